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
        admission.finish(status, headers)              # exactly once, also on errors

An adapter only translates: it builds the `RequestFacts` and the ordered candidate endpoints,
answers the refusal it is given or calls the app, and calls `finish` with the final status and
the response's headers (after the last byte of a streamed body; on errors and disconnects too). When
`admission.settles` is false, `finish` has nothing to do and an adapter may skip what it
costs to arrange the call. Everything a policy does before or after the response is written
here, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Final

from .bucket import Decision
from .client_ip import ClientAddress
from .config import Config, ConfigSource
from .errors import BucketTtlTooShortError, RequestFunctionError, StoreError
from .facts import RequestFacts
from .headers import Denial, Header, RateLimitHeaders
from .limiter import AsyncRateLimiter, logger
from .plans import NOT_LIMITED, Limit, Plan, PlanResolver
from .rules import BANNED
from .settling import Reservation, ResponseHeaders
from .slots import Slot

__all__ = ["NOT_LIMITED", "Admission", "Plan", "RequestLimiter"]

_NOW: Final = 1  # every store of the plan decides at once, every identity is sync
_SLOTTED: Final = 2  # a limiter of the plan has concurrency slots
_RESOLVED: Final = 4  # a limiter of the plan has a cost, exempt_when or tier function
_SHADOW: Final = 8  # a limiter of the plan is in shadow mode (off the one-limiter fast path)
_SETTLES: Final = 16  # a limiter of the plan settles at `finish` (settle_header, count_status)


class Admission:
    """The outcome of `begin` for one request, and what is left to do when it ends.

    `decision` is the one to report (the refusal, or the most restrictive of the allowing
    decisions; None when no limiter applied); `allowed` is false when the request must be
    refused (`denial()` says how). `finish` must be called once the response of an admitted
    request is complete (or failed); later calls do nothing. `settles` says whether it has
    anything to do: when false (most requests), an adapter may skip what it pays to arrange
    the call (Flask's close callback, Django's closer, a WSGI body wrapper, ASGI's status
    capture). Built on every request: two fields, everything else on the class.
    """

    __slots__ = ("_responses", "allowed", "decision")

    settles: bool = False
    slots: list[Slot] | None = None
    """The concurrency slots the request holds until `finish` (`max_concurrent`)."""

    def __init__(self, decision: Decision | None, responses: RateLimitHeaders) -> None:
        self.decision = decision
        self._responses = responses
        self.allowed = decision is None or decision.allowed

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

    def finish(self, status: int | None = None, headers: ResponseHeaders | None = None) -> None:
        """The response is complete (`status`, None when it never started; its `headers` as
        (name, value) pairs): settle the request.

        Idempotent. This is where refunds, settled costs and slot releases are made: a plain
        admission has none of them (`settles` is false).
        """

    def settle(self, status: int, headers: ResponseHeaders | None = None) -> None:
        """The response's status and headers are final, its body may still be on its way:
        charge what they say now (`count_status`, `settle_header`). `finish` still gives the
        slots back when the body is done, and settles nothing twice. Idempotent.

        For adapters whose response is complete before the server sends it (Flask, Quart),
        so that the next request, or a test client that never closes a response, sees the
        charge.
        """


class _HoldingAdmission(Admission):
    """An admission that holds concurrency slots, given back at `finish`."""

    __slots__ = ("slots",)

    settles = True

    def __init__(
        self, decision: Decision | None, responses: RateLimitHeaders, slots: list[Slot] | None
    ) -> None:
        Admission.__init__(self, decision, responses)
        self.slots = slots

    def finish(self, status: int | None = None, headers: ResponseHeaders | None = None) -> None:
        slots = self.slots
        if slots is not None:
            self.slots = None
            _release(slots)


class _SettlingAdmission(_HoldingAdmission):
    """An admission whose limiters charge what the response says (`settle_header`,
    `count_status`): settled at `finish`, with the slots it holds given back."""

    __slots__ = ("_limiter", "_reservations")

    def __init__(
        self, admitted: Admission, limiter: AsyncRateLimiter, reservations: list[Reservation]
    ) -> None:
        _HoldingAdmission.__init__(self, admitted.decision, admitted._responses, admitted.slots)
        self._limiter = limiter
        self._reservations: list[Reservation] | None = reservations

    def finish(self, status: int | None = None, headers: ResponseHeaders | None = None) -> None:
        _HoldingAdmission.finish(self, status, headers)
        self._charge(status, headers)

    def settle(self, status: int, headers: ResponseHeaders | None = None) -> None:
        self._charge(status, headers)

    def _charge(self, status: int | None, headers: ResponseHeaders | None) -> None:
        reservations, self._reservations = self._reservations, None
        if reservations:
            _settle(self._limiter, reservations, status, headers)


