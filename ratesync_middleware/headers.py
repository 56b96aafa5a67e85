"""Decisions as HTTP: rate-limit headers, `Retry-After`, and the RFC 9457 bodies of 429 and 503.

Header modes (`[middleware] headers`):

- `draft`, after draft-ietf-httpapi-ratelimit-headers-11:
  `RateLimit-Policy: "api";q=20;w=2` (quota = the burst, window = seconds to refill it) and
  `RateLimit: "api";r=7;t=1` (remaining units; seconds until the bucket is full, or on a denial
  until the request can be retried, so that `Retry-After` never points before the window's end).
- `legacy`: `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (Unix time of that
  same moment, as GitHub, flask-limiter and slowapi send it).
- `none`: no rate-limit headers; 429 and 503 still carry `Retry-After`.

A concurrency limit (`max_concurrent`) is not a quota over a time window, which is all the draft
can express: it gets no `RateLimit-Policy` item and no `RateLimit` field. Its refusal is a 429
with `Retry-After: 1` (when a request in flight ends is unknown) and a problem body naming it.

Headers are `(name, value)` pairs of latin-1 bytes, lower-case names, as ASGI sends them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from .algorithms import Algorithm
from .bucket import NS_PER_SECOND, Decision, Policy, Rates
from .config import Config, HeadersMode
from .rules import BANNED
from .slots import Slots

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "QUOTA_EXCEEDED",
    "Denial",
    "Header",
    "RateLimitHeaders",
    "add_missing",
    "header_name",
    "retry_after_seconds",
    "text_headers",
]

Header = tuple[bytes, bytes]

PROBLEM_CONTENT_TYPE: Final = b"application/problem+json"
QUOTA_EXCEEDED: Final = "https://iana.org/assignments/http-problem-types#quota-exceeded"
BANNED_TYPE: Final = "https://ratesync.github.io/ratesync-middleware/problems/banned"


# The names headers.py produces, spelt as people write them (HTTP does not care; logs do).
_HEADER_NAMES: Final = {
    b"ratelimit": "RateLimit",
    b"ratelimit-policy": "RateLimit-Policy",
    b"retry-after": "Retry-After",
    b"x-ratelimit-limit": "X-RateLimit-Limit",
    b"x-ratelimit-remaining": "X-RateLimit-Remaining",
    b"x-ratelimit-reset": "X-RateLimit-Reset",
    b"content-type": "Content-Type",
    b"content-length": "Content-Length",
}


def header_name(raw_name: bytes) -> str:
    """`b"retry-after"` -> `"Retry-After"`, for frameworks that take `str` header names."""
    return _HEADER_NAMES.get(raw_name) or raw_name.decode("latin-1")


def text_headers(headers: Iterable[Header]) -> list[tuple[str, str]]:
    """Our headers (latin-1 bytes, lower-case names) as `(str, str)` pairs (WSGI, Flask, Django)."""
    names = _HEADER_NAMES
    return [
        (names.get(name) or name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
    ]


class HeaderMap(Protocol):
    """What Starlette's, werkzeug's and Django's response headers all offer."""

    def __contains__(self, name: str, /) -> bool: ...
    def __setitem__(self, name: str, value: str, /) -> None: ...


def add_missing(headers: HeaderMap, extra: Iterable[Header]) -> None:
    """Add the headers of `extra` that a response (an app's own refusal) did not set itself."""
    names = _HEADER_NAMES
    for raw_name, raw_value in extra:
        name = names.get(raw_name) or raw_name.decode("latin-1")
        if name not in headers:
            headers[name] = raw_value.decode("latin-1")


def retry_after_seconds(seconds: float) -> int | None:
    """`Retry-After` for a wait of `seconds`: whole seconds rounded up, at least 1; None if never."""
    if not math.isfinite(seconds):
        return None
    return max(1, math.ceil(seconds))


class Denial(NamedTuple):
    """A refusal ready to send: status, headers (content type and length included), body.

    `detail` is the body's human-readable `detail`, for frameworks that render their own.
    A named tuple: built for every refused request, it costs a third of a frozen dataclass.
    """

    status: int
    headers: list[Header]
    body: bytes
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Problem:
    """An RFC 9457 problem document, encoded once, with its `Content-Type`/`Content-Length`."""

    body: bytes
    detail: str
    content_headers: tuple[Header, Header]


