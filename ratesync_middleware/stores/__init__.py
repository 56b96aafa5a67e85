"""The stores: where bucket state lives. `create_store` maps an engine name to its class.

The NATS client is imported only when a NATS store is created.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .base import Clock, Store, wall_clock
from .memory import MemoryStore

__all__ = ["Clock", "MemoryStore", "Store", "create_store", "limiter_windows_ns", "wall_clock"]


def create_store(config: Config, name: str, clock: Clock = wall_clock) -> Store:
    """The store for the `[stores.<name>]` table of `config`."""
    store = config.stores[name]
    if store.engine == "memory":
        return MemoryStore(max_keys=store.max_keys, clock=clock)
    if store.engine == "nats":
        from .nats import NatsStore

        return NatsStore(store, clock=clock, windows_ns=limiter_windows_ns(config, name))
    raise ConfigError(f"{store.name}: unknown engine {store.engine!r}")  # pragma: no cover


def limiter_windows_ns(config: Config, name: str) -> dict[str, int]:
    """The refill time of each limiter on store `name`: a NATS bucket's max age must cover them
    (`ratesync check` can pass the same to `NatsStore`), its tiers' too. A rate with a `timeout` may hold an
    admission reserved up to that far ahead: its value must outlive the window after it.
    Concurrency slots need their lease only (a live holder rewrites its claim every lease/3)."""
    return {
        limiter.name: max(
            max(map(_longest_window_ns, (limiter.policy, *limiter.tiers.values())))
            + round(limiter.timeout * 1e9)
            if limiter.policy is not None
            else 0,
            limiter.slots.lease_ns if limiter.slots is not None else 0,
        )
        for limiter in config.limiters.values()
        if limiter.store == name
    }


def _longest_window_ns(policy: object) -> int:
    """The refill time of a limiter's policy: its longest, for several rates on one group."""
    rates = getattr(policy, "rates", None) or (policy,)
    return max(int(getattr(rate, "window_ns", 0)) for rate in rates)
