"""The ASGI middleware on a real NATS server: one bucket per test, apps as users write them."""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from ratesync_middleware import AsyncRateLimiter, RateLimitMiddleware, exempt, limit

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[1]


def shared_config(store: dict[str, Any], **middleware: Any) -> dict[str, Any]:
    return {
        "stores": {"shared": store},
        "limiters": {
            "api": {"store": "shared", "limit": "3/minute"},  # one unit every 20 s
            "login": {"store": "shared", "limit": "2/minute"},
            "search": {"store": "shared", "rate_per_second": 0.01, "burst": 5},
        },
        "middleware": {"default": "api", **middleware},
    }


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


@limit("login")
async def login(request: Request) -> Response:
    return PlainTextResponse("welcome")


@exempt
async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


@limit("api", "login")
async def both(request: Request) -> Response:
    return PlainTextResponse("both")


def make_app(config: dict[str, Any], routes: list[Any] | None = None) -> Starlette:
    return Starlette(
        routes=routes
        or [
            Route("/", hello),
            Route("/login", login, methods=["POST"]),
            Route("/health", health),
            Route("/both", both),
            Route("/ruled", hello),
        ],
        middleware=[Middleware(RateLimitMiddleware, config=config)],
    )


def statuses(
    client: TestClient, count: int, path: str = "/", method: str = "GET", **kw: Any
) -> list[int]:
    return [client.request(method, path, **kw).status_code for _ in range(count)]


def test_burst_then_429_with_the_retry_after_of_the_bucket(nats_store: dict[str, Any]) -> None:
    config = shared_config(nats_store)
    with TestClient(make_app(config)) as client:
        assert statuses(client, 3) == [200, 200, 200]
        refused = client.get("/")

    async def bucket() -> float:
        async with AsyncRateLimiter(config) as limiter:
            state = await limiter.peek("api", "testclient")
            return state.reset_after - 2 * 20.0  # when one unit of three is back

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == str(math.ceil(asyncio.run(bucket()))) == "20"
    assert refused.headers["ratelimit"] == '"api";r=0;t=20'
    assert refused.json()["violated-policies"] == ["api"]


def test_fastapi_app_on_nats(nats_store: dict[str, Any]) -> None:
    app = FastAPI()

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/login")
    @limit("login")
    async def fastapi_login() -> dict[str, str]:
        return {"status": "welcome"}

    config = shared_config(nats_store)
    config["limiters"]["api"] = {"store": "shared", "rate_per_second": 0.01, "burst": 5}
    app.add_middleware(RateLimitMiddleware, config=config)
    with TestClient(app) as client:
        assert statuses(client, 6) == [200] * 5 + [429]
        assert client.get("/").headers["retry-after"] == "100"
        assert statuses(client, 3, "/login", "POST") == [200, 200, 429]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("draft", {"ratelimit-policy": '"api";q=3;w=60', "ratelimit": '"api";r=2;t=20'}),
        ("legacy", {"x-ratelimit-limit": "3", "x-ratelimit-remaining": "2"}),
        ("none", {}),
    ],
)
def test_header_modes(nats_store: dict[str, Any], mode: str, expected: dict[str, str]) -> None:
    with TestClient(make_app(shared_config(nats_store, headers=mode))) as client:
        response = client.get("/")
    present = {name: value for name, value in response.headers.items() if "ratelimit" in name}
    present.pop("x-ratelimit-reset", None)  # a Unix time
    assert present == expected


def test_overrides_exemptions_and_precedence(nats_store: dict[str, Any]) -> None:
    config = shared_config(nats_store)
    config["routes"] = [
        {"path": "/ruled", "limiters": ["search"]},
        {"path": "/login", "limiters": ["search"]},  # the decorator wins
        {"path": "/health", "limiters": ["search"]},  # @exempt wins
    ]
    with TestClient(make_app(config)) as client:
        assert client.get("/ruled").headers["ratelimit-policy"].startswith('"search"')
        assert client.post("/login").headers["ratelimit-policy"].startswith('"login"')
        assert statuses(client, 10, "/health") == [200] * 10
        assert client.get("/").headers["ratelimit-policy"].startswith('"api"')


def test_several_limiters_on_one_route(nats_store: dict[str, Any]) -> None:
    with TestClient(make_app(shared_config(nats_store))) as client:
        responses = [client.get("/both") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[2].json()["violated-policies"] == ["login"]


def test_spoofed_forwarded_for_from_an_untrusted_peer(nats_store: dict[str, Any]) -> None:
    app = make_app(shared_config(nats_store, trusted_proxies=["10.0.0.0/8"]))
    with TestClient(app, client=("203.0.113.7", 4000)) as client:
        spoofed = [
            client.get("/", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(4)
        ]
    assert spoofed == [200, 200, 200, 429]


def test_websocket_refused_at_connect(nats_store: dict[str, Any]) -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = make_app(shared_config(nats_store), routes=[WebSocketRoute("/ws", echo)])
    with TestClient(app) as client:
        for _ in range(3):
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("ping")
                assert websocket.receive_text() == "ping"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
            pass  # pragma: no cover
    assert refused.value.code == 1008


def closed_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
    return port


@pytest.mark.parametrize("fail_closed", [True, False])
def test_a_dead_store(fail_closed: bool, caplog: pytest.LogCaptureFixture) -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.3}
    config = shared_config(dead)
    config["limiters"]["api"]["fail_closed"] = fail_closed
    with TestClient(make_app(config)) as client:
        response = client.get("/")
    if fail_closed:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"  # the store's back-off
        assert response.headers["content-type"] == "application/problem+json"
        assert "ratelimit" not in response.headers
    else:
        assert response.status_code == 200
        assert "ratelimit" not in response.headers  # nothing true to say
    assert "Connection refused" in caplog.text


# --- two processes, one bucket -----------------------------------------------------------


@pytest.fixture
def example_servers(nats_url: str, bucket_name: str) -> Iterator[list[str]]:
    """Two uvicorn processes serving examples/fastapi on NATS, each on a port of its own."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RATESYNC_ENGINE": "nats",
        "NATS_URL": nats_url,
        "RATESYNC_BUCKET": bucket_name,
    }
    env.pop("RATE_SYNC_CONFIG", None)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.fastapi.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        yield [f"http://127.0.0.1:{serving_port(process)}" for process in processes]
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()


def serving_port(process: subprocess.Popen[str], timeout: float = 30.0) -> int:
    found: list[int] = []
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if match and not found:
                found.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or not found:
        raise RuntimeError("uvicorn did not start:\n" + "".join(log))
    return found[0]


def test_two_processes_share_one_limit(example_servers: list[str]) -> None:
    first, second = example_servers
    with httpx.Client(timeout=10) as client:
        answers = [
            client.post(f"{url}/login", headers={"X-Username": "ada"})
            for url in (first, second, first, second, first, second)
        ]
        other_user = client.post(f"{second}/login", headers={"X-Username": "bob"})

    assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429, 429]
    # 3/minute: the next unit is due 20 s after the first login, less the time the test took
    assert 19 <= int(answers[3].headers["retry-after"]) <= 20
    assert other_user.status_code == 200
