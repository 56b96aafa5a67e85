"""The clock assumption: hosts share buckets through wall-clock times, so skew moves the limit.

docs/reliability.md states the bound this test holds: with clocks `skew` apart, admissions over any
interval `t` stay within `burst + rate * (t + skew)` (+1 for the rounding of a single request).
"""

from __future__ import annotations

from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.bucket import NS_PER_SECOND

pytestmark = pytest.mark.nats


class VirtualClock:
    """A wall clock for tests: shared virtual time plus this host's skew."""

    base = 1_800_000_000 * NS_PER_SECOND

    def __init__(self, timeline: list[int], skew_ns: int = 0) -> None:
        self.timeline = timeline
        self.skew_ns = skew_ns

    def __call__(self) -> int:
        return self.base + self.timeline[0] + self.skew_ns


@pytest.mark.parametrize("skew_seconds", [0.0, 0.5, -0.5])
async def test_skewed_clock_stays_within_the_stated_bound(
    nats_store: dict[str, Any], skew_seconds: float
) -> None:
    rate, burst, seconds = 10.0, 5, 6.0
    config = {
        "stores": {"prod": nats_store},
        "limiters": {"api": {"rate_per_second": rate, "burst": burst}},
    }
    timeline = [0]
    skew_ns = int(skew_seconds * NS_PER_SECOND)
    honest = AsyncRateLimiter(config, clock=VirtualClock(timeline))
    skewed = AsyncRateLimiter(config, clock=VirtualClock(timeline, skew_ns))
    admitted = 0
    step_ns = NS_PER_SECOND // 100  # both hosts ask 100 times a second, far above the rate
    async with honest, skewed:
        while timeline[0] <= seconds * NS_PER_SECOND:
            for limiter in (honest, skewed):
                decision = await limiter.hit("api", key="shared")
                assert not decision.degraded
                admitted += decision.allowed
            timeline[0] += step_ns

    exact = burst + rate * seconds
    bound = burst + rate * (seconds + abs(skew_seconds)) + 1
    assert admitted <= bound
    assert admitted >= exact - rate * abs(skew_seconds) - 1  # a clock behind refuses early, no more
