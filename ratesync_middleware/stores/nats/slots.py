"""Concurrency slots on NATS KV: one value per group, each process's claim leased and renewed.

The value (docs/engines/nats.md, "Slots") maps each process holding slots of the group to
`[count, expires_at_ns]`. This process's claim is the truth of how many slots it holds, written
by compare-and-set:

- acquire: `count + admitted`, for every acquire waiting in this process at once (one write);
- release: `count - 1`, at once in this process and written in the background, coalesced with
  any other release or acquire of the group (one write for all of them);
- every writer drops the claims whose lease ended (a process that died): no one else is needed;
- a heartbeat renews this process's claims, one write per group held per `lease/3`, whatever
  the traffic (a group written meanwhile for an acquire or a release needs none);
- an acquire that may wait (`timeout`) watches the group's KV subject and tries again when it
  is written (a release, anywhere) or when another claim's lease ends: no polling;
- a reset deletes the value: a process that reads it without its own live claim knows that
  its slots were freed, and forgets them (its holders' releases then give back nothing).

What this process counts as held never exceeds what its stored claim says (a slot is counted
once its write landed, and uncounted before the release is written), so the sum of live claims
bounds the requests in flight across every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import nats.js.errors

from ...bucket import Decision
from ...errors import StoreError, StoreUnavailableError
from ...slots import Slots, live_holders
from .errors import NatsFailure, is_wrong_last_sequence
from .wire import decode_slots, encode_slots

if TYPE_CHECKING:
    from .store import NatsStore

__all__ = ["SlotKeeper", "holder_id"]

T = TypeVar("T")

_MIN_TICK = 0.05  # seconds: the heartbeat's shortest period
_MAX_TICK = 5.0
_MAX_IDLE_GROUPS = 10_000  # groups whose state is kept without a slot held (their revision)
_LAPSE_MARGIN = 0.01  # seconds after a claim's lease end before a waiter looks again


def holder_id() -> str:
    """This process's name in slots values: host, pid and a random part (a new one per store)."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(eq=False, slots=True)