def _problem(status: int, title: str, detail: str, problem_type: str, **extra: object) -> _Problem:
    document: dict[str, object] = {
        "type": problem_type,
        "title": title,
        "status": status,
        "detail": detail,
    }
    document.update(extra)
    body = json.dumps(document).encode()
    content = ((b"content-type", PROBLEM_CONTENT_TYPE), (b"content-length", b"%d" % len(body)))
    return _Problem(body, detail, content)


@dataclass(frozen=True, slots=True)
class _Precomputed:
    policy_header: Header  # RateLimit-Policy: constant per limiter
    limit: bytes  # X-RateLimit-Limit
    exceeded: _Problem  # 429
    impossible: _Problem  # 429 when the cost exceeds the burst
    unavailable: _Problem  # 503
    concurrency: bool = False  # a concurrency limit: no rate-limit headers


def _policy_item(policy: Algorithm) -> str:
    """One `RateLimit-Policy` item: quota `q` (the burst, or the window's limit) and window
    `w` (seconds for an empty bucket to refill, or the sliding window's length)."""
    # Intervals are rounded up to whole nanoseconds (3/second: 333,333,334 ns), so a refill
    # time may exceed the period by up to `burst` ns: not a second more in the header.
    window = max(1, math.ceil((policy.window_ns - policy.burst) / NS_PER_SECOND))
    return f'"{policy.name}";q={policy.burst};w={window}'


