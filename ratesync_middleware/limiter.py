"""The framework-free core: limiter names and identities in, `Decision`s out.

`AsyncRateLimiter` awaits its stores on the caller's event loop; `RateLimiter` is the same for
synchronous code, running every store call on one background loop per process (see `_portal`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _portal
from .bucket import Decision, Policy
from .config import ConfigSource, LimiterConfig, load_config
from .errors import ConfigError, StoreError
from .keys import group_key
from .stores import create_store
from .stores.base import Clock, Store, wall_clock
from .stores.memory import MemoryStore

logger = logging.getLogger("ratesync_middleware")


_WARNING_INTERVAL = 10.0  # seconds between two log lines about the same failing store


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """What the `on_decision` hook receives for every decision."""

    limiter: str
    key: str | None  # the identity as given to `hit`
    store: str
    decision: Decision
    seconds: float  # time spent waiting for the store
    error: StoreError | None  # set when the store failed and the decision is degraded


DecisionHook = Callable[[DecisionEvent], None]


class _FailureLog:
    """One warning per store per interval during an outage, with the count of failures since."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, store: str, error: StoreError) -> None:
        now = time.monotonic()
        if now - self._last.get(store, -math.inf) < _WARNING_INTERVAL:
            self._suppressed[store] = self._suppressed.get(store, 0) + 1
            return
        self._last[store] = now
        suppressed = self._suppressed.pop(store, 0)
        more = f" ({suppressed} more failures since the last report)" if suppressed else ""
        logger.warning("store %r failed: %s%s", store, error, more)

    def report_hook(self, limiter: str) -> None:
        now = time.monotonic()
        if now - self._last.get(f"hook:{limiter}", -math.inf) >= _WARNING_INTERVAL:
            self._last[f"hook:{limiter}"] = now
            logger.exception("the on_decision hook failed for limiter %r", limiter)


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
    ) -> None:
        self.config = load_config(config)
        self.on_decision = on_decision
        self._clock = clock
        self._stores: dict[str, Store] = {}
        self._failures = _FailureLog()

    def limiter(self, name: str) -> LimiterConfig:
        """The configuration of limiter `name`; `ConfigError` if there is none."""
        try:
            return self.config.limiters[name]
        except KeyError:
            known = ", ".join(sorted(self.config.limiters)) or "none"
            raise ConfigError(
                f"{self.config.source}: no limiter {name!r} (defined: {known})"
            ) from None

    def store(self, name: str) -> Store:
        """The store called `name`, created on first use."""
        store = self._stores.get(name)
        if store is None:
            store = self._stores[name] = create_store(self.config, name, self._clock)
        return store

    def resolve(self, limiter: str, key: str | None) -> tuple[LimiterConfig, Store, str]:
        """The limiter's configuration, its store, and the store key of `key`'s group."""
        config = self.limiter(limiter)
        store_key = group_key(limiter, None if config.is_global or key is None else key)
        return config, self.store(config.store), store_key

    async def hit(self, limiter: str, key: str | None = None, cost: int = 1) -> Decision:
        """Spend `cost` from the bucket of `key` under `limiter` and say whether it was allowed.

        `key` is the client identity (any string); it is ignored for `key = "global"` limiters.
        A failing store gives the limiter's fail-open/closed answer, marked `degraded`.
        """
        config, store, store_key = self.resolve(limiter, key)
        _check_cost(cost)
        if type(store) is MemoryStore:  # nothing to wait for: no coroutine chain
            return self._hit_memory(config, store, store_key, key, cost)
        hook = self.on_decision
        started = time.perf_counter() if hook is not None else 0.0
        try:
            decision = await store.hit(store_key, config.policy, cost)
        except StoreError as error:
            decision = self.degraded(config, error)
            self.notify(config, key, decision, started, error)
            return decision
        if hook is not None:
            self.notify(config, key, decision, started, None)
        return decision

    def hit_now(self, limiter: str, key: str | None = None, cost: int = 1) -> Decision:
        """`hit` for a limiter on a memory store, without a coroutine (sync adapters' fast path).

        Raises `TypeError` for a limiter whose store must be awaited.
        """
        config, store, store_key = self.resolve(limiter, key)
        _check_cost(cost)
        if not isinstance(store, MemoryStore):
            raise TypeError(f"limiter {limiter!r} uses store {config.store!r}: await hit()")
        return self._hit_memory(config, store, store_key, key, cost)

    def _hit_memory(
        self, config: LimiterConfig, store: MemoryStore, store_key: str, key: str | None, cost: int
    ) -> Decision:
        if self.on_decision is None:
            return store.hit_now(store_key, config.policy, cost)
        started = time.perf_counter()
        decision = store.hit_now(store_key, config.policy, cost)
        self.notify(config, key, decision, started, None)
        return decision

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
            config.name, key, config.store, decision, time.perf_counter() - started, error
        )
        try:
            hook(event)
        except Exception:
            self._failures.report_hook(config.name)

    async def peek(self, limiter: str, key: str | None = None) -> Decision:
        """The bucket's state now, changing nothing; raises `StoreError` when the store fails."""
        config, store, store_key = self.resolve(limiter, key)
        return await store.peek(store_key, config.policy)

    async def reset(self, limiter: str, key: str | None = None) -> None:
        """Refill one group's bucket; raises `StoreError` when the store fails."""
        _, store, store_key = self.resolve(limiter, key)
        await store.reset(store_key)

    def degraded(self, config: LimiterConfig, error: StoreError) -> Decision:
        """The fail-open or fail-closed answer of `config` while its store fails (logged, throttled)."""
        self._failures.report(config.store, error)
        policy: Policy = config.policy
        retry_after = self.config.stores[config.store].backoff if config.fail_closed else 0.0
        return Decision(
            allowed=not config.fail_closed,
            limit=policy.burst,
            remaining=policy.burst if not config.fail_closed else 0,
            retry_after=retry_after,
            reset_after=0.0,
            policy=policy.name,
            reason=f"store {config.store!r} unavailable: {type(error).__name__}",
            degraded=True,
        )

    async def aclose(self) -> None:
        """Close every store that was opened."""
        stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            await store.aclose()

    async def __aenter__(self) -> AsyncRateLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _check_cost(cost: int) -> None:
    if cost < 1:
        raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")


