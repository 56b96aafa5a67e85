"""Reliability through the real middleware: exact across processes, and NATS outages.

The claims these tests hold are stated in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import RateLimitMiddleware
from tests.conftest import start_server
from tests.servers import uvicorn_servers

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def write_config(path: Path, nats_url: str, bucket: str, rate: float, burst: int) -> Path:
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{nats_url}"
bucket_name = "{bucket}"
timeout = 2.0    # generous: on a loaded 2-core machine a fail-open answer would blur the count

[limiters.api]
store = "prod"
rate_per_second = {rate}
burst = {burst}
key = "global"

[middleware]
default = "api"
"""
    )
    return path


async def hammer(urls: list[str], seconds: float, concurrency: int) -> dict[str, int]:
    """Send requests round-robin for `seconds`; count the kinds of answers.

    `admitted` are 200s with a `RateLimit` header (counted by the bucket); `fail_open` are 200s
    without one (the store failed and the limiter let the request through uncounted).
    """
    counts = {"admitted": 0, "fail_open": 0, "refused": 0, "other": 0}
    answered: list[float] = []
    deadline = time.monotonic() + seconds

    # One client with a pool as large as the concurrency: one client per worker stalls for
    # seconds at a time under load (its connections' keep-alive dance), starving the test.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=5.0, limits=limits) as client:

        async def worker(index: int) -> None:
            n = index
            while time.monotonic() < deadline:
                response = await client.get(urls[n % len(urls)] + "/")
                answered.append(time.monotonic())
                n += 1
                if response.status_code == 200:
                    counted = "ratelimit" in response.headers
                    counts["admitted" if counted else "fail_open"] += 1
                else:
                    counts["refused" if response.status_code == 429 else "other"] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    # The milliseconds during which the servers were answering (without connection set-up).
    counts["window_ms"] = int(1000 * (max(answered) - min(answered)))
    return counts


def test_four_processes_share_one_exact_limit(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    # A burst of 2 s of refill: a load-induced stall of the test client shorter than that
    # wastes no token, so the 95% floor measures the limiter, not the client.
    rate, burst, seconds = 20.0, 40, 6.0
    config = write_config(tmp_path / "rate-sync.toml", nats_url, bucket_name, rate, burst)
    with uvicorn_servers(
        "tests.apps.starlette_app:app", 4, {"RATE_SYNC_CONFIG": str(config)}
    ) as urls:
        started = time.monotonic()
        counts = asyncio.run(hammer(urls, seconds, concurrency=32))
        elapsed = time.monotonic() - started
    bound = burst + rate * elapsed + 1
    admitted = counts["admitted"]
    served = burst + rate * counts["window_ms"] / 1000  # what the bucket owed while answering
    print(f"{counts}, elapsed {elapsed:.2f}s, bound {bound:.0f}, owed {served:.0f}")
    assert counts["other"] == 0
    assert counts["fail_open"] == 0
    assert counts["refused"] > admitted  # demand was far above the rate
    assert admitted <= bound
    assert admitted >= 0.95 * served


def outage_app(config: dict[str, object]) -> Starlette:
    async def index(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/", index)], middleware=[Middleware(RateLimitMiddleware, config=config)]
    )


def outage_config(url: str, bucket: str) -> dict[str, object]:
    return {
        "stores": {
            "prod": {
                "engine": "nats",
                "url": url,
                "bucket_name": bucket,
                "timeout": 0.25,
                "backoff": 0.5,
            }
        },
        "limiters": {
            "open": {"store": "prod", "rate_per_second": 1000.0, "burst": 1000},
            "closed": {
                "store": "prod",
                "rate_per_second": 1000.0,
                "burst": 1000,
                "fail_closed": True,
            },
        },
        "routes": [
            {"path": "/open", "limiters": ["open"]},
            {"path": "/closed", "limiters": ["closed"]},
        ],
    }


def timed_get(client: TestClient, path: str) -> tuple[int, float, httpx.Headers, str]:
    started = time.monotonic()
    response = client.get(path)
    return response.status_code, time.monotonic() - started, response.headers, response.text


def test_nats_killed_during_traffic_then_restarted(bucket_name: str) -> None:
    server = start_server()
    try:
        app = Starlette(
            routes=[
                Route("/open", lambda r: PlainTextResponse("ok")),
                Route("/closed", lambda r: PlainTextResponse("ok")),
            ],
            middleware=[
                Middleware(RateLimitMiddleware, config=outage_config(server.url, bucket_name))
            ],
        )
        with TestClient(app) as client:
            assert client.get("/open").status_code == 200
            assert client.get("/closed").status_code == 200
            server.kill()

            answers = [timed_get(client, path) for _ in range(20) for path in ("/open", "/closed")]
            for _status, seconds, _headers, body in answers:
                assert (
                    seconds < 1.0
                )  # the deadline (0.25 s) plus room for a loaded machine: no hang
                assert "Traceback" not in body
            assert {status for status, *_ in answers[0::2]} == {200}  # fail-open
            closed = answers[1::2]
            assert {status for status, *_ in closed} == {503}  # fail-closed
            assert all(int(headers["retry-after"]) >= 1 for _, _, headers, _ in closed)
            # During the back-off the answers come at once, without waiting the deadline.
            assert sorted(seconds for _, seconds, *_ in answers)[len(answers) // 2] < 0.05

            server.start()
            deadline = time.monotonic() + 15
            while client.get("/closed").status_code != 200:
                assert time.monotonic() < deadline, "limiting did not resume after the restart"
                time.sleep(0.1)
    finally:
        server.cleanup()


def test_nats_down_at_start_up(bucket_name: str) -> None:
    server = start_server()
    url = server.url
    server.stop()
    try:
        app = Starlette(
            routes=[
                Route("/open", lambda r: PlainTextResponse("ok")),
                Route("/closed", lambda r: PlainTextResponse("ok")),
            ],
            middleware=[Middleware(RateLimitMiddleware, config=outage_config(url, bucket_name))],
        )
        with TestClient(app) as client:  # start-up does not fail and does not hang
            assert client.get("/open").status_code == 200
            assert client.get("/closed").status_code == 503
            server.start()
            deadline = time.monotonic() + 15
            while client.get("/closed").status_code != 200:
                assert time.monotonic() < deadline, "limiting did not start once NATS came up"
                time.sleep(0.1)
    finally:
        server.cleanup()
