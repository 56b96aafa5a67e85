"""The shared store: one NATS JetStream Key-Value entry per group, written by compare-and-set.

The hot path (docs/engines/nats.md):
1. Each key's last known `(tat, revision)` is cached (bounded LRU); a write is tried with
   `expected last revision = cached` first, and the entry is read only after a conflict (for a
   key that other processes race for, before each write: the cache is surely stale then).
2. `tat` only grows, so a cached `tat` can only under-estimate the real one: when the cache already
   proves the bucket empty the answer is a denial without any round trip.
3. Concurrent decisions for one key in this process are queued and applied in arrival order by a
   single flusher, which writes their combined result with one compare-and-set.
4. Writes and reads are plain requests over one inbox subscription (`Replies`), cheaper than
   nats-py's `request()`.
Each decision has one deadline, from its start to its answer (queueing, opening, every round trip
included). After a failure, decisions fail at once until a short back-off ends, whatever the
socket says; a connection that stops answering is given up within seconds and opened afresh in
the background, one attempt per back-off.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamInfo

from ...algorithms import Algorithm, Settlement
from ...bucket import NS_PER_SECOND, Decision, peek
from ...config import StoreConfig
from ...errors import StoreError, StoreUnavailableError
from ...rules import Rules, override_key
from ...slots import Slots
from ..base import Clock, wall_clock
from .bucket import BucketOpener, key_expiry, precreate_command
from .control import (
    RECHECK_NS,
    Events,
    Presence,
    ResetListener,
    Rule,
    RuleKind,
    RulesWatcher,
    decode_rule,
    encode_rule,
    open_rules,
    rule_key,
    rules_bucket,
    rules_subject,
)
from .errors import (
    BucketGoneError,
    DeadlineError,
    NatsFailure,
    SilentLinkError,
    StalledError,
    Translator,
    in_cluster,
    is_definite_connect_failure,
    is_permission_violation,
    is_wrong_last_sequence,
    refused_subject,
)
from .lease import Lease, lease_for, warm
from .slots import SlotKeeper
from .wire import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    KV_OPERATION,
    MESSAGE_TTL,
    PENDING_BUFFER_BYTES,
    STATUS,
    Replies,
    StoredEntry,
    ack_revision,
    decode_state,
    decode_value,
    encode_state,
)

logger = logging.getLogger("ratesync_middleware.nats")

_RECONNECT_WAIT = 0.5  # seconds between reconnect attempts to one server
_CONTENDED_SECONDS = 0.05  # after a lost compare-and-set, pace this key's writes for so long
_WARNING_INTERVAL = 10.0
_PROBE_SECONDS = 1  # after a missed deadline, a connection must answer a PING within this
_RECREATION_CHECK_SECONDS = 2.0  # how often the bucket's stream is checked for a re-creation
_CLOSE_SECONDS = 2.0
_EXPIRY_MARGIN = 1.0  # seconds after a key's TTL ends before it is taken for gone (server lag)

Waiter = tuple[Algorithm | Settlement, int, "asyncio.Future[Decision] | None", float, int]
"""One decision to write: its policy, its cost, who waits for it (None: the writer itself), its
deadline (monotonic seconds), and how long it may be admitted for later (ns, `timeout`). A
settle is written the same way, its `Settlement` in place of the policy."""


@dataclass(eq=False, slots=True)
class _KeyState:
    """What this process knows of one key, and the decisions waiting to be written to it."""

    state: Any = None  # the algorithm's state (a token bucket's tat, ...), when revision is known
    revision: int | None = None  # None: unknown, the next write must find out
    lost: bool = False  # a failure left it unknown (a write may have landed): read before writing
    busy: bool = False  # a write to this key is under way; new decisions queue in `waiters`
    contended_until: float = 0.0  # monotonic time until which other processes race for it
    checked_ns: int = 0  # when `state` was last read or written (the clock's time)
    waiters: list[Waiter] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    asked: int = 0  # units asked since the last write (how hot the key is: lease.py)
    observed_at: float = 0.0  # monotonic time of the last write, until the key has a lease
    lease: Lease | None = None  # tokens this process took of the key's bucket (lease.py)
    settling: int = 0  # settles queued or being written: a cached denial may be stale then
    expires_at: float = 0.0  # monotonic time the last write's per-message TTL ends (0: none)


class _NoTimeLeftError(DeadlineError):
    """A decision's deadline would pass before its round trip ends: nothing was sent."""


def _settle(waiters: list[Waiter], error: BaseException) -> None:
    """Fail the futures of `waiters` that are still pending."""
    for _, _, future, _, _ in waiters:
        if future is not None and not future.done():
            future.set_exception(error)


def _algorithm(policy: Algorithm | Settlement) -> Algorithm:
    """The key's algorithm, whether a waiter is a decision or a settle."""
    return policy.policy if isinstance(policy, Settlement) else policy


