"""Idle keys leave the server: on nats-server 2.11+ each write carries a per-message TTL (the
time until the key's state is full again, at least 1 s), so a one-shot identity (a scan, a
botnet rotating addresses) costs the server nothing once its bucket has refilled. An older
server, or a bucket made without per-message TTL, keeps every key for the bucket's TTL (24 h),
and the store says which applies at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig, StreamConfig

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.keys import slots_key
from ratesync_middleware.stores.nats import NatsStore
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats


def config(url: str, bucket: str, **limiters: dict[str, Any]) -> dict[str, Any]:
    return {
        "stores": {"prod": {"engine": "nats", "url": url, "bucket_name": bucket, "timeout": 2.0}},
        "limiters": {name: {"store": "prod", **table} for name, table in limiters.items()},
    }


async def server_version(url: str) -> tuple[int, int]:
    nc = await nats.connect(url)
    try:
        version = nc.connected_server_version
        return version.major, version.minor
    finally:
        await nc.close()


async def stored_ttl(url: str, bucket: str, key: str) -> str | None:
    """The `Nats-TTL` header of a key's value as the server holds it (None: none; "gone": no key)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            message = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}")
        except nats.js.errors.NotFoundError:
            return "gone"
        return (message.headers or {}).get("Nats-TTL")
    finally:
        await nc.close()


async def gone_within(url: str, bucket: str, key: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await stored_ttl(url, bucket, key) == "gone":
            return True
        await asyncio.sleep(0.2)
    return False


async def test_each_value_lives_until_its_state_is_full_again(
    nats_server: NatsServer, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = nats_server.url
    limits = config(
        url,
        bucket_name,
        api={"rate_per_second": 0.1, "burst": 3},  # one request: full again in 10 s
        login={"algorithm": "sliding_window", "limit": 5, "window_seconds": 30},
        upload={"max_concurrent": 2, "lease_seconds": 20},
        quick={"rate_per_second": 100.0, "burst": 100},  # full again at once: 1 s, the least
    )
    supported = await server_version(url) >= (2, 11)
    with caplog.at_level(logging.INFO, "ratesync_middleware"):
        async with AsyncRateLimiter(limits) as limiter:
            await limiter.hit("api", key="scanner")
            await limiter.hit("login", key="kim")
            permit = await limiter.acquire("upload", key="u1")
            await limiter.hit("quick", key="q")
            ttls = {
                key: await stored_ttl(url, bucket_name, key)
                for key in ("api.scanner", "login.kim", slots_key("upload.u1"), "quick.q")
            }
            await permit.release()
    lines = [r.getMessage() for r in caplog.records if "idle keys" in r.getMessage()]
    if supported:
        assert ttls == {
            "api.scanner": "10s",
            "login.kim": "30s",
            slots_key("upload.u1"): "20s",
            "quick.q": "1s",
        }
        assert lines == [
            f"store 'prod': KV bucket '{bucket_name}': idle keys expire when full again "
            "(per-message TTL)"
        ]
    else:  # nats-server 2.9 / 2.10: today's behaviour, said once
        assert set(ttls.values()) == {None}
        assert len(lines) == 1
        assert "idle keys are kept 24h (the bucket's TTL: nats-server 2." in lines[0]


async def test_an_idle_key_leaves_the_server_and_comes_back_full(
    nats_server: NatsServer, bucket_name: str
) -> None:
    url = nats_server.url
    limits = config(url, bucket_name, api={"rate_per_second": 1.0, "burst": 2})
    async with AsyncRateLimiter(limits) as limiter:
        assert (await limiter.hit("api", key="one-shot", cost=2)).allowed
        assert not (await limiter.hit("api", key="one-shot")).allowed
        if await server_version(url) < (2, 11):
            await asyncio.sleep(3.0)
            assert await stored_ttl(url, bucket_name, "api.one-shot") is None  # kept 24 h
            return
        assert await gone_within(url, bucket_name, "api.one-shot", 6.0)
        # The cache still holds the old revision: the store finds out, and the key is whole.
        again = await limiter.hit("api", key="one-shot", cost=2)
        assert again.allowed
        assert not again.degraded
        assert not (await limiter.hit("api", key="one-shot")).allowed


async def test_a_bucket_made_without_per_message_ttl_keeps_todays_expiry(
    nats_server: NatsServer, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = nats_server.url
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if await server_version(url) >= (2, 11):
            await js.add_stream(  # as an operator's `nats kv add` of an older CLI makes it
                StreamConfig(
                    name=f"KV_{bucket_name}",
                    subjects=[f"$KV.{bucket_name}.>"],
                    max_msgs_per_subject=1,
                    max_age=24 * 3600,
                    allow_direct=True,
                    allow_rollup_hdrs=True,
                    deny_delete=True,
                    allow_msg_ttl=False,
                )
            )
        else:
            await js.create_key_value(KeyValueConfig(bucket=bucket_name, history=1, ttl=86400))
    finally:
        await nc.close()
    limits = config(url, bucket_name, api={"rate_per_second": 1.0, "burst": 2})
    with caplog.at_level(logging.INFO, "ratesync_middleware"):
        async with AsyncRateLimiter(limits) as limiter:
            decision = await limiter.hit("api", key="k")
            assert decision.allowed  # no TTL header: no write refused
            assert not decision.degraded
            store = limiter.store("prod")
            assert isinstance(store, NatsStore)
    assert await stored_ttl(url, bucket_name, "api.k") is None
    lines = [r.getMessage() for r in caplog.records if "idle keys" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(
        f"store 'prod': KV bucket '{bucket_name}': idle keys are kept 24h (the bucket's TTL: "
    )
