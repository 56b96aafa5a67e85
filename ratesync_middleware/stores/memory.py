"""The embedded store: buckets in a dict of this process, for development and single-process apps."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import OrderedDict
from typing import Any

from ..algorithms import Algorithm, AlgorithmLike
from ..bucket import Decision, Policy, consume, peek
from ..slots import Slots
from .base import Clock, wall_clock

_SWEEP_EVERY = 8  # writes between two looks for idle buckets (a power of two)


class MemoryStore:
    """Per-process state of every group, safe under coroutines and threads, bounded in memory.

    A token bucket's entry is its `tat` (an int); any other algorithm's is `(idle_at, state)`.
    An entry idle since `idle_at` is the same as no entry at all (a full bucket, an empty
    window), so such entries are dropped as they age out of the least-recently-used end. Past
    `max_keys` live entries the oldest is dropped even if not idle (an over-admission
    documented in the docs).
    """

    def __init__(self, max_keys: int = 100_000, clock: Clock = wall_clock) -> None:
        self._states: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._clock = clock
        self._writes = 0
        # group key -> (slots taken (> 0), their ticket): a group's ticket is new each time its
        # first slot is taken, so a release of a slot that a reset freed matches nothing
        self._held: dict[str, tuple[int, int]] = {}
        self._tickets = itertools.count(1)
        # group key -> the acquires waiting for a slot (`timeout`), oldest first
        self._released: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def hit_now(self, key: str, policy: Algorithm, cost: int = 1, max_wait_ns: int = 0) -> Decision:
        """The synchronous core of `hit`: nothing here ever waits (a reserved admission's
        `Decision.wait` is the caller's to sleep)."""
        now = self._clock()
        with self._lock:
            states = self._states
            if type(policy) is Policy:  # the common case, kept lean: the entry is the tat
                tat = states.get(key, 0)
                new, decision = consume(
                    policy, tat if type(tat) is int else 0, now, cost, max_wait_ns
                )
                stored: Any = new
            else:
                algorithm: AlgorithmLike = policy
                new, decision = algorithm.consume(self._state(key, policy), now, cost, max_wait_ns)
                stored = None if new is None else (algorithm.idle_at(new), new)
            if stored is not None:
                states[key] = stored
                states.move_to_end(key)
                self._writes += 1
                if not self._writes & (_SWEEP_EVERY - 1) or len(states) > self._max_keys:
                    self._drop_idle(now)
            return decision

    def settle(self, key: str, policy: Algorithm, receipt: int, reserved: int, actual: int) -> None:
        now = self._clock()
        with self._lock:
            if type(policy) is Policy:
                tat = self._states.get(key, 0)
                settled: Any = policy.settle(
                    tat if type(tat) is int else 0, now, receipt, reserved, actual
                )
                stored: Any = settled
            else:
                algorithm: AlgorithmLike = policy
                settled = algorithm.settle(self._state(key, policy), now, receipt, reserved, actual)
                stored = None if settled is None else (algorithm.idle_at(settled), settled)
            if stored is not None:
                self._states[key] = stored

    def _state(self, key: str, policy: Algorithm) -> Any:
        """The state of `key` for a non-token-bucket `policy` (empty when none or another kind's)."""
        entry = self._states.get(key)
        return entry[1] if type(entry) is tuple else policy.empty

    def _drop_idle(self, now: int) -> None:
        # Amortised O(1): every few writes, look at as many of the oldest entries as writes
        # happened, twice over; and enforce the hard bound.
        states = self._states
        for _ in range(2 * _SWEEP_EVERY):
            entry = states[next(iter(states))]
            if (entry if type(entry) is int else entry[0]) > now:
                break
            states.popitem(last=False)
        while len(states) > self._max_keys:
            states.popitem(last=False)

    async def hit(
        self, key: str, policy: Algorithm, cost: int = 1, max_wait_ns: int = 0
    ) -> Decision:
        return self.hit_now(key, policy, cost, max_wait_ns)

    def acquire_slot_now(self, key: str, slots: Slots) -> Decision:
        """Take a slot of the group at `key` if one of `slots.limit` is free."""
        with self._lock:
            return self._take_slot(key, slots)

    def _take_slot(self, key: str, slots: Slots) -> Decision:
        held, ticket = self._held.get(key) or (0, 0)
        if held >= slots.limit:
            return slots.refused(held)
        if not held:
            ticket = next(self._tickets)
        self._held[key] = (held + 1, ticket)
        return slots.allowed(held + 1, ticket)

    async def acquire_slot(self, key: str, slots: Slots, timeout: float = 0.0) -> Decision:
        """Take a slot, waiting up to `timeout` seconds for a release when none is free."""
        decision = self.acquire_slot_now(key, slots)
        if decision.allowed or timeout <= 0:
            return decision
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not decision.allowed and (left := deadline - loop.time()) > 0:
            released: asyncio.Future[None] = loop.create_future()
            waiter = (loop, released)
            with self._lock:
                decision = self._take_slot(key, slots)  # a release just before we listen
                if decision.allowed:
                    break
                self._released.setdefault(key, []).append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(released), left)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                pass
            except BaseException:  # cancelled: a wake-up it got goes to the next waiter
                with self._lock:
                    if waiter not in self._released.get(key, ()):
                        self._wake_next(key)
                raise
            finally:
                with self._lock:
                    listeners = self._released.get(key)
                    if listeners is not None and waiter in listeners:
                        listeners.remove(waiter)
                        if not listeners:
                            del self._released[key]
            decision = self.acquire_slot_now(key, slots)
        return decision

    def release_slot(self, key: str, slots: Slots, ticket: int) -> None:
        with self._lock:
            held, current = self._held.get(key) or (0, 0)
            if current != ticket:
                return  # a reset freed that slot already
            if held > 1:
                self._held[key] = (held - 1, ticket)
            else:
                del self._held[key]
            self._wake_next(key)

    def _wake_next(self, key: str) -> None:
        """Wake the oldest acquire waiting for a slot of `key` (from any thread: on its own
        loop); one per slot given back. Called under the lock."""
        listeners = self._released.get(key)
        if listeners:
            loop, released = listeners.pop(0)
            if not listeners:
                del self._released[key]
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                loop.call_soon_threadsafe(_wake, released)

    def slots_held(self, key: str) -> int:
        """The slots taken now in the group at `key` (tests, `ratesync`)."""
        held, _ = self._held.get(key) or (0, 0)
        return held

    async def peek(self, key: str, policy: Algorithm) -> Decision:
        now = self._clock()
        with self._lock:
            if type(policy) is Policy:
                tat = self._states.get(key, 0)
                return peek(policy, tat if type(tat) is int else 0, now)
            algorithm: AlgorithmLike = policy
            return algorithm.peek(self._state(key, policy), now)

    async def reset(self, key: str) -> None:
        with self._lock:
            self._states.pop(key, None)
            if self._held.pop(key, None) is not None:
                for _ in range(len(self._released.get(key, ()))):
                    self._wake_next(key)  # each tries again; those still refused wait again

    async def aclose(self) -> None:
        """Nothing to release; state survives so a closed-then-reused limiter keeps its buckets."""


def _wake(released: asyncio.Future[None]) -> None:
    if not released.done():
        released.set_result(None)
