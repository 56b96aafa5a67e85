"""From a request to a decision, for every adapter: client IP, identities, route plans, the check.

Nothing here imports a web framework. An adapter describes its request as `RequestFacts` (a subclass
that knows how to read one header and the authenticated user), finds the endpoint it will call, and
asks `RequestLimiter` for the `Plan` of that endpoint and request and then for a `Decision`.

Precedence of what limits a request: the endpoint's `@limit` / `@exempt` marks, else the first
matching `[[routes]]` rule, else `[middleware] default`, else nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import importlib
import inspect
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .bucket import Decision
from .config import Config, ConfigSource, LimiterConfig, RouteRule
from .errors import ConfigError, StoreError
from .keys import join_identity
from .limiter import AsyncRateLimiter, logger
from .stores.memory import MemoryStore

__all__ = [
    "ClientAddress",
    "Limit",
    "Marks",
    "Plan",
    "RequestFacts",
    "RequestLimiter",
    "exempt",
    "get_marks",
    "limit",
]


MARKS_ATTRIBUTE: Final = "_ratesync_marks"
PLAN_CACHE_SIZE: Final = 4096  # (method, path) plans kept when [[routes]] rules exist
ADDRESS_CACHE_SIZE: Final = 4096  # parsed peers / IPv6 networks kept
UNKNOWN_CLIENT: Final = "unknown"  # the identity of a request without a peer address (unix socket)

_F = TypeVar("_F")
_K = TypeVar("_K")
_V = TypeVar("_V")


# --- decorators ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Marks:
    """What `@limit` / `@exempt` wrote on an endpoint: (limiter, cost) pairs, or an exemption."""

    limits: tuple[tuple[str, int], ...] = ()
    exempt: bool = False


def get_marks(endpoint: object) -> Marks | None:
    """The marks on an endpoint (a function, method or class), None when it has none."""
    marks = getattr(endpoint, MARKS_ATTRIBUTE, None)
    return marks if isinstance(marks, Marks) else None


def limit(*names: str, cost: int = 1) -> Callable[[_F], _F]:
    """Limit an endpoint by the named limiters (all must allow), each request spending `cost`.

    Only sets an attribute on the function, so it works on Starlette endpoints, FastAPI path
    operations (above or below the route decorator), Django views and Flask view functions.
    Stacked `@limit`s add up, read from top to bottom.
    """
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError("limit() needs one or more limiter names, e.g. @limit('login')")
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")

    def decorate(endpoint: _F) -> _F:
        marks = get_marks(endpoint) or Marks()
        added = tuple((name, cost) for name in names)
        # Decorators apply bottom-up: prepend, so the names read top to bottom as written.
        setattr(endpoint, MARKS_ATTRIBUTE, Marks(added + marks.limits, marks.exempt))
        return endpoint

    return decorate


def exempt(endpoint: _F) -> _F:
    """Never limit this endpoint (it wins over `@limit`, route rules and the default)."""
    marks = get_marks(endpoint) or Marks()
    setattr(endpoint, MARKS_ATTRIBUTE, Marks(marks.limits, exempt=True))
    return endpoint


# --- client address --------------------------------------------------------------------------------


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a header element: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `"[::1]"`; else None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 has at least two colons
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """The client's address: the peer, or what `trusted_proxies` say the client was.

    `X-Forwarded-For` is read right to left, skipping trusted hops; the first untrusted hop is the
    client. Without that header the RFC 7239 `Forwarded` header's `for=` values are read the same
    way. An element that is no IP address (garbage, `unknown`, an obfuscated name) stops the walk
    and the peer is used. IPv6 clients are grouped by network (`ipv6_prefix` bits, /64 default),
    since one subscriber usually holds a whole /64.
    """

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        ipv6_prefix: int = 64,
        forwarded_header: str = "x-forwarded-for",
    ) -> None:
        self.networks = tuple(ipaddress.ip_network(net, strict=False) for net in trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self.forwarded_header = forwarded_header
        # Bounded caches: peers and header values are client-controlled.
        self._peer_is_trusted = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(self._trusted_text)
        self._group_v6 = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(self._group_v6_text)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def _trusted_text(self, peer: str) -> bool:
        address = _parse_ip(peer)
        return address is not None and self._is_trusted(address)

    def _group_v6_text(self, text: str) -> str:
        address = _parse_ip(text)
        return text if address is None else self._group(address)

    def _group(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        if address.version == 4:
            return str(address)
        network = ipaddress.IPv6Network((int(address), self.ipv6_prefix), strict=False)
        return str(network)

    def __call__(self, peer: str | None, header: Callable[[str], str | None]) -> str:
        """The client identity for a request from `peer`; `header(name)` reads a request header."""
        if not peer:
            return UNKNOWN_CLIENT
        if self.networks and self._peer_is_trusted(peer):
            try:
                forwarded = self._from_headers(header)
            except Exception:  # a header getter that chokes on bytes must not fail the request
                forwarded = None
            if forwarded is not None:
                return self._group(forwarded)
        if ":" in peer:
            return self._group_v6(peer)
        return peer

    def _from_headers(
        self, header: Callable[[str], str | None]
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        # Only the one header the proxies are configured to set: a client may send the other one,
        # and a proxy that does not know it passes it through unchanged.
        value = header(self.forwarded_header)
        if not value:
            return None
        if self.forwarded_header == "forwarded":
            return self._walk(_forwarded_for(value))
        return self._walk(value.split(","))

    def _walk(self, hops: list[str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """Right to left: the first hop that is not a trusted proxy; None on garbage."""
        address = None
        for hop in reversed(hops[-64:]):  # a proxy chain longer than 64 hops is an attack
            address = _parse_ip(hop)
            if address is None:
                return None
            if not self._is_trusted(address):
                return address
        return address  # every hop is trusted: the leftmost one is the client


def _forwarded_for(value: str) -> list[str]:
    """The `for=` values of an RFC 7239 `Forwarded` header, one per element, in order.

    An element without `for=` yields "" (not an address), which stops the walk there.
    """
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, equals, token = pair.partition("=")
            if equals and name.strip().lower() == "for":
                found = token.strip()
                break
        hops.append(found)
    return hops


# --- request facts ---------------------------------------------------------------------------------


class RequestFacts:
    """What the limiter needs to know about one request; adapters subclass it.

    A subclass overrides `header` (one header's value by lower-case name, repeated fields joined
    with ", "), `user_id` (the authenticated user's id, else None) and `request` (the framework's
    own request object, for `"pkg.mod:func"` keys). Everything is computed on demand.
    """

    __slots__ = ("_client_address", "_client_ip", "method", "path", "peer")

    def __init__(
        self, method: str, path: str, peer: str | None, client_address: ClientAddress
    ) -> None:
        self.method = method
        self.path = path
        self.peer = peer
        self._client_address = client_address
        self._client_ip: str | None = None

    def header(self, name: str) -> str | None:
        """The value of header `name` (lower case), None when absent."""
        return None

    def user_id(self) -> str | None:
        """The authenticated user's id, None for anonymous requests."""
        return None

    @property
    def request(self) -> Any:
        """The framework's request object (Starlette `Request`, Django `HttpRequest`, ...)."""
        return None

    @property
    def client_ip(self) -> str:
        """The client address (behind trusted proxies), IPv6 grouped by network."""
        ip = self._client_ip
        if ip is None:
            ip = self._client_ip = self._client_address(self.peer, self.header)
        return ip


