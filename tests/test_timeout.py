"""`timeout` (rate-sync's meaning): wait up to so long for a token or a slot instead of refusing.

For a rate the algorithm knows the wait: the admission is reserved in the same write and the
caller sleeps until it; a wait longer than the timeout refuses at once, spending nothing. For
`max_concurrent` the wait ends when a slot is given back (woken by the release, on memory and
on NATS, across processes). The framework-free API raises `RateLimitExceeded` when it refuses.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter, RateLimiter, RateLimitExceeded

# One admission per second, each kind: a second request waits up to a second for its turn.
RATES: dict[str, dict[str, Any]] = {
    "bucket": {"rate_per_second": 1.0},
    "rates": {"limit": ["1/second", "100/minute"]},
    "window": {"algorithm": "sliding_window", "limit": 1, "window_seconds": 1},
}
# One admission per minute: a second request would wait a minute.
SLOW_RATES: dict[str, dict[str, Any]] = {
    "bucket": {"limit": "1/minute"},
    "rates": {"limit": ["1/minute", "100/hour"]},
    "window": {"algorithm": "sliding_window", "limit": 1, "window_seconds": 60},
}


def config(store: dict[str, Any], limiter: dict[str, Any], timeout: float) -> dict[str, Any]:
    return {
        "stores": {"s": store},
        "limiters": {"api": {"store": "s", **limiter, "timeout": timeout}},
    }


@pytest.mark.parametrize("kind", RATES)
async def test_a_request_waits_for_its_token_then_is_admitted(
    store: dict[str, Any], kind: str
) -> None:
    async with AsyncRateLimiter(config(store, RATES[kind], timeout=5.0)) as limiter:
        first = await limiter.acquire("api", key="u1")
        assert first.decision.allowed
        assert first.decision.wait == 0
        second = await limiter.acquire("api", key="u1")  # waits for the next token
        assert second.decision.allowed
        assert 0 < second.decision.wait <= 1.0
        # The waited admission was spent: the next one refuses without a wait of its own.
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.acquire("api", key="u1", timeout=0)
        assert refused.value.decision.retry_after > 0


@pytest.mark.parametrize("kind", SLOW_RATES)
async def test_a_too_short_timeout_refuses_at_once_and_spends_nothing(
    store: dict[str, Any], kind: str
) -> None:
    async with AsyncRateLimiter(config(store, SLOW_RATES[kind], timeout=20.0)) as limiter:
        await limiter.acquire("api", key="u1")
        started = time.monotonic()
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.acquire("api", key="u1")  # the next token is a minute away
        # The bucket knew the wait exceeds the timeout: it did not sleep the 20 s in vain.
        assert time.monotonic() - started < 20.0
        decision = refused.value.decision
        assert not decision.allowed
        assert decision.retry_after > 20.0
        assert decision.policy.startswith("api")  # "api:1/minute" for several rates
        # Nothing was spent: another identity, and `hit` (which never waits), are unaffected.
        assert (await limiter.hit("api", key="u2")).allowed


async def test_the_acquire_timeout_overrides_the_limiters(store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(config(store, RATES["bucket"], timeout=0)) as limiter:
        await limiter.acquire("api", key="u1")
        with pytest.raises(RateLimitExceeded):
            await limiter.acquire("api", key="u1")  # the limiter's own: refuse at once
        permit = await limiter.acquire("api", key="u1", timeout=5.0)
        assert permit.decision.allowed
        assert permit.decision.wait > 0
        with pytest.raises(ValueError, match="timeout"):
            await limiter.acquire("api", key="u1", timeout=-1)


async def test_concurrent_waiting_requests_each_reserve_a_token_of_their_own(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(config(store, RATES["bucket"], timeout=5.0)) as limiter:
        permits = await asyncio.gather(*(limiter.acquire("api", key="u1") for _ in range(3)))
        waits = sorted(permit.decision.wait for permit in permits)
        assert waits[0] == 0
        assert waits[1] > 0
        assert waits[2] > 1.0  # the token after the next one: two seconds ahead, less the spread
        with pytest.raises(RateLimitExceeded):
            await limiter.acquire("api", key="u1", timeout=0)


# --- slots ---------------------------------------------------------------------------------------


def slots_config(store: dict[str, Any], timeout: float) -> dict[str, Any]:
    return config(store, {"max_concurrent": 1, "key": "global"}, timeout)


async def test_a_request_waits_for_a_slot_given_back_then_is_admitted(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(slots_config(store, timeout=10.0)) as limiter:
        holder = await limiter.acquire("api")
        with pytest.raises(RateLimitExceeded):
            await limiter.acquire("api", timeout=0)  # full: refused at once without a timeout
        waiting = asyncio.create_task(limiter.acquire("api"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # still waiting for the slot
        await holder.release()
        permit = await asyncio.wait_for(waiting, 10)
        assert permit.decision.allowed
        assert permit.decision.policy == "api:concurrent"
        await permit.release()


async def test_a_wait_for_a_slot_that_is_not_given_back_ends_with_a_refusal(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(slots_config(store, timeout=0.3)) as limiter:
        async with await limiter.acquire("api"):
            with pytest.raises(RateLimitExceeded) as refused:
                await limiter.acquire("api")
        assert refused.value.decision.policy == "api:concurrent"
        assert not refused.value.decision.degraded
        async with await limiter.acquire("api"):  # given back on exit
            pass


def test_the_sync_limiter_blocks_its_thread_for_the_wait(store: dict[str, Any]) -> None:
    with RateLimiter(config(store, RATES["bucket"], timeout=5.0)) as limiter:
        assert limiter.acquire("api", key="u1").decision.wait == 0
        permit = limiter.acquire("api", key="u1")
        assert permit.decision.allowed
        assert permit.decision.wait > 0
        with pytest.raises(RateLimitExceeded):
            limiter.acquire("api", key="u1", timeout=0)


# --- NATS slots across two processes -------------------------------------------------------------


def hold_then_release(table: dict[str, Any], held: Any, release: Any) -> None:
    asyncio.run(_hold_then_release(table, held, release))


async def _hold_then_release(table: dict[str, Any], held: Any, release: Any) -> None:
    async with AsyncRateLimiter(slots_config(table, timeout=0)) as limiter:
        permit = await limiter.acquire("api")
        held.set()
        await asyncio.to_thread(release.wait, 60)
        await permit.release()
        await asyncio.sleep(0.5)  # the release is written in the background


@pytest.mark.nats
async def test_a_slot_given_back_by_another_process_wakes_the_waiting_request(
    nats_store: dict[str, Any],
) -> None:
    table = {**nats_store, "timeout": 2.0}
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=hold_then_release, args=(table, held, release))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 30)
        async with AsyncRateLimiter(slots_config(table, timeout=30.0)) as limiter:
            with pytest.raises(RateLimitExceeded):
                await limiter.acquire("api", timeout=0)  # the other process holds it
            waiting = asyncio.create_task(limiter.acquire("api"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            release.set()
            permit = await asyncio.wait_for(waiting, 30)
            assert permit.decision.allowed
            await permit.release()
        holder.join(30)
        assert holder.exitcode == 0
    finally:
        holder.kill()
        holder.join(10)


async def test_a_waiter_cancelled_after_its_wake_up_passes_it_on() -> None:
    """Memory: one wake-up per slot given back; a waiter that goes away does not swallow it."""
    async with AsyncRateLimiter(slots_config({"engine": "memory"}, timeout=30.0)) as limiter:
        holder = await limiter.acquire("api")
        first = asyncio.create_task(limiter.acquire("api"))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(limiter.acquire("api"))
        await asyncio.sleep(0.1)
        await holder.release()  # wakes `first` (the oldest) ...
        first.cancel()  # ... which goes away before it runs
        permit = await asyncio.wait_for(second, 10)
        assert permit.decision.allowed
        with pytest.raises(asyncio.CancelledError):
            await first


def test_a_reserved_admission_is_covered_by_the_buckets_max_age() -> None:
    """A rate that may wait holds admissions up to `timeout` ahead: its value must outlive the
    window after the furthest one (the NATS bucket's max age is checked against this)."""
    from ratesync_middleware import load_config
    from ratesync_middleware.stores import limiter_windows_ns

    tables = {"limit": "10/minute", "key": "global"}
    loaded = load_config(
        {
            "limiters": {
                "waits": {**tables, "timeout": 30.0},
                "refuses": tables,
                "slots": {"max_concurrent": 2, "lease_seconds": 5, "timeout": 30.0},
            }
        }
    )
    windows = limiter_windows_ns(loaded, "default")
    assert windows["refuses"] == 60 * 10**9
    assert windows["waits"] == 90 * 10**9
    assert windows["slots"] == 5 * 10**9  # a slot wait reserves nothing in the store