class _Group:
    """What this process knows of one group's slots value."""

    slots: Slots
    holders: dict[str, tuple[int, int]] = field(default_factory=dict)  # as last read/written
    revision: int | None = None  # None: unknown, the next write reads first
    held: int = 0  # slots this process holds now (its requests in flight)
    stored: int = 0  # this process's count in the stored value; -1: unknown (a failed write)
    stored_until: int = 0  # the lease end written with it (ns since the epoch)
    ticket: int = 0  # of the slots held: a reset gives the group a new one
    waiters: list[tuple[asyncio.Future[Decision], float]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None

    @property
    def dirty(self) -> bool:
        return self.held != self.stored


class SlotKeeper:
    """The concurrency slots of one `NatsStore`: acquire, release, heartbeat."""

    def __init__(self, store: NatsStore) -> None:
        self._store = store
        self.holder = holder_id()
        self._groups: dict[str, _Group] = {}
        self._tickets = itertools.count(1)
        self._heartbeat: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def forget_revisions(self) -> None:
        """The bucket may have changed under us (reconnected, re-created): read before writing."""
        for group in self._groups.values():
            group.revision = None

    def drain(self) -> list[asyncio.Task[None]]:
        """Start writing every release not written yet (on the store's loop, before it closes):
        the tasks to wait for."""
        if self._loop is not asyncio.get_running_loop():
            return []
        for key, group in self._groups.items():
            if group.dirty:
                self._flush_soon(key, group)
        return [g.flusher for g in self._groups.values() if g.flusher is not None]

    def unwritten(self) -> int:
        """Slots released here that the stored claims still count (they come back when the
        claim's lease ends); a claim whose write failed counts as one."""
        return sum(
            group.stored - group.held if group.stored >= 0 else 1
            for group in self._groups.values()
            if group.stored > group.held or (group.stored < 0 and group.dirty)
        )

    def forget(self, key: str) -> None:
        """`key` was reset: the next write reads first, and finds whether its claim is gone."""
        group = self._groups.get(key)
        if group is not None:
            group.revision = None

    def close(self) -> None:
        """Stop the heartbeat and the writers (the claims lapse by themselves)."""
        tasks = [self._heartbeat, *(g.flusher for g in self._groups.values())]
        self._heartbeat = None
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
        self._groups.clear()
        self._loop = None

    # -- acquire and release -------------------------------------------------------------------

    async def acquire(self, key: str, slots: Slots, timeout: float = 0.0) -> Decision:
        """Take a slot; with `timeout`, wait up to so many seconds for one when none is free."""
        decision = await self._acquire(key, slots)
        if decision.allowed or timeout <= 0:
            return decision
        return await self._wait(key, slots, time.monotonic() + timeout)

    async def _wait(self, key: str, slots: Slots, until: float) -> Decision:
        """Try again whenever the group's value changes (a release anywhere is a write to its
        KV subject, which this watches) or the earliest other claim lapses (a dead holder
        writes nothing), until `until`: no polling."""
        changed = asyncio.Event()
        watch = await self._store.watch(key, changed.set)
        try:
            while True:  # first, a release between the refusal and the watch
                changed.clear()  # a change during this attempt wakes the wait below at once
                decision = await self._acquire(key, slots)
                left = until - time.monotonic()
                if decision.allowed or left <= 0:
                    return decision
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left, self._next_lapse(key)))
        finally:
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    def _next_lapse(self, key: str) -> float:
        """Seconds until the earliest claim of another process lapses (inf: none known)."""
        group = self._groups.get(key)
        now = self._store.now_ns()
        ends = [
            until
            for holder, (count, until) in (group.holders.items() if group else ())
            if holder != self.holder and count > 0 and until > now
        ]
        return (min(ends) - now) / 1e9 + _LAPSE_MARGIN if ends else math.inf

    async def _acquire(self, key: str, slots: Slots) -> Decision:
        store = self._store
        deadline = time.monotonic() + store.config.timeout
        await store.ensure_ready(deadline)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.close()
            self._loop = loop
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(slots, ticket=next(self._tickets))
            if len(self._groups) > _MAX_IDLE_GROUPS:
                self._drop_idle()
        store.check_backoff()
        future: asyncio.Future[Decision] = loop.create_future()
        group.waiters.append((future, deadline))
        self._flush_soon(key, group)
        return await future

    def release(self, key: str, ticket: int) -> None:
        """Give back one slot of `key`'s group taken with `ticket`; from any thread, never
        blocking."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # the store was closed: its claims lapse with their lease
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release(key, ticket)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._release, key, ticket)

    def _release(self, key: str, ticket: int) -> None:
        group = self._groups.get(key)
        if group is None or group.held < 1 or group.ticket != ticket:
            return  # a reset freed it, or the store was closed and reopened (the claim lapses)
        group.held -= 1
        self._flush_soon(key, group)

    def _flush_soon(self, key: str, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        if group.flusher is None or group.flusher.done():
            group.flusher = loop.create_task(self._flush(key, group))
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = loop.create_task(self._beat())

    def _drop_idle(self) -> None:
        for key in [k for k, g in self._groups.items() if not g.held and not g.dirty]:
            group = self._groups[key]
            if group.flusher is None and not group.waiters:
                del self._groups[key]
            if len(self._groups) <= _MAX_IDLE_GROUPS // 2:
                break

    async def _flush(self, key: str, group: _Group) -> None:
        """Write the group's waiting acquires and its releases, batch after batch."""
        try:
            while group.waiters or group.dirty:
                batch = [w for w in group.waiters if not w[0].done()]
                group.waiters = []
                deadline = batch[0][1] if batch else time.monotonic() + self._store.config.timeout
                try:
                    decisions = await self._commit(key, group, len(batch), deadline)
                except StoreError as error:
                    for future, _ in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not group.waiters:
                        return  # the heartbeat writes what is left once the store answers
                    continue
                except BaseException as error:
                    failure = StoreUnavailableError(f"slots interrupted ({type(error).__name__})")
                    for future, _ in [*batch, *group.waiters]:
                        if not future.done():
                            future.set_exception(failure)
                    group.waiters = []
                    raise
                for (future, _), decision in zip(batch, decisions, strict=True):
                    if future.done():  # its caller went away: give its slot back
                        if decision.allowed:
                            group.held -= 1
                    else:
                        future.set_result(decision)
        finally:
            group.flusher = None

    async def _commit(
        self, key: str, group: _Group, wanted: int, deadline: float, *, renew: bool = False
    ) -> list[Decision]:
        """Admit up to `wanted` acquires in arrival order and write this process's claim."""
        store = self._store
        subject = store.subject(key)
        slots = group.slots
        read_first = group.revision is None
        while True:
            if read_first:
                data, revision = await self._call(
                    store.read_raw(subject, self._left(deadline)), group
                )
                holders, problem = decode_slots(data)
                if problem is not None:
                    store.foreign_value(subject, problem)
                mine = holders.get(self.holder)
                if mine is None and group.stored > 0 and group.stored_until > store.now_ns():
                    # Our live claim is gone: a reset deleted the value. The slots it freed are
                    # no longer ours to count, nor to give back.
                    group.held, group.ticket = 0, next(self._tickets)
                group.holders, group.revision = holders, revision
                group.stored, group.stored_until = mine if mine is not None else (0, 0)
            now = store.now_ns()
            others = live_holders(group.holders, now, self.holder)
            in_use = sum(count for count, _ in others.values())
            held = group.held
            decisions = []
            for _ in range(wanted):
                if in_use + held < slots.limit:
                    held += 1
                    decisions.append(slots.allowed(in_use + held, group.ticket))
                else:
                    decisions.append(slots.refused(in_use + held))
            admitted = held - group.held
            if wanted > admitted and not read_first:
                read_first = True  # a refusal from a cached value: others may have released
                continue
            lapsed = len(others) != sum(1 for h in group.holders if h != self.holder)
            renewing = held > 0 and (renew or group.stored_until - now < slots.lease_ns * 2 // 3)
            if held == group.stored and not lapsed and not renewing:
                group.held += admitted
                return decisions  # nothing to write: the stored claim already says so
            claims = dict(others)
            until = now + slots.lease_ns
            if held:
                claims[self.holder] = (held, until)
            payload = encode_slots(slots.limit, slots.lease_ns, claims)
            # Kept by the server while a claim is live (its lease), then removed.
            ttl = store.ttl_until(max((end for _, end in claims.values()), default=now))
            try:
                revision = await self._call(
                    store.write_raw(
                        subject, payload, group.revision or 0, self._left(deadline), ttl
                    ),
                    group,
                    writing=True,
                )
            except nats.js.errors.APIError:  # lost the compare-and-set (see `_call`)
                if time.monotonic() >= deadline:
                    raise StoreUnavailableError(
                        f"store {store.config.name!r}: slots {key!r} still contended after "
                        f"{store.config.timeout:g}s of compare-and-set retries"
                    ) from None
                read_first = True
                continue
            group.holders, group.revision = claims, revision
            group.stored, group.stored_until = held, until if held else 0
            group.held += admitted
            return decisions

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreUnavailableError(
                f"store {self._store.config.name!r}: the slots deadline passed"
            )
        return left

    async def _call(self, call: Awaitable[T], group: _Group, *, writing: bool = False) -> T:
        """One round trip; a failure leaves the stored value unknown (a write may still land)."""
        store = self._store
        try:
            return await call
        except nats.js.errors.APIError as error:
            if writing and is_wrong_last_sequence(error):
                raise  # lost a race: nothing landed, the caller reads and retries
            failure: StoreError = store.call_failure(error, alone=False)
        except NatsFailure as error:
            failure = store.call_failure(error, alone=store.alone(error))
        group.revision = None
        if writing:
            group.stored = -1  # our claim as stored is unknown: the next write sets it
        raise failure

    # -- the heartbeat -------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Renew this process's claims (one write per group held per lease/3) and write the
        releases that a failure left unwritten. Stops when nothing is held."""
        tick = _MIN_TICK
        while True:
            await asyncio.sleep(tick)
            groups = self._groups.items()
            busy = [(k, g) for k, g in groups if g.held or g.dirty or g.waiters or g.flusher]
            if not busy:
                self._heartbeat = None
                return
            lease = min(g.slots.lease_ns for _, g in busy) / 1e9
            tick = min(_MAX_TICK, max(_MIN_TICK, lease / 6))
            now = self._store.now_ns()
            for key, group in busy:
                due = group.stored_until - now < group.slots.lease_ns * 2 // 3
                if (group.dirty or (group.held and due)) and group.flusher is None:
                    group.flusher = asyncio.get_running_loop().create_task(self._renew(key, group))

    async def _renew(self, key: str, group: _Group) -> None:
        try:
            await self._commit(key, group, 0, time.monotonic() + self._store.config.timeout)
        except StoreError:
            pass  # tried again at the next beat; the store logged and backs off
        finally:
            group.flusher = None
        if group.waiters or group.dirty:
            self._flush_soon(key, group)
