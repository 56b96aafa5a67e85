"""The shared store: one NATS JetStream Key-Value entry per group, written by compare-and-set.

The hot path (docs/engines/nats.md):
1. Each key's last known `(tat, revision)` is cached (bounded LRU); a write is tried with
   `expected last revision = cached` first, and the entry is read only after a conflict (for a
   key that other processes race for, before each write: the cache is surely stale then).
2. `tat` only grows, so a cached `tat` can only under-estimate the real one: when the cache already
   proves the bucket empty the answer is a denial without any round trip.
3. Concurrent decisions for one key in this process are queued and applied in arrival order by a
   single flusher, which writes their combined result with one compare-and-set.
4. Writes and reads are plain requests over one inbox subscription (`_Replies`), cheaper than
   nats-py's `request()`.
Every call has a deadline; after a failure, calls fail at once until a short back-off ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamInfo

from ..bucket import Decision, Policy, consume, peek
from ..config import StoreConfig
from ..errors import (
    PRECREATE_COMMAND,
    AuthenticationError,
    BucketNotFoundError,
    ConnectionRefusedError,
    InsufficientPermissionsError,
    JetStreamNotEnabledError,
    StoreError,
    StoreUnavailableError,
)
from .base import Clock, wall_clock

logger = logging.getLogger("ratesync_middleware.nats")

BUCKET_TTL_SECONDS = 24 * 3600
BUCKET_HISTORY = 1
VALUE_VERSION = 1
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
_KV_OPERATION = "KV-Operation"
_STATUS = "Status"  # a reply's status header: "404" not found, "503" no responders
_NO_RESPONDERS = "503"
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
_RECONNECT_WAIT = 0.5  # seconds between reconnect attempts to one server
_CONTENDED_SECONDS = 0.05  # after a lost compare-and-set, pace this key's writes for so long
_WARNING_INTERVAL = 10.0


def encode_value(tat: int, policy: Policy) -> bytes:
    """The stored value: small JSON, versioned, with the policy so any reader can decode it."""
    return (
        f'{{"v":{VALUE_VERSION},"tat_ns":{tat},'
        f'"interval_ns":{policy.interval_ns},"burst":{policy.burst}}}'
    ).encode()


def decode_value(data: bytes | None) -> dict[str, int] | None:
    """The fields of a stored value, or None for an empty or foreign one (a full bucket)."""
    if not data:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    fields = {name: value.get(name) for name in ("v", "tat_ns", "interval_ns", "burst")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
        return None
    return fields  # type: ignore[return-value]


def decode_tat(data: bytes | None) -> int:
    """The `tat` of a stored value; 0 (a full bucket) for an empty or foreign value."""
    value = decode_value(data)
    return value["tat_ns"] if value is not None else 0


@dataclass(frozen=True)
class StoredEntry:
    """One key as NATS holds it, decoded (for `ratesync get` and `watch`)."""

    key: str
    revision: int
    written_at: datetime | None
    deleted: bool
    value: dict[str, int] | None

    def policy(self) -> Policy | None:
        """The policy the last writer used, when the value carries one."""
        if self.value is None or self.value["interval_ns"] < 1 or self.value["burst"] < 1:
            return None
        return Policy(self.key, self.value["interval_ns"], self.value["burst"])

    @property
    def tat_ns(self) -> int:
        return 0 if self.deleted or self.value is None else self.value["tat_ns"]


Waiter = tuple[Policy, int, "asyncio.Future[Decision] | None"]
"""One decision to write: its policy, its cost, and who waits for it (None: the writer itself)."""


@dataclass(eq=False, slots=True)
class _KeyState:
    """What this process knows of one key, and the decisions waiting to be written to it."""

    tat: int = 0
    revision: int | None = None  # None: unknown, the next write must find out
    busy: bool = False  # a write to this key is under way; new decisions queue in `waiters`
    contended_until: float = 0.0  # monotonic time until which other processes race for it
    waiters: list[Waiter] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None


class _Replies:
    """Request/reply for the hot path, over one wildcard inbox subscription per connection.

    nats-py's `request()` draws a random token, wraps the wait in `wait_for` and builds a response
    dataclass on every call: on a hot key that was a fifth of the CPU of a decision
    (docs/benchmarks.md). Here a token is a counter and the deadline one timer.
    """

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()

    async def start(self) -> None:
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, message: Msg) -> None:
        future = self._waiting.pop(message.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(message)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """The reply to one request; `nats.errors.TimeoutError` after `timeout` seconds."""
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            message = await future
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        if not message.data and (message.headers or {}).get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError  # nothing stores the subject: no bucket
        return message


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _ack_revision(message: Msg) -> int:
    """The stream sequence in a JetStream publish acknowledgement; `APIError` for an error."""
    try:
        ack = json.loads(message.data)
        error = ack.get("error")
        if error is None:
            return int(ack["seq"])
        code, err_code = error.get("code"), error.get("err_code")
        description = error.get("description")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise nats.js.errors.APIError(description="unreadable acknowledgement") from None
    raise nats.js.errors.APIError(code=code, description=description, err_code=err_code)


def _settle(waiters: list[Waiter], error: BaseException) -> None:
    """Fail the futures of `waiters` that are still pending."""
    for _, _, future in waiters:
        if future is not None and not future.done():
            future.set_exception(error)


def _is_auth_error(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, nats.errors.AuthorizationError) or "authorization violation" in text


def _is_permission_error(error: BaseException) -> bool:
    return "permissions violation" in str(error).lower()


class NatsStore:
    """Buckets in a NATS JetStream KV bucket, shared by every process that names it."""

    def __init__(self, config: StoreConfig, clock: Clock = wall_clock) -> None:
        self.config = config
        self._clock = clock
        self._stream = f"KV_{config.bucket_name}"
        self._prefix = f"$KV.{config.bucket_name}."
        self._cache: OrderedDict[str, _KeyState] = OrderedDict()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._replies: _Replies | None = None
        self._direct_get = f"$JS.API.DIRECT.GET.{self._stream}."  # + subject: its last message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._direct = False
        self._retry_at = 0.0  # monotonic time before which calls fail at once
        self._last_error: StoreError | None = None
        self._connect_errors: list[BaseException] = []
        self._permission_denied = False
        self._last_warning = 0.0
        self._round_trip = 0.0005  # seconds, a moving average of successful writes

    def __repr__(self) -> str:
        servers = ", ".join(self.config.redacted_servers)
        return f"NatsStore({self.config.name!r}, servers=[{servers}], bucket={self.config.bucket_name!r})"

    # -- connection -------------------------------------------------------------------------

    async def ready(self) -> JetStreamContext:
        """The JetStream context, connecting and opening the bucket on first use.

        Raises the seed guide's errors at start-up, `StoreUnavailableError` during a back-off.
        """
        js = self._js
        nc = self._nc
        if js is not None and nc is not None and nc.is_connected:
            if self._loop is asyncio.get_running_loop():
                return js
            self._forget_connection()  # opened on another (now dead) loop: start afresh here
        elif js is not None and nc is not None and not nc.is_closed:
            self._fail(StoreUnavailableError(f"store {self.config.name!r}: reconnecting to NATS"))
        if time.monotonic() < self._retry_at and self._last_error is not None:
            raise self._last_error
        if self._opening is None or self._loop is not asyncio.get_running_loop():
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._js is None or self._nc is None or self._nc.is_closed:
                try:
                    await self._open()
                except StoreError as error:
                    self._fail(error)
            assert self._js is not None
            return self._js

    def _fail(self, error: StoreError) -> None:
        """Record a failure: calls fail at once with `error` until the back-off ends."""
        self._last_error = error
        self._retry_at = time.monotonic() + self.config.backoff
        raise error

    def _forget_connection(self) -> None:
        self._nc = self._js = self._replies = None
        self._cache.clear()

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
            replies = _Replies(nc)
            await replies.start()
        except BaseException:
            await self._close_client(nc)
            raise
        self._direct = bool(info.config.allow_direct)
        self._nc, self._js, self._replies = nc, js, replies
        self._loop = asyncio.get_running_loop()
        self._cache.clear()

    async def connect(self) -> NatsClient:
        """Connect within `connect_timeout` over all URLs, failing early on a rejected login."""
        loop = asyncio.get_running_loop()
        self._connect_errors = []
        self._permission_denied = False
        rejected: asyncio.Future[None] = loop.create_future()
        nc = NatsClient()

        async def on_error(error: Exception) -> None:
            if nc.is_connected:
                self._on_runtime_error(error)
                return
            self._connect_errors.append(error)
            if _is_auth_error(error) and not rejected.done():
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
        raise self._connect_failure()

    def _connect_options(self, nc: NatsClient, on_error: Any) -> dict[str, Any]:
        config = self.config

        async def on_disconnected() -> None:
            if self._nc is nc:  # not while connecting or closing
                self._warn("store %r: disconnected from NATS, reconnecting", config.name)

        async def on_reconnected() -> None:
            logger.info("store %r: reconnected to NATS", config.name)
            self._cache.clear()

        options: dict[str, Any] = {
            "servers": list(config.servers),
            "name": "ratesync-middleware",
            "connect_timeout": config.connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": _RECONNECT_WAIT,
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
        """The seed guide's error for what went wrong while connecting."""
        servers = ", ".join(self.config.redacted_servers)
        errors = self._connect_errors
        if any(_is_auth_error(error) for error in errors):
            how = (
                "the token (check the environment variable it comes from, e.g. `echo $NATS_TOKEN`)"
            )
            if self.config.creds or self.config.nkey:
                how = "the creds/nkey file"
            elif any("@" in url for url in self.config.servers):
                how = "the user and password in the URL"
            return AuthenticationError(
                f"Authentication violation: the NATS server at {servers} rejected the credentials "
                f"of store {self.config.name!r}. Verify {how} against the server configuration."
            )
        reasons = sorted({type(error).__name__ for error in errors}) or ["no answer"]
        return ConnectionRefusedError(
            f"Connection refused: no NATS server accepted a connection at {servers} within "
            f"{self.config.connect_timeout:g}s ({', '.join(reasons)}). Verify the URL, that "
            "nats-server is running, and that the network and firewall let this host reach it "
            "(e.g. `telnet HOST 4222`)."
        )

    async def open_bucket(self, js: JetStreamContext) -> StreamInfo:
        """Open the bucket, creating it with the guide's settings when allowed and missing."""
        bucket = self.config.bucket_name
        try:
            info = await js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            if not self.config.auto_create:
                raise BucketNotFoundError(
                    f"Bucket not found: KV bucket {bucket!r} does not exist and store "
                    f"{self.config.name!r} has auto_create = false. Create it with "
                    f"`{PRECREATE_COMMAND.format(bucket=bucket)}` (or `ratesync check`), "
                    "or set auto_create = true."
                ) from None
            return await self._create_bucket(js)
        except Exception as error:
            raise self._jetstream_failure(error) from None
        self._warn_on_settings(info)
        return info

    async def _create_bucket(self, js: JetStreamContext) -> StreamInfo:
        bucket = self.config.bucket_name
        kv_config = KeyValueConfig(
            bucket=bucket,
            history=BUCKET_HISTORY,
            ttl=BUCKET_TTL_SECONDS,
            replicas=self.config.replicas,
            direct=True,
        )
        try:
            await js.create_key_value(kv_config)
            return await js.stream_info(self._stream)
        except nats.js.errors.BadRequestError as error:
            if error.err_code == 10058:  # created meanwhile by another process, other settings
                return await js.stream_info(self._stream)
            raise self._jetstream_failure(error) from None
        except Exception as error:
            raise self._jetstream_failure(error) from None

    def _jetstream_failure(self, error: BaseException) -> StoreError:
        bucket = self.config.bucket_name
        if isinstance(
            error, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError
        ):
            return JetStreamNotEnabledError(
                f"JetStream not enabled: the NATS server of store {self.config.name!r} answers "
                "but has no JetStream. Start nats-server with the `-js` flag (or `jetstream {}` "
                "in its configuration), or ask your NATS administrator to enable it."
            )
        if self._permission_denied or _is_permission_error(error):
            return InsufficientPermissionsError(
                f"Insufficient permissions: the credentials of store {self.config.name!r} may not "
                f"create KV bucket {bucket!r}. Ask your NATS administrator to grant it, or "
                f"pre-create it with `{PRECREATE_COMMAND.format(bucket=bucket)}` and set "
                "auto_create = false."
            )
        return StoreUnavailableError(
            f"store {self.config.name!r}: opening KV bucket {bucket!r} failed "
            f"({type(error).__name__}: {error})"
        )

    def _warn_on_settings(self, info: StreamInfo) -> None:
        config = info.config
        differences = []
        if config.max_msgs_per_subject != BUCKET_HISTORY:
            differences.append(f"history {config.max_msgs_per_subject} (expected {BUCKET_HISTORY})")
        if not config.max_age or abs(config.max_age - BUCKET_TTL_SECONDS) > 1:
            differences.append(f"ttl {config.max_age or 0:g}s (expected {BUCKET_TTL_SECONDS}s)")
        if (config.num_replicas or 1) != self.config.replicas:
            differences.append(f"replicas {config.num_replicas} (expected {self.config.replicas})")
        if differences:
            logger.warning(
                "store %r: KV bucket %r exists with %s; using it as it is. To recreate it: "
                "`nats kv rm %s` then `%s`",
                self.config.name,
                self.config.bucket_name,
                ", ".join(differences),
                self.config.bucket_name,
                PRECREATE_COMMAND.format(bucket=self.config.bucket_name),
            )

    def _on_runtime_error(self, error: Exception) -> None:
        if _is_permission_error(error):
            self._permission_denied = True
        self._warn("store %r: NATS reported %s", self.config.name, type(error).__name__)

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARNING_INTERVAL:
            self._last_warning = now
            logger.warning(message, *args)

    @staticmethod
    async def _close_client(nc: NatsClient) -> None:
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)

    async def aclose(self) -> None:
        nc = self._nc
        self._forget_connection()
        for state in self._cache.values():
            if state.flusher is not None:
                state.flusher.cancel()
        if nc is not None and not nc.is_closed and self._loop is asyncio.get_running_loop():
            await self._close_client(nc)

    # -- decisions --------------------------------------------------------------------------

    async def hit(self, key: str, policy: Policy, cost: int = 1) -> Decision:
        await self.ready()
        cache = self._cache
        state = cache.get(key)
        if state is None:
            state = cache[key] = _KeyState()
            if len(cache) > self.config.max_keys:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
            if state.revision is not None:
                new_tat, decision = consume(policy, state.tat, self._clock(), cost)
                if new_tat is None:
                    return decision  # the cache proves the bucket empty: no round trip
        if state.busy or state.contended_until > time.monotonic():
            # Another decision is writing this key, or other processes race for it: join the
            # next batch (the flusher paces a contended key's writes, see `_flush`).
            future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            state.waiters.append((policy, cost, future))
            if not state.busy:
                state.busy = True
                state.flusher = asyncio.get_running_loop().create_task(self._flush(key, state))
            return await future
        # The key is idle: write this decision here, without a task or a future.
        state.busy = True
        try:
            return (await self._commit(key, state, [(policy, cost, None)]))[0]
        except BaseException:
            state.revision = None  # interrupted or failed: what NATS holds is unknown
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
                batch, state.waiters = state.waiters, []
                try:
                    if time.monotonic() < self._retry_at and self._last_error is not None:
                        raise self._last_error  # a call just failed: answer the rest at once
                    # Others wrote the key meanwhile, almost surely: read before writing.
                    decisions = await self._commit(key, state, batch, read_first=contended)
                except StoreError as error:
                    _settle(batch, error)
                    continue
                except BaseException as error:
                    state.revision = None
                    failure = StoreUnavailableError(
                        f"decision interrupted ({type(error).__name__})"
                    )
                    _settle([*batch, *state.waiters], failure)
                    state.waiters = []
                    raise
                for (_, _, future), decision in zip(batch, decisions, strict=True):
                    if future is not None and not future.done():
                        future.set_result(decision)
        finally:
            state.flusher = None
            state.busy = False

    async def _commit(
        self, key: str, state: _KeyState, batch: list[Waiter], *, read_first: bool = False
    ) -> list[Decision]:
        """Apply `batch` in arrival order to the key's state and write it with compare-and-set.

        The cached state is tried first unless `read_first`; after a conflict it is read again.
        """
        deadline = time.monotonic() + self.config.timeout
        subject = self._prefix + key
        while True:
            if read_first:
                try:
                    state.tat, state.revision = await self._read(subject)
                except (nats.errors.Error, OSError) as read_error:
                    raise self._call_failure(state, read_error) from None
            now = self._clock()
            tat = state.tat if state.revision is not None else 0
            new_tat = tat
            last_policy = batch[0][0]
            decisions = []
            for policy, cost, _ in batch:
                admitted_tat, decision = consume(policy, new_tat, now, cost)
                if admitted_tat is not None:
                    new_tat, last_policy = admitted_tat, policy
                decisions.append(decision)
            if new_tat == tat:
                return decisions  # nothing admitted: nothing to write
            started = time.monotonic()
            try:
                revision = await self._write(subject, new_tat, last_policy, state.revision or 0)
            except nats.js.errors.APIError as error:
                if error.err_code not in _WRONG_LAST_SEQUENCE:
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
            except (nats.errors.Error, OSError) as error:
                raise self._call_failure(state, error) from None
            state.tat, state.revision = new_tat, revision
            # A moving average of the write round trip paces contended keys.
            self._round_trip += (time.monotonic() - started - self._round_trip) / 16
            return decisions

    def _call_failure(self, state: _KeyState, error: BaseException) -> StoreUnavailableError:
        """A store call failed: its write may still land, so the key's state is unknown now."""
        state.revision = None
        failure = StoreUnavailableError(
            f"store {self.config.name!r}: NATS call failed ({type(error).__name__})"
        )
        if isinstance(error, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            # Nobody stores `$KV.<bucket>.>` any more: the bucket was deleted. Open it afresh
            # (creating it when allowed) once the back-off ends.
            self._drop_connection()
        self._last_error = failure
        self._retry_at = time.monotonic() + self.config.backoff
        return failure

    async def _write(self, subject: str, tat: int, policy: Policy, last_revision: int) -> int:
        """Store `tat` if the subject's last revision is `last_revision`; the new revision."""
        headers = {_EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision)}
        message = await self._connected_replies().request(
            subject, encode_value(tat, policy), headers, self.config.timeout
        )
        return _ack_revision(message)

    def _connected_replies(self) -> _Replies:
        replies = self._replies
        if replies is None:  # the connection was dropped meanwhile (a deleted bucket)
            raise nats.errors.ConnectionClosedError
        return replies

    async def _read(self, subject: str) -> tuple[int, int]:
        """The stored `(tat, revision)` of a subject; `(0, 0)` when it never existed."""
        if not self._direct:  # a bucket made without direct get: the JetStream API
            entry = await self._read_entry(subject)
            return (entry.tat_ns, entry.revision) if entry is not None else (0, 0)
        message = await self._connected_replies().request(
            self._direct_get + subject, b"", None, self.config.timeout
        )
        headers = message.headers or {}
        status = headers.get(_STATUS)
        if status == "404":
            return 0, 0
        if status is not None:
            raise nats.js.errors.APIError(description=f"direct get: status {status}")
        revision = int(headers.get("Nats-Sequence") or 0)
        if headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
            return 0, revision
        return decode_tat(message.data), revision

    async def _read_entry(self, subject: str) -> StoredEntry | None:
        js = self._js
        if js is None:  # the connection was dropped meanwhile (a deleted bucket)
            raise nats.errors.ConnectionClosedError
        try:
            message = await js.get_msg(self._stream, subject=subject, direct=self._direct)
        except nats.js.errors.NotFoundError:
            return None
        headers = message.headers or {}
        return StoredEntry(
            key=subject[len(self._prefix) :],
            revision=int(message.seq or 0),
            written_at=message.time,
            deleted=headers.get(_KV_OPERATION) in ("DEL", "PURGE"),
            value=decode_value(message.data),
        )

    async def read_entry(self, key: str) -> StoredEntry | None:
        """The stored entry of `key` as it is in NATS now; None when it never existed."""
        await self.ready()
        try:
            return await self._read_entry(self._prefix + key)
        except (nats.errors.Error, OSError) as error:
            raise StoreUnavailableError(
                f"store {self.config.name!r}: read failed ({error!r})"
            ) from None

    async def peek(self, key: str, policy: Policy) -> Decision:
        await self.ready()
        try:
            tat, _ = await self._read(self._prefix + key)
        except (nats.errors.Error, OSError) as error:
            raise StoreUnavailableError(
                f"store {self.config.name!r}: read failed ({error!r})"
            ) from None
        return peek(policy, tat, self._clock())

    async def reset(self, key: str) -> None:
        js = await self.ready()
        try:
            await js.publish(self._prefix + key, b"", headers={_KV_OPERATION: "DEL"})
        except (nats.errors.Error, OSError) as error:
            raise StoreUnavailableError(
                f"store {self.config.name!r}: reset failed ({error!r})"
            ) from None
        state = self._cache.get(key)
        if state is not None:
            state.revision = None