class RateLimitHeaders:
    """Headers and refusals for the limiters of one configuration, precomputed per limiter."""

    def __init__(self, mode: HeadersMode, policies: Iterable[Algorithm | Slots]) -> None:
        if mode not in ("draft", "legacy", "none"):
            raise ValueError(f"headers mode must be 'draft', 'legacy' or 'none', not {mode!r}")
        self.mode = mode
        self._by_name: dict[str, _Precomputed] = {}
        self.extra_policy: Callable[[str], Algorithm | None] | None = None
        """Where the policies of live overrides are found (`AsyncRateLimiter.override_policy`)."""
        for policy in policies:
            self.add(policy)

    def add(self, policy: Algorithm | Slots) -> None:
        """Precompute the headers of one more policy (a tier's, an inline `@limit`'s)."""
        if isinstance(policy, Rates):
            # One policy item per rate (draft-11 allows a list); a decision names the
            # rate that bound it, and the limiter's own name covers degraded answers.
            listed = ", ".join(_policy_item(rate) for rate in policy.rates).encode()
            covered: tuple[Algorithm, ...] = (*policy.rates, policy)
            for item in covered:
                self._by_name[item.name] = self._precompute(item, listed)
        elif isinstance(policy, Slots):
            self._by_name[policy.name] = self._concurrency(policy)
        else:
            self._by_name[policy.name] = self._precompute(policy)

    @classmethod
    def for_config(cls, config: Config) -> RateLimitHeaders:
        """The headers of `config`: its `[middleware] headers` mode and its limiters."""
        policies: list[Algorithm | Slots] = []
        for limiter in config.limiters.values():
            if limiter.policy is not None:
                policies.append(limiter.policy)
            policies.extend(limiter.tiers.values())
            if limiter.slots is not None:
                policies.append(limiter.slots)
        return cls(config.middleware.headers, policies)

    @staticmethod
    def _concurrency(slots: Slots) -> _Precomputed:
        name = slots.limiter
        return _Precomputed(
            policy_header=(b"ratelimit-policy", b""),
            limit=str(slots.limit).encode(),
            exceeded=_problem(
                429,
                "Too Many Requests",
                f"Concurrency limit {name!r} reached: {slots.limit} requests in flight.",
                QUOTA_EXCEEDED,
                **{"violated-policies": [slots.name]},
            ),
            impossible=_problem(429, "Too Many Requests", "", QUOTA_EXCEEDED),  # never used
            unavailable=_problem(
                503,
                "Service Unavailable",
                f"Concurrency limit {name!r} cannot be checked right now; try again later.",
                "about:blank",
            ),
            concurrency=True,
        )

    @staticmethod
    def _precompute(policy: Algorithm, policy_header: bytes | None = None) -> _Precomputed:
        name = policy.name
        return _Precomputed(
            policy_header=(b"ratelimit-policy", policy_header or _policy_item(policy).encode()),
            limit=str(policy.burst).encode(),
            exceeded=_problem(
                429,
                "Too Many Requests",
                f"Rate limit {name!r} exceeded.",
                QUOTA_EXCEEDED,
                **{"violated-policies": [name]},
            ),
            impossible=_problem(
                429,
                "Too Many Requests",
                f"The request costs more than the burst of rate limit {name!r} ({policy.burst});"
                " it can never be allowed.",
                QUOTA_EXCEEDED,
                **{"violated-policies": [name]},
            ),
            unavailable=_problem(
                503,
                "Service Unavailable",
                f"Rate limit {name!r} cannot be checked right now; try again later.",
                "about:blank",
            ),
        )

    def _entry(self, decision: Decision) -> _Precomputed:
        entry = self._by_name.get(decision.policy)
        if entry is None:  # a decision from a policy this object was not built with
            extra = self.extra_policy
            policy = extra(decision.policy) if extra is not None else None
            if policy is None:
                policy = Policy(decision.policy, NS_PER_SECOND, max(1, decision.limit))
            if isinstance(policy, Rates):  # one of its rates: they are listed together
                self.add(policy)
            entry = self._by_name.get(decision.policy) or self._precompute(policy)
            self._by_name[decision.policy] = entry
        return entry

    def headers(self, decision: Decision | None) -> list[Header]:
        """The rate-limit headers for a response under `decision` (none for fail-open guesses)."""
        if decision is None or self.mode == "none" or decision.degraded:
            return []
        if decision.allowed or not math.isfinite(decision.retry_after):
            seconds = math.ceil(decision.reset_after)
        else:
            seconds = max(1, math.ceil(decision.retry_after))
        entry = self._entry(decision)
        if entry.concurrency:
            return []
        if self.mode == "draft":
            return [
                entry.policy_header,
                (
                    b"ratelimit",
                    f'"{decision.policy}";r={decision.remaining};t={seconds}'.encode(),
                ),
            ]
        return [
            (b"x-ratelimit-limit", entry.limit),
            (b"x-ratelimit-remaining", str(decision.remaining).encode()),
            (b"x-ratelimit-reset", str(math.ceil(time.time()) + seconds).encode()),
        ]

    def retry_after(self, decision: Decision) -> list[Header]:
        """`Retry-After` for a refused request; none when it can never succeed."""
        seconds = retry_after_seconds(decision.retry_after)
        return [] if seconds is None else [(b"retry-after", str(seconds).encode())]

    def denial(self, decision: Decision) -> Denial:
        """The 429 (or, for a fail-closed store failure, 503; for a ban, 403) for a refused request."""
        if decision.reason == BANNED:
            return self._banned(decision)
        entry = self._entry(decision)
        if decision.degraded:
            status, problem = 503, entry.unavailable
        elif math.isfinite(decision.retry_after):
            status, problem = 429, entry.exceeded
        else:
            status, problem = 429, entry.impossible
        headers = [*problem.content_headers]
        retry_after = decision.retry_after
        if math.isfinite(retry_after):  # else it can never succeed: no Retry-After
            headers.append((b"retry-after", b"%d" % max(1, math.ceil(retry_after))))
        headers += self.headers(decision)
        return Denial(status, headers, problem.body, problem.detail)

    def _banned(self, decision: Decision) -> Denial:
        """403: an operator banned this group (`ratesync ban`); `Retry-After` when it ends."""
        problem = _problem(
            403,
            "Forbidden",
            f"This client is banned from {decision.policy!r}.",
            BANNED_TYPE,
            **{"violated-policies": [decision.policy]},
        )
        headers = [*problem.content_headers, *self.retry_after(decision)]
        return Denial(403, headers, problem.body, problem.detail)
