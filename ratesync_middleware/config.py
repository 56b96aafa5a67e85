"""Configuration: discovery, TOML or dict loading, ${VAR} expansion, strict validation.

The result is a tree of frozen dataclasses: everything downstream trusts it and checks nothing, so
every number is bounded here (MAX_* below) such that no later integer or float maths can overflow.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .algorithms import Algorithm
from .bucket import NS_PER_SECOND, PERIOD_SECONDS, Policy, Rates
from .errors import ConfigError, ConfigErrorKind
from .slots import DEFAULT_LEASE_SECONDS, Slots
from .window import SlidingWindow

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

Engine = Literal["nats", "memory"]
HeadersMode = Literal["draft", "legacy", "none"]
FailMode = Literal["open", "closed", "local"]
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]
Mode = Literal["enforce", "shadow"]

DEFAULT_STORE_NAME = "default"
DEFAULT_BUCKET = "rate_limits"
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 0.25
DEFAULT_BACKOFF = 1.0
DEFAULT_CACHE_SIZE = 100_000

# Upper bounds: generous for any real limit, small enough that tat + 2 * burst * interval stays far
# inside a signed 64-bit nanosecond count (the shared value's field, read by other languages too)
# and every duration converts to a float exactly enough for headers.
MAX_COUNT = 1_000_000_000  # burst, and the N of "N/period" or of an integer limit
MAX_RATE = 1_000_000_000.0  # per second: one unit per nanosecond, the clock's resolution
MAX_WINDOW_SECONDS = 366 * 86_400  # window_seconds: a year
MAX_REFILL_SECONDS = 10 * 365 * 86_400  # burst x interval: the time an empty bucket takes to fill
MAX_TIMEOUT_SECONDS = 3600.0  # connect_timeout, timeout, backoff
MAX_KEYS = 100_000_000  # max_keys
MAX_CONCURRENT = 1_000_000  # max_concurrent
MAX_LEASE_SECONDS = 3600.0  # lease_seconds
MAX_NESTING = 16  # lists and tables inside each other, counted from the top of the file


@dataclass(frozen=True)
class StoreConfig:
    """One `[stores.<name>]` table. Secrets are kept out of `repr`."""

    name: str
    engine: Engine = "memory"
    servers: tuple[str, ...] = field(default=(), repr=False)  # URLs as given, credentials included
    token: str | None = field(default=None, repr=False)
    bucket_name: str = DEFAULT_BUCKET
    auto_create: bool = True
    replicas: int = 1
    creds: str | None = None  # path to a .creds file
    nkey: str | None = None  # path to an nkey seed file
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # seconds to connect, all URLs together
    timeout: float = DEFAULT_TIMEOUT  # seconds one decision may wait for the store
    backoff: float = DEFAULT_BACKOFF  # seconds of immediate fail-open/closed after a failure
    max_keys: int = DEFAULT_CACHE_SIZE  # memory: buckets kept; nats: cached states

    @property
    def redacted_servers(self) -> tuple[str, ...]:
        """The URLs with any user:password@ replaced, safe for messages and logs."""
        return tuple(redact_url(url) for url in self.servers)


@dataclass(frozen=True)
class LimiterConfig:
    """One `[limiters.<name>]` table."""

    name: str
    store: str
    # A token bucket (Policy), several rates (Rates) or a SlidingWindow; None for a limiter
    # that is only a concurrency limit (`max_concurrent` alone).
    policy: Algorithm | None
    key: tuple[str, ...] = ("ip",)
    fail_closed: bool = False
    slots: Slots | None = None  # `max_concurrent` and `lease_seconds`
    timeout: float = 0.0  # seconds a request may wait for a token or a slot (0: refuse at once)
    cost: int | str = 1  # what a request spends: a whole number, or "pkg.mod:func" (request -> int)
    exempt_when: str | None = None  # "pkg.mod:func" (request -> bool): true, this limiter skips it
    shadow: bool = False  # mode = "shadow": decide and report, never refuse
    tier: str | None = None  # "pkg.mod:func" (request -> tier name or None): which rate applies
    # `[limiters.<name>.tiers]`: tier name -> its algorithm (a token bucket or several rates; a
    # sliding window's tiers are sliding windows). A request without a known tier: `policy`.
    tiers: Mapping[str, Algorithm] = field(default_factory=dict, hash=False)
    settle_header: str | None = None  # after the response: charge this header's integer instead
    count_status: tuple[int, ...] | None = None  # only these statuses are charged; others refunded
    # While the store fails: "open" lets requests through, "closed" refuses them (503), "local"
    # limits from this process's own state at its share of the rate (`fail_closed` = "closed").
    fail_mode: FailMode = "open"

    @property
    def limit(self) -> int:
        """The number a refusal reports as its limit: the rate's burst, else `max_concurrent`."""
        if self.policy is not None:
            return self.policy.burst
        assert self.slots is not None  # a limiter has a rate, slots, or both
        return self.slots.limit

    @property
    def is_global(self) -> bool:
        """One bucket for everybody: its NATS key is the limiter's name."""
        return self.key == ("global",)


@dataclass(frozen=True)
class MiddlewareConfig:
    """The `[middleware]` table."""

    default: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    headers: HeadersMode = "draft"
    ipv6_prefix: int = 64
    forwarded_header: ForwardedHeader = "x-forwarded-for"  # the one header trusted proxies set
    mode: Mode = "enforce"  # "shadow": every limiter decides and reports, none refuses


@dataclass(frozen=True)
class RouteRule:
    """One `[[routes]]` entry: a glob path, optional methods, limiters or exemption."""

    path: str
    methods: tuple[str, ...] | None = None
    limiters: tuple[str, ...] = ()
    exempt: bool = False
    cost: int | str | None = None  # the cost of its limiters (wins over theirs); None: theirs
    messages: tuple[str, ...] = ()  # limiters each message of a matching WebSocket spends from


@dataclass(frozen=True)
class Config:
    """A whole validated configuration."""

    stores: Mapping[str, StoreConfig]
    limiters: Mapping[str, LimiterConfig]
    middleware: MiddlewareConfig = MiddlewareConfig()
    routes: tuple[RouteRule, ...] = ()
    source: str = "<dict>"


ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | Config | None
"""What every entry point accepts: a path, the tables as a dict, a `Config`, or None (discovery)."""


