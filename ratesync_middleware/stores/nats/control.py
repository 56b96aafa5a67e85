"""The fleet's control plane on NATS: what one process or an operator changes, every process hears.

Overrides and bans live in a KV bucket of their own, `<bucket>_rules` (no TTL: a rule without
one stays until removed), which every process watches into memory (`RulesWatcher`).

Resets (docs/engines/nats.md, "The control plane"): whoever resets a group deletes its key and
then publishes the key on the bucket's control subject `ratesync.<bucket>.reset` (core NATS, no
JetStream); every process sharing the bucket subscribes to it and forgets its cached state of
that key, so its next decision reads the key again. Nothing of this is on a request's path.

What the subject can miss is covered elsewhere: a process that was disconnected drops its whole
cache when it reconnects (store.py), and a denial answered from the cache is checked against
NATS again once it is older than `RECHECK_NS` (a plain `nats kv del` publishes nothing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Literal

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig
from nats.js.kv import KeyValue

from ...bucket import Policy
from ...config import StoreConfig
from ...rules import Ban, Override, Rules, override_key
from .slots import holder_id
from .wire import KV_OPERATION

__all__ = [
    "EVENT_INTERVAL",
    "HEARTBEAT_SECONDS",
    "RECHECK_NS",
    "Events",
    "Presence",
    "ResetListener",
    "RulesWatcher",
    "decode_rule",
    "encode_rule",
    "events_subject",
    "fleet",
    "open_rules",
    "reset_subject",
    "rule_key",
    "rules_bucket",
    "rules_subject",
]

logger = logging.getLogger("ratesync_middleware.nats")

_RULES_RETRY_SECONDS = 5.0

RECHECK_NS = 1_000_000_000
"""A denial answered from a cached state older than this reads the key first (DESIGN.md: 1 s)."""


def reset_subject(bucket: str) -> str:
    """The core NATS subject on which resets of `bucket`'s keys are announced."""
    return f"ratesync.{bucket}.reset"


class ResetListener:
    """Subscribes one connection to its bucket's resets and hands each reset key to `forget`."""

    def __init__(self, bucket: str, forget: Callable[[str], None]) -> None:
        self.subject = reset_subject(bucket)
        self._forget = forget

    async def start(self, nc: NatsClient) -> None:
        await nc.subscribe(self.subject, cb=self._on_reset)

    async def _on_reset(self, message: Msg) -> None:
        try:
            key = message.data.decode("ascii")
        except UnicodeDecodeError:
            return  # not a key of ours (keys are ASCII): nothing to forget
        self._forget(key)

    async def announce(self, nc: NatsClient, key: str) -> None:
        """Tell every process sharing the bucket that `key` was reset (after it was deleted)."""
        await nc.publish(self.subject, key.encode("ascii"))
        await nc.flush()


# -- overrides and bans: the rules bucket ----------------------------------------------------------


def rules_bucket(bucket: str) -> str:
    """The KV bucket holding the overrides and bans of `bucket`'s groups (no TTL, history 1)."""
    return f"{bucket}_rules"


def rules_subject(bucket: str) -> str:
    """Where a writer of rules tells the processes to look for the rules bucket again."""
    return f"ratesync.{bucket}.rules"


def rule_key(kind: RuleKind, group: str) -> str:
    """The rules bucket's key of one group's ban or override: `ban.<group>`, `override.<group>`."""
    return f"{kind}.{group}"


RuleKind = Literal["ban", "override"]
Rule = Ban | Override


def encode_rule(rule: Rule) -> bytes:
    """A rule as the rules bucket stores it (docs/engines/nats.md, "Overrides and bans")."""
    if isinstance(rule, Ban):
        return f'{{"v":1,"kind":"ban","until_ns":{rule.until_ns}}}'.encode()
    policy = rule.policy
    return (
        f'{{"v":1,"kind":"override","name":{json.dumps(policy.name)},'
        f'"interval_ns":{policy.interval_ns},"burst":{policy.burst},"until_ns":{rule.until_ns}}}'
    ).encode()


def decode_rule(data: bytes | None) -> Rule | None:
    """The rule of a stored value; None for anything else (it is ignored)."""
    try:
        value = json.loads(data or b"")
        until = value["until_ns"]
        if not isinstance(until, int) or until < 0:
            return None
        if value["kind"] == "ban":
            return Ban(until)
        if value["kind"] == "override":
            policy = Policy(str(value["name"]), value["interval_ns"], value["burst"])
            if isinstance(policy.interval_ns, int) and isinstance(policy.burst, int):
                return Override(policy, until)
    except (ValueError, KeyError, TypeError):
        pass
    return None


async def open_rules(js: JetStreamContext, config: StoreConfig, *, create: bool = True) -> KeyValue:
    """The rules bucket of `config`'s bucket, created when missing, `create` and `auto_create`.

    Application processes only look for it (opening a store costs no stream creation); whoever
    writes the first rule creates it and nudges them (`rules_subject`).
    """
    name = rules_bucket(config.bucket_name)
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        if not (create and config.auto_create):
            raise
    return await js.create_key_value(
        KeyValueConfig(bucket=name, history=1, replicas=config.replicas, direct=True)
    )


