"""Failures at run time named by their cause: a permission revoked by a server reload, a
replicated bucket whose stream lost its leader. "No answer within the deadline" is left for
real timeouts."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator

import pytest

from ratesync_middleware import AsyncRateLimiter
from tests.natsserver import NatsServer
from tests.test_nats_cluster import cluster, stream_leader

pytestmark = pytest.mark.nats

__all__ = ["cluster"]  # the fixture, shared with test_nats_cluster

ALL_ALLOWED = """
jetstream {{ store_dir: "{{store_dir}}" }}
authorization {{ users = [ {{ user: app, password: "app-pw" {permissions} }} ] }}
"""
# What an administrator's edit can do to a running application: take away publish on the bucket.
KV_REVOKED = (
    ', permissions: { publish: { allow: [">"], deny: ["$KV.{bucket}.>"] }, '
    'subscribe: { allow: [">"] } }'
)


@pytest.fixture
def reloadable_server() -> Iterator[NatsServer]:
    server = NatsServer(jetstream=False, config=ALL_ALLOWED.format(permissions=""))
    server.start()
    yield server
    server.cleanup()


def reload_with(server: NatsServer, config: str) -> None:
    """Rewrite the server's configuration file and have it reloaded (SIGHUP)."""
    (server.workdir / "server.conf").write_text(
        config.replace("{store_dir}", str(server.workdir / "js"))
    )
    reloads = sum("Reloaded server configuration" in line for line in server.log)
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum("Reloaded server configuration" in line for line in server.log) == reloads:
        assert time.monotonic() < deadline, "".join(server.log[-5:])
        time.sleep(0.02)


async def test_a_permission_revoked_at_run_time_is_named(
    reloadable_server: NatsServer, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"nats://app:app-pw@127.0.0.1:{reloadable_server.port}"
    config = {
        "stores": {
            "prod": {"engine": "nats", "url": url, "bucket_name": bucket_name, "timeout": 0.5}
        },
        "limiters": {"api": {"store": "prod", "rate_per_second": 100.0, "burst": 100}},
    }
    async with AsyncRateLimiter(config) as limiter:
        assert not (await limiter.hit("api", key="k")).degraded
        revoked = KV_REVOKED.replace("{bucket}", bucket_name)
        await asyncio.to_thread(
            reload_with, reloadable_server, ALL_ALLOWED.format(permissions=revoked)
        )
        with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
            decision = await limiter.hit("api", key="k2")
    assert decision.degraded
    assert decision.allowed  # fail-open
    failures = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert failures, caplog.text
    assert "Insufficient permissions" in failures[0]
    assert f"publish to $KV.{bucket_name}.api.k2" in failures[0]
    assert "within the deadline" not in caplog.text
    assert "app-pw" not in caplog.text


@pytest.mark.slow
async def test_a_stream_without_a_leader_is_no_quorum(
    cluster: list[NatsServer], caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "stores": {
            "prod_ha": {
                "engine": "nats",
                "url": ",".join(server.url for server in cluster),
                "replicas": 3,
                "bucket_name": "quorum",
                "timeout": 0.5,
                "backoff": 0.25,
            }
        },
        "limiters": {"api": {"store": "prod_ha", "rate_per_second": 100.0, "burst": 100}},
    }
    # Created once through a process that reaches every server (a young cluster may need a
    # moment), then used by one connected to a server that is not the stream's leader.
    async with AsyncRateLimiter(config) as creator:
        deadline = time.monotonic() + 15
        while (await creator.hit("api", key="k")).degraded:
            assert time.monotonic() < deadline, "the replicated bucket could not be created"
            await asyncio.sleep(0.3)
    leader = await stream_leader(cluster[0].url, "quorum")
    survivor = next(s for i, s in enumerate(cluster) if f"n{i}" != leader)
    config["stores"]["prod_ha"]["url"] = survivor.url
    async with AsyncRateLimiter(config) as limiter:
        assert not (await limiter.hit("api", key="k")).degraded
        for server in cluster:
            if server is not survivor:
                server.kill()  # the majority is gone: no leader can be elected
        with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
            decision = await limiter.hit("api", key="k")
    assert decision.degraded
    failures = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert failures, caplog.text
    assert failures[0].startswith("store 'prod_ha' failed: No JetStream quorum")
    assert "deleted?" not in caplog.text