def redact_url(url: str) -> str:
    """`nats://user:secret@host:4222` -> `nats://***@host:4222`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}***@{hostpart}" if userinfo else url


# --- loading -----------------------------------------------------------------------------------


class RateSyncConfigWarning(UserWarning):
    """A rate-sync key that means nothing to a middleware: loaded, ignored, and said so."""


ENV_CONFIG = "RATE_SYNC_CONFIG"
SEARCH_PATHS = (Path("rate-sync.toml"), Path("config") / "rate-sync.toml")

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names, methods
_CALLABLE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", re.ASCII)
_LIMIT = re.compile(r"\s*([0-9]{1,18})\s*/\s*([A-Za-z]+)\s*")
_UNITS = {**PERIOD_SECONDS, "s": 1, "m": 60, "h": 3600, "d": 86400}
_URL_SCHEMES = ("nats", "tls", "ws", "wss")
_KEY_WORDS = ("ip", "global", "user", "path")


class _BadValueError(Exception):
    """Raised by a checker: what the value should have been (optionally what to show, a remedy)."""

    def __init__(self, what: str, got: str | None = None, remedy: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.got = got
        self.remedy = remedy


Check = Callable[[Any], Any]


@dataclass(frozen=True)
class _Scalar:
    """The checker of a number or boolean key: a value that is exactly one `${...}` is parsed
    from its expansion by `from_text` (strictly: ValueError when it is not of the type), then
    checked like a literal."""

    check: Check
    from_text: Callable[[str], Any]
    what: str  # the type `from_text` reads, for its error

    def __call__(self, value: Any) -> Any:
        return self.check(value)


@dataclass(frozen=True)
class _Where:
    """Where a value sits, so that every message (and error field) names the file, table and key."""

    source: str
    table: str = ""

    def _place(self, key: object) -> str:
        where = " ".join(
            part for part in (self.table, None if key is None else _label(key)) if part
        )
        return f"{self.source}: {where}" if where else self.source

    def error(
        self, key: object, message: str, *, kind: ConfigErrorKind, variable: str | None = None
    ) -> ConfigError:
        return ConfigError(
            f"{self._place(key)}: {message}",
            source=self.source,
            table=self.table or None,
            key=None if key is None else key if isinstance(key, str) else _repr(key),
            kind=kind,
            variable=variable,
        )

    def warn(self, key: str, message: str) -> None:
        warnings.warn(f"{self._place(key)}: {message}", RateSyncConfigWarning, stacklevel=2)


def _label(name: object) -> str:
    return name if isinstance(name, str) and _NAME.fullmatch(name) else _repr(name)


def _show(value: object) -> str:
    return f"{_short(_repr(value))} ({type(value).__name__})"


def _repr(value: object) -> str:
    """repr, except for an int too long for Python to print (4300+ digits: ValueError)."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"an integer of {math.floor(value.bit_length() * math.log10(2)) + 1}+ digits"
    return repr(value)


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


# --- ${...} alone: numbers and booleans from the environment ----------------------------------

_DIGITS = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LONGEST_INTEGER_TEXT = 30  # digits; longer is out of every range (and int() refuses 4300+)
_BEYOND_EVERY_BOUND: int = 10**_LONGEST_INTEGER_TEXT


def _integer_text(text: str) -> int:
    """Decimal digits only: no sign, no `_`, no spaces (a variable holds a count, not TOML)."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(text)
    if len(text.lstrip("0")) > _LONGEST_INTEGER_TEXT:
        return _BEYOND_EVERY_BOUND  # the key's checker then says its range
    return int(text)


def _float_text(text: str) -> float:
    """Python's decimal float syntax without `_`, `inf` or `nan`; too large gives inf (refused)."""
    if not _FLOAT.fullmatch(text):
        raise ValueError(text)
    return float(text)


def _boolean_text(text: str) -> bool:
    """TOML's spelling, exactly: `true` or `false`."""
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def _limit_text(text: str) -> Any:
    """Digits are rate-sync's integer limit (with window_seconds); anything else stays "N/period"."""
    return _integer_text(text) if _DIGITS.fullmatch(text) else text


# --- checkers: value in, clean value out, or _BadValueError ----------------------------------


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _BadValueError("a string")
    return value


def _optional_string(value: Any) -> str | None:
    return _string(value) or None  # "" means unset, so `${VAR:-}` can switch a setting off


def _name(value: Any) -> str:
    if not (isinstance(value, str) and _NAME.fullmatch(value)):
        raise _BadValueError("a name of letters, digits, '_' and '-'")
    return value


def _check_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _BadValueError("true or false")
    return value


_boolean = _Scalar(_check_boolean, _boolean_text, "true or false")


def _integer(low: int, high: int, *, range_in_every_message: bool = True) -> _Scalar:
    """An int from `low` to `high`. A safety bound (`range_in_every_message=False`) is named only
    to a value above it, so the messages users know (`an integer >= 1`) stay as they were."""
    full = f"an integer from {low} to {high}"
    usual = full if range_in_every_message else f"an integer >= {low}"

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _BadValueError(usual)  # bool is an int subclass, but `burst = true` is a mistake
        if value > high:
            raise _BadValueError(full)
        return value

    return _Scalar(check, _integer_text, "an integer (decimal digits only)")


def _non_negative(high: float) -> _Scalar:
    """A number >= 0 and at most `high` (0: none, as rate-sync's `timeout = 0`)."""
    positive = _positive(high).check

    def check(value: Any) -> float:
        if value == 0 and not isinstance(value, bool):
            return 0.0
        try:
            return float(positive(value))
        except _BadValueError:
            raise _BadValueError(f"a number >= 0 and <= {high:.15g}") from None

    return _Scalar(check, _float_text, "a number")


def _positive(high: float) -> _Scalar:
    """A number > 0 and at most `high` (a safety bound, named only to a value above it)."""

    def check(value: Any) -> float:
        # Compared before float(): an int of 400 digits would overflow the conversion.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _BadValueError("a number > 0")
        if not value <= high:  # also inf; nan failed above
            raise _BadValueError(f"a number > 0 and <= {high:.15g}")
        return float(value)

    return _Scalar(check, _float_text, "a number")


