"""Permits: what `acquire` returns, held until released (the framework-free form of a request).

    async with await limiter.acquire("upload", key="u1"):      # RateLimitExceeded if refused
        ...                                                    # the slot is given back on exit
    with sync_limiter.acquire("upload", key="u1"): ...         # RateLimiter: the same, sync

A permit holds the concurrency slot of a `max_concurrent` limiter; the rate (if any) was spent
when it was granted. `release()` is idempotent. `settle(cost)` charges the rate the real cost
instead (an LLM answer's tokens, an upload's bytes): more overdraws, less refunds; a permit
settles once (again with the same cost does nothing; with another, `RuntimeError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bucket import Decision
from .slots import Slot

if TYPE_CHECKING:
    from .limiter import AsyncRateLimiter

__all__ = ["Permit", "SyncPermit", "check_settled_cost"]

Charge = tuple["AsyncRateLimiter", str, "str | None", int, "str | None"]
"""Who charged a permit's rate, and what: the limiter, its name, the key, the cost reserved,
the key's tier."""


def check_settled_cost(cost: object) -> None:
    """What a request is charged in the end is a whole number >= 0 (0: all of it refunded)."""
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"a settled cost must be an int >= 0, not {type(cost).__name__} {cost!r}")
    if cost < 0:
        raise ValueError(f"a settled cost must be a whole number >= 0, got {cost!r}")


class _Held:
    """What both permits hold: the decision granted, the slot until it is given back, and what
    its rate was charged (None: nothing to settle, e.g. a fail-open answer)."""

    __slots__ = ("_charge", "_settled", "_slot", "decision")

    def __init__(
        self, decision: Decision, slot: Slot | None = None, charge: Charge | None = None
    ) -> None:
        self.decision = decision
        self._slot = slot
        self._charge = charge
        self._settled: int | None = None

    def _settle(self, cost: int) -> None:
        check_settled_cost(cost)
        if self._settled is not None:
            if cost != self._settled:
                raise RuntimeError(f"this permit was settled at {self._settled} already")
            return
        charge = self._charge
        if charge is not None:
            limiter, name, key, reserved, tier = charge
            limiter.settle(name, key, self.decision, reserved, cost, tier=tier)
        self._settled = cost

    @property
    def released(self) -> bool:
        """Whether nothing is held any more (a permit of a rate alone holds nothing)."""
        return self._slot is None or self._slot.released

    def _give_back(self) -> None:
        if self._slot is not None:
            self._slot.release()


class Permit(_Held):
    """A granted `AsyncRateLimiter.acquire`: `decision` says what was spent; `release()` frees
    the slot (idempotent); `async with` releases on exit."""

    __slots__ = ()

    def synchronous(self) -> SyncPermit:
        """The same permit for synchronous code (`RateLimiter.acquire`)."""
        return SyncPermit(self.decision, self._slot, self._charge)

    async def settle(self, cost: int) -> None:
        """Charge `cost` (a whole number >= 0) instead of what was reserved; never waits (the
        store writes it in the background). Once: again with the same cost does nothing."""
        self._settle(cost)

    async def release(self) -> None:
        """Give the slot back (the store writes it in the background); later calls do nothing."""
        self._give_back()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


class SyncPermit(_Held):
    """A granted `RateLimiter.acquire`: the same as `Permit`, synchronous, usable as `with`."""

    __slots__ = ()

    def release(self) -> None:
        """Give the slot back; never blocks, later calls do nothing."""
        self._give_back()

    def settle(self, cost: int) -> None:
        """See `Permit.settle`; never blocks."""
        self._settle(cost)

    def __enter__(self) -> SyncPermit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
