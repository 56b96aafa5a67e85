"""High availability: a 3-server JetStream cluster, a bucket with 3 replicas, the leader stopped."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import nats
import pytest

from ratesync_middleware import AsyncRateLimiter
from tests.natsserver import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.slow]

FAILOVER_SECONDS = 15.0  # docs/reliability.md states the bound this test holds (raft: 4-9 s)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def cluster() -> Iterator[list[NatsServer]]:
    client_ports, route_ports = free_ports(3), free_ports(3)
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    servers = [
        NatsServer(
            jetstream=False,
            port=client_ports[i],
            config=f"""
            server_name: n{i}
            jetstream {{ store_dir: "{{store_dir}}" }}
            cluster {{ name: ratesync, listen: 127.0.0.1:{route_ports[i]}, routes: [{routes}] }}
            """,
        )
        for i in range(3)
    ]
    for server in servers:
        server.start()
    try:
        asyncio.run(_wait_for_cluster(servers[0].url))
        yield servers
    finally:
        for server in servers:
            server.cleanup()


async def _wait_for_cluster(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=1)
            try:
                await nc.jetstream(timeout=2).account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def stream_leader(url: str, bucket: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        assert info.cluster is not None
        assert info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


async def test_decisions_continue_after_the_leader_stops(cluster: list[NatsServer]) -> None:
    urls = ",".join(server.url for server in cluster)
    rate, burst = 20.0, 10
    config = {
        "stores": {
            "prod_ha": {
                "engine": "nats",
                "url": urls,
                "replicas": 3,
                "bucket_name": "rate_limits",
                "timeout": 0.5,
                "backoff": 0.25,
            }
        },
        "limiters": {"api": {"store": "prod_ha", "rate_per_second": rate, "burst": burst}},
    }
    async with AsyncRateLimiter(config) as limiter:
        # The first decision creates the R3 bucket; a young cluster may need a moment.
        deadline = time.monotonic() + 15
        while (await limiter.hit("api", key="k")).degraded:
            assert time.monotonic() < deadline, "the replicated bucket could not be created"
            await asyncio.sleep(0.3)
        leader = await stream_leader(cluster[0].url, "rate_limits")
        started = time.monotonic()
        admitted = 1
        stopped_at = recovered_at = None
        degraded = 0
        while time.monotonic() - started < 2 + FAILOVER_SECONDS + 3:
            decision = await limiter.hit("api", key="k")
            if decision.degraded:
                degraded += 1
            else:
                admitted += decision.allowed
                # Recovered: an admission, i.e. a write the new leader accepted (a denial may
                # come from this process's cache without asking NATS at all).
                if decision.allowed and stopped_at is not None and recovered_at is None:
                    recovered_at = time.monotonic()
            if stopped_at is None and time.monotonic() - started > 2:
                victim = next(s for i, s in enumerate(cluster) if f"n{i}" == leader)
                victim.kill()  # a crash, not a graceful step-down
                stopped_at = time.monotonic()
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started

    assert stopped_at is not None
    print(f"fail-over: {(recovered_at or 0) - stopped_at:.2f}s, degraded answers: {degraded}")
    assert recovered_at is not None, "no decision came from NATS after the leader stopped"
    assert recovered_at - stopped_at < FAILOVER_SECONDS
    # Counted admissions never exceed the bucket's bound; answers during fail-over are fail-open.
    assert admitted <= burst + rate * elapsed + 1