class RulesWatcher:
    """Keeps a `Rules` equal to the rules bucket: every value at start, every change after.

    An ordered consumer of the last value of each key (`$KV.<bucket>_rules.>`): operator
    traffic only, a few messages a day, whatever the request rate. Started again after each
    reconnect; a missing bucket is looked for again every few seconds.
    """

    def __init__(self, config: StoreConfig, rules: Rules, forget: Callable[[str], None]) -> None:
        self._config = config
        self._rules = rules
        self._forget = forget
        self._prefix = f"$KV.{rules_bucket(config.bucket_name)}."
        self._subscription: Any = None
        self._missing_logged = False
        self._nudged = asyncio.Event()
        self.settled = asyncio.Event()
        """Set once the rules in force are loaded, or the first attempt to watch them failed."""

    def restart(self) -> None:
        """Before `run` on a new connection: the rules are to be loaded again."""
        self.settled = asyncio.Event()
        self._nudged = asyncio.Event()  # (on this loop: a forked child runs another)

    async def run(self, js: JetStreamContext) -> None:
        """Subscribe (retrying while the bucket is missing or the call fails); then return."""
        await self.stop()
        settled = self.settled
        while True:
            self._nudged.clear()  # a nudge during this attempt makes the next one start at once
            try:
                await open_rules(js, self._config, create=False)
                self._subscription = subscription = await js.subscribe(
                    self._prefix + ">",
                    stream=f"KV_{rules_bucket(self._config.bucket_name)}",  # no name lookup
                    cb=self._on_update,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    inactive_threshold=300.0,
                )
                info = await subscription.consumer_info()
                if info.num_pending == 0 and subscription.delivered == 0:
                    settled.set()  # no rule at all (else the last one delivered sets it)
                return
            except Exception as error:  # no bucket yet, no permission, a failing call
                settled.set()
                if not self._missing_logged:
                    self._missing_logged = True
                    logger.info(
                        "store %r: no overrides or bans (rules bucket %r: %s); looking again "
                        "when a rule is written, and every %gs",
                        self._config.name,
                        rules_bucket(self._config.bucket_name),
                        type(error).__name__,
                        _RULES_RETRY_SECONDS,
                    )
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), _RULES_RETRY_SECONDS)

    async def nudge(self, message: Msg) -> None:
        """A rule was written (maybe the bucket just created): look again now if not watching."""
        self._nudged.set()

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with suppress(Exception):
                await subscription.unsubscribe()

    async def _on_update(self, message: Msg) -> None:
        self._apply(message)
        with suppress(Exception):
            if message.metadata.num_pending == 0:
                self.settled.set()

    def _apply(self, message: Msg) -> None:
        kind, _, group = message.subject[len(self._prefix) :].partition(".")
        headers = message.headers or {}
        removed = KV_OPERATION in headers or "Nats-Marker-Reason" in headers
        rule = None if removed else decode_rule(message.data)
        if kind == "override":
            self._forget(override_key(group))  # an override starts from a full bucket
        if kind in ("ban", "override"):
            self._rules.set(kind, group, rule)


# -- presence: who shares the bucket ---------------------------------------------------------------

HEARTBEAT_SECONDS = 5.0
"""How often a process announces itself; a peer not heard for three of them is gone."""


def presence_subject(bucket: str) -> str:
    """Where processes sharing `bucket` announce themselves (`.who`: asks all of them at once)."""
    return f"ratesync.{bucket}.presence"


