"""Settles on a real NATS server: permits, the caches of this process and of others, leases."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter, RateLimiter
from tests.conftest import start_server
from tests.natsserver import NatsServer
from tests.test_fleet import FrozenClock, eventually
from tests.test_nats_faults import limits, own_server, stopped  # noqa: F401 (a fixture)
from tests.test_nats_leases import out_messages

pytestmark = pytest.mark.nats

_PATIENCE = 30.0  # seconds a process waits for another (spawning one takes seconds when loaded)


def tokens(store: dict[str, Any], **llm: Any) -> dict[str, Any]:
    """An LLM token budget: 100 tokens, refilled over a day (no refill during a test), on a
    store with a generous deadline (the counts are exact, on a loaded machine too)."""
    return {
        "stores": {"shared": {**store, "timeout": 2.0}},
        "limiters": {"llm": {"limit": 100, "window_seconds": 86400, **llm}},
    }


async def test_a_permit_settled_for_less_refunds_and_for_more_overdraws(
    nats_store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(tokens(nats_store)) as limiter:
        permit = await limiter.acquire("llm", key="ann", cost=60)
        await permit.settle(15)  # the answer took 15 tokens
        await permit.settle(15)  # the same again: nothing more happens
        with pytest.raises(RuntimeError, match="settled at 15 already"):
            await permit.settle(20)
        with pytest.raises(ValueError, match=">= 0"):
            await permit.settle(-1)
        assert (await limiter.hit("llm", key="ann", cost=85)).allowed  # 15 + 85 = 100
        overdrawn = await limiter.acquire("llm", key="bob", cost=10)
        await overdrawn.settle(130)
        refused = await limiter.hit("llm", key="bob")
        assert not refused.allowed
        assert refused.retry_after > 86400 * 0.3  # 30 tokens of debt, then the token asked


def test_a_sync_permit_settles_from_a_worker_thread(nats_store: dict[str, Any]) -> None:
    with RateLimiter(tokens(nats_store)) as limiter:
        permit = limiter.acquire("llm", key="ann", cost=100)
        assert not limiter.hit("llm", key="ann").allowed
        permit.settle(0)  # never blocks: written on the background loop
        deadline = time.monotonic() + _PATIENCE
        while limiter.peek("llm", key="ann").remaining < 100:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert limiter.hit("llm", key="ann").allowed


async def test_a_refund_updates_this_processs_cached_denial_at_once(
    nats_store: dict[str, Any],
) -> None:
    """The clock never moves: a cached denial would be trusted forever, were it not for the
    settle this process queued (its next decision is written after it)."""
    async with AsyncRateLimiter(tokens(nats_store), clock=FrozenClock()) as limiter:
        permit = await limiter.acquire("llm", key="ann", cost=100)
        assert not (await limiter.hit("llm", key="ann")).allowed  # from the cache
        await permit.settle(40)
        decision = await limiter.hit("llm", key="ann", cost=60)
    assert decision.allowed
    assert not decision.degraded


def _refund_when_told(config: dict[str, Any], spent: Any, go: Any, done: Any) -> None:
    """Another process: spend the whole budget, wait for the word, refund it all."""

    async def run() -> None:
        async with AsyncRateLimiter(config) as limiter:
            permit = await limiter.acquire("llm", key="ann", cost=100)
            spent.set()
            await asyncio.get_running_loop().run_in_executor(None, go.wait, _PATIENCE)
            await permit.settle(0)
            for _ in range(int(_PATIENCE * 100)):  # until it is written
                if (await limiter.peek("llm", key="ann")).remaining == 100:
                    done.put(time.monotonic())
                    return
                await asyncio.sleep(0.01)

    asyncio.run(run())


async def test_a_refund_in_another_process_admits_again_within_the_recheck_second(
    nats_store: dict[str, Any],
) -> None:
    config = tokens(nats_store)
    context = multiprocessing.get_context("spawn")
    spent, go, done = context.Event(), context.Event(), context.Queue()
    other = context.Process(target=_refund_when_told, args=(config, spent, go, done))
    other.start()
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, spent.wait, _PATIENCE)
        async with AsyncRateLimiter(config) as limiter:
            assert not (await limiter.hit("llm", key="ann")).allowed  # read, then cached
            assert not (await limiter.hit("llm", key="ann")).allowed  # from the cache
            go.set()
            refunded_at = await loop.run_in_executor(None, done.get, True, _PATIENCE)
            decision = await eventually(lambda: limiter.hit("llm", key="ann"))
            admitted_at = time.monotonic()
    finally:
        go.set()
        other.join(_PATIENCE)
    assert not decision.degraded
    # A cached denial is re-read once it is a second old (the polling adds a little).
    print(f"admitted {admitted_at - refunded_at:.3f} s after the refund landed")
    assert admitted_at - refunded_at < 5.0


async def test_refunds_of_a_hot_leased_key_go_through_the_shared_bucket(
    nats_store: dict[str, Any],
) -> None:
    """Half the admissions of a hot key (served from this process's lease) are refunded: the
    shared bucket gives back those, and never more."""
    burst, interval_ns = 1_000_000, 100 * 10**9  # one unit per 100 s: the counts are exact
    config = {
        # A generous deadline: a write that timed out may have landed, and the count is exact.
        "stores": {"prod": {**nats_store, "timeout": 5.0}},
        "limiters": {"api": {"rate_per_second": 0.01, "burst": burst}},
    }
    admitted = 0
    refunded: list[int] = []  # when each refunded admission was made
    async with AsyncRateLimiter(config) as limiter:
        await limiter.hit("api")
        before = out_messages(limiter)

        async def worker() -> None:
            nonlocal admitted
            for number in range(2000):
                decision = await limiter.hit("api")
                assert decision.allowed
                assert not decision.degraded
                admitted += 1
                if number % 2:
                    limiter.settle("api", None, decision, 1, 0)
                    refunded.append(decision.receipt or 0)

        await asyncio.gather(*(worker() for _ in range(8)))
        writes = out_messages(limiter) - before
        assert writes < 0.2 * admitted, writes  # leased: most decisions wrote nothing
        charged = 1 + admitted - len(refunded)
        for _ in range(int(_PATIENCE * 100)):  # the last are written in the background
            if not limiter.store("prod")._cache["api"].settling:
                break
            await asyncio.sleep(0.01)
        settled_by = time.time_ns()
        left = (await limiter.peek("api")).remaining
        lease = limiter.store("prod")._cache["api"].lease
        assert lease is not None
        leased = lease.left  # units this process may still admit from its lease
    # The bucket counts what was charged and what the lease holds: the refunds came back, but
    # for what time refilled between each admission and its refund (a refund gives back only
    # what is still ahead: algorithms.py), and never more than them.
    refilled = sum(settled_by - made for made in refunded) / interval_ns
    assert burst - charged - refilled - 2 <= left + leased <= burst - charged, (
        left,
        leased,
        charged,
        refilled,
    )


async def test_a_settle_while_nats_hangs_is_logged_once_and_never_raised(
    own_server: NatsServer,  # noqa: F811 (the fixture of that name)
    bucket_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = limits(own_server.url, bucket_name, timeout=0.3, backoff=0.5)
    async with AsyncRateLimiter(config) as limiter:
        permits = [await limiter.acquire("slow", key=f"k{n}") for n in range(3)]
        with caplog.at_level(logging.WARNING, "ratesync_middleware.nats"), stopped(own_server):
            for permit in permits:
                await permit.settle(0)  # returns at once: written by the store's flusher
            for _ in range(int(_PATIENCE * 100)):
                if any("a settle was not written" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "a settle was not written" in r.getMessage()]
    assert len(lines) == 1, lines  # one line per 10 s, however many failed
    assert "the admission stays charged as it was" in lines[0]


async def test_a_disconnect_warning_does_not_hide_a_settle_that_failed(
    bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    try:
        config = limits(server.url, bucket_name, timeout=0.3, backoff=0.5)
        async with AsyncRateLimiter(config) as limiter:
            permit = await limiter.acquire("slow", key="k")
            with caplog.at_level(logging.WARNING, "ratesync_middleware.nats"):
                server.kill()
                await _logged(caplog, "disconnected from NATS")
                await permit.settle(0)  # written by the store's flusher: it cannot be now
                await _logged(caplog, "a settle was not written")
    finally:
        server.cleanup()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a log line holds `text` (a store logs from its own tasks)."""
    deadline = time.monotonic() + _PATIENCE
    while not any(text in record.getMessage() for record in caplog.records):
        assert time.monotonic() < deadline, f"never logged: {text!r}"
        await asyncio.sleep(0.01)