def _choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise _BadValueError("one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def _one_or_more(item: Check) -> Check:
    """A string or a list of them (TOML users write both), each checked by `item`."""

    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (str, list, tuple)):
            raise _BadValueError("a string or a list of strings")
        out = []
        for element in [value] if isinstance(value, str) else value:
            try:
                out.append(item(element))
            except _BadValueError as exc:
                raise _BadValueError(exc.what, exc.got or _show(element)) from None
        return tuple(out)

    return check


def _urls(value: Any) -> tuple[str, ...]:
    """One URL, a comma-separated list or a TOML list; messages show them redacted."""
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _BadValueError("a URL, a comma-separated list of URLs or a list of them")
    servers = []
    for raw in items:
        if not isinstance(raw, str):
            raise _BadValueError("URL strings", _show(raw))
        url = raw.strip()
        if not url:
            continue
        try:
            parts = urlsplit(url)
            valid = parts.scheme in _URL_SCHEMES and bool(parts.hostname)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError:
            valid = False
        if not valid:
            raise _BadValueError(
                "nats://, tls://, ws:// or wss:// URLs with a host", _show(redact_url(url))
            )
        servers.append(url)
    return tuple(servers)


def _check_limit(value: Any) -> tuple[int, int | None]:
    """`"600/minute"` -> (600, 60); a bare int N -> (N, None): its window is window_seconds."""
    count: int | None = None
    period: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        count = value
    elif isinstance(value, str) and (match := _LIMIT.fullmatch(value)):
        count, unit = int(match[1]), match[2].lower()
        if count < 1 or unit not in _UNITS:
            count = None
        period = _UNITS.get(unit)
    if count is None:
        raise _BadValueError(
            '"N/second", "N/minute", "N/hour" or "N/day", or an integer with window_seconds'
        )
    if count > MAX_COUNT:
        raise _BadValueError(f"N from 1 to {MAX_COUNT}")
    return count, period


def _check_limits(value: Any) -> tuple[tuple[int, int | None], ...]:
    """One limit (an integer or "N/period"), or a list of "N/period" rates: all must allow."""
    if not isinstance(value, (list, tuple)):
        return (_check_limit(value),)
    rates = []
    for element in value:
        if not isinstance(element, str):
            raise _BadValueError('a list of "N/period" strings', _show(element))
        try:
            rates.append(_check_limit(element))
        except _BadValueError as exc:
            raise _BadValueError(exc.what, exc.got or _show(element)) from None
    if not rates:
        raise _BadValueError('at least one "N/period" rate')
    return tuple(rates)


_limit = _Scalar(_check_limits, _limit_text, "an integer or N/period")

_OTHER_ENGINES = ("redis", "postgres")  # rate-sync's other stores
_engine_name = _choice("nats", "memory")


def _engine(value: Any) -> str:
    if isinstance(value, str) and value in _OTHER_ENGINES:
        raise _BadValueError(
            "one of 'nats', 'memory'",
            remedy=f"rate-sync's {value} store is not one of the engines of ratesync-middleware"
            " ('nats' and 'memory'); to share limits between processes, run NATS"
            ' (docs/setup/nats-setup.md) or use engine = "memory"',
        )
    engine: str = _engine_name(value)
    return engine


def _key_part(value: Any) -> str:
    if isinstance(value, str):
        kind, _, header = value.partition(":")
        if value in _KEY_WORDS or (kind == "header" and _TOKEN.fullmatch(header)):
            return value
        if kind != "header" and _CALLABLE.fullmatch(value):
            return value  # imported by the limiter, not here: loading a config runs no user code
    raise _BadValueError(
        '"ip", "global", "user", "path", "header:<Name>" or "package.module:function"'
    )


def _function(value: Any) -> str:
    if isinstance(value, str) and _CALLABLE.fullmatch(value):
        return value  # imported by the limiter, not here: loading a config runs no user code
    raise _BadValueError('"package.module:function"')


_cost_count = _integer(1, MAX_COUNT, range_in_every_message=False)


def _tier_table(value: Any) -> Mapping[Any, Any]:
    """`[limiters.X.tiers]`: checked tier by tier by `_tiers` (each names its own key)."""
    if not isinstance(value, Mapping) or not value:
        raise _BadValueError('a table of tier names to rates, e.g. free = "100/hour"')
    return value


def _cost(value: Any) -> int | str:
    if isinstance(value, str):
        if _CALLABLE.fullmatch(value):
            return value
        raise _BadValueError('an integer >= 1 or "package.module:function" (request -> int)')
    cost: int = _cost_count(value)
    return cost


def _header_name(value: Any) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _BadValueError('a response header name such as "X-Cost"')


def _statuses(value: Any) -> tuple[int, ...]:
    if isinstance(value, list) and value:
        if all(type(status) is int and 100 <= status <= 599 for status in value):
            return tuple(value)
        wrong = next(s for s in value if not (type(s) is int and 100 <= s <= 599))
        raise _BadValueError("a list of HTTP statuses from 100 to 599", _show(wrong))
    raise _BadValueError("a non-empty list of HTTP statuses such as [401, 403]")


def _keys(value: Any) -> tuple[str, ...]:
    parts: tuple[str, ...] = _one_or_more(_key_part)(value)
    if not parts:
        raise _BadValueError("at least one key")
    if "global" in parts and len(parts) > 1:
        raise _BadValueError('"global" alone: one bucket for everybody has no other parts')
    return parts


def _network(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(_string(value), strict=False))
    except ValueError:
        raise _BadValueError("an IP address or network such as '10.0.0.0/8'") from None


def _route_path(value: Any) -> str:
    if not (isinstance(value, str) and value.startswith("/")):
        raise _BadValueError("a path starting with '/', '*' matching anything")
    return value


def _method(value: Any) -> str:
    if not (isinstance(value, str) and _TOKEN.fullmatch(value)):
        raise _BadValueError("HTTP method names")
    return value.upper()


# --- the tables ------------------------------------------------------------------------------