class Presence:
    """This process's heartbeat on its bucket's presence subject, and the peers it hears.

    One small message per `HEARTBEAT_SECONDS` per process, whatever the traffic; a process that
    closes its store says goodbye, one that crashed is forgotten after three missed beats.
    `ratesync fleet` publishes on `<subject>.who` and every process answers at once.
    """

    def __init__(self, bucket: str, limiters: list[str]) -> None:
        self.subject = presence_subject(bucket)
        self.identity = {
            "id": holder_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": _version(),
            "limiters": sorted(limiters),
            "heartbeat_seconds": HEARTBEAT_SECONDS,
        }
        self.peers: dict[str, tuple[dict[str, Any], float]] = {}  # id -> (identity, heard at)
        self._nc: NatsClient | None = None
        self._last_beat = time.monotonic()  # of the last heartbeat sent while connected

    def live(self) -> int:
        """Processes heard within three heartbeats of this one's last, this one included.

        While this process cannot reach NATS it hears nobody: the count from before holds.
        """
        horizon = self._last_beat - 3 * HEARTBEAT_SECONDS
        return 1 + sum(1 for _, heard in self.peers.values() if heard >= horizon)

    async def run(self, nc: NatsClient) -> None:
        """Announce this process now and every heartbeat, until cancelled."""
        self._nc = nc
        await nc.subscribe(self.subject, cb=self._on_peer)
        await nc.subscribe(self.subject + ".who", cb=self._on_who)
        with suppress(Exception):  # the others answer at once: this process knows them now
            await nc.publish(self.subject + ".who", b"")
        while True:
            if nc.is_connected:
                self._last_beat = time.monotonic()
            await self._announce(nc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _announce(self, nc: NatsClient, state: str = "up") -> None:
        with suppress(Exception):
            await nc.publish(self.subject, json.dumps({**self.identity, "state": state}).encode())

    async def _on_who(self, message: Msg) -> None:
        if self._nc is not None:
            await self._announce(self._nc)

    async def goodbye(self, nc: NatsClient) -> None:
        await self._announce(nc, "down")

    async def _on_peer(self, message: Msg) -> None:
        try:
            peer = json.loads(message.data)
            peer_id = str(peer["id"])
        except (ValueError, KeyError, TypeError):
            return
        if peer_id == self.identity["id"]:
            return
        if peer.get("state") == "down":
            self.peers.pop(peer_id, None)
        else:
            self.peers[peer_id] = (peer, time.monotonic())


async def fleet(nc: NatsClient, bucket: str, listen: float = 1.0) -> list[dict[str, Any]]:
    """The processes sharing `bucket` now: each answers a `.who` within `listen` seconds."""
    subject = presence_subject(bucket)
    heard: dict[str, dict[str, Any]] = {}

    async def on_peer(message: Msg) -> None:
        with suppress(ValueError, KeyError, TypeError):
            peer = json.loads(message.data)
            if peer.get("state") == "down":
                heard.pop(str(peer["id"]), None)
            else:
                heard[str(peer["id"])] = peer

    subscription = await nc.subscribe(subject, cb=on_peer)
    try:
        await nc.publish(subject + ".who", b"")
        await nc.flush()
        await asyncio.sleep(listen)
    finally:
        await subscription.unsubscribe()
    return sorted(heard.values(), key=lambda peer: (str(peer.get("host")), int(peer.get("pid", 0))))


def _version() -> str:
    from ... import __version__

    return __version__


# -- events: denials, bans and overrides -----------------------------------------------------------

EVENT_INTERVAL = 1.0  # seconds: at most one denial summary per group per process per interval
_MAX_EVENT_GROUPS = 10_000  # groups summed per interval; more are counted as `other_groups`


def events_subject(bucket: str) -> str:
    """Where the processes sharing `bucket` publish their events (docs/engines/nats.md)."""
    return f"ratesync.{bucket}.events"


class Events:
    """Denials counted in memory and published once a second as one summary per group.

    The request path only adds to a dict; publishing is a background task that ends when a
    second passes without a denial. Bans and overrides are published as they are set.
    """

    def __init__(self, bucket: str, source: dict[str, Any]) -> None:
        self.subject = events_subject(bucket)
        self._source = {"host": source["host"], "pid": source["pid"]}
        self.denials: dict[str, int] = {}
        """Store key of a group -> its denials this second. Always this one dict (cleared,
        never replaced): a limiter adds to a group already counted without a call."""
        self._other = 0
        self._nc: NatsClient | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, nc: NatsClient) -> None:
        self._nc = nc

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None
        self._nc = None
        self.denials.clear()  # (a group counted here would never start the publisher again)

    def denied(self, group: str) -> None:
        """Count one denial of `group` (its store key); from the store's event loop."""
        counts = self.denials
        count = counts.get(group)
        if count is not None:
            counts[group] = count + 1
            return  # the publisher runs: it was started with the group's first denial
        if len(counts) < _MAX_EVENT_GROUPS:
            counts[group] = 1
        else:
            self._other += 1
        if self._task is None and self._nc is not None:
            self._task = asyncio.get_running_loop().create_task(self._publish_summaries())

    async def _publish_summaries(self) -> None:
        try:
            while True:
                await asyncio.sleep(EVENT_INTERVAL)
                counts, other, self._other = dict(self.denials), self._other, 0
                self.denials.clear()
                nc = self._nc
                if not counts or nc is None or not nc.is_connected:
                    return  # idle (or cut off: these counts are dropped)
                for group, denied in counts.items():
                    limiter = group.split(".", 1)[0]  # a limiter name has no dot
                    await self._publish(
                        nc,
                        {"type": "denied", "limiter": limiter, "group": group, "count": denied},
                    )
                if other:
                    await self._publish(nc, {"type": "denied", "other_groups": other})
        finally:
            self._task = None

    async def rule(self, kind: str, group: str, rule: Rule | None) -> None:
        """Publish a ban, unban, override or the end of an override as it is set."""
        nc = self._nc
        if nc is None:
            return
        event: dict[str, Any] = {"type": kind if rule is not None else f"{kind}_removed"}
        event["group"] = group
        if rule is not None:
            event["until_ns"] = rule.until_ns
            if isinstance(rule, Override):
                event["policy"] = rule.policy.name
        await self._publish(nc, event)

    async def _publish(self, nc: NatsClient, event: dict[str, Any]) -> None:
        event = {"v": 1, **event, **self._source, "at_ns": time.time_ns()}
        with suppress(Exception):
            await nc.publish(self.subject, json.dumps(event).encode())
