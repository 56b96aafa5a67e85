"""What goes over the wire: the stored value's encoding, and the hot path's request/reply.

The value format is documented in docs/engines/nats.md so that another language can share buckets.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ...algorithms import Algorithm
from ...bucket import Policy, Rates
from ...slots import Holders
from ...window import Log
from .errors import SilentLinkError

VALUE_VERSION = 1
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
KV_OPERATION = "KV-Operation"
MESSAGE_TTL = "Nats-TTL"  # seconds until the server removes the value (nats-server 2.11+)
STATUS = "Status"  # a reply's status header: "404" not found, "503" no responders
NO_RESPONDERS = "503"
_FIELDS = ("v", "tat_ns", "interval_ns", "burst")

# nats-py forces a flush, with no deadline, once its pending buffer passes this size; a request
# is refused before that (one request is far below the margin: a key is at most ~110 bytes and
# a value ~100), so that publishing never waits for a link that does not drain.
PENDING_BUFFER_BYTES = 2 * 1024 * 1024
_PENDING_LIMIT = PENDING_BUFFER_BYTES - 64 * 1024
_READ_TURNS = 3  # turns of the event loop a missed request gives late replies to be read


def encode_value(tat: int, policy: Policy) -> bytes:
    """The stored value: small JSON, versioned, with the policy so any reader can decode it."""
    return (
        f'{{"v":{VALUE_VERSION},"tat_ns":{tat},'
        f'"interval_ns":{policy.interval_ns},"burst":{policy.burst}}}'
    ).encode()


def encode_state(policy: Algorithm, state: Any) -> bytes:
    """The stored value of any algorithm's state (docs/engines/nats.md, "Value").

    A token bucket keeps the original form; several rates and a sliding window add a `kind`.
    """
    if isinstance(policy, Policy):
        return encode_value(state, policy)
    if isinstance(policy, Rates):
        tats = ",".join(str(tat) for tat in state)
        rates = ",".join(f"[{rate.interval_ns},{rate.burst}]" for rate in policy.rates)
        return (
            f'{{"v":{VALUE_VERSION},"kind":"rates","tats_ns":[{tats}],"rates":[{rates}]}}'.encode()
        )
    log = ",".join(f"[{admitted_at},{units}]" for admitted_at, units in state)
    return (
        f'{{"v":{VALUE_VERSION},"kind":"window","limit":{policy.limit},'
        f'"window_ns":{policy.window_ns},"log":[{log}]}}'
    ).encode()


def decode_state(policy: Algorithm, data: bytes | None) -> tuple[Any, str | None]:
    """The state of a key `policy` owns, and what is wrong with the value (None: nothing).

    A value this policy cannot read (another kind, a foreign writer) is reported, never
    silently taken as a full bucket; the state is then the empty one, which the next
    admitted decision overwrites.
    """
    if isinstance(policy, Policy):
        return decode_owned_tat(data)
    if not data:
        return policy.empty, None
    try:
        value = json.loads(data)
    except ValueError:
        return policy.empty, "not JSON"
    if not isinstance(value, dict):
        return policy.empty, f"a JSON {type(value).__name__}, not an object"
    if isinstance(policy, Rates):
        tats = value.get("tats_ns")
        if (
            value.get("kind") == "rates"
            and isinstance(tats, list)
            and len(tats) == len(policy.rates)
            and all(_is_integer(tat) for tat in tats)
        ):
            return tuple(tats), None
        return policy.empty, f"not a value of {len(policy.rates)} rates (read as full buckets)"
    log = value.get("log")
    if value.get("kind") == "window" and isinstance(log, list):
        entries = _log_entries(log)
        if entries is not None:
            return entries, None
    return policy.empty, "not a sliding-window log (read as an empty window)"


def _log_entries(log: list[Any]) -> Log | None:
    entries = []
    for entry in log:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and _is_integer(entry[0])
            and _is_integer(entry[1])
            and entry[1] >= 1
        ):
            return None
        entries.append((entry[0], entry[1]))
    entries.sort()
    return tuple(entries)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    fields = {name: value.get(name) for name in _FIELDS}
    if not all(_is_integer(v) for v in fields.values()):
        return None
    return fields  # type: ignore[return-value]


def decode_tat(data: bytes | None) -> int:
    """The `tat` of a stored value; 0 (a full bucket) for an empty or foreign value."""
    value = decode_value(data)
    return value["tat_ns"] if value is not None else 0


def decode_owned_tat(data: bytes | None) -> tuple[int, str | None]:
    """The `tat` of a key a limiter owns, and what is wrong with the value (None: nothing).

    A foreign value is never silently a full bucket: a finite number where an integer belongs
    (`"tat_ns":1.796e+18`, as a writer with a fractional cost leaves) is rounded up, which can
    only under-admit; anything else unreadable is a full bucket. Either way the caller logs it.
    """
    if not data:
        return 0, None
    fields = decode_value(data)
    if fields is not None:
        return fields["tat_ns"], None
    try:
        value = json.loads(data)
    except ValueError:
        return 0, "not JSON"
    if not isinstance(value, dict):
        return 0, f"a JSON {type(value).__name__}, not an object"
    wrong = [name for name in _FIELDS if not _is_integer(value.get(name))]
    tat = value.get("tat_ns")
    what = "non-integer " + ", ".join(f"{name}={_shown(value.get(name))}" for name in wrong)
    if isinstance(tat, float) and math.isfinite(tat) and tat >= 0:
        return math.ceil(tat), what + " (tat_ns rounded up)"
    if isinstance(tat, int) and not isinstance(tat, bool):
        return tat, what
    return 0, what + " (read as a full bucket)"


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 32 else text[:29] + "..."


@dataclass(frozen=True)
class StoredEntry:
    """One key as NATS holds it, decoded (for `ratesync get` and `watch`)."""

    key: str
    revision: int
    written_at: datetime | None
    deleted: bool
    value: dict[str, int] | None
    data: bytes | None = None  # the stored bytes, for values of any kind (`ratesync get`)

    def policy(self) -> Policy | None:
        """The policy the last writer used, when the value carries one."""
        if self.value is None or self.value["interval_ns"] < 1 or self.value["burst"] < 1:
            return None
        return Policy(self.key, self.value["interval_ns"], self.value["burst"])

    @property
    def tat_ns(self) -> int:
        return 0 if self.deleted or self.value is None else self.value["tat_ns"]


class Replies:
    """Request/reply for the hot path, over one wildcard inbox subscription per connection.

    nats-py's `request()` draws a random token, wraps the wait in `wait_for` and builds a response
    dataclass on every call: on a hot key that was a fifth of the CPU of a decision
    (docs/benchmarks.md). Here a token is a counter and the deadline one timer, which starts
    before the publish; the publish itself never waits (see `PENDING_BUFFER_BYTES`).
    """

    def __init__(self, nc: NatsClient, on_late_answer: Callable[[], None] | None = None) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()
        self.answers = 0  # replies received, late ones included: the evidence that NATS answers
        self._on_late_answer = on_late_answer

    async def start(self) -> None:
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, message: Msg) -> None:
        self.answers += 1
        future = self._waiting.pop(message.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(message)
        elif self._on_late_answer is not None:  # its request missed its deadline
            self._on_late_answer()

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """The reply to one request; `nats.errors.TimeoutError` after `timeout` seconds.

        `OutboundBufferLimitError` at once when the connection's outgoing buffer is not
        draining: nats-py would block this publish until it did.
        """
        nc = self._nc
        if nc.pending_data_size > _PENDING_LIMIT:
            raise nats.errors.OutboundBufferLimitError
        if timeout <= 0:
            raise nats.errors.TimeoutError
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        answers = self.answers
        try:
            await nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            try:
                message = await future
            except nats.errors.TimeoutError:
                message = await self._late_reply(token, answers)
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        if not message.data and (message.headers or {}).get(STATUS) == NO_RESPONDERS:
            raise nats.errors.NoRespondersError  # nothing stores the subject: no bucket
        return message

    async def _late_reply(self, token: str, answers: int) -> Msg:
        """A request's deadline passed. A process starved of CPU (a busy loop, threads holding
        the GIL) may hold its reply unread while the timer fires: read what arrived, a few
        turns of the loop, and take the reply if it is there. Else `SilentLinkError` when NATS
        answered nothing since the request was sent, `TimeoutError` when it answered others."""
        late: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = late
        for _ in range(_READ_TURNS):
            await asyncio.sleep(0)
            if late.done():
                return late.result()
        if self.answers == answers:
            raise SilentLinkError
        raise nats.errors.TimeoutError


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def ack_revision(message: Msg) -> int:
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


def encode_slots(limit: int, lease_ns: int, holders: Holders) -> bytes:
    """The stored value of a group's concurrency slots (docs/engines/nats.md, "Slots")."""
    claims = ",".join(
        f"{json.dumps(holder)}:[{count},{until}]" for holder, (count, until) in holders.items()
    )
    return (
        f'{{"v":{VALUE_VERSION},"kind":"slots","limit":{limit},"lease_ns":{lease_ns},'
        f'"holders":{{{claims}}}}}'
    ).encode()


def decode_slots(data: bytes | None) -> tuple[dict[str, tuple[int, int]], str | None]:
    """The holders of a stored slots value, and what is wrong with it (None: nothing).

    An unreadable value holds no slots (it is reported; the next write replaces it).
    """
    if not data:
        return {}, None
    try:
        value = json.loads(data)
    except ValueError:
        return {}, "not JSON"
    holders = value.get("holders") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and value.get("kind") == "slots" and isinstance(holders, dict)):
        return {}, "not a slots value (read as no slots held)"
    claims: dict[str, tuple[int, int]] = {}
    for holder, claim in holders.items():
        if not (
            isinstance(claim, list)
            and len(claim) == 2
            and _is_integer(claim[0])
            and _is_integer(claim[1])
        ):
            return {}, f"holder {_shown(holder)} has no [count, expires_at_ns]"
        claims[holder] = (claim[0], claim[1])
    return claims, None