_STORE_KEYS: dict[str, Check] = {
    "engine": _engine,
    "url": _urls,
    "token": _optional_string,
    "bucket_name": _name,
    "auto_create": _boolean,
    "replicas": _integer(1, 5),
    "creds": _optional_string,
    "nkey": _optional_string,
    "tls_ca": _optional_string,
    "tls_cert": _optional_string,
    "tls_key": _optional_string,
    "connect_timeout": _positive(MAX_TIMEOUT_SECONDS),
    "timeout": _positive(MAX_TIMEOUT_SECONDS),
    "backoff": _positive(MAX_TIMEOUT_SECONDS),
    "max_keys": _integer(1, MAX_KEYS, range_in_every_message=False),
}
_STORE_IGNORED = frozenset(
    {
        *("retry_interval", "max_retries", "timing_margin_ms", "socket_timeout"),
        *("db", "password", "key_prefix", "socket_connect_timeout"),  # redis
        *("pool_min_size", "pool_max_size", "table_name", "schema_name"),  # postgres
    }
)
_LIMITER_KEYS: dict[str, Check] = {
    "store": _string,
    "rate_per_second": _positive(MAX_RATE),
    "limit": _limit,
    "window_seconds": _integer(1, MAX_WINDOW_SECONDS, range_in_every_message=False),
    "burst": _integer(1, MAX_COUNT, range_in_every_message=False),
    "key": _keys,
    "fail_closed": _boolean,
    "fail_mode": _choice("open", "closed", "local"),
    "algorithm": _choice("token_bucket", "sliding_window"),
    "max_concurrent": _integer(1, MAX_CONCURRENT),
    "lease_seconds": _positive(MAX_LEASE_SECONDS),
    "timeout": _non_negative(MAX_TIMEOUT_SECONDS),
    "cost": _cost,
    "exempt_when": _function,
    "mode": _choice("enforce", "shadow"),
    "tier": _function,
    "tiers": _tier_table,
    "settle_header": _header_name,
    "count_status": _statuses,
}
# rate-sync keys that mean nothing to a middleware (docs/configuration.md says why, for each).
_LIMITER_IGNORED = frozenset({"max_retries", "retry_interval"})
_RATE_KEYS = ("rate_per_second", "limit", "window_seconds", "burst", "algorithm")
_MIDDLEWARE_KEYS: dict[str, Check] = {
    "default": _one_or_more(_string),
    "trusted_proxies": _one_or_more(_network),
    "headers": _choice("draft", "legacy", "none"),
    "ipv6_prefix": _integer(1, 128),
    "forwarded_header": _choice("x-forwarded-for", "forwarded"),
    "mode": _choice("enforce", "shadow"),
}
_ROUTE_KEYS: dict[str, Check] = {
    "path": _route_path,
    "methods": _one_or_more(_method),
    "limiters": _one_or_more(_string),
    "exempt": _boolean,
    "cost": _cost,
    "messages": _one_or_more(_string),
}
_SECTIONS = ("stores", "limiters", "middleware", "routes")
_SECRET_KEYS = frozenset({"token"})


