"""The framework-free core: limiter names and identities in, `Decision`s out.

`AsyncRateLimiter` awaits its stores on the caller's event loop; `RateLimiter` is the same for
synchronous code, through the one sync driver of `sync.py` (one background loop per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from .algorithms import Algorithm, Policy, Rates, SlidingWindow
from .bucket import NS_PER_SECOND, Decision
from .config import ConfigSource, LimiterConfig, load_config
from .errors import ConfigError, RateLimitExceeded, RequestFunctionError, StoreError
from .keys import group_key, slots_key, tier_key
from .permits import Permit, SyncPermit, check_settled_cost
from .rules import BANNED, Ban, Override, Rules, expiry_ns, override_key, override_policy
from .slots import Slot, Slots
from .stores import create_store
from .stores.base import Clock, DecidesNow, Store, wall_clock
from .stores.memory import MemoryStore
from .throttle import LogThrottle

if TYPE_CHECKING:
    from .sync import SyncRequestLimiter

logger = logging.getLogger("ratesync_middleware")


_WARNING_INTERVAL = 10.0  # seconds between two log lines about the same failing store
_FUNCTION_RETRY_SECONDS = 1.0  # Retry-After of a fail-closed refusal whose cost/exempt_when failed
_UNKNOWN_TIERS_LOGGED = 256  # distinct unknown tier names logged (a tier may come from a client)


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """What the `on_decision` hook receives for every decision."""

    limiter: str
    key: str | None  # the identity as given to `hit`
    store: str
    decision: Decision
    seconds: float  # time spent waiting for the store
    error: StoreError | None  # the store failed: a degraded decision, or fail_mode local's own
    enforced: bool = True  # False for a refusal of a `mode = "shadow"` limiter: not sent


DecisionHook = Callable[[DecisionEvent], None]


@dataclass(slots=True)
class _Outage:
    since: float  # monotonic time of the first failure
    answers: int = 0  # decisions answered by the fail rule since
    reported: bool = False  # a WARNING told of it


class _FailureLog:
    """One warning per store per interval during an outage, with the count of failures since."""

    def __init__(self) -> None:
        self._due = LogThrottle(_WARNING_INTERVAL).due
        self._outages: dict[str, _Outage] = {}  # store -> since when it fails, and how often

    def report(self, store: str, error: StoreError) -> None:
        outage = self._outages.get(store)
        if outage is None:
            outage = self._outages[store] = _Outage(time.monotonic())
        outage.answers += 1
        more = self._due(store, "failures")
        if more is not None:
            outage.reported = True
            logger.warning("store %r failed: %s%s", store, error, more)

    def answering_again(self, store: str) -> None:
        """The store answered after failures: one INFO line, when a WARNING told of them."""
        outage = self._outages.pop(store, None)
        if outage is not None and outage.reported:
            logger.info(
                "store %r answers again after %.1fs; %d decisions used the fail rule meanwhile",
                store,
                time.monotonic() - outage.since,
                outage.answers,
            )

    def report_function(self, limiter: str, error: RequestFunctionError) -> None:
        more = self._due(f"function:{limiter}", "failures")
        if more is not None:
            logger.error("limiter %r: %s; answered by its fail rule%s", limiter, error, more)

    def report_shadow(self, limiter: str, decision: Decision) -> None:
        more = self._due(f"shadow:{limiter}", "refusals")
        if more is not None:
            logger.warning(
                "limiter %r (shadow mode) would have refused a request: %s%s",
                limiter,
                decision.reason,
                more,
            )

    def report_unsettled(self, limiter: str, why: str) -> None:
        more = self._due(f"settle:{limiter}", "responses")
        if more is not None:
            logger.warning(
                "limiter %r: %s; the request stays charged what it reserved%s", limiter, why, more
            )

    def report_hook(self, limiter: str) -> None:
        if self._due(f"hook:{limiter}", "failures") is not None:  # a traceback: no count
            logger.exception("the on_decision hook failed for limiter %r", limiter)


class _Bound(NamedTuple):
    """A limiter bound to its store, once: what `hit` needs without looking anything up."""

    config: LimiterConfig
    store: Store
    now: Callable[[str, Algorithm, int, int], Decision] | None  # the store's `hit_now`, if any
    is_global: bool  # one bucket for everybody: the key is ignored
    rules: Rules  # the live overrides and bans of the store's groups (rules.py)
    events: Any  # the store's event publisher (`denied(limiter, group)`), None for none
    denials: dict[str, int] | None  # its count of denials per group (`events.denials`)


class AsyncRateLimiter:
    """Decisions for the limiters of one configuration.

    limiter = AsyncRateLimiter(load_config("rate-sync.toml"))
    decision = await limiter.hit("api", key="user-42")
    await limiter.aclose()
    """

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        clock: Clock = wall_clock,
        on_decision: DecisionHook | None = None,
        inline: dict[str, LimiterConfig] | None = None,
    ) -> None:
        self.config = load_config(config)
        self.on_decision = on_decision
        self.inline: dict[str, LimiterConfig] = {} if inline is None else inline
        """The unnamed limiters of inline `@limit("5/minute")`s, by name (`add_limiter`);
        shared with `fresh()` copies, so a forked child knows those its parent found."""
        self._clock = clock
        self._stores: dict[str, Store] = {}
        self._bound: dict[str, _Bound] = {}
        self._failures = _FailureLog()
        self._local_rules: dict[str, Rules] = {}  # of stores that keep no rules themselves
        self._fallbacks: dict[str, MemoryStore] = {}  # fail_mode = "local": while a store fails
        self._unknown_tiers: set[tuple[str, str]] = set()  # (limiter, tier) already logged
        self._announce_stores()

    def fresh(self) -> AsyncRateLimiter:
        """A limiter with the same configuration and options and no connections (after `fork()`)."""
        return AsyncRateLimiter(
            self.config, clock=self._clock, on_decision=self.on_decision, inline=self.inline
        )

    @property
    def opened(self) -> bool:
        """Whether a store is open (this process has something to close)."""
        return bool(self._stores)

    @property
    def opened_unused(self) -> bool:
        """A store is open but no limiter was used yet: what a pre-fork server's master holds."""
        return bool(self._stores) and not self._bound

    def _announce_stores(self) -> None:
        """One INFO line per store in use, so that a log says where the limits live."""
        used = dict.fromkeys(limiter.store for limiter in self.config.limiters.values())
        for name in used:
            store = self.config.stores[name]
            if store.engine == "memory":
                logger.info("store %r: engine memory (this process only)", name)
            else:
                logger.info(
                    "store %r: engine %s, bucket %r, servers %s",
                    name,
                    store.engine,
                    store.bucket_name,
                    ", ".join(store.redacted_servers),
                )

    def limiter(self, name: str) -> LimiterConfig:
        """The configuration of limiter `name`; `ConfigError` if there is none."""
        try:
            return self.config.limiters.get(name) or self.inline[name]
        except KeyError:
            known = ", ".join(sorted(self.config.limiters)) or "none"
            raise ConfigError(
                f"{self.config.source}: no limiter {name!r} (defined: {known})",
                source=self.config.source,
                kind="undefined_reference",
            ) from None

    def store(self, name: str) -> Store:
        """The store called `name`, created on first use."""
        store = self._stores.get(name)
        if store is None:
            config = self.config
            if self.inline:  # a NATS bucket's TTL must cover the inline limiters' windows too
                config = replace(config, limiters={**self.inline, **config.limiters})
            store = self._stores[name] = create_store(config, name, self._clock)
            if hasattr(store, "on_answering_again"):
                store.on_answering_again = functools.partial(self._failures.answering_again, name)
        return store

    def add_limiter(self, limiter: LimiterConfig) -> None:
        """Know one more limiter beside the configuration's: an inline `@limit("5/minute")`.

        `ConfigError` when another limiter has its name (two endpoints of the same name with
        different inline rates, or a `[limiters.<name>]` table of that name)."""
        known = self.config.limiters.get(limiter.name) or self.inline.get(limiter.name)
        if known is not None and known != limiter:
            raise ConfigError(
                f"{self.config.source}: the inline @limit of {limiter.name!r} and another"
                " limiter of that name differ (name the limiters in the configuration)",
                source=self.config.source,
                kind="conflict",
            )
        self.inline[limiter.name] = limiter

    def _bind(self, limiter: str) -> _Bound:
        bound = self._bound.get(limiter)
        if bound is None:
            config = self.limiter(limiter)
            store = self.store(config.store)
            now = store.hit_now if isinstance(store, DecidesNow) else None
            rules = self._rules(config.store, store)
            events = getattr(store, "events", None)
            bound = self._bound[limiter] = _Bound(
                config,
                store,
                now,
                config.is_global,
                rules,
                events,
                getattr(events, "denials", None),
            )
        return bound

    def _rules(self, name: str, store: Store) -> Rules:
        """The rules of a store: its own (NATS, watched across the fleet), else this process's."""
        rules = getattr(store, "rules", None)
        if isinstance(rules, Rules):
            return rules
        return self._local_rules.setdefault(name, Rules())

    def decides_now(self, limiter: str) -> bool:
        """Whether `hit_now` can decide for `limiter`: its store answers without awaiting."""
        return self._bind(limiter).now is not None

    def _no_rate(self, config: LimiterConfig) -> ConfigError:
        return ConfigError(
            f"{self.config.source}: limiter {config.name!r} has no rate, only max_concurrent:"
            " use acquire() for it, not hit()",
            source=self.config.source,
            table=f"[limiters.{config.name}]",
            kind="missing",
        )

    def resolve(self, limiter: str, key: str | None) -> tuple[LimiterConfig, Store, str]:
        """The limiter's configuration, its store, and the store key of `key`'s group."""
        bound = self._bind(limiter)
        return bound.config, bound.store, group_key(limiter, None if bound.is_global else key)

    async def hit(
        self,
        limiter: str,
        key: str | None = None,
        cost: int = 1,
        *,
        timeout: float = 0.0,
        tier: str | None = None,
    ) -> Decision:
        """Spend `cost` from the bucket of `key` under `limiter` and say whether it was allowed.

        `key` is the client identity (any string); it is ignored for `key = "global"` limiters.
        `cost` is a whole number >= 1 (`TypeError` / `ValueError` otherwise). A failing store
        gives the limiter's fail-open/closed answer, marked `degraded`. With `timeout` (seconds),
        a request the rate allows within it is admitted for then, in the same store write, and
        `hit` returns after sleeping until then (`Decision.wait`); one that would wait longer
        is refused at once. `tier` names one of the limiter's `tiers` (its own rate for None
        or an unknown name): the group is decided by that tier's rate, on its own state.
        """
        bound = self._bound.get(limiter) or self._bind(limiter)
        config, store, now, is_global, rules, events, denials = bound  # (one step, not six)
        if now is not None:  # nothing to wait for: no coroutine chain
            decision = self.hit_now(limiter, key, cost, timeout=timeout, tier=tier)
            if decision.wait:
                await asyncio.sleep(decision.wait)
            return decision
        if type(cost) is not int or cost < 1:  # bool is not int here: True is no cost
            check_cost(cost)
        policy = config.policy
        if policy is None:
            raise self._no_rate(config)
        store_key = group = group_key(limiter, None if is_global else key)
        hook = self.on_decision
        started = time.perf_counter() if hook is not None else 0.0
        if tier is not None or not rules.empty:
            if not rules.loaded:  # the store opens (and loads its rules) on first use
                await self._open_rules(bound)
            ruled = self._ruled(bound, group, policy, tier)
            if isinstance(ruled, Decision):  # banned
                self.notify(config, key, ruled, started, None)
                return ruled
            policy, store_key = ruled
        try:
            decision = await store.hit(store_key, policy, cost, _ns(timeout) if timeout else 0)
        except StoreError as error:
            if config.fail_mode == "local":
                decision = self._decide_locally(bound, store_key, policy, cost, error)
            else:
                decision = self.degraded(config, error)
            self.notify(config, key, decision, started, error)
            return decision
        if hook is not None:
            self.notify(config, key, decision, started, None)
        if decision.allowed:
            if decision.wait:  # admitted for later: the store's deadline covered the round trip
                await asyncio.sleep(decision.wait)
        elif denials is not None:  # summed, published once a second
            if store_key in denials:
                denials[store_key] += 1
            else:
                events.denied(store_key)  # the group's first: may start the publisher
        return decision

    def hit_now(
        self,
        limiter: str,
        key: str | None = None,
        cost: int = 1,
        *,
        timeout: float = 0.0,
        tier: str | None = None,
    ) -> Decision:
        """`hit` for a limiter whose store decides without awaiting (see `decides_now`).

        Raises `TypeError` for a limiter whose store must be awaited. Never sleeps: a decision
        admitted within `timeout` for later has a `wait` that the caller must sleep first.
        """
        bound = self._bound.get(limiter) or self._bind(limiter)
        if type(cost) is not int or cost < 1:  # bool is not int here: True is no cost
            check_cost(cost)
        decide = bound.now
        if decide is None:
            raise TypeError(f"limiter {limiter!r} uses store {bound.config.store!r}: await hit()")
        config = bound.config
        policy = config.policy
        if policy is None:
            raise self._no_rate(config)
        store_key = group = group_key(limiter, None if bound.is_global else key)
        max_wait = _ns(timeout) if timeout else 0
        if tier is not None or not bound.rules.empty:
            ruled = self._ruled(bound, group, policy, tier)
            if isinstance(ruled, Decision):  # banned
                self.notify(config, key, ruled, time.perf_counter(), None)
                return ruled
            policy, store_key = ruled
        if self.on_decision is None:
            return decide(store_key, policy, cost, max_wait)
        started = time.perf_counter()
        decision = decide(store_key, policy, cost, max_wait)
        self.notify(config, key, decision, started, None)
        return decision

    def settle(
        self,
        limiter: str,
        key: str | None,
        admitted: Decision,
        reserved: int,
        actual: int,
        *,
        tier: str | None = None,
    ) -> None:
        """Charge the admission `admitted` (a decision of `hit` for `key` and `tier`, of
        `reserved` units) `actual` units instead: more overdraws the bucket, fewer refunds
        (algorithms.py says how much). Never blocks: the store writes it in the background. A
        decision that spent nothing (a refusal, a fail-open answer) settles nothing."""
        check_settled_cost(actual)
        receipt = admitted.receipt
        if receipt is None or actual == reserved:
            return
        bound = self._bound.get(limiter) or self._bind(limiter)
        policy = bound.config.policy
        if policy is None:
            return
        store_key = group = group_key(limiter, None if bound.is_global else key)
        if tier is not None or not bound.rules.empty:
            ruled = self._ruled(bound, group, policy, tier)
            if isinstance(ruled, Decision):
                return  # banned since: nothing it spends matters now
            policy, store_key = ruled
        bound.store.settle(store_key, policy, receipt, reserved, actual)

    def unsettled(self, limiter: str, why: str) -> None:
        """A response did not say what to charge (`settle_header`): logged, throttled."""
        self._failures.report_unsettled(limiter, why)

    def _decide_locally(
        self, bound: _Bound, group: str, policy: Algorithm, cost: int, error: StoreError
    ) -> Decision:
        """`fail_mode = "local"`: this process's own state, at its share of the rate (1/N of
        the rate and burst, N the processes presence last saw sharing the store)."""
        self._failures.report(bound.config.store, error)
        live = getattr(bound.store, "live_processes", None)
        share = max(1, live()) if live is not None else 1
        local = self._fallbacks.get(bound.config.store)
        if local is None:
            local = self._fallbacks[bound.config.store] = MemoryStore(clock=self._clock)
        decision = local.hit_now(group, share_of(policy, share), cost)
        # Spent from this process's own state, not the shared one: nothing there to settle.
        return decision._replace(receipt=None) if decision.receipt is not None else decision

    async def _open_rules(self, bound: _Bound) -> None:
        ready = getattr(bound.store, "ready", None)
        if ready is not None:
            timeout = self.config.stores[bound.config.store].timeout
            with contextlib.suppress(StoreError):  # the decision then fails the same way
                await ready(time.monotonic() + timeout)

    def _tiered(self, config: LimiterConfig, group: str, tier: str) -> tuple[Algorithm, str]:
        """The policy and store key of `group` under `tier`: the tier's rate on the tier's own
        state (keys.py `tier_key`); the limiter's own for a tier it does not have (logged once
        per name)."""
        policy = config.tiers.get(tier)
        if policy is not None:
            return policy, tier_key(group, tier)
        seen, shown = self._unknown_tiers, tier[:64]  # a tier may come from the client
        if (config.name, shown) not in seen and len(seen) < _UNKNOWN_TIERS_LOGGED:
            seen.add((config.name, shown))
            logger.warning(
                "limiter %r has no tier %r (tiers: %s): its own rate applies",
                config.name,
                shown,
                ", ".join(config.tiers) or "none",
            )
        assert config.policy is not None  # checked by the caller
        return config.policy, group

    def _ruled(
        self, bound: _Bound, group: str, policy: Algorithm, tier: str | None
    ) -> tuple[Algorithm, str] | Decision:
        """A group's ban (the refusal), or the policy and key to decide it by: an override's,
        else its tier's (on the tier's own state), else `policy` at the group's own key. Called
        only with a tier or a rule in force (`Rules.empty`): the common case needs neither."""
        store_key = group
        if tier is not None:
            policy, store_key = self._tiered(bound.config, group, tier)
        if bound.rules.empty:
            return policy, store_key
        now = self._clock()
        ban = bound.rules.ban(group, now)
        if ban is not None:
            return ban.decision(policy.burst, bound.config.name, now)
        override = bound.rules.override(group, now)
        if override is not None:
            return override.policy, override_key(group)
        return policy, store_key

    # -- live overrides and bans (rules.py) ---------------------------------------------------

    async def override(
        self,
        limiter: str,
        key: str | None = None,
        limit: str | None = None,
        burst: int | None = None,
        ttl: float | None = None,
    ) -> None:
        """Judge `key`'s group by `limit` (`"100/second"`, capacity `burst`, default its
        count) from now on, for `ttl` seconds (None: until removed); `limit=None` removes it.

        Every process sharing the store applies it within a second (a NATS store's rules
        bucket); the group starts from a full bucket under the new rate.
        """
        config, store, group = self.resolve(limiter, key)
        if config.policy is None:
            raise self._no_rate(config)
        rule = None
        if limit is not None:
            rule = Override(override_policy(limiter, limit, burst), expiry_ns(ttl, self._clock()))
        await self._set_rule(config.store, store, "override", group, rule)

    async def ban(self, limiter: str, key: str | None = None, ttl: float | None = None) -> None:
        """Refuse `key`'s group under `limiter` (403) for `ttl` seconds (None: until `unban`)."""
        config, store, group = self.resolve(limiter, key)
        await self._set_rule(config.store, store, "ban", group, Ban(expiry_ns(ttl, self._clock())))

    async def unban(self, limiter: str, key: str | None = None) -> None:
        """Lift the ban of `key`'s group under `limiter`."""
        config, store, group = self.resolve(limiter, key)
        await self._set_rule(config.store, store, "ban", group, None)

    async def _set_rule(
        self, name: str, store: Store, kind: str, group: str, rule: Ban | Override | None
    ) -> None:
        set_rule = getattr(store, "set_rule", None)
        if set_rule is not None:  # kept in NATS, watched by every process
            await set_rule(kind, group, rule)
            return
        if kind == "override":
            await store.reset(override_key(group))
        self._rules(name, store).set(kind, group, rule)

    def override_policy(self, name: str) -> Algorithm | None:
        """The policy called `name` of a live override, or of an inline limiter (the
        rate-limit headers report it; several rates: the limiter's, which lists them all)."""
        for bound in self._bound.values():
            policy = bound.rules.policy(name)
            if policy is not None:
                return policy
        for limiter in self.inline.values():
            inline = limiter.policy
            if inline is not None and (
                inline.name == name
                or any(rate.name == name for rate in getattr(inline, "rates", ()))
            ):
                return inline
        return None

    # -- concurrency slots (`max_concurrent`) -------------------------------------------------

    def _slotted(self, limiter: str, key: str | None) -> tuple[_Bound, Slots, str]:
        bound = self._bound.get(limiter) or self._bind(limiter)
        slots = bound.config.slots
        if slots is None:
            raise ConfigError(
                f"{self.config.source}: limiter {limiter!r} has no max_concurrent",
                source=self.config.source,
                table=f"[limiters.{limiter}]",
                key="max_concurrent",
                kind="missing",
            )
        return bound, slots, slots_key(group_key(limiter, None if bound.is_global else key))

    async def take_slot(
        self, limiter: str, key: str | None = None, *, timeout: float = 0.0
    ) -> tuple[Decision, Slot | None]:
        """Take a concurrency slot of `key`'s group under `limiter` (`max_concurrent`), waiting
        up to `timeout` seconds for one to be given back when none is free.

        The decision, and the slot when one was taken (release it when done). A failing store
        gives the limiter's fail-open/closed answer without a slot: nothing to give back.
        """
        bound, slots, store_key = self._slotted(limiter, key)
        if bound.now is not None and timeout <= 0:
            return self.take_slot_now(limiter, key)
        store = bound.store
        started = time.perf_counter()
        try:
            decision = await store.acquire_slot(store_key, slots, timeout)
        except StoreError as error:
            decision = self.degraded(bound.config, error)
            self.notify(bound.config, key, decision, started, error)
            return decision, None
        return self._taken(bound, slots, store_key, key, decision, started)

    def _taken(
        self,
        bound: _Bound,
        slots: Slots,
        store_key: str,
        key: str | None,
        decision: Decision,
        started: float,
    ) -> tuple[Decision, Slot | None]:
        """The store's answer to a slot request, told to the hook, with the slot if taken."""
        slot = None
        ticket = decision.receipt  # an allowed slot decision carries the slot's ticket
        if decision.allowed and ticket is not None:
            slot = Slot(functools.partial(bound.store.release_slot, store_key, slots, ticket))
            decision = decision._replace(receipt=None)  # the ticket is the slot's business
        self.notify(bound.config, key, decision, started, None)
        return decision, slot

    def take_slot_now(self, limiter: str, key: str | None = None) -> tuple[Decision, Slot | None]:
        """`take_slot` for a limiter whose store decides without awaiting (see `decides_now`)."""
        bound, slots, store_key = self._slotted(limiter, key)
        store = bound.store
        if not isinstance(store, DecidesNow):
            raise TypeError(f"limiter {limiter!r} uses store {bound.config.store!r}: await it")
        started = time.perf_counter()
        decision = store.acquire_slot_now(store_key, slots)
        return self._taken(bound, slots, store_key, key, decision, started)

    async def acquire(
        self,
        limiter: str,
        key: str | None = None,
        cost: int = 1,
        timeout: float | None = None,
        *,
        tier: str | None = None,
    ) -> Permit:
        """A permit under `limiter` for `key`: its concurrency slot (`max_concurrent`) taken and
        `cost` spent from its rate, both or neither. Raises `RateLimitExceeded` when refused
        (a `mode = "shadow"` limiter never refuses: its permit holds the refusal as `decision`).

        A permit holds one slot whatever its cost; release it (`await permit.release()`, or
        `async with await limiter.acquire(...)`). `timeout` (seconds; None: the limiter's own,
        rate-sync's meaning) is how long to wait for a slot, then for the rate, instead of
        refusing; a rate that knows its wait exceeds what is left refuses at once. A failing
        store gives the limiter's fail-open answer (a permit holding nothing) or, fail-closed,
        `RateLimitExceeded` with a degraded decision. `tier` is the key's tier, as for `hit`.
        """
        check_cost(cost)
        config = self.limiter(limiter)
        budget = config.timeout if timeout is None else check_timeout(timeout)
        waited_until = time.monotonic() + budget
        decision: Decision | None = None
        slot: Slot | None = None
        if config.slots is not None:
            decision, slot = await self.take_slot(limiter, key, timeout=budget)
            if not decision.allowed and self._enforces(config, decision):
                raise RateLimitExceeded(decision)
        if config.policy is not None:
            left = max(0.0, waited_until - time.monotonic()) if budget else 0.0
            try:
                decision = await self.hit(limiter, key, cost, timeout=left, tier=tier)
            except BaseException:
                if slot is not None:
                    slot.release()
                raise
            if not decision.allowed and self._enforces(config, decision):
                if slot is not None:
                    slot.release()
                raise RateLimitExceeded(decision)
        assert decision is not None  # a limiter has a rate, slots, or both
        settles = config.policy is not None and decision.receipt is not None
        return Permit(decision, slot, (self, limiter, key, cost, tier) if settles else None)

    def notify(
        self,
        config: LimiterConfig,
        key: str | None,
        decision: Decision,
        started: float,
        error: StoreError | None,
    ) -> None:
        """Tell the `on_decision` hook; a failing hook is logged, never raised into a request."""
        hook = self.on_decision
        if hook is None:
            return
        event = DecisionEvent(
            config.name,
            key,
            config.store,
            decision,
            time.perf_counter() - started,
            error,
            decision.allowed or not config.shadow,
        )
        try:
            hook(event)
        except Exception:
            self._failures.report_hook(config.name)

    async def peek(
        self, limiter: str, key: str | None = None, *, tier: str | None = None
    ) -> Decision:
        """The bucket's state now (under `tier`), changing nothing; raises `StoreError` when
        the store fails."""
        config, store, store_key = self.resolve(limiter, key)
        policy = config.policy
        if policy is None:
            raise self._no_rate(config)
        if tier is not None:
            policy, store_key = self._tiered(config, store_key, tier)
        return await store.peek(store_key, policy)

    async def reset(self, limiter: str, key: str | None = None) -> None:
        """Refill one group's bucket, and its bucket under each tier, and free its concurrency
        slots (rate-sync's `reset()`: a holder's later release gives back nothing); raises
        `StoreError` when the store fails."""
        config, store, store_key = self.resolve(limiter, key)
        await store.reset(store_key)
        for tier in config.tiers:
            await store.reset(tier_key(store_key, tier))
        if config.slots is not None:
            await store.reset(slots_key(store_key))

    def _enforces(self, config: LimiterConfig, refusal: Decision) -> bool:
        if config.shadow and refusal.reason != BANNED:
            self.shadowed(config.name, refusal)
            return False
        return True

    def shadowed(self, limiter: str, decision: Decision) -> None:
        """A refusal of a shadow-mode limiter was not enforced: one warning per 10 s says so."""
        self._failures.report_shadow(limiter, decision)

    def degraded(self, config: LimiterConfig, error: StoreError | RequestFunctionError) -> Decision:
        """The fail-open or fail-closed answer of `config` while its store fails, or while its
        cost or exempt_when function fails (logged, throttled)."""
        if isinstance(error, RequestFunctionError):
            self._failures.report_function(config.name, error)
            reason = f"limiter {config.name!r}: {error}"
            backoff = _FUNCTION_RETRY_SECONDS
        else:
            self._failures.report(config.store, error)
            reason = f"store {config.store!r} unavailable: {type(error).__name__}"
            backoff = self.config.stores[config.store].backoff
        policy = config.policy if config.policy is not None else config.slots
        assert policy is not None  # a limiter has a rate, slots, or both
        limit = config.limit
        retry_after = backoff if config.fail_closed else 0.0
        return Decision(
            allowed=not config.fail_closed,
            limit=limit,
            remaining=limit if not config.fail_closed else 0,
            retry_after=retry_after,
            reset_after=0.0,
            policy=policy.name,
            reason=reason,
            degraded=True,
        )

    async def aclose(self) -> None:
        """Close every store that was opened."""
        stores, self._stores, self._bound = list(self._stores.values()), {}, {}
        for store in stores:
            await store.aclose()

    async def __aenter__(self) -> AsyncRateLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def check_timeout(timeout: object) -> float:
    """A wait is a finite number of seconds >= 0 (0: refuse at once)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not 0 <= timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_SECOND)


@functools.lru_cache(maxsize=1024)
def share_of(policy: Algorithm, processes: int) -> Algorithm:
    """One process's share of `policy` among `processes`: rate and burst (or limit) / N."""
    if processes <= 1:
        return policy
    if isinstance(policy, Policy):
        return Policy(
            policy.name, policy.interval_ns * processes, max(1, policy.burst // processes)
        )
    if isinstance(policy, Rates):
        rates = tuple(share_of(rate, processes) for rate in policy.rates)
        return Rates(policy.name, rates)  # type: ignore[arg-type]
    return SlidingWindow(policy.name, max(1, policy.limit // processes), policy.window_ns)


def check_cost(cost: object) -> None:
    """A cost is a whole number >= 1: a float or a bool would corrupt a shared bucket's value."""
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be an int >= 1, not {type(cost).__name__} {cost!r}")
    if cost < 1:
        raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")


class RateLimiter:
    """The synchronous twin of `AsyncRateLimiter`, for WSGI, Flask, Django under WSGI and scripts.

    Decisions of memory stores are made inline; every other call runs on the process's
    background event loop, through the one sync driver (`sync.SyncRequestLimiter`). After
    `fork()` a child gets a fresh loop and fresh connections on first use, so gunicorn
    `--preload` works.
    """

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        clock: Clock = wall_clock,
        on_decision: DecisionHook | None = None,
    ) -> None:
        from .sync import SyncRequestLimiter  # sync.py builds on this module

        self._driver: SyncRequestLimiter = SyncRequestLimiter(
            AsyncRateLimiter(config, clock=clock, on_decision=on_decision)
        )
        self.config = self._driver.config

    @property
    def async_limiter(self) -> AsyncRateLimiter:
        """This process's async core (rebuilt in a forked child)."""
        return self._driver.core.limiter

    def hit(
        self, limiter: str, key: str | None = None, cost: int = 1, *, tier: str | None = None
    ) -> Decision:
        """See `AsyncRateLimiter.hit`."""
        return self._driver.hit(limiter, key, cost, tier)

    def acquire(
        self,
        limiter: str,
        key: str | None = None,
        cost: int = 1,
        timeout: float | None = None,
        *,
        tier: str | None = None,
    ) -> SyncPermit:
        """See `AsyncRateLimiter.acquire`; `with limiter.acquire(...)` releases on exit.

        A wait (`timeout`) blocks the calling thread, for as long as the wait at most.
        """
        core = self.async_limiter
        wait = core.limiter(limiter).timeout if timeout is None else check_timeout(timeout)
        acquired = core.acquire(limiter, key, cost, timeout, tier=tier)
        return self._driver.run(acquired, wait).synchronous()

    def peek(self, limiter: str, key: str | None = None, *, tier: str | None = None) -> Decision:
        """See `AsyncRateLimiter.peek`."""
        return self._driver.run(self.async_limiter.peek(limiter, key, tier=tier))

    def reset(self, limiter: str, key: str | None = None) -> None:
        """See `AsyncRateLimiter.reset`."""
        self._driver.run(self.async_limiter.reset(limiter, key))

    def override(
        self,
        limiter: str,
        key: str | None = None,
        limit: str | None = None,
        burst: int | None = None,
        ttl: float | None = None,
    ) -> None:
        """See `AsyncRateLimiter.override`."""
        self._driver.run(self.async_limiter.override(limiter, key, limit, burst, ttl))

    def ban(self, limiter: str, key: str | None = None, ttl: float | None = None) -> None:
        """See `AsyncRateLimiter.ban`."""
        self._driver.run(self.async_limiter.ban(limiter, key, ttl))

    def unban(self, limiter: str, key: str | None = None) -> None:
        """See `AsyncRateLimiter.unban`."""
        self._driver.run(self.async_limiter.unban(limiter, key))

    def close(self) -> None:
        """Close every store that was opened."""
        self._driver.close()

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
