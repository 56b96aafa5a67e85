"""Concurrency slots (`max_concurrent`): at most `limit` requests of a group in flight at once.

A slot is taken when a request is admitted and given back when its response has ended
(`Admission.finish`, `Permit.release`); a reset of the group (rate-sync's `reset()`) frees
every slot at once, and a release of a slot taken before it gives back nothing. The shared form of the state is one value per group:
each process's count of slots held, with the time its claim lapses unless renewed (its lease),
so a process that dies holding slots gives them back by itself (docs/engines/nats.md, "Slots").

This module is pure: the arithmetic of a holders map, and the `Decision`s it gives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from .bucket import NS_PER_SECOND, Decision

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "DEFAULT_LEASE_SECONDS",
    "Holders",
    "Slot",
    "Slots",
]

DEFAULT_LEASE_SECONDS: Final = 30.0
CONCURRENCY_RETRY_AFTER: Final = 1.0
"""Seconds a refusal asks to wait: nobody knows when a request in flight will end, so the
honest answer is "soon"; `Retry-After: 1`."""

Holders = Mapping[str, tuple[int, int]]
"""Process id -> (slots held, lease end in ns since the epoch)."""


@dataclass(frozen=True, slots=True)
class Slots:
    """The concurrency limit of one limiter: `limit` in flight, claims renewed within `lease_ns`.

    `name` is what its decisions report as `Decision.policy`: `<limiter>:concurrent`, so that a
    refusal by the concurrency limit is never taken for one by the limiter's rate.
    """

    name: str
    limit: int
    lease_ns: int

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.lease_ns < 1:
            raise ValueError("lease_ns must be >= 1")

    @classmethod
    def of(cls, limiter: str, limit: int, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Slots:
        return cls(f"{limiter}:concurrent", limit, max(1, round(lease_seconds * NS_PER_SECOND)))

    @property
    def limiter(self) -> str:
        """The limiter's own name."""
        return self.name.rpartition(":")[0]

    def allowed(self, in_use: int, ticket: int) -> Decision:
        """The answer to a request admitted with `in_use` slots now taken (its own included).

        Its `receipt` is the slot's `ticket`, what the store's `release_slot` needs: a reset
        of the group frees every slot taken before it, so a store gives those a ticket that
        it no longer honours, and their holders' releases free nobody else's slot."""
        return Decision(
            True, self.limit, max(0, self.limit - in_use), 0.0, 0.0, self.name, receipt=ticket
        )

    def refused(self, in_use: int) -> Decision:
        """The answer to a request refused because `in_use` slots are taken."""
        return Decision(
            False,
            self.limit,
            max(0, self.limit - in_use),
            CONCURRENCY_RETRY_AFTER,
            0.0,
            self.name,
            f"concurrency limit {self.limiter!r} reached ({self.limit} in flight)",
        )


def live_holders(holders: Holders, now: int, besides: str) -> dict[str, tuple[int, int]]:
    """The claims of `holders` other than `besides`'s that have not lapsed at `now`."""
    return {
        holder: claim
        for holder, claim in holders.items()
        if holder != besides and claim[1] > now and claim[0] > 0
    }


class Slot:
    """One slot held: `release()` gives it back, once (later calls do nothing); thread-safe."""

    __slots__ = ("_give_back", "_lock", "released")

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back: Callable[[], None] | None = give_back
        self._lock = threading.Lock()
        self.released = False

    def release(self) -> None:
        with self._lock:
            give_back, self._give_back = self._give_back, None
            self.released = True
        if give_back is not None:
            give_back()
