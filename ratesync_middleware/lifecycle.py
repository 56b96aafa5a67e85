"""The request lifecycle, for every adapter: `begin` decides, `Admission.finish` settles.

    core = RequestLimiter("rate-sync.toml")
    plan = core.plans.plan(method, path, handler, view)  # which limiters (plans.py)
    admission = core.begin(facts, plan)                # identities, stores, the decision
    if not isinstance(admission, Admission):           # a store must be awaited
        admission = await admission
    if not admission.allowed:
        send(admission.denial())                       # 429, or 503 for a fail-closed outage
    else:
        ... call the app, adding admission.headers() to its response ...
        admission.finish(status)                       # exactly once, also on errors

An adapter only translates: it builds the `RequestFacts` and the ordered candidate endpoints,
answers the refusal it is given or calls the app, and calls `finish` with the final status
(after the last byte of a streamed body; on errors and disconnects too). When
`admission.settles` is false, `finish` has nothing to do and an adapter may skip what it
costs to arrange the call. Everything a policy does before or after the response is written
here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, Final

from .bucket import Decision
from .client_ip import ClientAddress
from .config import Config, ConfigSource
from .errors import BucketTtlTooShortError, StoreError
from .facts import RequestFacts
from .headers import Denial, Header, RateLimitHeaders
from .limiter import AsyncRateLimiter, logger
from .plans import NOT_LIMITED, Plan, PlanResolver
from .slots import Slot

__all__ = ["NOT_LIMITED", "Admission", "Plan", "RequestLimiter"]

_NOW: Final = 1  # every store of the plan decides at once, every identity is sync
_SLOTTED: Final = 2  # a limiter of the plan has concurrency slots


class Admission:
    """The outcome of `begin` for one request, and what is left to do when it ends.

    `decision` is the one to report (the refusal, or the most restrictive of the allowing
    decisions; None when no limiter applied). `finish` must be called once the response of an
    admitted request is complete (or failed); later calls do nothing. It gives back the
    concurrency slots the request holds (`max_concurrent`).
    """

    __slots__ = ("_responses", "decision", "finished", "settles", "slots")

    def __init__(
        self,
        decision: Decision | None,
        responses: RateLimitHeaders,
        slots: list[Slot] | None = None,
    ) -> None:
        self.decision = decision
        self._responses = responses
        self.finished = False
        self.slots = slots  # the concurrency slots held until `finish`
        # Whether `finish` has work to do (slots to give back today; refunds and settled costs
        # next). When it has none, an adapter may skip what it pays to arrange the call
        # (Flask's close callback, Django's closer, a WSGI body wrapper, ASGI's status capture).
        self.settles = slots is not None

    @property
    def allowed(self) -> bool:
        """False when the request must be refused (`denial()` says how)."""
        decision = self.decision
        return decision is None or decision.allowed

    def headers(self) -> list[Header]:
        """The rate-limit headers for the response (of the configured `headers` mode)."""
        return self._responses.headers(self.decision)

    def denial(self) -> Denial:
        """The refusal to send: 429 (503 when a fail-closed store is down), headers and body."""
        assert self.decision is not None, "an admission without a decision refuses nothing"
        return self._responses.denial(self.decision)

    def refusal_headers(self) -> list[Header]:
        """`Retry-After` and the rate-limit headers, for a refusal the app's own code answers."""
        decision = self.decision
        assert decision is not None
        return [*self._responses.retry_after(decision), *self._responses.headers(decision)]

    def finish(self, status: int | None = None) -> None:
        """The response is complete (`status`, None when it never started): settle the request.

        Idempotent. This is where refunds, settled costs and slot releases are made.
        """
        self.finished = True
        slots = self.slots
        if slots is not None:
            self.slots = None
            _release(slots)


def _release(slots: list[Slot]) -> None:
    for slot in slots:
        slot.release()


