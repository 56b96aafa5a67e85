"""Shutdown writes what it owes: settles, refunds and slot releases made right before `aclose()`
(or `close()`, or a SIGTERM of the server) reach the store; what cannot is counted in a WARNING."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ratesync_middleware import AsyncRateLimiter, RateLimiter
from tests.natsserver import NatsServer
from tests.servers import ROOT, free_port
from tests.test_nats_faults import own_server, stopped  # noqa: F401 (a fixture)

KEYS = [f"user-{n}" for n in range(20)]


def budget(store: dict[str, Any], **limiter: Any) -> dict[str, Any]:
    """100 units a key, no refill worth counting during a test."""
    return {
        "stores": {"shared": {**store, "timeout": 2.0}},
        "limiters": {"llm": {"store": "shared", "limit": 100, "window_seconds": 86400, **limiter}},
    }


async def test_settles_right_before_aclose_land(store: dict[str, Any]) -> None:
    limiter = AsyncRateLimiter(budget(store))
    permits = [await limiter.acquire("llm", key=key, cost=60) for key in KEYS]
    for permit in permits:
        await permit.settle(0)  # queued: written in the background
    await limiter.aclose()
    async with limiter:  # the same limiter: the memory store keeps its state; NATS reconnects
        remaining = [(await limiter.peek("llm", key=key)).remaining for key in KEYS]
    assert remaining == [100] * len(KEYS)


def test_settles_right_before_close_land(store: dict[str, Any]) -> None:
    limiter = RateLimiter(budget(store))
    permits = [limiter.acquire("llm", key=key, cost=60) for key in KEYS]
    for permit in permits:
        permit.settle(0)
    limiter.close()
    with limiter:
        remaining = [limiter.peek("llm", key=key).remaining for key in KEYS]
    assert remaining == [100] * len(KEYS)


@pytest.mark.nats
async def test_a_slot_released_right_before_aclose_is_free_for_others(
    nats_store: dict[str, Any],
) -> None:
    config = {
        "stores": {"shared": {**nats_store, "timeout": 2.0}},
        "limiters": {"upload": {"store": "shared", "max_concurrent": 1, "lease_seconds": 60}},
    }
    first = AsyncRateLimiter(config)
    permit = await first.acquire("upload", key="k")
    await permit.release()
    await first.aclose()
    async with AsyncRateLimiter(config) as second:  # another process, in effect
        held = await second.acquire("upload", key="k")  # refused for 60 s if the release was lost
        await held.release()


@pytest.mark.nats
async def test_settles_that_nats_cannot_take_are_counted_in_one_warning(
    own_server: NatsServer,  # noqa: F811 (a fixture)
    bucket_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = {"engine": "nats", "url": own_server.url, "bucket_name": bucket_name}
    config = budget(store)
    config["stores"]["shared"]["timeout"] = 0.5
    limiter = AsyncRateLimiter(config)
    permits = [await limiter.acquire("llm", key=key, cost=60) for key in KEYS]
    with stopped(own_server), caplog.at_level(logging.WARNING, "ratesync_middleware"):
        for permit in permits:
            await permit.settle(0)
        started = time.monotonic()
        await limiter.aclose()
        elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if "closing with" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"store 'shared': closing with {len(KEYS)} settles or refunds not written to NATS"
    )
    assert not [r for r in caplog.records if "a settle was not written" in r.getMessage()]
    assert elapsed < 0.5 + 2.0 + 1.0  # the drain's deadline, then closing a hung connection


# -- a real server stopped with requests in flight ------------------------------------------------

SERVER_CONFIG = """
[stores.shared]
engine = "nats"
url = "{url}"
bucket_name = "{bucket}"
timeout = 2.0

[limiters.checked]
store = "shared"
rate_per_second = 0.0001       # 10,000 s a unit: nothing refills during the test
burst = 1000
key = "global"
count_status = [401]           # a 200 is refunded when its response ends

[[routes]]
path = "/slow"
limiters = ["checked"]
"""


@pytest.mark.nats
@pytest.mark.slow
async def test_sigterm_of_uvicorn_with_requests_in_flight_refunds_them_all(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = tmp_path / "rate-sync.toml"
    config.write_text(SERVER_CONFIG.format(url=nats_url, bucket=bucket_name))
    port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 (started once, before any request)
        [sys.executable, "-m", "uvicorn", "tests.apps.starlette_app:app", "--port", str(port)],
        env={**os.environ, "RATE_SYNC_CONFIG": str(config), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    in_flight = 100
    try:
        await asyncio.to_thread(_wait_for_port, port, server)
        connections = httpx.Limits(max_connections=in_flight)
        async with (
            httpx.AsyncClient(limits=connections, timeout=60) as client,
            AsyncRateLimiter(config) as limiter,
        ):
            url = f"http://127.0.0.1:{port}/slow?sleep=3"
            answers = [asyncio.ensure_future(client.get(url)) for _ in range(in_flight)]
            deadline = time.monotonic() + 30
            while (await limiter.peek("checked")).remaining > 1000 - in_flight:
                assert time.monotonic() < deadline, "the requests were never all admitted"
                await asyncio.sleep(0.02)
            server.send_signal(signal.SIGTERM)  # uvicorn finishes them, then shuts down
            statuses = [answer.status_code for answer in await asyncio.gather(*answers)]
            _, errors = await asyncio.to_thread(server.communicate, timeout=30)
            after = await limiter.peek("checked")
    finally:
        if server.poll() is None:
            server.kill()
    assert statuses == [200] * in_flight
    # uvicorn re-raises the signal once it has shut down (its exit status says SIGTERM).
    assert server.returncode in (0, -signal.SIGTERM), errors.decode()
    assert b"Finished server process" in errors
    assert b"closing with" not in errors, errors.decode()
    # Every 200 refunded before the process ended: less than one unit is still charged (a
    # refund gives back what time has not: the seconds each request was in flight).
    assert after.reset_after * 0.0001 < 1.0, after


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "uvicorn exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


EXITS_WITHOUT_CLOSING = """
import sys
from ratesync_middleware import RateLimiter

limiter = RateLimiter(sys.argv[1])
permits = [limiter.acquire("llm", key=f"user-{n}", cost=60) for n in range(20)]
for permit in permits:
    permit.settle(0)  # queued for the background loop; then the script ends
"""


@pytest.mark.nats
def test_a_sync_process_that_exits_without_close_writes_its_settles(
    nats_store: dict[str, Any], tmp_path: Path
) -> None:
    config = tmp_path / "rate-sync.toml"
    config.write_text(
        f"""
[stores.shared]
engine = "nats"
url = "{nats_store["url"]}"
bucket_name = "{nats_store["bucket_name"]}"
timeout = 2.0

[limiters.llm]
store = "shared"
limit = 100
window_seconds = 86400
"""
    )
    subprocess.run(
        [sys.executable, "-c", EXITS_WITHOUT_CLOSING, str(config)],
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    with RateLimiter(config) as limiter:
        remaining = [limiter.peek("llm", key=key).remaining for key in KEYS]
    assert remaining == [100] * len(KEYS)