# --- identities ------------------------------------------------------------------------------------

KeyFunction = Callable[[RequestFacts], Any]
"""A `"pkg.mod:func"` key: called with the `RequestFacts`; returns a str (or int), None meaning
"use the client IP"; may be a coroutine function."""


def _part_ip(facts: RequestFacts) -> str:
    return facts.client_ip


def _part_user(facts: RequestFacts) -> str:
    return facts.user_id() or facts.client_ip


def _part_path(facts: RequestFacts) -> str:
    return facts.path


def _part_header(name: str) -> Callable[[RequestFacts], str]:
    def part(facts: RequestFacts) -> str:
        return facts.header(name) or facts.client_ip

    return part


def _import_key(limiter: str, spec: str, source: str) -> KeyFunction:
    module_name, _, qualname = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attribute in qualname.split("."):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{source}: [limiters.{limiter}] key: cannot import {spec!r}: {exc}"
        ) from None
    if not callable(target):
        raise ConfigError(f"{source}: [limiters.{limiter}] key: {spec!r} is not callable")
    function: KeyFunction = target
    return function


class Identity:
    """A limiter's `key` compiled once: request facts in, the identity string out.

    `sync` identities (everything but `"pkg.mod:func"` parts) are computed without awaiting.
    A global limiter's identity is None: one bucket for everybody.
    """

    __slots__ = ("_callables", "_limiter", "_parts", "_source", "is_global", "sync")

    def __init__(self, config: LimiterConfig, source: str) -> None:
        self.is_global = config.is_global
        self._parts: list[Callable[[RequestFacts], Any]] = []
        self._callables: list[tuple[int, str]] = []  # (index, spec) still to import
        for spec in config.key:
            if spec == "global":
                continue
            if spec == "ip":
                self._parts.append(_part_ip)
            elif spec == "user":
                self._parts.append(_part_user)
            elif spec == "path":
                self._parts.append(_part_path)
            elif spec.startswith("header:"):
                self._parts.append(_part_header(spec[len("header:") :].lower()))
            else:
                self._callables.append((len(self._parts), spec))
                self._parts.append(_part_ip)  # placeholder until imported
        self.sync = not self._callables
        self._limiter, self._source = config.name, source

    def load(self) -> None:
        """Import the `"pkg.mod:func"` parts (done lazily on first use, or at start-up)."""
        for index, spec in self._callables:
            self._parts[index] = _import_key(self._limiter, spec, self._source)
        self._callables = []

    def now(self, facts: RequestFacts) -> str | None:
        """The identity of a key without callables."""
        if self.is_global:
            return None
        parts = self._parts
        if len(parts) == 1:
            identity: str = parts[0](facts)
            return identity
        return join_identity([part(facts) for part in parts])

    async def __call__(self, facts: RequestFacts) -> str | None:
        """The identity, awaiting async key functions."""
        if self.is_global:
            return None
        if self._callables:
            self.load()
        values = []
        for part in self._parts:
            value = part(facts)
            if inspect.isawaitable(value):
                value = await value
            values.append(facts.client_ip if value is None else str(value))
        return values[0] if len(values) == 1 else join_identity(values)


