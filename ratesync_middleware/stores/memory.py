"""The embedded store: buckets in a dict of this process, for development and single-process apps."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..bucket import Decision, Policy, consume, peek
from .base import Clock, wall_clock

_SWEEP_EVERY = 8  # writes between two looks for idle buckets (a power of two)


class MemoryStore:
    """Per-process buckets, safe under coroutines and threads, bounded in memory.

    A bucket whose `tat` lies in the past is full, which is the same as no entry at all, so such
    entries are dropped as they age out of the least-recently-used end. Past `max_keys` live
    buckets the oldest is dropped even if not full (an over-admission documented in the docs).
    """

    def __init__(self, max_keys: int = 100_000, clock: Clock = wall_clock) -> None:
        self._tats: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._clock = clock
        self._writes = 0

    def __len__(self) -> int:
        return len(self._tats)

    def hit_now(self, key: str, policy: Policy, cost: int = 1) -> Decision:
        """The synchronous core of `hit`: nothing here ever waits."""
        now = self._clock()
        with self._lock:
            tats = self._tats
            new_tat, decision = consume(policy, tats.get(key, 0), now, cost)
            if new_tat is not None:
                tats[key] = new_tat
                tats.move_to_end(key)
                self._writes += 1
                if not self._writes & (_SWEEP_EVERY - 1) or len(tats) > self._max_keys:
                    self._drop_idle(now)
            return decision

    def _drop_idle(self, now: int) -> None:
        # Amortised O(1): every few writes, look at as many of the oldest entries as writes
        # happened, twice over; and enforce the hard bound.
        tats = self._tats
        for _ in range(2 * _SWEEP_EVERY):
            oldest = next(iter(tats))
            if tats[oldest] > now:
                break
            del tats[oldest]
        while len(tats) > self._max_keys:
            tats.popitem(last=False)

    async def hit(self, key: str, policy: Policy, cost: int = 1) -> Decision:
        return self.hit_now(key, policy, cost)

    async def peek(self, key: str, policy: Policy) -> Decision:
        with self._lock:
            tat = self._tats.get(key, 0)
        return peek(policy, tat, self._clock())

    async def reset(self, key: str) -> None:
        with self._lock:
            self._tats.pop(key, None)

    async def aclose(self) -> None:
        """Nothing to release; state survives so a closed-then-reused limiter keeps its buckets."""
