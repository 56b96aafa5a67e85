"""The framework-free limiter, async and sync, on the embedded memory store."""

from __future__ import annotations

import logging
import threading

import pytest

from ratesync_middleware import AsyncRateLimiter, ConfigError, Decision, RateLimiter, load_config

CONFIG = {
    "limiters": {
        "api": {"rate_per_second": 1.0, "burst": 3},
        "site": {"limit": "100/minute", "key": "global"},
    }
}


def test_public_names_import() -> None:
    import ratesync_middleware

    for name in ("AsyncRateLimiter", "RateLimiter", "load_config", "Decision"):
        assert name in ratesync_middleware.__all__
        assert getattr(ratesync_middleware, name)


async def test_async_limiter_on_the_memory_default() -> None:
    async with AsyncRateLimiter(CONFIG) as limiter:
        decisions = [await limiter.hit("api", key="user-42") for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert decisions[-1].retry_after > 0
        assert (await limiter.hit("api", key="user-43")).allowed  # another group


async def test_hit_now_decides_memory_limiters_without_awaiting() -> None:
    seen = []
    limits = {
        "stores": {
            "here": {"engine": "memory"},
            "shared": {"engine": "nats", "url": "nats://127.0.0.1:4222"},
        },
        "limiters": {
            "api": {"rate_per_second": 1.0, "burst": 3, "store": "here"},
            "remote": {"rate_per_second": 1.0, "store": "shared"},
        },
    }
    limiter = AsyncRateLimiter(limits, on_decision=seen.append)
    decisions = [limiter.hit_now("api", key="user-42") for _ in range(3)]
    decisions.append(await limiter.hit("api", key="user-42"))  # the same bucket
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [event.decision for event in seen] == decisions  # the hook sees both paths
    with pytest.raises(TypeError, match="await hit"):
        limiter.hit_now("remote", key="user-42")  # a NATS store must be awaited


async def test_a_global_limiter_ignores_the_identity() -> None:
    async with AsyncRateLimiter(CONFIG) as limiter:
        first = await limiter.hit("site", key="a")
        second = await limiter.hit("site", key="b")
        assert second.remaining == first.remaining - 1


async def test_unknown_limiter_and_bad_cost() -> None:
    async with AsyncRateLimiter(CONFIG) as limiter:
        with pytest.raises(ConfigError, match="no limiter 'nope'"):
            await limiter.hit("nope", key="k")
        with pytest.raises(ValueError, match="cost"):
            await limiter.hit("api", key="k", cost=0)


def test_sync_limiter_from_many_threads() -> None:
    limiter = RateLimiter({"limiters": {"api": {"rate_per_second": 0.001, "burst": 100}}})
    results: list[Decision] = []
    lock = threading.Lock()

    def spend() -> None:
        for _ in range(50):
            decision = limiter.hit("api", key="k")
            with lock:
                results.append(decision)

    threads = [threading.Thread(target=spend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    limiter.close()
    assert sum(d.allowed for d in results) == 100


def test_sync_and_async_share_the_config_type() -> None:
    config = load_config(CONFIG)
    assert RateLimiter(config).config is config
    assert AsyncRateLimiter(config).config is config


async def test_store_failures_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {
        "stores": {"down": {"engine": "nats", "url": "nats://127.0.0.1:1", "connect_timeout": 0.1}},
        "limiters": {"api": {"store": "down", "rate_per_second": 1.0}},
    }
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        async with AsyncRateLimiter(config) as limiter:
            decisions = [await limiter.hit("api", key="k") for _ in range(20)]
    assert all(d.allowed and d.degraded for d in decisions)
    failures = [r for r in caplog.records if "store 'down' failed" in r.getMessage()]
    assert len(failures) == 1
    assert "Connection refused" in failures[0].getMessage()