# --- plans -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """One limiter that applies to a request: its name, the cost, how to find the identity."""

    name: str
    cost: int
    identity: Identity


Plan = tuple[Limit, ...]
"""The limiters of a request, checked in order; empty means not limited."""

NOT_LIMITED: Final[Plan] = ()


@dataclass(frozen=True, slots=True)
class _Rule:
    match: Callable[[str], object]
    methods: frozenset[str] | None
    plan: Plan


def _glob(pattern: str) -> Callable[[str], object]:
    """A compiled `[[routes]] path` glob: `*` matches anything (also `/`), `?` one character."""
    return re.compile(fnmatch.translate(pattern)).match


class BoundedCache(dict[_K, _V]):
    """A dict that forgets its oldest entries beyond `size`: keys can be client-controlled."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: _K, value: _V) -> _V:
        if len(self) >= self.size:
            # Another thread may have evicted it first (sync adapters share this across threads).
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self[next(iter(self))]
        self[key] = value
        return value


class RequestLimiter:
    """Route plans and decisions for one configuration, shared by all adapters.

        core = RequestLimiter("rate-sync.toml")
        plan = core.plan(facts.method, facts.path, endpoint)
        decision = await core.check(facts, plan)   # None: not limited
        if decision is not None and not decision.allowed: ...   # 429, or 503 when degraded

    The configuration is compiled once; per request the work is a dict lookup for the plan,
    the identity of each limiter and one store call per limiter.
    """

    def __init__(self, config: ConfigSource | AsyncRateLimiter = None) -> None:
        self.limiter = config if isinstance(config, AsyncRateLimiter) else AsyncRateLimiter(config)
        self.config: Config = self.limiter.config
        middleware = self.config.middleware
        self.client_address = ClientAddress(
            middleware.trusted_proxies, middleware.ipv6_prefix, middleware.forwarded_header
        )
        self._identities = {
            name: Identity(limiter, self.config.source)
            for name, limiter in self.config.limiters.items()
        }
        self._default = self._plan_of(((name, 1) for name in middleware.default), "[middleware]")
        self._rules = tuple(self._rule(rule) for rule in self.config.routes)
        self._marked: dict[Marks, Plan] = {}
        self._immediate: dict[Plan, bool] = {}  # plans come from the configuration: few
        self._by_path: BoundedCache[tuple[str, str], Plan] = BoundedCache(PLAN_CACHE_SIZE)

    def _plan_of(self, limits: Iterable[tuple[str, int]], where: str) -> Plan:
        plan = []
        for name, cost in limits:
            if name not in self._identities:
                known = ", ".join(sorted(self._identities)) or "none"
                raise ConfigError(
                    f"{self.config.source}: {where}: no limiter {name!r} (defined: {known})"
                )
            plan.append(Limit(name, cost, self._identities[name]))
        return tuple(plan)

    def _rule(self, rule: RouteRule) -> _Rule:
        methods = None
        if rule.methods is not None:
            methods = frozenset(rule.methods)
            if "GET" in methods:
                methods |= {"HEAD"}  # HEAD is GET without a body: no way around a GET limit
        plan = NOT_LIMITED if rule.exempt else self._plan_of(((n, 1) for n in rule.limiters), "")
        return _Rule(_glob(rule.path), methods, plan)

    def marked_plan(self, marks: Marks, where: object = None) -> Plan:
        """The plan of an endpoint carrying `marks` (exempt wins over limits)."""
        plan = self._marked.get(marks)
        if plan is None:
            label = f"@limit on {getattr(where, '__qualname__', where)!s}" if where else "@limit"
            plan = NOT_LIMITED if marks.exempt else self._plan_of(marks.limits, label)
            self._marked[marks] = plan
        return plan

    def plan(self, method: str, path: str, endpoint: object = None) -> Plan:
        """The limiters of a request: endpoint marks > first matching route rule > default.

        `endpoint` is what the framework will call (function, method or class), None if unknown.
        """
        if endpoint is not None:
            marks = get_marks(endpoint)
            if marks is not None:
                plan = self._marked.get(marks)
                return plan if plan is not None else self.marked_plan(marks, endpoint)
        if not self._rules:
            return self._default
        key = (method, path)
        plan = self._by_path.get(key)
        if plan is None:
            plan = self._by_path.put(key, self._match_rules(method, path))
        return plan

    def _match_rules(self, method: str, path: str) -> Plan:
        for rule in self._rules:
            if (rule.methods is None or method in rule.methods) and rule.match(path):
                return rule.plan
        return self._default

    async def check(self, facts: RequestFacts, plan: Plan) -> Decision | None:
        """Spend from every limiter of `plan`; the decision to report, None when not limited.

        Limiters are checked in order and the first denial stops the check and is returned
        (`decision.policy` names the limiter; `degraded` with a denial means the store failed
        under `fail_closed`). When all allow, the most restrictive decision is returned: the one
        with the fewest remaining units, preferring real answers over fail-open ones.
        """
        best: Decision | None = None
        hit = self.limiter.hit
        for item in plan:
            identity = item.identity
            key = identity.now(facts) if identity.sync else await identity(facts)
            decision = await hit(item.name, key, item.cost)
            if not decision.allowed:
                return decision
            if best is None or _more_restrictive(decision, best):
                best = decision
        return best

    def immediate(self, plan: Plan) -> bool:
        """Whether `check_now` can decide `plan`: memory stores only, keys without async parts."""
        known = self._immediate.get(plan)
        if known is None:
            limiter = self.limiter
            known = self._immediate[plan] = all(
                item.identity.sync
                and isinstance(limiter.store(limiter.limiter(item.name).store), MemoryStore)
                for item in plan
            )
        return known

    def check_now(self, facts: RequestFacts, plan: Plan) -> Decision | None:
        """`check` for a plan that never waits (see `immediate`), without a coroutine.

        The adapters' fast path for memory stores; the same answers as `check`.
        """
        best: Decision | None = None
        hit_now = self.limiter.hit_now
        for item in plan:
            decision = hit_now(item.name, item.identity.now(facts), item.cost)
            if not decision.allowed:
                return decision
            if best is None or _more_restrictive(decision, best):
                best = decision
        return best

    async def startup(self, endpoints: Iterable[object] = ()) -> None:
        """Fail early: import key functions, check the marks of `endpoints`, open the stores.

        Configuration errors raise `ConfigError`; a store that cannot be reached only logs (its
        limiters answer fail-open/closed until it can).
        """
        self.prepare(endpoints)
        await self.open_stores()

    def prepare(self, endpoints: Iterable[object] = ()) -> None:
        """The part of `startup` that needs no store: key functions and the endpoints' marks."""
        for identity in self._identities.values():
            identity.load()
        for endpoint in endpoints:
            marks = get_marks(endpoint)
            if marks is not None:
                self.marked_plan(marks, endpoint)

    @property
    def remote_stores(self) -> list[str]:
        """The stores in use that talk to a server (all but the in-process memory store)."""
        used = {limiter.store for limiter in self.config.limiters.values()}
        return sorted(name for name in used if self.config.stores[name].engine != "memory")

    async def open_stores(self) -> None:
        """Connect the stores in use now rather than at the first request."""
        await asyncio.gather(*(self._open(name) for name in self.remote_stores))

    async def _open(self, name: str) -> None:
        ready = getattr(self.limiter.store(name), "ready", None)
        if ready is None:
            return
        try:
            await ready()
        except StoreError as error:  # requests answer fail-open/closed until it is back
            logger.warning("store %r is not reachable at start-up: %s", name, error)

    async def aclose(self) -> None:
        """Close the stores (they reopen on next use)."""
        await self.limiter.aclose()


def _more_restrictive(decision: Decision, than: Decision) -> bool:
    if decision.degraded != than.degraded:
        return than.degraded  # a real answer says more than a fail-open guess
    if decision.remaining != than.remaining:
        return decision.remaining < than.remaining
    return decision.reset_after > than.reset_after