def _seconds_until(idle_at_ns: int, now_ns: int) -> int:
    """A per-message TTL: whole seconds until a state is full again, at least the server's 1."""
    return max(1, -(-(idle_at_ns - now_ns) // NS_PER_SECOND))


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background task's exception as seen: its callers got it, or nobody needs it."""
    if not task.cancelled():
        task.exception()


class NatsStore:
    """Buckets in a NATS JetStream KV bucket, shared by every process that names it.

    `windows_ns` maps the limiters on this store to their refill times (`Policy.window_ns`): the
    bucket's max age must cover the longest, see `bucket.py`.
    """

    def __init__(
        self,
        config: StoreConfig,
        clock: Clock = wall_clock,
        *,
        windows_ns: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._stream = f"KV_{config.bucket_name}"
        self._prefix = f"$KV.{config.bucket_name}."
        self._bucket = BucketOpener(config, windows_ns or {}, Translator(config, ""))
        self._errors = Translator(
            config, precreate_command(config.bucket_name, self._bucket.ttl_seconds)
        )
        self._bucket.translator = self._errors
        self._cache: OrderedDict[str, _KeyState] = OrderedDict()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._replies: Replies | None = None
        self._direct_get = f"$JS.API.DIRECT.GET.{self._stream}."  # + subject: its last message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Task[JetStreamContext] | None = None
        self._opened_before = False  # since then, reopening never holds a decision up
        self._probe: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stream_created: datetime | None = None
        self._highest_ack = 0  # stream sequences only grow, unless the stream was re-created
        self._direct = False
        self._msg_ttl = False  # writes carry `Nats-TTL` (the bucket allows per-message TTL)
        self._retry_at = 0.0  # monotonic time before which calls fail at once
        self._last_error: StoreError | None = None
        self._connect_errors: list[BaseException] = []
        self._permission_denied = False
        self._refused: tuple[str, float] | None = None  # a subject of the bucket refused, when
        self._last_warnings: dict[str, float] = {}  # a warning's format -> when it was logged
        self._settles: set[asyncio.Future[Decision]] = set()  # settles on their way to NATS
        self._closing = False  # draining in `aclose`: failures are counted, not logged each
        self._last_foreign_warning = 0.0
        self._failing = False  # a call failed since the last answer
        self.on_answering_again: Callable[[], None] | None = None  # after failures (limiter.py)
        self._round_trip = 0.0005  # seconds, a moving average of successful writes
        self._last_reply = 0.0  # monotonic time of the last answer NATS gave to a decision
        self._slots = SlotKeeper(self)
        self._resets = ResetListener(config.bucket_name, self.forget)
        self.rules = Rules(loaded=False)  # this bucket's overrides and bans, watched
        self._rules_watch = RulesWatcher(config, self.rules, self.forget)
        self._rules_task: asyncio.Task[None] | None = None
        self._presence = Presence(config.bucket_name, list(windows_ns or {}))
        self._presence_task: asyncio.Task[None] | None = None
        self.events = Events(config.bucket_name, self._presence.identity)

    def __repr__(self) -> str:
        servers = ", ".join(self.config.redacted_servers)
        return f"NatsStore({self.config.name!r}, servers=[{servers}], bucket={self.config.bucket_name!r})"

    # -- connection -------------------------------------------------------------------------

    async def ready(self, deadline: float | None = None) -> JetStreamContext:
        """The JetStream context, connecting and opening the bucket on first use.

        Raises the seed guide's errors at start-up, `StoreUnavailableError` during a back-off.
        After the first attempt, opening happens in the background: a decision waits for it
        until its `deadline` at most, and others fail at once meanwhile.
        """
        js, nc = self._js, self._nc
        loop = asyncio.get_running_loop()
        if js is not None and nc is not None and self._loop is loop:
            if nc.is_connected:
                return js
            if not nc.is_closed:  # nats-py is reconnecting by itself
                raise self._failed(
                    StoreUnavailableError(f"store {self.config.name!r}: reconnecting to NATS")
                )
        if self._loop is not None and self._loop is not loop:
            self._forget_connection()  # opened on another (now dead) loop: start afresh here
            self._opening = self._probe = self._watcher = None
            self._opened_before = False
            self._loop = None
        if time.monotonic() < self._retry_at and self._last_error is not None:
            raise self._last_error  # one open attempt per back-off
        # The first attempt at start-up holds its callers (for `connect_timeout` at most); any
        # later one is a background task that holds a decision until its deadline at most.
        patient = deadline is None or (not self._opened_before and self._last_error is None)
        opening = self._opening
        if opening is not None and not opening.done():
            if deadline is not None and not patient:
                raise StoreUnavailableError(
                    f"store {self.config.name!r}: (re)connecting to NATS, an attempt is under way"
                )
            return await asyncio.shield(opening)
        opening = self._opening = loop.create_task(self._open_once())
        opening.add_done_callback(_retrieve)
        if deadline is None or patient:
            return await asyncio.shield(opening)
        await asyncio.wait({opening}, timeout=max(0.0, deadline - time.monotonic()))
        if not opening.done():
            raise DeadlineError(
                f"store {self.config.name!r}: connecting to NATS took longer than the deadline"
            )
        return opening.result()

    async def _open_once(self) -> JetStreamContext:
        try:
            await self._open()
        except StoreError as error:
            raise self._failed(error) from None
        js = self._js
        if js is None:  # dropped while the rules loaded (a probe gave the connection up)
            raise self._failed(
                StoreUnavailableError(
                    f"store {self.config.name!r}: the connection to NATS was lost while opening"
                )
            )
        return js

    def _failed(self, error: StoreError) -> StoreError:
        """Record a failure: calls fail at once with `error` until the back-off ends."""
        self._last_error = error
        self._retry_at = time.monotonic() + self.config.backoff
        self._failing = True
        return error

    def _answered_late(self) -> None:
        """A reply came after its request's deadline: NATS answers again (a pause, a loop that
        was starved of CPU). A back-off that a silent link opened ends at once."""
        if isinstance(self._last_error, DeadlineError) and time.monotonic() < self._retry_at:
            self._retry_at = 0.0

    def _answers_again(self) -> None:
        """The first answer after failures: the `on_answering_again` hook logs it."""
        self._failing = False
        hook = self.on_answering_again
        if hook is not None:
            hook()

    def _forget_connection(self) -> None:
        self._nc = self._js = self._replies = None
        self.events.stop()
        self._cache.clear()
        self._slots.forget_revisions()
        current = asyncio.current_task()
        on_own_loop = self._loop is asyncio.get_running_loop()
        for task in (self._probe, self._watcher, self._rules_task, self._presence_task):
            if task is not None and task is not current and not task.done() and on_own_loop:
                task.cancel()

    def _drop_connection(self) -> None:
        """Forget the connection now and close it in the background."""
        nc = self._nc
        self._forget_connection()
        if nc is not None:
            asyncio.get_running_loop().create_task(self._close_client(nc))

    async def _open(self) -> None:
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=self.config.timeout)
            # Opening (or creating: a replicated stream needs its raft group) is a management
            # call made once per connection, given the connect deadline rather than a decision's.
            setup = nc.jetstream(timeout=max(self.config.timeout, self.config.connect_timeout))
            info = await self.open_bucket(setup)
            replies = Replies(nc, on_late_answer=self._answered_late)
            await replies.start()
            await self._resets.start(nc)
            await nc.subscribe(rules_subject(self.config.bucket_name), cb=self._rules_watch.nudge)
        except BaseException:
            await self._close_client(nc)
            raise
        self._direct = bool(info.config.allow_direct)
        version = nc.connected_server_version
        self._msg_ttl, expiry = key_expiry(info, (version.major, version.minor))
        if not self._opened_before:
            logger.info(
                "store %r: KV bucket %r: %s", self.config.name, self.config.bucket_name, expiry
            )
        self._nc, self._js, self._replies = nc, js, replies
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._opened_before = True
        self._last_reply = time.monotonic()
        self._cache.clear()
        self._highest_ack = 0
        self._stream_created = info.created
        self._watcher = self._loop.create_task(self._watch_stream(nc, setup))
        self._presence_task = self._loop.create_task(self._presence.run(nc))
        self.events.start(nc)
        self._rules_watch.restart()
        self._rules_task = self._loop.create_task(self._rules_watch.run(setup))
        # The bans in force apply from the first decision on: wait for them, briefly.
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._rules_watch.settled.wait(), self.config.connect_timeout)
        self.rules.mark_loaded()

    async def connect(self) -> NatsClient:
        """Connect within `connect_timeout` over all URLs.

        Fails at once when every URL failed for good in a row (refused, not resolved, or
        credentials rejected): nats-py would try them again until the deadline. Only a server
        that does not answer at all (a black hole) costs the whole `connect_timeout`.
        """
        loop = asyncio.get_running_loop()
        self._connect_errors = []
        self._permission_denied = False
        rejected: asyncio.Future[None] = loop.create_future()
        nc = NatsClient()
        definite_in_a_row = 0

        async def on_error(error: Exception) -> None:
            nonlocal definite_in_a_row
            if nc.is_connected:
                self._on_runtime_error(error)
                return
            self._connect_errors.append(error)
            definite_in_a_row = definite_in_a_row + 1 if is_definite_connect_failure(error) else 0
            # nats-py tries the URLs in turn: as many failures in a row as URLs covers each.
            if definite_in_a_row >= len(self.config.servers) and not rejected.done():
                rejected.set_result(None)

        connecting = loop.create_task(nc.connect(**self._connect_options(nc, on_error)))
        waiting: set[asyncio.Future[None]] = {connecting, rejected}
        await asyncio.wait(
            waiting,
            timeout=self.config.connect_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
            return nc
        connecting.cancel()
        with suppress(BaseException):
            await connecting
        await self._close_client(nc)
        raise self._errors.connect_failure(self._connect_errors)

    def _connect_options(self, nc: NatsClient, on_error: Any) -> dict[str, Any]:
        config = self.config

        async def on_disconnected() -> None:
            if self._nc is nc:  # not while connecting or closing
                self._warn("store %r: disconnected from NATS, reconnecting", config.name)

        async def on_reconnected() -> None:
            logger.info("store %r: reconnected to NATS", config.name)
            self._cache.clear()
            self._slots.forget_revisions()
            self._check_stream_soon()  # the server may have lost, or re-created, the bucket
            self._watch_rules_again()  # its consumer may be gone with the server

        options: dict[str, Any] = {
            "servers": list(config.servers),
            "name": "ratesync-middleware",
            "connect_timeout": config.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": _RECONNECT_WAIT,
            "pending_size": PENDING_BUFFER_BYTES,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
        }
        if config.token:
            options["token"] = config.token
        if config.creds:
            options["user_credentials"] = config.creds
        if config.nkey:
            options["nkeys_seed"] = config.nkey
        tls = self._tls_context()
        if tls is not None:
            options["tls"] = tls
        return options

    def _tls_context(self) -> ssl.SSLContext | None:
        config = self.config
        if not (config.tls_ca or config.tls_cert):
            return None
        context = ssl.create_default_context(cafile=config.tls_ca)
        if config.tls_cert:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        return context

    def _connect_failure(self) -> StoreError:
        return self._errors.connect_failure(self._connect_errors)

    async def open_bucket(self, js: JetStreamContext) -> StreamInfo:
        """Open the bucket, creating it with the guide's settings when allowed and missing."""
        return await self._bucket.open(js, lambda: self._permission_denied)

    def _jetstream_failure(self, error: BaseException) -> StoreError:
        """The seed guide's error for a failed management call (`ratesync check` shows it)."""
        return self._errors.bucket_failure(
            error, permission_denied=self._permission_denied, clustered=in_cluster(self._nc)
        )

    def _on_runtime_error(self, error: Exception) -> None:
        if is_permission_violation(error):
            self._permission_denied = True
            refusal = refused_subject(error)
            if refusal is not None:
                refusal = self._bucket_refusal(refusal)
            if refusal is not None:
                self._refused = (refusal, time.monotonic())
        # A permissions violation names the subject refused (what to grant); nothing secret.
        shown = str(error) if is_permission_violation(error) else type(error).__name__
        self._warn("store %r: NATS reported %s", self.config.name, shown)

    def _bucket_refusal(self, refusal: str) -> str | None:
        """`publish to <subject>` when the subject is one a decision waits on (its write, its
        read or its reply), else None. nats-py lowercases the server's text: the bucket's
        prefix gets its case back (the rest of the subject may have had capitals)."""
        action, _, subject = refusal.rpartition(" ")
        for prefix in (self._prefix, self._direct_get, "_INBOX.", "$JS.API."):
            if subject.lower().startswith(prefix.lower()):
                return f"{action} {prefix}{subject[len(prefix) :]}"
        return None

    def _recent_refusal(self) -> str | None:
        """The bucket's subject the server refused within the last deadline (and a second)."""
        refused = self._refused
        if refused is None or time.monotonic() - refused[1] > self.config.timeout + 1.0:
            return None
        return refused[0]

    def _warn(self, message: str, *args: object) -> None:
        """One line per kind of warning (its format) every `_WARNING_INTERVAL` at most: a flood
        of one kind (disconnects) never hides another (a settle that failed)."""
        now = time.monotonic()
        if now - self._last_warnings.get(message, -_WARNING_INTERVAL) >= _WARNING_INTERVAL:
            self._last_warnings[message] = now
            logger.warning(message, *args)

    # -- a connection that hangs, a bucket that was re-created --------------------------------

    def _suspect_connection(self) -> None:
        """A call missed its deadline: check in the background that the connection answers."""
        nc = self._nc
        if (
            nc is None
            or not nc.is_connected
            or (self._probe is not None and not self._probe.done())
        ):
            return
        self._probe = asyncio.get_running_loop().create_task(self._probe_connection(nc))

    async def _probe_connection(self, nc: NatsClient) -> None:
        replies = self._replies
        answers = replies.answers if replies is not None else 0
        try:
            # A PING queued behind everything written so far: its PONG proves the link drains.
            await asyncio.wait_for(nc.flush(timeout=_PROBE_SECONDS), _PROBE_SECONDS + 0.5)
        except NatsFailure:
            if replies is not None and replies.answers != answers:
                return  # the PONG is late, but requests are answered: a busy link, not a hung one
            if self._nc is nc and nc.is_connected:
                self._give_up(nc, f"no answer to a PING within {_PROBE_SECONDS}s")

    def _give_up(self, nc: NatsClient, why: str) -> None:
        """The connection hangs (its outgoing buffer does not drain): open a new one."""
        if self._nc is not nc:
            return
        logger.warning(
            "store %r: the connection to NATS hangs (%s); opening a new one", self.config.name, why
        )
        self._failed(StalledError(f"store {self.config.name!r}: the connection to NATS hangs"))
        self._drop_connection()

    def _watch_rules_again(self) -> None:
        task, nc = self._rules_task, self._nc
        if task is not None and not task.done():
            task.cancel()
        if nc is not None:
            setup = nc.jetstream(timeout=max(self.config.timeout, self.config.connect_timeout))
            self._rules_watch.restart()
            self._rules_task = asyncio.get_running_loop().create_task(self._rules_watch.run(setup))

    def _check_stream_soon(self) -> None:
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
        nc, js = self._nc, self._js
        if nc is not None and js is not None:
            setup = nc.jetstream(timeout=max(self.config.timeout, self.config.connect_timeout))
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_stream(nc, setup, first_delay=0.0)
            )

    async def _watch_stream(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        first_delay: float = _RECREATION_CHECK_SECONDS,
    ) -> None:
        """Every few seconds, compare the stream's creation time with the one we opened.

        A bucket deleted and created again (`nats kv rm` + `nats kv add`) restarts its sequences
        at 1, so a cached revision can match a newer key's and a stale state would overwrite it:
        the cache is dropped as soon as the new stream is seen. Costs no request of a decision.
        """
        delay = first_delay
        while self._nc is nc:
            await asyncio.sleep(delay)
            delay = _RECREATION_CHECK_SECONDS
            if not nc.is_connected:
                continue
            try:
                info = await js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                self._cache.clear()  # deleted: writes get no responders and reopen it
                continue
            except Exception:  # a failed check is tried again next time
                continue
            if self._nc is not nc:
                return
            self._note_stream(info.created)

    def _note_stream(self, created: datetime | None) -> None:
        if created is None or created == self._stream_created:
            return
        if self._stream_created is not None:
            logger.warning(
                "store %r: KV bucket %r was re-created (stream created %s); forgetting the "
                "cached state of %d keys",
                self.config.name,
                self.config.bucket_name,
                created.isoformat(),
                len(self._cache),
            )
        self._stream_created = created
        self._highest_ack = 0
        for state in self._cache.values():
            state.revision, state.lost = None, True
        self._slots.forget_revisions()

    @staticmethod
    async def _close_client(nc: NatsClient) -> None:
        try:
            await asyncio.wait_for(nc.close(), _CLOSE_SECONDS)
        except Exception:
            # A hung link keeps nats-py's close waiting to flush: drop the socket instead
            # (a private attribute of nats-py 2.16's TCP transport; best effort).
            writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
            with suppress(Exception):
                writer.transport.abort()  # type: ignore[union-attr]

    async def aclose(self) -> None:
        """Write what this process owes NATS (queued settles and refunds, slot releases, the
        unused tokens of leases) within the store `timeout`, then close. What could not be
        written is counted in one WARNING."""
        if self._loop is asyncio.get_running_loop():
            await self._drain(time.monotonic() + self.config.timeout)
        nc = self._nc
        self._forget_connection()
        self._slots.close()
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
        for state in self._cache.values():
            if state.flusher is not None:
                state.flusher.cancel()
        if nc is not None and not nc.is_closed and self._loop is asyncio.get_running_loop():
            if nc.is_connected:  # peers forget this process at once, not after 3 heartbeats
                with suppress(Exception):
                    await asyncio.wait_for(self._presence.goodbye(nc), self.config.timeout)
            await self._close_client(nc)

    async def _drain(self, deadline: float) -> None:
        """Wait, until `deadline`, for the settles and slot releases on their way, then give
        back unused lease tokens; one WARNING counts what did not reach NATS."""
        self._closing = True  # until the store opens again: failures are counted here
        await asyncio.sleep(0)  # settles and releases sent from other threads are queued
        settles = list(self._settles)
        releases = self._slots.drain()
        pending: set[asyncio.Future[Any]] = {*settles, *releases}
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        unsettled = sum(
            1
            for written in settles
            if not written.done() or written.cancelled() or written.exception() is not None
        )
        unreleased = self._slots.unwritten()
        unreturned = await self._return_leases(deadline)
        lost = [
            f"{count} {what}"
            for count, what in (
                (unsettled, "settles or refunds"),
                (unreleased, "slot releases"),
                (unreturned, "lease returns"),
            )
            if count
        ]
        if lost:
            error = self._last_error if time.monotonic() < self._retry_at else None
            logger.warning(
                "store %r: closing with %s not written to NATS (%s); what they would have "
                "given back stays charged until it refills or its lease ends",
                self.config.name,
                ", ".join(lost),
                error or f"no answer within {self.config.timeout:g}s",
            )

    # -- what the slots (slots.py) use of the store ---------------------------------------------

    async def ensure_ready(self, deadline: float) -> None:
        """Connect (within `deadline`) unless connected on this loop already."""
        nc = self._nc
        if (
            self._js is None
            or nc is None
            or not nc.is_connected
            or self._loop is not asyncio.get_running_loop()
        ):
            await self.ready(deadline)

    def check_backoff(self) -> None:
        """Raise the last failure while its back-off is in force."""
        if time.monotonic() < self._retry_at and self._last_error is not None:
            raise self._last_error

    def subject(self, key: str) -> str:
        return self._prefix + key

    def now_ns(self) -> int:
        return self._clock()

    def foreign_value(self, subject: str, problem: str) -> None:
        self._foreign_value(subject, problem)

    def alone(self, error: BaseException) -> bool:
        return self._alone(error)

    def call_failure(self, error: BaseException, *, alone: bool) -> StoreError:
        """A round trip failed: the store's error for it (and the back-off unless `alone`)."""
        return self._call_failure(_KeyState(), error, alone=alone)

    async def watch(self, key: str, changed: Callable[[], None]) -> Subscription:
        """Call `changed` on every write to `key` (a core subscription to its KV subject), until
        the subscription is unsubscribed: how a waiting acquire learns of a release."""
        nc = self._nc
        if nc is None:
            raise StoreUnavailableError(f"store {self.config.name!r}: not connected to NATS")

        async def on_write(_: Msg) -> None:
            changed()

        with self._errors.calls("watch"):
            return await nc.subscribe(self._prefix + key, cb=on_write)

    async def acquire_slot(self, key: str, slots: Slots, timeout: float = 0.0) -> Decision:
        return await self._slots.acquire(key, slots, timeout)

    def release_slot(self, key: str, slots: Slots, ticket: int) -> None:
        self._slots.release(key, ticket)

    # -- decisions --------------------------------------------------------------------------

    async def hit(
        self, key: str, policy: Algorithm, cost: int = 1, max_wait_ns: int = 0
    ) -> Decision:
        deadline = 0.0  # the decision's, from its start: taken only when it is needed
        nc = self._nc
        if (
            self._js is None
            or nc is None
            or not nc.is_connected
            or self._loop is not asyncio.get_running_loop()
        ):
            deadline = time.monotonic() + self.config.timeout
            await self.ready(deadline)
        cache = self._cache
        state = cache.get(key)
        if state is None:
            state = cache[key] = _KeyState(asked=cost)
            if len(cache) > self.config.max_keys:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
            lease = state.lease
            if lease is not None:
                state.asked += cost  # denials too: a key at the limit stays hot
                if lease.runs and lease.policy is policy:
                    leased = self._from_lease(key, state, lease, cost)
                    if leased is not None:
                        return leased  # a token this process leased: no round trip
            else:
                state.asked += cost
            if state.revision is not None:
                clock_now = self._clock()
                admitted, decision = policy.consume(state.state, clock_now, cost, max_wait_ns)
                if admitted is None:
                    # The cache proves the bucket empty (for longer than the request may wait:
                    # the real state can only make it wait longer): no round trip; unless a
                    # settle of this process is on its way (a refund?): then decide in its
                    # batch, after it; or it was cached long ago (a reset elsewhere?): then
                    # read it first.
                    if state.settling:
                        pass
                    elif clock_now - state.checked_ns < RECHECK_NS:
                        return decision
                    else:
                        state.lost = True
                elif lease is not None and lease.holding and not max_wait_ns and not state.settling:
                    held = lease.hold_back(state.state, clock_now, cost)
                    if held is not None:
                        return held  # a hot key at the limit: see `Lease.hold_back`
        now = time.monotonic()
        if now < self._retry_at and self._last_error is not None:
            raise self._last_error  # a call just failed: answer at once, whatever the socket says
        if not deadline:
            deadline = now + self.config.timeout
        if state.busy or state.contended_until > now:
            # Another decision is writing this key, or other processes race for it: join the
            # next batch (the flusher paces a contended key's writes, see `_flush`).
            future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            state.waiters.append((policy, cost, future, deadline, max_wait_ns))
            if not state.busy:
                state.busy = True
                state.flusher = asyncio.get_running_loop().create_task(self._flush(key, state))
            return await future
        # The key is idle: write this decision here, without a task or a future.
        state.busy = True
        try:
            batch: list[Waiter] = [(policy, cost, None, deadline, max_wait_ns)]
            return (await self._commit(key, state, batch))[0]
        except _NoTimeLeftError:
            raise  # nothing was sent: the key's state is still known
        except BaseException:
            state.revision = None  # interrupted or failed: what NATS holds is unknown
            state.lost = True
            raise
        finally:
            state.busy = False
            if state.waiters:  # decisions that arrived meanwhile
                state.busy = True
                state.flusher = asyncio.get_running_loop().create_task(self._flush(key, state))

    async def _flush(self, key: str, state: _KeyState) -> None:
        """Write the waiting decisions of one key, batch after batch, until none is left."""
        try:
            while state.waiters:
                contended = state.contended_until > time.monotonic()
                if contended:
                    # Back-to-back writes from here would starve the other processes, which
                    # must read before they write: leave them a round trip, and batch more.
                    await asyncio.sleep(self._round_trip)
                # A waiter whose caller went away is not written: nobody would be told.
                batch = [w for w in state.waiters if w[2] is None or not w[2].done()]
                state.waiters = []
                if state.lease is not None and state.lease.runs:
                    batch = self._serve_from_lease(state, state.lease, batch)
                if not batch:
                    continue
                # Arrival order is deadline order: the batch must answer by its first's.
                deadline = batch[0][3]
                try:
                    if time.monotonic() < self._retry_at and self._last_error is not None:
                        raise self._last_error  # a call just failed: answer the rest at once
                    # Others wrote the key meanwhile, almost surely: read before writing.
                    decisions = await self._commit(
                        key, state, batch, read_first=contended, deadline=deadline
                    )
                except StoreError as error:
                    _settle(batch, error)
                    continue
                except BaseException as error:
                    state.revision, state.lost = None, True
                    failure = StoreUnavailableError(
                        f"decision interrupted ({type(error).__name__})"
                    )
                    _settle([*batch, *state.waiters], failure)
                    state.waiters = []
                    raise
                for (_, _, future, _, _), decision in zip(batch, decisions, strict=True):
                    if future is not None and not future.done():
                        future.set_result(decision)
        finally:
            state.flusher = None
            state.busy = False

    async def _commit(
        self,
        key: str,
        state: _KeyState,
        batch: list[Waiter],
        *,
        read_first: bool = False,
        deadline: float | None = None,
        policy: Algorithm | None = None,
    ) -> list[Decision]:
        """Apply `batch` in arrival order to the key's state and write it with compare-and-set.

        The cached state is tried first unless `read_first`; after a conflict it is read again.
        Every round trip, and the retries after lost races, end by `deadline`. A hot key's
        write also takes a lease (lease.py); `policy` is the key's when `batch` is empty (a
        lease renewed ahead of need).
        """
        if deadline is None:
            deadline = time.monotonic() + self.config.timeout
        algorithm = _algorithm(batch[0][0]) if batch else policy
        assert algorithm is not None
        leasing = self._leasing(state, algorithm)
        run: tuple[int, int] | None = None
        subject = self._prefix + key
        read_first = read_first or state.lost
        while True:
            if read_first:
                remaining = deadline - time.monotonic()
                if not self._fits(remaining):
                    raise self._no_time_left(key)
                try:
                    state.state, state.revision = await self._read(subject, remaining, algorithm)
                    state.lost, state.checked_ns, state.expires_at = False, self._clock(), 0.0
                    self._last_reply = time.monotonic()
                    if self._failing:
                        self._answers_again()
                except NatsFailure as read_error:
                    raise self._call_failure(
                        state, read_error, alone=self._alone(read_error)
                    ) from None
            now = self._clock()
            last_policy: Algorithm | Settlement | None = None
            new_state: Any = state.state if state.revision is not None else algorithm.empty
            decisions = []
            for waiter_policy, cost, _, _, max_wait in batch:
                # A request admitted for later is reserved in this same write (`timeout`).
                admitted, decision = waiter_policy.consume(new_state, now, cost, max_wait)
                if admitted is not None:
                    new_state, last_policy = admitted, waiter_policy
                decisions.append(decision)
            if leasing is not None:
                run = leasing.slots(new_state, now, self._round_trip)
                if run is not None:
                    new_state, last_policy = run[1], leasing.policy
            if last_policy is None:
                return decisions  # nothing admitted: nothing to write
            started = time.monotonic()
            remaining = deadline - started
            if not self._fits(remaining):
                raise self._no_time_left(key)
            written = _algorithm(last_policy)
            ttl = _seconds_until(written.idle_at(new_state), now) if self._msg_ttl else 0
            last = state.revision or 0
            if last and state.expires_at and started >= state.expires_at + _EXPIRY_MARGIN:
                last = 0  # its TTL has ended: the server removed the key (else: read, retry)
            try:
                payload = encode_state(written, new_state)
                revision = await self.write_raw(subject, payload, last, remaining, ttl)
            except nats.js.errors.APIError as error:
                if not is_wrong_last_sequence(error):
                    raise self._call_failure(state, error) from None
                state.contended_until = time.monotonic() + _CONTENDED_SECONDS
                if time.monotonic() >= deadline:
                    # NATS is healthy, others just kept winning the race: fail this batch only
                    # (no back-off), and nothing of it landed (a rejected write never does).
                    raise StoreUnavailableError(
                        f"store {self.config.name!r}: key {key!r} still contended after "
                        f"{self.config.timeout:g}s of compare-and-set retries"
                    ) from None
                read_first = True
                continue
            except NatsFailure as error:
                alone = self._alone(error)
                raise self._call_failure(state, error, alone=alone) from None
            state.state, state.revision, state.lost = new_state, revision, False
            state.expires_at = started + ttl if ttl else 0.0
            if run is not None and leasing is not None:
                leasing.add(*run, self._round_trip)
            state.checked_ns = now
            if revision <= self._highest_ack:
                self._check_stream_soon()  # the stream's sequence went back: re-created?
            self._highest_ack = revision
            # A moving average of the write round trip paces contended keys.
            self._last_reply = replied = time.monotonic()
            self._round_trip += (replied - started - self._round_trip) / 16
            if self._failing:
                self._answers_again()
            return decisions

    # -- settles (Admission.finish, Permit.settle) ---------------------------------------------

    def settle(self, key: str, policy: Algorithm, receipt: int, reserved: int, actual: int) -> None:
        """Queue the settle with the key's decisions (one compare-and-set for all that wait),
        on the store's loop, from any thread; never blocks. Through the shared bucket, also for
        a key this process leases: the refund is one the bucket could have made itself."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # closed: nothing this store admitted is left to settle
        settlement = Settlement(policy, receipt, reserved, actual)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._queue_settlement(key, settlement)
        else:
            with suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._queue_settlement, key, settlement)

    def _queue_settlement(self, key: str, settlement: Settlement) -> None:
        loop = asyncio.get_running_loop()
        state = self._cache.get(key)
        if state is None:
            state = self._cache[key] = _KeyState()
            if len(self._cache) > self.config.max_keys:
                self._cache.popitem(last=False)
        if state.revision is None:
            state.lost = True  # a refund of an unknown state would be lost: read it first
        written: asyncio.Future[Decision] = loop.create_future()
        written.add_done_callback(lambda done: self._settled(key, state, done))
        self._settles.add(written)
        state.settling += 1
        state.waiters.append((settlement, 0, written, time.monotonic() + self.config.timeout, 0))
        if not state.busy:
            state.busy = True
            state.flusher = loop.create_task(self._flush(key, state))

    def _settled(self, key: str, state: _KeyState, written: asyncio.Future[Decision]) -> None:
        state.settling -= 1
        self._settles.discard(written)
        error = None if written.cancelled() else written.exception()
        if error is not None and not self._closing:  # closing: counted in one line
            self._warn(
                "store %r: key %r: a settle was not written (%s); the admission stays charged "
                "as it was",
                self.config.name,
                key,
                error,
            )

    # -- leases (lease.py) -----------------------------------------------------------------------

    def _leasing(self, state: _KeyState, algorithm: Algorithm) -> Lease | None:
        """The key's lease when the key is hot enough to lease, else None (a plain write)."""
        asked, state.asked = state.asked, 0
        now = time.monotonic()
        lease = state.lease
        if lease is None or lease.policy is not algorithm:
            # A cold key costs one comparison per write: its lease is made once it warms up.
            observed_at, state.observed_at = state.observed_at, now
            if not warm(asked, now - observed_at):
                return None
            lease = state.lease = lease_for(algorithm)
            if lease is None:
                return None
        return lease if lease.observe(asked, now) else None

    def _from_lease(self, key: str, state: _KeyState, lease: Lease, cost: int) -> Decision | None:
        """Admit from the key's lease, renewing it in the background as it runs low; the
        headers are those of the shared bucket as this process last wrote or read it."""
        now = self._clock()
        if not lease.take(now, cost):
            return None
        if not state.busy and lease.wants_refill(now):
            state.busy = True
            state.flusher = asyncio.get_running_loop().create_task(
                self._refill(key, state, lease.policy)
            )
            state.flusher.add_done_callback(_retrieve)
        return peek(lease.policy, state.state, now, now)

    def _serve_from_lease(
        self, state: _KeyState, lease: Lease, batch: list[Waiter]
    ) -> list[Waiter]:
        """Answer waiters from a lease that landed while they queued; the rest, to be written."""
        now = self._clock()
        rest = []
        for waiter in batch:
            policy, cost, future, _, _ = waiter
            if future is not None and policy is lease.policy and lease.take(now, cost):
                future.set_result(peek(lease.policy, state.state, now, now))
            else:
                rest.append(waiter)
        return rest

    async def _refill(self, key: str, state: _KeyState, policy: Algorithm) -> None:
        """Renew a hot key's lease ahead of need, then write what queued meanwhile."""
        try:
            now = time.monotonic()
            if now >= self._retry_at or self._last_error is None:  # not during a back-off
                await self._commit(
                    key, state, [], read_first=state.contended_until > now, policy=policy
                )
        except StoreError:
            pass  # the lease runs out: the next decisions take the plain path, and its answer
        except BaseException:
            state.revision, state.lost = None, True
            state.busy, state.flusher = False, None
            raise
        state.busy, state.flusher = False, None
        if state.waiters:
            state.busy = True
            state.flusher = asyncio.get_running_loop().create_task(self._flush(key, state))

    async def _return_leases(self, deadline: float) -> int:
        """Give back the unused tokens of leases whose write is still the key's last (then
        GCRA allows it: nobody holds a slot after them), before the connection closes; how
        many could not be given back (they come back by themselves as the bucket refills)."""
        returnable = []
        now = self._clock()
        for key, state in self._cache.items():
            lease = state.lease
            unused = lease.unused(now) if lease is not None else None
            if lease is None or unused is None or state.revision is None:
                continue
            if unused[1] != state.state:
                continue  # others wrote after the lease: its slots are not the last ones
            lease.drop()
            returnable.append((key, state, lease.policy, max(unused[0], now)))
        if not returnable:
            return 0
        nc = self._nc
        left = deadline - time.monotonic()
        if nc is None or not nc.is_connected or time.monotonic() < self._retry_at or left <= 0:
            return len(returnable)  # NATS is failing, or the time is up
        returns = [
            self.write_raw(
                self._prefix + key,
                encode_state(policy, tat),
                state.revision or 0,
                left,
                self.ttl_until(policy.idle_at(tat)),
            )
            for key, state, policy, tat in returnable
            if not state.busy
        ]
        results = await asyncio.gather(*returns, return_exceptions=True)
        busy = len(returnable) - len(returns)  # still writing at the deadline
        return busy + sum(isinstance(result, BaseException) for result in results)

    def _fits(self, remaining: float) -> bool:
        """Whether a round trip fits in `remaining` seconds, by the moving average of the last
        ones. A decision with half its deadline left is always sent: a burst of slow round
        trips could otherwise push the average past the deadline, and a store that sends
        nothing would never measure it coming back down."""
        return remaining >= min(self._round_trip, self.config.timeout / 2)

    def _no_time_left(self, key: str) -> _NoTimeLeftError:
        """A decision that queued behind other writes may have less time left than a round
        trip takes: it fails alone, at once, sending nothing (the key's state stays known)."""
        return _NoTimeLeftError(
            f"store {self.config.name!r}: key {key!r}: the decision's deadline would pass "
            f"before a round trip to NATS (~{self._round_trip * 1000:.0f} ms) ends"
        )

    def _alone(self, error: BaseException) -> bool:
        """Whether a failed round trip fails only its own batch, without opening the back-off.

        A missed deadline opens the back-off only on evidence that NATS stopped answering: no
        reply at all to any request since this one was sent, once the replies that already
        arrived are read (`SilentLinkError`: a hang, a black hole, a partition; every call
        would miss, whatever the socket says). While other requests are answered (a slow
        link, a CPU-starved process reading its replies late), a miss fails alone: its round
        trip did not fit in what was left of its deadline. A back-off opened by a silent link
        ends with the first reply that comes, late or not (`_answered_late`). Every miss has
        the connection checked (`_suspect_connection`). So has a request refused before it was
        sent because the outgoing buffer is full: a burst, or a link that does not drain (then
        the PING goes unanswered and the connection is given up).
        """
        if isinstance(error, nats.errors.OutboundBufferLimitError):
            self._suspect_connection()
            return True
        if isinstance(error, SilentLinkError):
            self._suspect_connection()
            return False
        if isinstance(error, nats.errors.TimeoutError):
            self._suspect_connection()
            return True  # answered meanwhile (see `Replies.request`): slow, not dead
        if not isinstance(error, asyncio.TimeoutError):
            return False
        self._suspect_connection()  # a management call (a bucket without direct get)
        return time.monotonic() - self._last_reply < self.config.timeout

    def _call_failure(
        self, state: _KeyState, error: BaseException, *, alone: bool = False
    ) -> StoreError:
        """A store call failed: its write may still land, so the key's state is unknown now.

        The back-off opens, unless `alone`: then only this batch fails (see `_alone`).
        """
        if not isinstance(error, nats.errors.OutboundBufferLimitError):  # else: never sent
            state.revision, state.lost = None, True
        failure = self._errors.call_failure(
            error, refused=self._recent_refusal(), clustered=in_cluster(self._nc)
        )
        self._failing = True
        if alone:
            return failure
        if isinstance(failure, BucketGoneError):
            # Nobody stores `$KV.<bucket>.>` any more: the bucket was deleted. Open it afresh
            # (creating it when allowed) once the back-off ends.
            self._drop_connection()
        elif isinstance(failure, DeadlineError):
            self._suspect_connection()
        return self._failed(failure)

    def ttl_until(self, idle_at_ns: int) -> int:
        """The per-message TTL of a value whose state is full again at `idle_at_ns` (the
        store's clock), 0 when the bucket has none (slots.py)."""
        return _seconds_until(idle_at_ns, self._clock()) if self._msg_ttl else 0

    def _connected_replies(self) -> Replies:
        replies = self._replies
        if replies is None:  # the connection was dropped meanwhile (a deleted bucket)
            raise nats.errors.ConnectionClosedError
        return replies

    async def _read(self, subject: str, timeout: float, policy: Algorithm) -> tuple[Any, int]:
        """The stored `(state, revision)` of a subject; `(policy.empty, 0)` when it never existed."""
        data, revision = await self.read_raw(subject, timeout)
        if data is None:
            return policy.empty, revision
        value, problem = decode_state(policy, data)
        if problem is not None:
            self._foreign_value(subject, problem)
        return value, revision

    async def read_raw(self, subject: str, timeout: float) -> tuple[bytes | None, int]:
        """The stored value of a subject and its revision; None for none (0: it never existed)."""
        if self._direct:
            message = await self._connected_replies().request(
                self._direct_get + subject, b"", None, timeout
            )
            headers = message.headers or {}
            status = headers.get(STATUS)
            if status == "404":
                return None, 0
            if status is not None:
                raise nats.js.errors.APIError(
                    code=int(status) if status.isdigit() else None,
                    description=headers.get("Description") or f"direct get: status {status}",
                )
            revision = int(headers.get("Nats-Sequence") or 0)
            data: bytes | None = message.data
        else:  # a bucket made without direct get: the JetStream API
            stored = await asyncio.wait_for(self._get_message(subject), max(0.0, timeout))
            if stored is None:
                return None, 0
            headers, revision, data = stored.headers or {}, int(stored.seq or 0), stored.data
        if headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            return None, revision
        return data or None, revision

    async def write_raw(
        self, subject: str, payload: bytes, last_revision: int, timeout: float, ttl: int = 0
    ) -> int:
        """Store `payload` if the subject's last revision is `last_revision`; the new revision
        (with `ttl`: the server removes it that many seconds later unless written again)."""
        headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision)}
        if ttl:
            headers[MESSAGE_TTL] = f"{ttl}s"
        message = await self._connected_replies().request(subject, payload, headers, timeout)
        return ack_revision(message)

    def _foreign_value(self, subject: str, problem: str) -> None:
        now = time.monotonic()
        if now - self._last_foreign_warning >= _WARNING_INTERVAL:
            self._last_foreign_warning = now
            logger.warning(
                "store %r: key %r of KV bucket %r holds a value this version cannot read "
                "(%s); the next admitted decision overwrites it (docs/engines/nats.md, Value)",
                self.config.name,
                subject[len(self._prefix) :],
                self.config.bucket_name,
                problem,
            )

    async def _get_message(self, subject: str) -> RawStreamMsg | None:
        js = self._js
        if js is None:  # the connection was dropped meanwhile (a deleted bucket)
            raise nats.errors.ConnectionClosedError
        try:
            return await js.get_msg(self._stream, subject=subject, direct=self._direct)
        except nats.js.errors.NotFoundError:
            return None

    async def _read_entry(self, subject: str) -> StoredEntry | None:
        message = await self._get_message(subject)
        if message is None:
            return None
        headers = message.headers or {}
        return StoredEntry(
            key=subject[len(self._prefix) :],
            revision=int(message.seq or 0),
            written_at=message.time,
            deleted=headers.get(KV_OPERATION) in ("DEL", "PURGE"),
            value=decode_value(message.data),
            data=message.data,
        )

    async def read_entry(self, key: str) -> StoredEntry | None:
        """The stored entry of `key` as it is in NATS now; None when it never existed."""
        await self.ready()
        with self._errors.calls("read"):
            return await asyncio.wait_for(self._read_entry(self._prefix + key), self.config.timeout)

    async def peek(self, key: str, policy: Algorithm) -> Decision:
        deadline = time.monotonic() + self.config.timeout
        await self.ready(deadline)
        with self._errors.calls("read"):
            value, _ = await self._read(self._prefix + key, deadline - time.monotonic(), policy)
        return policy.peek(value, self._clock())

    async def reset(self, key: str) -> None:
        """Delete `key` and tell every process sharing the bucket to forget its cached state."""
        js = await self.ready()
        with self._errors.calls("reset"):
            await asyncio.wait_for(
                js.publish(self._prefix + key, b"", headers={KV_OPERATION: "DEL"}),
                self.config.timeout,
            )
            self.forget(key)
            nc = self._nc
            if nc is not None:
                await asyncio.wait_for(self._resets.announce(nc, key), self.config.timeout)

    async def set_rule(self, kind: RuleKind, group: str, rule: Rule | None) -> None:
        """Store (None: remove) the ban or override of `group`; every process applies it.

        An override's own state is reset first, so it starts from a full bucket everywhere.
        """
        await self.ready()
        if kind == "override":
            await self.reset(override_key(group))
        nc = self._nc
        assert nc is not None
        setup = nc.jetstream(timeout=max(self.config.timeout, self.config.connect_timeout))
        with self._errors.calls("rules"):
            kv = await open_rules(setup, self.config)
            if rule is None:
                await kv.delete(rule_key(kind, group))
            else:
                await kv.put(rule_key(kind, group), encode_rule(rule))
            await nc.publish(rules_subject(self.config.bucket_name), b"")  # processes not watching
        self.rules.set(kind, group, rule)
        await self.events.rule(kind, group, rule)

    async def read_rules(self) -> list[tuple[RuleKind, str, Rule]]:
        """Every rule stored now, expired ones included (`ratesync overrides`)."""
        await self.ready()
        nc = self._nc
        assert nc is not None
        setup = nc.jetstream(timeout=max(self.config.timeout, self.config.connect_timeout))
        found: list[tuple[RuleKind, str, Rule]] = []
        with self._errors.calls("rules"):
            try:
                kv = await setup.key_value(rules_bucket(self.config.bucket_name))
                keys = await kv.keys()
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
                return found
            for key in keys:
                kind, _, group = key.partition(".")
                entry = await kv.get(key)
                rule = decode_rule(entry.value)
                if rule is not None and kind in ("ban", "override"):
                    found.append(("ban" if kind == "ban" else "override", group, rule))
        return found

    async def subscribe(self, subject: str, callback: Any) -> Any:
        """A core NATS subscription on this store's connection (`ratesync top` and `watch`)."""
        await self.ready()
        nc = self._nc
        assert nc is not None
        return await nc.subscribe(subject, cb=callback)

    def live_processes(self) -> int:
        """The processes sharing the bucket, this one included, as presence last heard them
        while connected (during an outage nobody is heard: the count from before it holds)."""
        return self._presence.live()

    def forget(self, key: str) -> None:
        """Drop the cached state of `key` (a reset): the next decision reads it first."""
        self._slots.forget(key)
        state = self._cache.get(key)
        if state is not None:
            state.revision, state.lost = None, True
            state.lease = None  # its tokens came from the bucket before the reset
