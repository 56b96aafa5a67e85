"""Which limiters apply to a request: one resolver for every adapter.

Precedence, the same everywhere: the first of the adapter's candidate endpoint objects that
carries `@limit` / `@exempt` marks (an adapter lists them in its framework's order: the method
handler, the view function, the view class, a blueprint...), else the first matching
`[[routes]]` rule, else `[middleware] default`, else nothing. An adapter whose endpoint would not
handle the request (a 404, a 405) lists no candidates: rules and the default still apply.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import inspect
import re
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

from .callables import Exemption, RequestCost, RequestTier
from .config import Config, LimiterConfig, RouteRule, inline_limiter
from .errors import ConfigError
from .identities import Identity
from .marks import MARKS_ATTRIBUTE, Cost, InlineRate, Marks, get_marks
from .settling import SettleRule

__all__ = [
    "EXEMPT",
    "NOT_LIMITED",
    "PLAN_CACHE_SIZE",
    "BoundedCache",
    "Limit",
    "Plan",
    "PlanResolver",
    "endpoint_objects",
    "method_handler",
]

PLAN_CACHE_SIZE: Final = 4096  # request-keyed plans kept (paths and methods are client-controlled)
_INLINE_NAME_LENGTH: Final = 80  # longer derived names keep a prefix and a hash (a NATS key)

_K = TypeVar("_K")
_V = TypeVar("_V")


class Limit(NamedTuple):
    """One limiter that applies to a request: its name, the cost, how to find the identity.

    `request_cost` (then `cost` is a placeholder), `exempt_when` and `request_tier` are the
    user's functions of the request, resolved per request by the lifecycle before any store
    call (which builds a `Limit` with the cost and `tier` of each such request: a named tuple,
    a third of a frozen dataclass).
    """

    name: str
    cost: int
    identity: Identity
    request_cost: RequestCost | None = None
    exempt_when: Exemption | None = None
    shadow: bool = False  # `mode = "shadow"`: its refusals are reported, never enforced
    tier: str | None = None  # the request's tier (resolved from `request_tier`, or given)
    request_tier: RequestTier | None = None  # `tier = "pkg.mod:func"`, called per request
    settle: SettleRule | None = None  # `settle_header` / `count_status`: charged at `finish`


Plan = tuple[Limit, ...]
"""The limiters of a request, checked in order; empty means not limited."""

NOT_LIMITED: Final[Plan] = ()


class _Candidate:
    """A candidate endpoint that is nothing but its marks (see `EXEMPT`)."""

    __slots__ = (MARKS_ATTRIBUTE,)

    def __init__(self, marks: Marks) -> None:
        setattr(self, MARKS_ATTRIBUTE, marks)


EXEMPT: Final = _Candidate(Marks(exempt=True))
"""A candidate that exempts the request: an adapter's own exemption (Flask's static files)."""


def method_handler(
    view_class: object, method: str, allowed: Collection[str] | None = None
) -> object | None:
    """The method of a class-based view that handles `method`, None when there is none (405).

    `allowed`: the lower-case method names the framework dispatches at all (Django's
    `http_method_names`). HEAD falls back to `get`, as Starlette, Django and Flask all do.
    """
    name = method.lower()
    if allowed is not None and name not in allowed:
        return None
    handler = getattr(view_class, name, None)
    if handler is None and name == "head":
        handler = getattr(view_class, "get", None)
    return handler


def endpoint_objects(endpoint: object) -> Iterator[object]:
    """An endpoint and, for a class, each of its attributes: what may carry marks, at start-up."""
    yield endpoint
    if inspect.isclass(endpoint):
        for name in dir(endpoint):
            with contextlib.suppress(Exception):  # a descriptor that raises has no marks
                yield getattr(endpoint, name)


@dataclass(frozen=True, slots=True)
class _Rule:
    match: Callable[[str], object]
    methods: frozenset[str] | None
    plan: Plan
    decides: bool  # it has limiters or exempt = true (a rule may have only messages)
    messages: Plan  # what each message of a matching WebSocket spends


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


class PlanResolver:
    """Marks > `[[routes]]` > default, compiled once per configuration; one plan cache.

    plans = PlanResolver(config)
    plan = plans.plan("POST", "/login", handler, view)          # candidates in order
    plan = plans.cached_plan(key, "POST", "/login", find)       # find() -> candidates
    """

    def __init__(
        self, config: Config, add_limiter: Callable[[LimiterConfig], None] | None = None
    ) -> None:
        """`add_limiter` is told of each inline `@limit("5/minute")` limiter as it is found."""
        self.config = config
        self._add_limiter = add_limiter
        self._limiters: dict[str, LimiterConfig] = dict(config.limiters)  # and the inline ones
        self._identities = {
            name: Identity(limiter, config.source) for name, limiter in config.limiters.items()
        }
        source = config.source
        # The user's functions named in the tables, compiled once (imported at `prepare`).
        self._functions: list[RequestCost | Exemption | RequestTier] = []
        self._costs: dict[str, int | RequestCost] = {}
        self._exemptions: dict[str, Exemption] = {}
        self._tiers: dict[str, RequestTier] = {}
        for name, limiter in config.limiters.items():
            table = f"[limiters.{name}]"
            self._costs[name] = self._cost(limiter.cost, table)
            if limiter.exempt_when is not None:
                exemption = Exemption(
                    limiter.exempt_when, source=source, table=table, key="exempt_when"
                )
                self._exemptions[name] = exemption
                self._functions.append(exemption)
            if limiter.tier is not None:
                tier = RequestTier(limiter.tier, source=source, table=table, key="tier")
                self._tiers[name] = tier
                self._functions.append(tier)
        middleware = config.middleware
        default = ((name, None) for name in middleware.default)
        self._default = self._plan_of(default, "[middleware]")
        self._rules = tuple(
            self._rule(rule, f"[[routes]] #{number}")
            for number, rule in enumerate(config.routes, 1)
        )
        self._marked: dict[Marks, Plan] = {}  # marks are written in code: few
        # Request-keyed, so bounded: an adapter's key -> its plan, (method, path) -> the rules'.
        self._by_request: BoundedCache[Hashable, Plan] = BoundedCache(PLAN_CACHE_SIZE)
        self.known_plan: Callable[[Hashable], Plan | None] = self._by_request.get
        """The plan `cached_plan` keeps for a key, else None: a dict lookup, for hot paths."""
        self._by_path: BoundedCache[tuple[str, str], Plan] = BoundedCache(PLAN_CACHE_SIZE)
        self._messages_by_path: BoundedCache[str, Plan] = BoundedCache(PLAN_CACHE_SIZE)

    @property
    def identities(self) -> dict[str, Identity]:
        """Each limiter's compiled key, by limiter name."""
        return self._identities

    @property
    def request_functions(self) -> list[RequestCost | Exemption | RequestTier]:
        """The `cost`, `exempt_when` and `tier` functions the tables name (`load()` each)."""
        return self._functions

    def _cost(self, cost: Cost | str, table: str) -> int | RequestCost:
        if isinstance(cost, int):
            return cost
        compiled = RequestCost(cost, source=self.config.source, table=table, key="cost")
        self._functions.append(compiled)
        return compiled

    def _plan_of(
        self, limits: Iterable[tuple[str | InlineRate, Cost | str | None]], where: str
    ) -> Plan:
        """The plan of these (limiter, cost) pairs; a cost of None is the limiter's own."""
        plan = []
        inline = 0
        for limiter, given in limits:
            if isinstance(limiter, InlineRate):
                inline += 1
                name = self._inline(limiter, inline)
            else:
                name = limiter
            if name not in self._identities:
                known = ", ".join(sorted(self.config.limiters)) or "none"
                hint = difflib.get_close_matches(name, self.config.limiters, n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(
                    f"{self.config.source}: {where}: no limiter {name!r}{did_you_mean}"
                    f" (defined: {known})",
                    source=self.config.source,
                    table="[middleware]" if where == "[middleware]" else None,
                    key="default" if where == "[middleware]" else None,
                    kind="undefined_reference",
                )
            cost = self._costs[name] if given is None else self._cost(given, where or "@limit")
            plan.append(
                Limit(
                    name,
                    cost if isinstance(cost, int) else 1,
                    self._identities[name],
                    None if isinstance(cost, int) else cost,
                    self._exemptions.get(name),
                    self._limiters[name].shadow,
                    None,
                    self._tiers.get(name),
                    SettleRule.of(self._limiters[name]),
                )
            )
        return tuple(plan)

    def _inline(self, rate: InlineRate, number: int) -> str:
        """The name of an inline limiter (the `number`th of its endpoint), compiled and made
        known on first sight; `ConfigError` for a malformed rate or key."""
        name = _inline_name(rate.endpoint, number)
        limiter = inline_limiter(self.config, name, rate.endpoint, rate.rates, rate.key)
        known = self._limiters.get(name)
        if known is None or known != limiter:
            if self._add_limiter is not None:
                self._add_limiter(limiter)  # ConfigError for a name taken by another
            elif known is not None:
                raise ConfigError(
                    f"{rate.endpoint}: @limit: the inline limiter {name!r} and another"
                    " limiter of that name differ",
                    source=rate.endpoint,
                    kind="conflict",
                )
            self._limiters[name] = limiter
            identity = self._identities[name] = Identity(limiter, rate.endpoint, "@limit")
            identity.load()
            self._costs[name] = 1
        return name

    def _rule(self, rule: RouteRule, where: str) -> _Rule:
        methods = None
        if rule.methods is not None:
            methods = frozenset(rule.methods)
            if "GET" in methods:
                methods |= {"HEAD"}  # HEAD is GET without a body: no way around a GET limit
        limits = ((name, rule.cost) for name in rule.limiters)
        plan = NOT_LIMITED if rule.exempt else self._plan_of(limits, where)
        messages = self._plan_of(((name, rule.cost) for name in rule.messages), where)
        # A message has no response to settle by: it is charged its cost.
        messages = tuple(item._replace(settle=None) for item in messages)
        decides = bool(rule.limiters) or rule.exempt
        return _Rule(_glob(rule.path), methods, plan, decides, messages)

    def marked_plan(self, marks: Marks, where: object = None) -> Plan:
        """The plan of an endpoint carrying `marks` (exempt wins over limits)."""
        plan = self._marked.get(marks)
        if plan is None:
            label = f"@limit on {getattr(where, '__qualname__', where)!s}" if where else "@limit"
            plan = NOT_LIMITED if marks.exempt else self._plan_of(marks.limits, label)
            self._marked[marks] = plan
        return plan

    def plan(self, method: str, path: str, *candidates: object) -> Plan:
        """The limiters of a request: the first marked candidate > route rules > default."""
        marked = self._marked_plan_of(candidates)
        return marked if marked is not None else self.rules_plan(method, path)

    def cached_plan(
        self,
        key: Hashable,
        method: str,
        path: str,
        find: Callable[..., Iterable[object]],
        *args: object,
    ) -> Plan:
        """`plan` for candidates costly to find: `find(*args)`, looked up once per `key`.

        `key` must determine the whole plan: what picks the candidates (ASGI: the scope type;
        Flask: the endpoint; Django: the view), the method and the path.
        """
        plan = self._by_request.get(key)
        if plan is None:
            plan = self._by_request.put(key, self.plan(method, path, *find(*args)))
        return plan

    def forget(self, key: Hashable) -> None:
        """Drop what `cached_plan` keeps for `key` (it turned out not to determine the plan)."""
        self._by_request.pop(key, None)

    def _marked_plan_of(self, candidates: Iterable[object]) -> Plan | None:
        for candidate in candidates:
            marks = get_marks(candidate)
            if marks is not None:
                plan = self._marked.get(marks)
                return plan if plan is not None else self.marked_plan(marks, candidate)
        return None

    def rules_plan(self, method: str, path: str) -> Plan:
        """The plan of a request no marks decide: the first matching rule, else the default."""
        if not self._rules:
            return self._default
        key = (method, path)
        plan = self._by_path.get(key)
        if plan is None:
            plan = self._by_path.put(key, self._match_rules(method, path))
        return plan

    def _match_rules(self, method: str, path: str) -> Plan:
        for rule in self._rules:
            methods = rule.methods
            if rule.decides and (methods is None or method in methods) and rule.match(path):
                return rule.plan
        return self._default

    def messages_plan(self, path: str) -> Plan:
        """What each message received on a WebSocket at `path` spends: the `messages` of the
        first matching rule that has any (none: messages are not limited)."""
        plan = self._messages_by_path.get(path)
        if plan is None:
            plan = NOT_LIMITED
            for rule in self._rules:
                if rule.messages and rule.match(path):
                    plan = rule.messages
                    break
            plan = self._messages_by_path.put(path, plan)
        return plan

    def prepare(self, endpoints: Iterable[object] = ()) -> None:
        """Fail early: import key functions and check the marks of every endpoint object."""
        for identity in self._identities.values():
            identity.load()
        for function in self._functions:
            function.load()
        for endpoint in endpoints:
            for candidate in endpoint_objects(endpoint):
                marks = get_marks(candidate)
                if marks is not None:
                    self.marked_plan(marks, candidate)


def _inline_name(endpoint: str, number: int) -> str:
    """A limiter name from an endpoint's `module.qualname`: stable across processes and
    restarts (headers name it, NATS keys start with it), of letters, digits, `_` and `-`."""
    name = re.sub(r"[^A-Za-z0-9_]+", "-", endpoint).strip("-") or "inline"
    if number > 1:
        name = f"{name}-{number}"
    if len(name) > _INLINE_NAME_LENGTH:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[: _INLINE_NAME_LENGTH - 13]}-{digest}"
    return name
