"""Token leases on a hot key (docs/engines/nats.md, "Leases"): few writes, never over-admitted,
fair between processes, and cold keys exactly as before."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.bucket import Policy, Rates
from ratesync_middleware.stores.nats import NatsStore
from ratesync_middleware.stores.nats.lease import Lease, lease_for
from ratesync_middleware.window import SlidingWindow
from tests.fleet import in_processes

MS = 1_000_000  # ns


def config(store: dict[str, Any], **limiter: Any) -> dict[str, Any]:
    return {
        # Exactness and fairness, not latency: a generous deadline keeps a loaded machine from
        # answering a decision fail-open, which would blur the counts.
        "stores": {"prod": {**store, "timeout": 5.0}},
        "limiters": {"api": {"store": "prod", "key": "global", **limiter}},
    }


def out_messages(limiter: AsyncRateLimiter) -> int:
    store = limiter.store("prod")
    assert isinstance(store, NatsStore)
    assert store._nc is not None
    return int(store._nc.stats["out_msgs"])


# -- the maths of a lease, without a server ---------------------------------------------------


def test_a_leased_unit_expires_when_its_slot_starts() -> None:
    lease = Lease(Policy("api", 10 * MS, 100))
    lease.add(1000 * MS, 1040 * MS, round_trip=0.001)  # 4 units: slots at 1000..1030 ms
    assert lease.take(990 * MS, 2)  # early: any unit may go (those of 1000 and 1010 ms)
    assert lease.left == 2
    assert lease.take(1025 * MS, 1)  # the slot of 1020 ms has started: the unit of 1030 ms
    assert lease.left == 0
    assert not lease.take(1026 * MS, 1)

    late = Lease(Policy("api", 10 * MS, 100))
    late.add(1000 * MS, 1040 * MS, round_trip=0.001)
    assert not late.take(1031 * MS, 1)  # every slot has started: all four expired unused


def test_a_lease_never_takes_more_than_the_bucket_holds() -> None:
    policy = Policy("api", 1 * MS, 1000)  # 1000/s, burst 1000
    lease = Lease(policy)
    lease.demand = 1e9  # more than any bucket could give
    now = 10**12
    nearly_empty = now + 900 * MS  # 100 units left
    start, end = lease.slots(nearly_empty, now, round_trip=0.001) or (0, 0)
    assert start == nearly_empty
    assert (end - start) // policy.interval_ns == 25  # a quarter of what is left
    assert end - policy.window_ns <= now  # a write GCRA itself would admit
    assert lease.slots(now + 990 * MS, now, round_trip=0.001) is None  # 10 left: not worth it


def test_at_the_limit_a_hot_key_waits_for_a_few_units_with_an_honest_retry_after() -> None:
    policy = Policy("api", 1 * MS, 2000)  # 1000/s, burst 2000: waits for 50 ms of units
    lease = Lease(policy)
    now = 10**12
    two_back = now + policy.window_ns - 2 * MS  # the bucket has 2 units
    held = lease.hold_back(two_back, now, 1)
    assert held is not None
    assert not held.allowed
    assert held.remaining == 2
    assert held.retry_after == pytest.approx(0.048)  # when the 50th unit is back
    assert held == policy.consume(two_back, now, 50)[1]  # the denial of the units it waits for
    assert lease.hold_back(now + policy.window_ns - 50 * MS, now, 1) is None  # 50 back: go


def test_only_token_buckets_with_room_are_leased() -> None:
    assert lease_for(Policy("api", MS, 1000)) is not None
    assert lease_for(Policy("login", MS, 10)) is None  # too small a burst to share
    assert lease_for(SlidingWindow("login", 1000, 10**9)) is None
    assert lease_for(Rates("api", (Policy("a", MS, 1000), Policy("b", 60 * MS, 1000)))) is None


# -- one process -------------------------------------------------------------------------------


@pytest.mark.nats
async def test_a_hot_key_costs_a_few_writes_and_the_headers_stay_honest(
    nats_store: dict[str, Any],
) -> None:
    burst = 1_000_000  # refilled one unit per 100 s: the counts below are exact
    limits = config(nats_store, rate_per_second=0.01, burst=burst)
    async with AsyncRateLimiter(limits) as limiter:
        await limiter.hit("api")
        before = out_messages(limiter)
        decisions = []

        async def worker() -> None:
            for _ in range(2500):
                decisions.append(await limiter.hit("api"))

        await asyncio.gather(*(worker() for _ in range(8)))
        writes = out_messages(limiter) - before
        admitted = 1 + len(decisions)
        assert all(d.allowed and not d.degraded for d in decisions)
        # Eight concurrent tasks alone would be batches of eight, 1 write per 8 decisions.
        assert writes < 0.05 * len(decisions), writes
        # `remaining` counts this process's unused lease as spent: never more than is left.
        assert min(d.remaining for d in decisions) <= burst - admitted
        assert (await limiter.peek("api")).remaining <= burst - admitted
    # Closing gave the unused lease back: the bucket holds what was not admitted (the lease
    # started a little ahead of time: at most one unit of rounding).
    async with AsyncRateLimiter(limits) as fresh:
        remaining = (await fresh.peek("api")).remaining
    assert burst - admitted - 1 <= remaining <= burst - admitted


@pytest.mark.nats
async def test_a_cold_key_writes_once_per_admission(nats_store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(config(nats_store, rate_per_second=0.01, burst=1000)) as limiter:
        await limiter.hit("api")
        before = out_messages(limiter)
        for _ in range(10):
            await asyncio.sleep(0.03)  # tens of requests a second: no lease
            assert (await limiter.hit("api")).allowed
        assert out_messages(limiter) - before == 10
        assert (await limiter.peek("api")).remaining == 1000 - 11


# -- across processes ----------------------------------------------------------------------------


async def _hammer(config: dict[str, Any], start_at: float, seconds: float) -> list[tuple[int, int]]:
    """Decide as fast as 8 tasks can from `start_at` for `seconds`: each admission's
    `(before, after)` wall-clock ns (its decision was made in between)."""
    admitted: list[tuple[int, int]] = []
    async with AsyncRateLimiter(config) as limiter:
        await limiter.peek("api")  # connected before the start
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds

        async def worker() -> None:
            while time.time() < end:
                before = time.time_ns()
                decision = await limiter.hit("api")
                assert not decision.degraded, decision.reason
                if decision.allowed:
                    admitted.append((before, time.time_ns()))

        await asyncio.gather(*(worker() for _ in range(8)))
    return admitted


def _admissions(config: dict[str, Any], start_at: float, seconds: float) -> list[tuple[int, int]]:
    return asyncio.run(_hammer(config, start_at, seconds))


def _fleet(config: dict[str, Any], processes: int, seconds: float) -> list[list[tuple[int, int]]]:
    start_at = time.time() + 3.0  # every process connected by then, even on a loaded machine
    return in_processes(_admissions, (config, start_at, seconds), processes)


@pytest.mark.nats
@pytest.mark.slow
def test_two_processes_on_a_hot_key_are_exact_fair_and_waste_little(
    nats_store: dict[str, Any],
) -> None:
    rate, burst, processes = 200.0, 200, 2
    per_process = _fleet(config(nats_store, rate_per_second=rate, burst=burst), processes, 3.0)
    admissions = sorted(a for one in per_process for a in one)
    total = len(admissions)

    # Never over-admitted, over any interval: the admissions made within [x, x + w] are at
    # most burst + rate*w (+ one per process).
    afters = [after for _, after in admissions]
    for window_ns in (20 * MS, 100 * MS, 500 * MS, afters[-1] - admissions[0][0]):
        allowed = burst + rate * window_ns / 1e9 + processes
        for i, (start, _) in enumerate(admissions):
            inside = sum(1 for before, after in admissions[i:] if after <= start + window_ns)
            assert inside <= allowed, (window_ns, inside, allowed)
            if afters[-1] <= start + window_ns:
                break

    # Waste little: demand was far above the rate, so the fleet got >= 90% of what it could.
    owed = burst + rate * (afters[-1] - admissions[0][1]) / 1e9
    assert total >= 0.9 * owed, (total, owed)

    # Fair: equally loaded processes get 35-65% each.
    shares = [len(one) / total for one in per_process]
    print(f"admitted {total} of {owed:.0f} owed, shares {shares}")
    assert all(0.35 <= share <= 0.65 for share in shares), shares
