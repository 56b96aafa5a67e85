"""The fleet's control plane on real servers: what one process resets, every process sees.

Each test runs two limiters on one bucket, as two processes of a fleet would (each has its own
connection and its own cache). A frozen clock keeps the cached denials' one-second re-check
from firing, so a process can only learn of a reset through the control plane.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from ratesync_middleware import AsyncRateLimiter, Decision
from tests.servers import uvicorn_servers
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.nats

_PATIENCE = 10.0  # seconds a test waits for something that should take milliseconds


class FrozenClock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now_ns = time.time_ns()

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


def fleet_config(url: str, bucket: str) -> dict[str, Any]:
    return {
        "stores": {"prod": {"engine": "nats", "url": url, "bucket_name": bucket}},
        "limiters": {"login": {"store": "prod", "limit": "2/hour"}},
    }


async def exhaust(limiter: AsyncRateLimiter, key: str) -> None:
    """Spend the group's whole burst, so that its next request is refused from the cache."""
    while (await limiter.hit("login", key=key)).allowed:
        pass
    assert not (await limiter.hit("login", key=key)).allowed


async def eventually(hit: Callable[[], Any]) -> Decision:
    """Hit until a real (not fail-open) admission; fails after `_PATIENCE` seconds."""
    deadline = time.monotonic() + _PATIENCE
    while True:
        decision: Decision = await hit()
        if decision.allowed and not decision.degraded:
            return decision
        assert time.monotonic() < deadline, f"still refused: {decision}"
        await asyncio.sleep(0.01)


async def test_a_reset_reaches_another_process_that_cached_the_denial(
    nats_url: str, bucket_name: str
) -> None:
    config = fleet_config(nats_url, bucket_name)
    clock = FrozenClock()
    async with AsyncRateLimiter(config, clock=clock) as a, AsyncRateLimiter(config) as b:
        await exhaust(a, "kim")
        await b.reset("login", key="kim")
        await eventually(lambda: a.hit("login", key="kim"))


async def test_a_plain_kv_delete_is_seen_once_the_cached_denial_is_a_second_old(
    nats_url: str, bucket_name: str
) -> None:
    clock = FrozenClock()
    async with AsyncRateLimiter(fleet_config(nats_url, bucket_name), clock=clock) as limiter:
        await exhaust(limiter, "kim")
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bucket_name)
            await kv.delete("login.kim")  # what `nats kv del` does: no control message
        finally:
            await nc.close()
        # Within the second, the cache still proves the bucket empty: no round trip.
        assert not (await limiter.hit("login", key="kim")).allowed
        clock.advance(1.0)  # (2/hour: a second refills nothing)
        decision = await limiter.hit("login", key="kim")
    assert decision.allowed
    assert not decision.degraded


async def test_a_process_disconnected_during_a_reset_reads_again_on_reconnect(
    nats_url: str, nats_server: Any, bucket_name: str
) -> None:
    proxy = TcpProxy(nats_server.port).start()
    behind_proxy = fleet_config(proxy.url, bucket_name)
    clock = FrozenClock()
    try:
        async with AsyncRateLimiter(behind_proxy, clock=clock) as a:
            await exhaust(a, "kim")
            proxy.stop()  # a's connection drops; nats-py keeps trying to reconnect
            async with AsyncRateLimiter(fleet_config(nats_url, bucket_name)) as b:
                await b.reset("login", key="kim")  # a cannot hear this
            proxy = TcpProxy(nats_server.port, port=proxy.port).start()
            await eventually(lambda: a.hit("login", key="kim"))
    finally:
        proxy.stop()


# -- real app processes -----------------------------------------------------------------------


def write_app_config(path: Path, url: str, bucket: str, burst: int) -> Path:
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{url}"
bucket_name = "{bucket}"
timeout = 2.0

[limiters.login]
store = "prod"
limit = "{burst}/hour"
key = "ip"

[middleware]
default = "login"
"""
    )
    return path


async def until_admitted(client: httpx.AsyncClient, url: str, since: float) -> float:
    """Seconds from `since` until `url` admits a request (a 200 that the bucket counted)."""
    deadline = time.monotonic() + _PATIENCE
    while True:
        response = await client.get(url)
        if response.status_code == 200 and "ratelimit" in response.headers:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"{url} still answers {response.status_code}"
        await asyncio.sleep(0.005)


async def reset_latencies(urls: list[str], config: Path, rounds: int) -> list[float]:
    """For each round: exhaust the group, have every process refuse it, reset it from another
    process, and time how long each app process takes to admit it again."""
    latencies: list[float] = []
    async with (
        httpx.AsyncClient(timeout=5.0) as client,
        AsyncRateLimiter(str(config)) as operator,
    ):
        for _ in range(rounds):
            while (await client.get(urls[0] + "/")).status_code == 200:
                pass
            for url in urls:  # each process now holds the group as empty in its cache
                assert (await client.get(url + "/")).status_code == 429
            started = time.monotonic()
            await operator.reset("login", key="127.0.0.1")
            latencies += await asyncio.gather(
                *(until_admitted(client, url + "/", started) for url in urls)
            )
    return latencies


@pytest.mark.slow
def test_a_reset_reaches_three_uvicorn_processes_within_a_second(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = write_app_config(tmp_path / "rate-sync.toml", nats_url, bucket_name, burst=6)
    with uvicorn_servers(
        "tests.apps.starlette_app:app", 3, {"RATE_SYNC_CONFIG": str(config)}
    ) as urls:
        latencies = sorted(asyncio.run(reset_latencies(urls, config, rounds=20)))
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(
        f"reset -> admitted, {len(latencies)} samples: p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert p99 < 1.0