def _unknown(where: _Where, key: object, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    hint = difflib.get_close_matches(key if isinstance(key, str) else _repr(key), known, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return where.error(
        key, f"unknown key{did_you_mean}; known keys are: {', '.join(known)}", kind="unknown_key"
    )


def _fields(
    where: _Where,
    table: Mapping[Any, Any],
    spec: Mapping[str, Check],
    ignored: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Expand, type-check and convert every key of one table against its spec."""
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key in ignored:
            where.warn(key, "rate-sync key ignored by ratesync-middleware")
            continue
        if key not in spec:
            raise _unknown(where, key, spec)
        check = spec[key]
        if isinstance(check, _Scalar) and isinstance(raw, str) and _VAR.fullmatch(raw):
            values[key] = _scalar_from_environment(where, key, raw, check)
            continue
        value = _expand(where, key, raw)
        try:
            values[key] = check(value)
        except _BadValueError as exc:
            got = exc.got or (
                f"a value of type {type(value).__name__}" if key in _SECRET_KEYS else _show(value)
            )
            remedy = f": {exc.remedy}" if exc.remedy else ""
            raise where.error(
                key, f"expected {exc.what}, got {got}{remedy}", kind="bad_value"
            ) from None
    return values


def _scalar_from_environment(where: _Where, key: str, raw: str, check: _Scalar) -> Any:
    """`burst = "${BURST:-20}"`: the expansion parsed as the key's type, strictly."""
    match = _VAR.fullmatch(raw)
    assert match is not None  # the caller matched it
    text, name, from_default = _substitute(where, key, match)
    if from_default:
        origin = f"{raw} gives its default {_short(repr(text))} ({name} is not set)"
    else:
        origin = f"environment variable {name} is {_short(repr(text))}"
    try:
        return check(check.from_text(text))
    except ValueError:
        what = check.what
    except _BadValueError as exc:
        what = exc.what
    raise where.error(key, f"{origin}: expected {what}", kind="env_var", variable=name)


def _substitute(where: _Where, key: object, match: re.Match[str]) -> tuple[str, str, bool]:
    """One `${...}`: its text, the variable's name, and whether the default gave the text."""
    body = _VAR_BODY.fullmatch(match[1])
    if body is None:
        raise where.error(
            key, f"malformed {match[0]!r}: write ${{VAR}} or ${{VAR:-default}}", kind="env_var"
        )
    name, default = body[1], body[2]
    found = os.environ.get(name)
    if found:
        return found, name, False
    if default is not None:
        return default, name, True  # like the shell: unset or empty takes the default
    if found is None:
        raise where.error(
            key,
            f"environment variable {name} is not set (set it, or write ${{{name}:-default}})",
            kind="env_var",
            variable=name,
        )
    return found, name, False


def _expand(where: _Where, key: object, value: Any) -> Any:
    """`${VAR}` / `${VAR:-default}` in strings, also inside lists; nothing else is special."""
    if isinstance(value, (list, tuple)):
        return [_expand(where, key, element) for element in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    return _VAR.sub(lambda match: _substitute(where, key, match)[0], value)


_TOO_DEEP = f"lists and tables nested more than {MAX_NESTING} levels deep"


def _check_nesting(source: str, data: Mapping[Any, Any]) -> None:
    """Refuse lists and tables nested past MAX_NESTING (or cyclic, from a dict) before anything
    recursive (repr, expansion) meets them; iterative, so depth itself cannot hurt."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            children: Iterable[tuple[Any, Any]] = value.items()
        elif isinstance(value, (list, tuple)):
            children = enumerate(value)
        else:
            continue
        if len(path) >= MAX_NESTING:
            raise _nesting_error(source, path)
        for name, child in children:
            step = name if isinstance(name, (str, int)) else "?"
            if isinstance(name, tuple):
                stack.append((name, (*path, "?")))  # a dict's tuple key can nest too
            stack.append((child, (*path, step)))


def _nesting_error(source: str, path: tuple[Any, ...]) -> ConfigError:
    section, rest = path[0], path[1:]
    # Name the table and key as the loader would; a list where a table belongs is named above it.
    key: object = None
    if section in ("stores", "limiters") and rest and isinstance(rest[0], str):
        where = _Where(source, f"[{section}.{_label(rest[0])}]")
        key = rest[1] if len(rest) > 1 and isinstance(rest[1], str) else None
    elif section == "routes" and rest and isinstance(rest[0], int):
        where = _Where(source, f"[[routes]] #{rest[0] + 1}")
        key = rest[1] if len(rest) > 1 and isinstance(rest[1], str) else None
    elif section == "middleware" and rest and isinstance(rest[0], str):
        where, key = _Where(source, "[middleware]"), rest[0]
    else:
        where, key = _Where(source), section
    return where.error(key, _TOO_DEEP, kind="bad_value")


def _named_tables(
    source: str, data: Mapping[str, Any], section: str
) -> list[tuple[_Where, str, Mapping[Any, Any]]]:
    """The `[section.NAME]` tables, names expanded and checked (they become NATS keys)."""
    tables = data.get(section, {})
    if not isinstance(tables, Mapping):
        raise _Where(source).error(
            section, f"expected [{section}.<name>] tables, got {_show(tables)}", kind="bad_value"
        )
    found: list[tuple[_Where, str, Mapping[Any, Any]]] = []
    seen: set[str] = set()  # expansion can make two names one: `[limiters."${APP}"]`
    for raw_name, table in tables.items():
        where = _Where(source, f"[{section}.{_label(raw_name)}]")
        name = _expand(where, None, raw_name)
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise where.error(
                None,
                f"names may only use letters, digits, '_' and '-', got {_short(_repr(name))}",
                kind="bad_value",
            )
        where = _Where(source, f"[{section}.{name}]")
        if name in seen:
            raise where.error(None, "defined twice", kind="conflict")
        seen.add(name)
        if not isinstance(table, Mapping):
            raise where.error(None, f"expected a table, got {_show(table)}", kind="bad_value")
        found.append((where, name, table))
    return found


def _store(where: _Where, name: str, table: Mapping[Any, Any]) -> StoreConfig:
    values = _fields(where, table, _STORE_KEYS, _STORE_IGNORED)
    if values.pop("engine", "memory") == "memory":
        # NATS keys are checked but unused: one file serves both engines via ${ENGINE:-memory}.
        return StoreConfig(name, "memory", max_keys=values.get("max_keys", DEFAULT_CACHE_SIZE))
    servers = values.pop("url", ())
    if not servers:
        raise where.error(
            "url", 'a nats store needs a url, e.g. url = "nats://localhost:4222"', kind="missing"
        )
    if (values.get("tls_cert") is None) != (values.get("tls_key") is None):
        raise where.error(
            "tls_cert", "tls_cert and tls_key go together: set both or neither", kind="conflict"
        )
    return StoreConfig(name, "nats", servers=servers, **values)


_PERIOD_NAMES = {seconds: unit for unit, seconds in PERIOD_SECONDS.items()}
_TWO_ALGORITHMS = (
    "cannot be combined with limit + window_seconds: they are two algorithms, token_bucket"
    " (from rate_per_second) and sliding_window (from limit + window_seconds), and a limiter"
    " has one; keep rate_per_second = 10.0, or limit = 5 with window_seconds = 300"
)


def _policy(where: _Where, name: str, values: Mapping[str, Any]) -> Algorithm:
    """The limiter's algorithm: a token bucket (rate_per_second, limit = "N/period", or
    rate-sync's integer limit + window_seconds), several rates (a list of "N/period"), or
    rate-sync's exact sliding window (algorithm = "sliding_window")."""
    rate: float | None = values.get("rate_per_second")
    limits: tuple[tuple[int, int | None], ...] | None = values.get("limit")
    window: int | None = values.get("window_seconds")
    one_of = 'set exactly one of rate_per_second = 10.0 or limit = "600/minute"'
    if rate is not None and (window is not None or (limits is not None and limits[0][1] is None)):
        raise where.error("rate_per_second", _TWO_ALGORITHMS, kind="conflict")
    if rate is not None and limits is not None:
        raise where.error("rate_per_second", one_of, kind="conflict")
    if values.get("algorithm") == "sliding_window":
        return _sliding_window(where, name, values)
    if limits is not None and len(limits) > 1:
        return _rates(where, name, values, limits)
    if limits is not None:
        count, period = limits[0]
        if period is None:
            if window is None:
                raise where.error(
                    "limit", "an integer limit needs window_seconds (N per window)", kind="missing"
                )
            period = window
        elif window is not None:
            raise where.error(
                "window_seconds",
                f'cannot be combined with limit = "{count}/period"',
                kind="conflict",
            )
        policy = Policy.per_period(name, count, period, values.get("burst", count))
        return _bounded(where, "limit", "burst" in values, policy)
    if rate is None:
        raise where.error(
            "limit", f"missing: {one_of} (or max_concurrent = N alone)", kind="missing"
        )
    try:  # rate-sync's pacing: one admission every 1/rate unless `burst` says otherwise
        policy = Policy.per_second(name, rate, values.get("burst", 1))
    except (ValueError, OverflowError):  # a rate so small that its interval overflows a float
        policy = Policy(name, MAX_REFILL_SECONDS * NS_PER_SECOND + 1, 1)
    return _bounded(where, "rate_per_second", "burst" in values, policy)


def _window_of(where: _Where, count: int, period: int | None, window: int | None) -> int:
    """The seconds of `limit = N` + `window_seconds`, or of `limit = "N/period"`."""
    if period is None:
        if window is None:
            raise where.error(
                "limit", "an integer limit needs window_seconds (N per window)", kind="missing"
            )
        return window
    if window is not None:
        raise where.error(
            "window_seconds", f'cannot be combined with limit = "{count}/period"', kind="conflict"
        )
    return period


def _sliding_window(where: _Where, name: str, values: Mapping[str, Any]) -> SlidingWindow:
    """rate-sync's exact sliding window: at most `limit` in any `window_seconds`."""
    limits: tuple[tuple[int, int | None], ...] | None = values.get("limit")
    if limits is None:
        raise where.error(
            "limit",
            "a sliding window counts admissions: give limit = 5 and window_seconds = 300",
            kind="missing" if "rate_per_second" not in values else "conflict",
        )
    if len(limits) > 1:
        raise where.error("limit", "a sliding window takes one limit, not a list", kind="conflict")
    if "burst" in values:
        raise where.error(
            "burst", "a sliding window has no burst: its limit is its capacity", kind="conflict"
        )
    count, period = limits[0]
    seconds = _window_of(where, count, period, values.get("window_seconds"))
    return SlidingWindow(name, count, seconds * NS_PER_SECOND)


def _rates(
    where: _Where,
    name: str,
    values: Mapping[str, Any],
    limits: tuple[tuple[int, int | None], ...],
    key: str | None = "limit",
) -> Rates:
    """`limit = ["10/second", "1000/day"]`: each rate's N is its own capacity."""
    for conflicting in ("burst", "window_seconds"):
        if conflicting in values:
            raise where.error(
                conflicting,
                "cannot be combined with several rates: each rate's N is its capacity",
                kind="conflict",
            )
    rates = []
    for count, period in limits:
        assert period is not None  # a list holds "N/period" strings only
        unit = _PERIOD_NAMES.get(period, f"{period}s")
        rate = Policy.per_period(f"{name}:{count}/{unit}", count, period, count)
        rates.append(_bounded(where, key, False, rate))
    if len({rate.name for rate in rates}) != len(rates):
        raise where.error(key, "the same rate is listed twice", kind="conflict")
    return Rates(name, tuple(rates))


def _bounded(where: _Where, rate_key: str | None, burst_given: bool, policy: Policy) -> Policy:
    """An empty bucket refills within MAX_REFILL_SECONDS, so `tat` stays far inside 64 bits."""
    limit_ns = MAX_REFILL_SECONDS * NS_PER_SECOND
    if policy.window_ns <= limit_ns:
        return policy
    key = "burst" if burst_given and policy.interval_ns <= limit_ns else rate_key
    refill = f"{policy.window_ns / NS_PER_SECOND:.6g} s"
    raise where.error(
        key,
        f"unusable rate: an empty bucket of {policy.burst} would take {refill} to refill,"
        f" more than {MAX_REFILL_SECONDS} s (10 years)",
        kind="bad_value",
    )


def _limiter(
    where: _Where, name: str, table: Mapping[Any, Any], stores: Mapping[str, StoreConfig]
) -> LimiterConfig:
    values = _fields(where, table, _LIMITER_KEYS, _LIMITER_IGNORED)
    store = values.get("store")
    if store is None:
        if len(stores) != 1:
            raise where.error(
                "store", f"missing; name one of the stores: {', '.join(stores)}", kind="missing"
            )
        store = next(iter(stores))
    elif store not in stores:
        raise _undefined(where, "store", store, "store", stores)
    slots = _slots(where, name, values)
    rated = slots is None or any(key in values for key in _RATE_KEYS)
    fail_mode: FailMode = values.get("fail_mode") or (
        "closed" if values.get("fail_closed") else "open"
    )
    if "fail_closed" in values and (fail_mode == "closed") != values["fail_closed"]:
        raise where.error(
            "fail_closed", f'contradicts fail_mode = "{fail_mode}" (keep one)', kind="conflict"
        )
    for settling in ("settle_header", "count_status"):
        if settling in values and not rated:
            raise where.error(
                settling,
                "goes with a rate (what it settles): max_concurrent has none",
                kind="missing",
            )
    policy = _policy(where, name, values) if rated else None
    tiers = _tiers(where, name, values, policy)
    return LimiterConfig(
        name=name,
        store=store,
        policy=policy,
        key=values.get("key", ("ip",)),
        fail_closed=fail_mode == "closed",
        slots=slots,
        timeout=values.get("timeout", 0.0),
        cost=values.get("cost", 1),
        exempt_when=values.get("exempt_when"),
        shadow=values.get("mode") == "shadow",
        tier=values.get("tier"),
        tiers=tiers,
        settle_header=values.get("settle_header"),
        count_status=values.get("count_status"),
        fail_mode=fail_mode,
    )


_PERIOD_RATES = '"N/second", "N/minute", "N/hour" or "N/day", or a list of them'


def _period_rates(where: _Where, key: str | None, value: Any) -> tuple[tuple[int, int], ...]:
    """A "N/period" rate or a list of them (a tier's, an inline `@limit`'s): (N, seconds)s."""
    try:
        limits = _check_limits(value)
        periods = tuple((count, period) for count, period in limits if period is not None)
        if len(periods) != len(limits):
            raise _BadValueError(_PERIOD_RATES)
    except _BadValueError as exc:
        what = exc.what if exc.what.startswith("N from") else _PERIOD_RATES
        raise where.error(
            key, f"expected {what}, got {exc.got or _show(value)}", kind="bad_value"
        ) from None
    return periods


def _rate_policy(
    where: _Where, key: str | None, name: str, limits: tuple[tuple[int, int], ...]
) -> Policy | Rates:
    """One token bucket of burst N, or several rates, for `_period_rates`."""
    if len(limits) > 1:
        return _rates(where, name, {}, limits, key)
    count, period = limits[0]
    return _bounded(where, key, False, Policy.per_period(name, count, period, count))


def _tiers(
    where: _Where, name: str, values: Mapping[str, Any], policy: Algorithm | None
) -> dict[str, Algorithm]:
    """`[limiters.<name>.tiers]`: each tier's rate, or list of rates, compiled like `limit`.

    A tier's policy is named `<limiter>:<tier>` (what RateLimit-Policy reports). The tiers of
    a sliding-window limiter are sliding windows of their "N/period" (one rate each)."""
    table: Mapping[Any, Any] | None = values.get("tiers")
    if table is None:
        if "tier" in values:
            raise where.error(
                "tiers",
                f'tier needs a [limiters.{name}.tiers] table, e.g. pro = "1000/hour"',
                kind="missing",
            )
        return {}
    if "tier" not in values:
        raise where.error(
            "tier",
            'missing: tiers need tier = "package.module:function" (request -> tier name)',
            kind="missing",
        )
    if policy is None:
        raise where.error(
            "tiers",
            "tiers need the limiter's own rate too (for requests without a tier)",
            kind="missing",
        )
    inner = _Where(where.source, f"[limiters.{name}.tiers]")
    sliding = isinstance(policy, SlidingWindow)
    tiers: dict[str, Algorithm] = {}
    for tier, raw in table.items():
        if not (isinstance(tier, str) and _NAME.fullmatch(tier)):
            raise inner.error(
                tier, "tier names may only use letters, digits, '_' and '-'", kind="bad_value"
            )
        value = _expand(inner, tier, raw)
        limits = _period_rates(inner, tier, value)
        tier_name = f"{name}:{tier}"
        if sliding:
            if len(limits) > 1:
                raise inner.error(
                    tier, "a sliding window's tier takes one rate, not a list", kind="conflict"
                )
            count, period = limits[0]
            tiers[tier] = SlidingWindow(tier_name, count, period * NS_PER_SECOND)
        else:
            tiers[tier] = _rate_policy(inner, tier, tier_name, limits)
    return tiers


def _slots(where: _Where, name: str, values: Mapping[str, Any]) -> Slots | None:
    """`max_concurrent` (alone or with a rate) and its `lease_seconds`."""
    limit: int | None = values.get("max_concurrent")
    lease: float | None = values.get("lease_seconds")
    if limit is None:
        if lease is not None:
            raise where.error(
                "lease_seconds", "goes with max_concurrent (the lease of its slots)", kind="missing"
            )
        return None
    return Slots.of(name, limit, DEFAULT_LEASE_SECONDS if lease is None else lease)


def _undefined(
    where: _Where, key: str, name: str, kind: str, defined: Iterable[str]
) -> ConfigError:
    defined = list(defined)
    hint = difflib.get_close_matches(name, defined, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    known = ", ".join(defined) or "none"
    return where.error(
        key,
        f"no {kind} named {name!r}{did_you_mean} (defined: {known})",
        kind="undefined_reference",
    )


def _check_limiters(
    where: _Where, key: str, names: tuple[str, ...], limiters: Mapping[str, LimiterConfig]
) -> None:
    for name in names:
        if name not in limiters:
            raise _undefined(where, key, name, "limiter", limiters)


def _middleware(
    source: str, data: Mapping[str, Any], limiters: Mapping[str, LimiterConfig]
) -> MiddlewareConfig:
    table = data.get("middleware", {})
    where = _Where(source, "[middleware]")
    if not isinstance(table, Mapping):
        raise _Where(source).error(
            "middleware", f"expected a table, got {_show(table)}", kind="bad_value"
        )
    values = _fields(where, table, _MIDDLEWARE_KEYS)
    _check_limiters(where, "default", values.get("default", ()), limiters)
    return MiddlewareConfig(**values)


def _routes(
    source: str, data: Mapping[str, Any], limiters: Mapping[str, LimiterConfig]
) -> tuple[RouteRule, ...]:
    tables = data.get("routes", [])
    if not isinstance(tables, (list, tuple)) or not all(isinstance(t, Mapping) for t in tables):
        raise _Where(source).error(
            "routes", f"expected [[routes]] tables, got {_show(tables)}", kind="bad_value"
        )
    rules = []
    for number, table in enumerate(tables, 1):
        where = _Where(source, f"[[routes]] #{number}")
        values = _fields(where, table, _ROUTE_KEYS)
        if "path" not in values:
            raise where.error("path", 'missing, e.g. path = "/api/*"', kind="missing")
        _check_limiters(where, "limiters", values.get("limiters", ()), limiters)
        _check_limiters(where, "messages", values.get("messages", ()), limiters)
        if values.get("limiters") and values.get("exempt", False):
            raise where.error(
                "limiters",
                "a rule needs either limiters or exempt = true, not both",
                kind="conflict",
            )
        if not (values.get("limiters") or values.get("exempt") or values.get("messages")):
            raise where.error(
                "limiters",
                "a rule needs either limiters or exempt = true (or only messages, for a"
                " WebSocket's messages)",
                kind="conflict",
            )
        if "cost" in values and not (values.get("limiters") or values.get("messages")):
            raise where.error(
                "cost", "goes with limiters or messages (what each of them spends)", kind="missing"
            )
        rules.append(RouteRule(**values))
    return tuple(rules)


def _validate(data: Mapping[Any, Any], source: str) -> Config:
    _check_nesting(source, data)
    for key in data:
        if key not in _SECTIONS:
            raise _unknown(_Where(source), key, _SECTIONS)
    stores = {name: _store(w, name, t) for w, name, t in _named_tables(source, data, "stores")}
    stores = stores or {DEFAULT_STORE_NAME: StoreConfig(DEFAULT_STORE_NAME)}  # embedded default
    limiters = {
        name: _limiter(w, name, t, stores) for w, name, t in _named_tables(source, data, "limiters")
    }
    middleware = _middleware(source, data, limiters)
    if middleware.mode == "shadow":  # for all: a limiter's own mode cannot enforce then
        limiters = {name: replace(limiter, shadow=True) for name, limiter in limiters.items()}
    return Config(
        stores=stores,
        limiters=limiters,
        middleware=middleware,
        routes=_routes(source, data, limiters),
        source=source,
    )


# --- inline limiters: @limit("5/minute") -------------------------------------------------------


def inline_limiter(
    config: Config, name: str, endpoint: str, rates: tuple[str, ...], key: Any
) -> LimiterConfig:
    """The unnamed limiter of `@limit("5/minute", key=...)` on `endpoint`, called `name`: its
    rates (several: all must allow, like `limit = [...]`) on the default store (the one called
    "default", else the only one), keyed by `key` ("ip" for None). ConfigError, naming the
    endpoint, for a malformed rate or key."""
    where = _Where(endpoint, "@limit")
    limits = _period_rates(where, None, list(rates) if len(rates) > 1 else rates[0])
    try:
        keys = ("ip",) if key is None else _keys(key)
    except _BadValueError as exc:
        raise where.error(
            "key", f"expected {exc.what}, got {_show(key)}", kind="bad_value"
        ) from None
    stores = config.stores
    store = DEFAULT_STORE_NAME if DEFAULT_STORE_NAME in stores else None
    if store is None and len(stores) == 1:
        store = next(iter(stores))
    if store is None:
        raise where.error(
            None,
            f"an inline rate lives on the default store, and none of the stores"
            f" ({', '.join(stores)}) is called {DEFAULT_STORE_NAME!r}: add"
            f" [stores.{DEFAULT_STORE_NAME}], or give the endpoint a [limiters.<name>] table",
            kind="missing",
        )
    return LimiterConfig(
        name=name,
        store=store,
        policy=_rate_policy(where, None, name, limits),
        key=keys,
        shadow=config.middleware.mode == "shadow",
    )


# --- sources -----------------------------------------------------------------------------------


def discover_config_path() -> Path | None:
    """`$RATE_SYNC_CONFIG`, then ./rate-sync.toml, then ./config/rate-sync.toml; None if none."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(
                f"${ENV_CONFIG} is {explicit!r}, but there is no such file",
                source=explicit,
                kind="file",
            )
        return path
    return next((path for path in SEARCH_PATHS if path.is_file()), None)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file", source=source, kind="file") from None
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read: {exc.strerror or exc}", source=source, kind="unreadable"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: not UTF-8 text: {exc}", source=source, kind="unreadable"
        ) from None
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid TOML: {exc}", source=source, kind="toml_syntax"
        ) from None
    except (RecursionError, ValueError) as exc:  # parsed, but past the parser's own limits
        raise _parser_limit_error(source, text, exc) from None
    return data


_TOML_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_TOML_KEY_LINE = re.compile(rf"\s*({_TOML_KEY_PART}(?:\s*\.\s*{_TOML_KEY_PART})*)\s*=")
_TOML_HEADER_LINE = re.compile(r"\s*(\[\[?)\s*([^\]\n]+?)\s*(\]\]?)\s*(?:#.*)?$")
_TOML_PARSERS = frozenset({"tomllib._parser", "tomli._parser"})


def _parser_limit_error(source: str, text: str, exc: Exception) -> ConfigError:
    """The line, table and key of a value the TOML parser could not hold (nested past Python's
    recursion limit, an integer of 4300+ digits), named as the loader names them."""
    line, path = _statement_in_traceback(exc) or _statement_by_bisection(text)
    table: str | None = None
    if len(path) > 1:
        parents = path[:-1]
        table = "[[routes]]" if parents == ("routes",) else f"[{'.'.join(map(_label, parents))}]"
    if isinstance(exc, RecursionError):
        problem = _TOO_DEEP
    elif "digits" in str(exc):
        problem = "an integer with thousands of digits, far beyond any limit"
    else:
        problem = f"cannot be parsed: {_short(str(exc))}"
    key = path[-1] if path else None
    return _Where(source, table or "").error(key, f"line {line}: {problem}", kind="bad_value")


def _key_parts(dotted: str) -> tuple[str, ...]:
    """`limiters."api".burst` -> ("limiters", "api", "burst"), quotes removed (no escapes)."""
    return tuple(part.strip("\"'") for part in re.findall(_TOML_KEY_PART, dotted))


def _statement_in_traceback(exc: BaseException) -> tuple[int, tuple[str, ...]] | None:
    """Where the parser's statement loop stood: its `src`, `pos` (the start of the key = value
    statement) and `header` (the current table). Private to tomllib/tomli, hence the fallback."""
    trace = exc.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if frame.f_code.co_name == "loads" and frame.f_globals.get("__name__") in _TOML_PARSERS:
            src, pos, header = (frame.f_locals.get(name) for name in ("src", "pos", "header"))
            if not (isinstance(src, str) and isinstance(pos, int) and isinstance(header, tuple)):
                return None
            assignment = _TOML_KEY_LINE.match(src, pos)
            key = _key_parts(assignment[1]) if assignment else ()
            return src.count("\n", 0, pos) + 1, (*map(str, header), *key)
        trace = trace.tb_next
    return None


def _statement_by_bisection(text: str) -> tuple[int, tuple[str, ...]]:
    """The first line at which a prefix of the file fails the same way (the parser reads in
    order), then the key on or above it and the table header above that: a parse per step."""

    def fails(line_count: int) -> bool:
        try:
            tomllib.loads("".join(lines[:line_count]))
        except tomllib.TOMLDecodeError:
            return False  # only cut short
        except (RecursionError, ValueError):
            return True
        return False

    lines = text.splitlines(keepends=True)
    good, bad = 0, len(lines)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (good, middle) if fails(middle) else (middle, bad)
    table: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    for line in reversed(lines[:bad]):
        if header := _TOML_HEADER_LINE.match(line):
            table = _key_parts(header[2])
            break
        if not key and (assignment := _TOML_KEY_LINE.match(line)):
            key = _key_parts(assignment[1])
    return bad, (*table, *key)


# --- no configuration at all -------------------------------------------------------------------

_logger = logging.getLogger("ratesync_middleware")
_no_config_lock = threading.Lock()
_no_config_warned = False


def _warn_no_config() -> None:
    """Once per process: an app that meant to be limited and found no file limits nothing."""
    global _no_config_warned
    with _no_config_lock:
        if _no_config_warned:
            return
        _no_config_warned = True
    try:
        searched = [str(Path.cwd() / path) for path in SEARCH_PATHS]
    except OSError:  # the working directory was removed
        searched = [str(path) for path in SEARCH_PATHS]
    _logger.warning(
        "No rate-sync configuration found ($%s is not set; no %s): using one memory store and"
        ' no limiters, so only inline @limit("N/period") rates apply. Pass config=..., set $%s'
        " or create rate-sync.toml.",
        ENV_CONFIG,
        " and no ".join(searched),
        ENV_CONFIG,
    )


def reset_no_config_warning() -> None:
    """Let the next `load_config()` that finds no configuration warn again (for tests)."""
    global _no_config_warned
    with _no_config_lock:
        _no_config_warned = False


def load_config(
    source: ConfigSource = None,
) -> Config:
    """A validated Config from a TOML path, a dict shaped like the TOML, a Config, or discovery.

    With nothing given and nothing discovered, the embedded default: one memory store, no limiters,
    and one WARNING on the `ratesync_middleware` logger per process, naming the places searched.
    Raises ConfigError, naming the file, table and key, for anything it cannot use.
    """
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return _validate(source, "<dict>")
    if source is None:
        source = discover_config_path()
        if source is None:
            _warn_no_config()
            return _validate({}, "<default>")  # an empty file: the default memory store
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"config must be a path, a mapping or a Config, not {type(source).__name__}"
        )
    return _validate(_read_toml(source), os.fspath(source))
