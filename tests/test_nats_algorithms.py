"""The sliding window and several rates on a real NATS server, exact across processes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
import pytest

from ratesync_middleware import AsyncRateLimiter
from tests.fleet import in_processes

pytestmark = pytest.mark.nats


def limiters(nats_store: dict[str, Any]) -> dict[str, Any]:
    # These tests are about exactness, not latency: a generous deadline keeps a loaded CI
    # machine from degrading a decision that queued behind the other process's writes.
    return {
        "stores": {"prod": {**nats_store, "timeout": 5.0}},
        "limiters": {
            "login": {
                "store": "prod",
                "algorithm": "sliding_window",
                "limit": 5,
                "window_seconds": 300,
                "key": "global",
            },
            "api": {"store": "prod", "limit": ["3/second", "5/minute"], "key": "global"},
        },
    }


async def _spend(config: dict[str, Any], limiter_name: str, seconds: float) -> int:
    admitted = 0
    async with AsyncRateLimiter(config) as limiter:

        async def worker() -> None:
            nonlocal admitted
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                decision = await limiter.hit(limiter_name)
                assert not decision.degraded, decision.reason
                admitted += decision.allowed
                await asyncio.sleep(0.005)

        await asyncio.gather(*(worker() for _ in range(8)))
    return admitted


def _count(config: dict[str, Any], limiter_name: str, seconds: float) -> int:
    return asyncio.run(_spend(config, limiter_name, seconds))


def _in_two_processes(config: dict[str, Any], limiter_name: str, seconds: float) -> list[int]:
    return in_processes(_count, (config, limiter_name, seconds), 2)


@pytest.mark.slow
def test_the_sliding_window_is_exact_across_two_processes(nats_store: dict[str, Any]) -> None:
    config = limiters(nats_store)
    counts = _in_two_processes(config, "login", 1.5)
    assert sum(counts) == 5  # 5 in any 300 s, whoever asks


@pytest.mark.slow
def test_several_rates_are_exact_across_two_processes(nats_store: dict[str, Any]) -> None:
    config = limiters(nats_store)
    counts = _in_two_processes(config, "api", 2.5)
    assert sum(counts) == 5  # 3 in the first second, then the minute's last 2


async def test_the_stored_values_are_documented_json(
    nats_store: dict[str, Any], nats_url: str, bucket_name: str
) -> None:
    config = limiters(nats_store)
    async with AsyncRateLimiter(config) as limiter:
        assert (await limiter.hit("login")).allowed
        assert (await limiter.hit("api", cost=2)).allowed
        peeked = await limiter.peek("login")
        assert peeked.remaining == 4
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(bucket_name)
        window = json.loads((await kv.get("login")).value or b"")
        rates = json.loads((await kv.get("api")).value or b"")
    finally:
        await nc.close()
    assert window["v"] == 1
    assert window["kind"] == "window"
    assert window["limit"] == 5
    assert window["window_ns"] == 300 * 10**9
    assert len(window["log"]) == 1
    assert window["log"][0][1] == 1
    assert rates["kind"] == "rates"
    assert len(rates["tats_ns"]) == 2
    assert rates["rates"] == [[333_333_334, 3], [12 * 10**9, 5]]


async def test_a_foreign_value_is_logged_not_silently_a_fresh_window(
    nats_store: dict[str, Any], nats_url: str, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = limiters(nats_store)
    async with AsyncRateLimiter(config) as limiter:
        assert (await limiter.hit("login")).allowed  # creates the bucket
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bucket_name)
            await kv.put("login", b'{"v":1,"tat_ns":5,"interval_ns":1,"burst":1}')
        finally:
            await nc.close()
        await limiter.aclose()
        decision = await limiter.peek("login")
    assert decision.remaining == 5
    assert "not a sliding-window log" in caplog.text