class RequestLimiter:
    """Plans and decisions for one configuration, shared by all adapters.

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
        self.plans = PlanResolver(self.config)
        self.responses = RateLimitHeaders.for_config(self.config)
        self.responses.extra_policy = self.limiter.override_policy  # live overrides' headers
        self.settles = any(limiter.slots is not None for limiter in self.config.limiters.values())
        """Whether any admission of this configuration can have work at `finish` (`settles`)."""
        # How each plan is decided (_NOW | _SLOTTED bits); plans come from the configuration
        # and marks: few.
        self._routes: dict[Plan, int] = {}

    # -- plans ------------------------------------------------------------------------------

    def plan(self, method: str, path: str, *candidates: object) -> Plan:
        """See `PlanResolver.plan`: the first marked candidate > route rules > default."""
        return self.plans.plan(method, path, *candidates)

    # -- decisions --------------------------------------------------------------------------

    def decides_now(self, plan: Plan) -> bool:
        """Whether `begin_now` can decide `plan`: every store answers at once, no async keys."""
        route = self._routes.get(plan)
        return bool((self._route(plan) if route is None else route) & _NOW)

    def slotted(self, plan: Plan) -> bool:
        """Whether a limiter of `plan` has concurrency slots (`max_concurrent`)."""
        route = self._routes.get(plan)
        return bool((self._route(plan) if route is None else route) & _SLOTTED)

    def _route(self, plan: Plan) -> int:
        decides_now, limiter = self.limiter.decides_now, self.limiter.limiter
        now = all(item.identity.sync and decides_now(item.name) for item in plan)
        slotted = any(limiter(item.name).slots is not None for item in plan)
        route = self._routes[plan] = (_NOW if now else 0) | (_SLOTTED if slotted else 0)
        return route

    def begin(self, facts: RequestFacts, plan: Plan) -> Admission | Coroutine[Any, Any, Admission]:
        """The `Admission` of a request, at once when every store of `plan` decides without
        waiting (memory), else a coroutine to await for it (`abegin`).

        Sync callers hand the coroutine to the background loop; async callers await it. Either
        way there is no coroutine at all on the path that does not need one.
        """
        route = self._routes.get(plan)
        if route is None:
            route = self._route(plan)
        if route == _NOW:
            return self._begin_now(facts, plan)
        if route & _NOW:
            return self._begin_slotted_now(facts, plan)
        return self.abegin(facts, plan)

    async def abegin(self, facts: RequestFacts, plan: Plan) -> Admission:
        """Spend from every limiter of `plan`, in order; the first denial stops and refuses.

        When all allow, the admission reports the most restrictive decision: the fewest
        remaining units, real answers before fail-open ones.
        """
        if self.decides_now(plan):
            return self.begin_now(facts, plan)
        if self.slotted(plan):
            return await self._abegin_slotted(facts, plan)
        best: Decision | None = None
        hit = self.limiter.hit
        for item in plan:
            identity = item.identity
            key = identity.now(facts) if identity.sync else await identity(facts)
            decision = await hit(item.name, key, item.cost)
            if not decision.allowed:
                return Admission(decision, self.responses)
            if best is None or _more_restrictive(decision, best):
                best = decision
        return Admission(best, self.responses)

    def begin_now(self, facts: RequestFacts, plan: Plan) -> Admission:
        """`begin` for a plan that `decides_now`, without a coroutine."""
        if self.slotted(plan):
            return self._begin_slotted_now(facts, plan)
        return self._begin_now(facts, plan)

    def _begin_now(self, facts: RequestFacts, plan: Plan) -> Admission:
        best: Decision | None = None
        hit_now = self.limiter.hit_now
        for item in plan:
            decision = hit_now(item.name, item.identity.now(facts), item.cost)
            if not decision.allowed:
                return Admission(decision, self.responses)
            if best is None or _more_restrictive(decision, best):
                best = decision
        return Admission(best, self.responses)

    # A request takes each limiter's slot before spending from its rate, so that a refusal by
    # either spends nothing of the other: a slot taken is given back when a later check refuses
    # (a rate spent could not be refunded).

    async def _abegin_slotted(self, facts: RequestFacts, plan: Plan) -> Admission:
        best: Decision | None = None
        held: list[Slot] = []
        limiter = self.limiter
        for item in plan:
            identity = item.identity
            key = identity.now(facts) if identity.sync else await identity(facts)
            config = limiter.limiter(item.name)
            if config.slots is not None:
                try:
                    decision, slot = await limiter.take_slot(item.name, key)
                except BaseException:
                    _release(held)
                    raise
                if slot is not None:
                    held.append(slot)
                if not decision.allowed:
                    return self._refused(decision, held)
            if config.policy is not None:
                try:
                    decision = await limiter.hit(item.name, key, item.cost)
                except BaseException:
                    _release(held)
                    raise
                if not decision.allowed:
                    return self._refused(decision, held)
                if best is None or _more_restrictive(decision, best):
                    best = decision
        return Admission(best, self.responses, held or None)

    def _begin_slotted_now(self, facts: RequestFacts, plan: Plan) -> Admission:
        best: Decision | None = None
        held: list[Slot] = []
        limiter = self.limiter
        for item in plan:
            key = item.identity.now(facts)
            config = limiter.limiter(item.name)
            if config.slots is not None:
                decision, slot = limiter.take_slot_now(item.name, key)
                if slot is not None:
                    held.append(slot)
                if not decision.allowed:
                    return self._refused(decision, held)
            if config.policy is not None:
                decision = limiter.hit_now(item.name, key, item.cost)
                if not decision.allowed:
                    return self._refused(decision, held)
                if best is None or _more_restrictive(decision, best):
                    best = decision
        return Admission(best, self.responses, held or None)

    def _refused(self, decision: Decision, held: list[Slot]) -> Admission:
        _release(held)
        return Admission(decision, self.responses)

    def degraded(self, plan: Plan, error: StoreError) -> Admission:
        """The answer when the decision itself could not be made: the plan's strictest rule.

        Any `fail_closed` limiter in the plan refuses (503); otherwise the request passes.
        """
        configs = [self.limiter.limiter(item.name) for item in plan]
        strictest = next((c for c in configs if c.fail_closed), configs[0])
        return Admission(self.limiter.degraded(strictest, error), self.responses)

    # -- start-up and shutdown --------------------------------------------------------------

    async def startup(self, endpoints: Iterable[object] = ()) -> None:
        """Fail early: import key functions, check the marks of `endpoints`, open the stores.

        Configuration errors raise `ConfigError`; a store that cannot be reached only logs (its
        limiters answer fail-open/closed until it can).
        """
        self.prepare(endpoints)
        await self.open_stores()

    def prepare(self, endpoints: Iterable[object] = ()) -> None:
        """The part of `startup` that needs no store: key functions and the endpoints' marks."""
        self.plans.prepare(endpoints)

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
        except BucketTtlTooShortError:
            raise  # a bucket that forgets keys early would over-admit: refuse to start
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
