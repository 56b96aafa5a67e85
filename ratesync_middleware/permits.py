"""Permits: what `acquire` returns, held until released (the framework-free form of a request).

    async with await limiter.acquire("upload", key="u1"):      # RateLimitExceeded if refused
        ...                                                    # the slot is given back on exit
    with sync_limiter.acquire("upload", key="u1"): ...         # RateLimiter: the same, sync

A permit holds the concurrency slot of a `max_concurrent` limiter; the rate (if any) was spent
when it was granted. `release()` is idempotent.
"""

from __future__ import annotations

from .bucket import Decision
from .slots import Slot

__all__ = ["Permit", "SyncPermit"]


class _Held:
    """What both permits hold: the decision granted, and the slot until it is given back."""

    __slots__ = ("_slot", "decision")

    def __init__(self, decision: Decision, slot: Slot | None = None) -> None:
        self.decision = decision
        self._slot = slot

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
        return SyncPermit(self.decision, self._slot)

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

    def __enter__(self) -> SyncPermit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