class RateLimiter:
    """The synchronous twin of `AsyncRateLimiter`, for WSGI, Flask, Django under WSGI and scripts.

    Every call runs on the process's background event loop; after `fork()` a child gets a fresh
    loop and fresh connections on first use, so gunicorn `--preload` works.
    """

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        clock: Clock = wall_clock,
        on_decision: DecisionHook | None = None,
    ) -> None:
        self.config = load_config(config)
        self._clock = clock
        self._on_decision = on_decision
        self._pid = os.getpid()
        self._async = AsyncRateLimiter(self.config, clock=clock, on_decision=on_decision)

    @property
    def async_limiter(self) -> AsyncRateLimiter:
        """The async core, rebuilt in a forked child (the parent's connections belong to it)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._async = AsyncRateLimiter(
                self.config, clock=self._clock, on_decision=self._on_decision
            )
        return self._async

    def _deadline(self, limiter: str) -> float:
        # The store enforces its own deadline; this outer one only guards against a wedged loop.
        config = self.async_limiter.limiter(limiter)
        store = self.config.stores[config.store]
        return store.connect_timeout + 4 * store.timeout + 1.0

    def hit(self, limiter: str, key: str | None = None, cost: int = 1) -> Decision:
        """See `AsyncRateLimiter.hit`."""
        core = self.async_limiter
        config, store, store_key = core.resolve(limiter, key)
        _check_cost(cost)
        if isinstance(store, MemoryStore):  # nothing to wait for: skip the hop to the loop thread
            return core._hit_memory(config, store, store_key, key, cost)
        try:
            return _portal.run(core.hit(limiter, key, cost), self._deadline(limiter))
        except StoreError as error:  # the loop thread itself did not answer in time
            return core.degraded(config, error)

    def peek(self, limiter: str, key: str | None = None) -> Decision:
        """See `AsyncRateLimiter.peek`."""
        core = self.async_limiter
        return _portal.run(core.peek(limiter, key), self._deadline(limiter))

    def reset(self, limiter: str, key: str | None = None) -> None:
        """See `AsyncRateLimiter.reset`."""
        core = self.async_limiter
        _portal.run(core.reset(limiter, key), self._deadline(limiter))

    def close(self) -> None:
        """Close every store that was opened."""
        _portal.run(self.async_limiter.aclose(), 10.0)

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