def _settle(
    limiter: AsyncRateLimiter,
    reservations: list[Reservation],
    status: int | None,
    headers: ResponseHeaders | None,
) -> None:
    for reserved in reservations:
        charge = reserved.rule.charge(reserved.cost, status, headers)
        if isinstance(charge, str):
            limiter.unsettled(reserved.limiter, charge)
            continue
        limiter.settle(
            reserved.limiter,
            reserved.key,
            reserved.decision,
            reserved.cost,
            charge,
            tier=reserved.tier,
        )


def _admitted(
    decision: Decision | None, responses: RateLimitHeaders, held: list[Slot]
) -> Admission:
    return _HoldingAdmission(decision, responses, held) if held else Admission(decision, responses)


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
        self.plans = PlanResolver(self.config, self.limiter.add_limiter)
        self.responses = RateLimitHeaders.for_config(self.config)
        self.responses.extra_policy = self.limiter.override_policy  # live overrides' headers
        self.settles = any(
            limiter.slots is not None
            or limiter.settle_header is not None
            or limiter.count_status is not None
            for limiter in self.config.limiters.values()
        )
        """Whether any admission of this configuration can have work at `finish` (`settles`)."""
        # How each plan is decided (_NOW | _SLOTTED bits); plans come from the configuration
        # and marks: few.
        self._routes: dict[Plan, int] = {}
        self._waits: dict[Plan, float] = {}  # the longest a plan's request may wait, in seconds

    # -- plans ------------------------------------------------------------------------------

    def plan(self, method: str, path: str, *candidates: object) -> Plan:
        """See `PlanResolver.plan`: the first marked candidate > route rules > default."""
        return self.plans.plan(method, path, *candidates)

    # -- decisions --------------------------------------------------------------------------

    def decides_now(self, plan: Plan) -> bool:
        """Whether `begin` decides `plan` without a coroutine: every store answers at once,
        no identity has async parts, no limiter waits."""
        route = self._routes.get(plan)
        return bool((self._route(plan) if route is None else route) & _NOW)

    def wait(self, plan: Plan) -> float:
        """The longest a request of `plan` may wait for tokens and slots: its limiters'
        `timeout`s, one after the other (a sync caller's outer deadline grows by it)."""
        wait = self._waits.get(plan)
        if wait is None:
            wait = self._waits[plan] = sum(self.limiter.limiter(i.name).timeout for i in plan)
        return wait

    def _route(self, plan: Plan) -> int:
        decides_now, limiter = self.limiter.decides_now, self.limiter.limiter
        # A plan that may wait is decided by a coroutine: an async adapter awaits the wait, a
        # sync one blocks its thread on the background loop for it (sync.py).
        waits = self.wait(plan) > 0
        now = not waits and all(item.identity.sync and decides_now(item.name) for item in plan)
        slotted = any(limiter(item.name).slots is not None for item in plan)
        resolved = any(item.request_cost or item.exempt_when or item.request_tier for item in plan)
        route = (_NOW if now else 0) | (_SLOTTED if slotted else 0)
        route |= (_RESOLVED if resolved else 0) | (_SHADOW if any(i.shadow for i in plan) else 0)
        route |= _SETTLES if any(item.settle is not None for item in plan) else 0
        self._routes[plan] = route
        return route

    def begin(
        self, facts: RequestFacts, plan: Plan, reserved: list[Reservation] | None = None
    ) -> Admission | Coroutine[Any, Any, Admission]:
        """The `Admission` of a request, at once when every store of `plan` decides without
        waiting (memory), else a coroutine to await for it (`abegin`).

        Sync callers hand the coroutine to the background loop; async callers await it. Either
        way there is no coroutine at all on the path that does not need one. `reserved`
        collects what settling limiters reserve (`_settling` passes it).
        """
        route = self._routes.get(plan)
        if route is None:
            route = self._route(plan)
        if route == _NOW:
            if len(plan) == 1:  # the common case, one memory limiter: no more calls than needed
                item = plan[0]
                decision = self.limiter.hit_now(item.name, item.identity.now(facts), item.cost)
                return Admission(decision, self.responses)
            return self._begin_now(facts, plan)
        if route & _SETTLES and reserved is None:
            return self._settling(facts, plan)
        if route & _RESOLVED:
            # The user's functions run here, in the request's own thread (a sync adapter's
            # worker, with its framework's request context), before any store call.
            resolved = self._resolve(facts, plan)
            if isinstance(resolved, Admission):
                return resolved
            plan = resolved
        if route & _NOW:
            if route & _SLOTTED:
                return self._begin_slotted_now(facts, plan, reserved)
            return self._begin_now(facts, plan, reserved)
        if route & _SLOTTED:
            return self._abegin_slotted(facts, plan, reserved)
        waits = self.wait(plan) > 0 if not route & _RESOLVED else None
        return self._abegin(facts, plan, waits, reserved)

    def _settling(
        self, facts: RequestFacts, plan: Plan
    ) -> Admission | Coroutine[Any, Any, Admission]:
        """`begin` for a plan with settling limiters: what each reserved, settled at `finish`."""
        reserved: list[Reservation] = []
        begun = self.begin(facts, plan, reserved)
        if isinstance(begun, Admission):
            return self._reserving(begun, reserved)
        return self._areserving(begun, reserved)

    async def _areserving(
        self, begun: Coroutine[Any, Any, Admission], reserved: list[Reservation]
    ) -> Admission:
        return self._reserving(await begun, reserved)

    def _reserving(self, admission: Admission, reserved: list[Reservation]) -> Admission:
        if not reserved:
            return admission
        if not admission.allowed:  # another limiter refused: no response of the app's
            _settle(self.limiter, reserved, None, None)
            return admission
        return _SettlingAdmission(admission, self.limiter, reserved)

    async def abegin(self, facts: RequestFacts, plan: Plan) -> Admission:
        """`begin`, awaited: spend from every limiter of `plan`, in order; the first denial
        stops and refuses.

        When all allow, the admission reports the most restrictive decision: the fewest
        remaining units, real answers before fail-open ones.
        """
        admission = self.begin(facts, plan)
        return admission if isinstance(admission, Admission) else await admission

    def _resolve(self, facts: RequestFacts, plan: Plan) -> Plan | Admission:
        """`plan` for this request: each cost function's cost and tier function's tier, without
        the limiters whose `exempt_when` holds. A function that fails is answered by its limiter's fail rule:
        fail-open leaves the limiter out, `fail_closed` refuses the request (503)."""
        request = facts.request
        items: list[Limit] = []
        failed_open: Decision | None = None
        for item in plan:
            try:
                if item.exempt_when is not None and item.exempt_when(request):
                    continue
                request_cost, request_tier = item.request_cost, item.request_tier
                if request_cost is not None or request_tier is not None:
                    item = Limit(
                        item.name,
                        item.cost if request_cost is None else request_cost(request),
                        item.identity,
                        None,
                        None,
                        item.shadow,
                        None if request_tier is None else request_tier(request),
                        None,
                        item.settle,
                    )
            except RequestFunctionError as error:
                decision = self.limiter.degraded(self.limiter.limiter(item.name), error)
                if not decision.allowed and self._refuses(item, decision):
                    return Admission(decision, self.responses)
                failed_open = decision
                continue
            items.append(item)
        if not items:
            return Admission(failed_open, self.responses)
        return tuple(items)

    async def _abegin(
        self,
        facts: RequestFacts,
        plan: Plan,
        waits: bool | None,
        reserved: list[Reservation] | None = None,
    ) -> Admission:
        """`waits`: whether a limiter of the plan has a `timeout` (None: look it up)."""
        best: Decision | None = None
        hit, limiter = self.limiter.hit, self.limiter.limiter
        if waits is None:
            waits = any(limiter(item.name).timeout > 0 for item in plan)
        for item in plan:
            identity = item.identity
            try:
                key = identity.now(facts) if identity.sync else await identity(facts)
            except RequestFunctionError as error:  # the fail rule answers, as in `_resolve`
                failed = self.limiter.degraded(limiter(item.name), error)
                if not failed.allowed and self._refuses(item, failed):
                    return Admission(failed, self.responses)
                best = best or (failed if failed.allowed else None)
                continue
            timeout = limiter(item.name).timeout if waits else 0.0
            decision = await hit(item.name, key, item.cost, timeout=timeout, tier=item.tier)
            if reserved is not None and item.settle is not None:
                _reserve(reserved, item, key, decision)
            if not decision.allowed and self._refuses(item, decision):
                return Admission(decision, self.responses)
            if not item.shadow and (best is None or _more_restrictive(decision, best)):
                best = decision
        return Admission(best, self.responses)

    def _begin_now(
        self, facts: RequestFacts, plan: Plan, reserved: list[Reservation] | None = None
    ) -> Admission:
        best: Decision | None = None
        hit_now = self.limiter.hit_now
        for item in plan:
            key = item.identity.now(facts)
            decision = hit_now(item.name, key, item.cost, tier=item.tier)
            if reserved is not None and item.settle is not None:
                _reserve(reserved, item, key, decision)
            if not decision.allowed and self._refuses(item, decision):
                return Admission(decision, self.responses)
            if not item.shadow and (best is None or _more_restrictive(decision, best)):
                best = decision
        return Admission(best, self.responses)

    # A request takes each limiter's slot before spending from its rate, so that a refusal by
    # either spends nothing of the other: a slot taken is given back when a later check refuses
    # (a rate spent stays spent, unless its limiter settles: see `_SettlingAdmission`).

    async def _abegin_slotted(
        self, facts: RequestFacts, plan: Plan, reserved: list[Reservation] | None = None
    ) -> Admission:
        best: Decision | None = None
        held: list[Slot] = []
        limiter = self.limiter
        for item in plan:
            identity = item.identity
            try:
                key = identity.now(facts) if identity.sync else await identity(facts)
            except RequestFunctionError as error:  # the fail rule answers, as in `_resolve`
                failed = limiter.degraded(limiter.limiter(item.name), error)
                if not failed.allowed and self._refuses(item, failed):
                    return self._refused(failed, held)
                best = best or (failed if failed.allowed else None)
                continue
            config = limiter.limiter(item.name)
            timeout = config.timeout
            if config.slots is not None:
                waited_until = time.monotonic() + timeout
                try:
                    decision, slot = await limiter.take_slot(item.name, key, timeout=timeout)
                except BaseException:
                    _release(held)
                    raise
                if slot is not None:
                    held.append(slot)
                if not decision.allowed and self._refuses(item, decision):
                    return self._refused(decision, held)
                if timeout:  # the rate may wait for what is left of the limiter's timeout
                    timeout = max(0.0, waited_until - time.monotonic())
            if config.policy is not None:
                try:
                    decision = await limiter.hit(
                        item.name, key, item.cost, timeout=timeout, tier=item.tier
                    )
                except BaseException:
                    _release(held)
                    raise
                if reserved is not None and item.settle is not None:
                    _reserve(reserved, item, key, decision)
                if not decision.allowed and self._refuses(item, decision):
                    return self._refused(decision, held)
                if not item.shadow and (best is None or _more_restrictive(decision, best)):
                    best = decision
        return _admitted(best, self.responses, held)

    def _begin_slotted_now(
        self, facts: RequestFacts, plan: Plan, reserved: list[Reservation] | None = None
    ) -> Admission:
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
                if not decision.allowed and self._refuses(item, decision):
                    return self._refused(decision, held)
            if config.policy is not None:
                decision = limiter.hit_now(item.name, key, item.cost, tier=item.tier)
                if reserved is not None and item.settle is not None:
                    _reserve(reserved, item, key, decision)
                if not decision.allowed and self._refuses(item, decision):
                    return self._refused(decision, held)
                if not item.shadow and (best is None or _more_restrictive(decision, best)):
                    best = decision
        return _admitted(best, self.responses, held)

    def _refuses(self, item: Limit, decision: Decision) -> bool:
        """Whether a refusing `decision` refuses the request: a shadow limiter's never does
        (it is reported: the `on_decision` event, a metric, a throttled log line), except an
        operator's ban, which holds in every mode."""
        if item.shadow and decision.reason != BANNED:
            self.limiter.shadowed(item.name, decision)
            return False
        return True

    def _refused(self, decision: Decision, held: list[Slot]) -> Admission:
        _release(held)
        return Admission(decision, self.responses)

    def degraded(self, plan: Plan, error: StoreError) -> Admission:
        """The answer when the decision itself could not be made: the plan's strictest rule.

        Any `fail_closed` limiter in the plan refuses (503) unless it is in shadow mode;
        otherwise the request passes.
        """
        configs = [self.limiter.limiter(item.name) for item in plan]
        enforcing = [config for config in configs if not config.shadow] or configs
        strictest = next((c for c in enforcing if c.fail_closed and not c.shadow), enforcing[0])
        decision = self.limiter.degraded(strictest, error)
        if not decision.allowed and strictest.shadow:
            self.limiter.shadowed(strictest.name, decision)
            return Admission(None, self.responses)
        return Admission(decision, self.responses)

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
        limiters = [*self.config.limiters.values(), *self.limiter.inline.values()]
        used = {limiter.store for limiter in limiters}
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
            logger.warning(
                "store %r did not open at start-up (requests follow each limiter's fail rule "
                "until it does): %s",
                name,
                error,
            )

    async def aclose(self) -> None:
        """Close the stores (they reopen on next use)."""
        await self.limiter.aclose()


def _reserve(reserved: list[Reservation], item: Limit, key: str | None, decision: Decision) -> None:
    """Note what a settling limiter spent (a refusal spent nothing: nothing to settle)."""
    if decision.receipt is not None and item.settle is not None:
        reserved.append(Reservation(item.name, key, item.cost, item.settle, decision, item.tier))


def _more_restrictive(decision: Decision, than: Decision) -> bool:
    if decision.degraded != than.degraded:
        return than.degraded  # a real answer says more than a fail-open guess
    if decision.remaining != than.remaining:
        return decision.remaining < than.remaining
    return decision.reset_after > than.reset_after
