"""`timeout` through each adapter: a request waits for its token or slot, then gets 200.

The waiting is the lifecycle's (lifecycle.py, sync.py): ASGI awaits it, WSGI and Flask block the
worker thread. Without a timeout the same requests are refused; a wait longer than the timeout
is a 429 at once. Django is in tests/test_django.py (its own project fixtures).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratesync_middleware import RateLimitMiddleware
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware
from tests.test_concurrency import Gate, call

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def config(store: dict[str, Any], timeout: float, **limiter: Any) -> dict[str, Any]:
    """One limiter on every request: by default a token every 200 ms and a burst of one."""
    return {
        "stores": {"s": store},
        "limiters": {
            "api": {
                "store": "s",
                **(limiter or {"rate_per_second": 5.0, "burst": 1}),
                "timeout": timeout,
            }
        },
        "middleware": {"default": "api"},
    }


# (timeout, limiter) -> the statuses of three requests in a row
CASES = [
    pytest.param(5.0, {}, [200, 200, 200], id="waits-for-each-token"),
    pytest.param(0.0, {}, [200, 429, 429], id="no-timeout-refuses"),
    pytest.param(5.0, {"limit": "1/minute"}, [200, 429, 429], id="too-short-refuses"),
]


def starlette_app(config: dict[str, Any]) -> Starlette:
    return Starlette(
        routes=[Route("/", lambda request: PlainTextResponse("hello"))],
        middleware=[Middleware(RateLimitMiddleware, config=config)],
    )


@pytest.mark.parametrize(("timeout", "limiter", "statuses"), CASES)
def test_asgi(
    store: dict[str, Any], timeout: float, limiter: dict[str, Any], statuses: list[int]
) -> None:
    with TestClient(starlette_app(config(store, timeout, **limiter))) as client:
        assert [client.get("/").status_code for _ in range(3)] == statuses


def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.mark.parametrize(("timeout", "limiter", "statuses"), CASES)
def test_wsgi(
    store: dict[str, Any], timeout: float, limiter: dict[str, Any], statuses: list[int]
) -> None:
    middleware = WSGIRateLimitMiddleware(wsgi_app, config=config(store, timeout, **limiter))
    client = Client(middleware)
    try:
        assert [client.get("/").status_code for _ in range(3)] == statuses
    finally:
        middleware.close()


def flask_app(config: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    RateLimit(app, config=config)

    @app.get("/")
    def index() -> str:
        return "hello"

    return app


@pytest.mark.parametrize(("timeout", "limiter", "statuses"), CASES)
def test_flask(
    store: dict[str, Any], timeout: float, limiter: dict[str, Any], statuses: list[int]
) -> None:
    client = flask_app(config(store, timeout, **limiter)).test_client()
    assert [client.get("/").status_code for _ in range(3)] == statuses


# --- a slot given back ---------------------------------------------------------------------------


async def test_asgi_request_waits_for_the_slot_of_the_one_in_flight(
    store: dict[str, Any],
) -> None:
    gate = Gate()
    app = Starlette(
        routes=[Route("/held", gate.endpoint), Route("/", lambda r: PlainTextResponse("hi"))],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                config=config(store, 10.0, max_concurrent=1, key="global"),
            )
        ],
    )
    held = asyncio.create_task(call(app, "/held"))
    await asyncio.wait_for(gate.entered.wait(), 5)
    waiting = asyncio.create_task(call(app, "/"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # waits for the slot instead of a 429
    gate.opened.set()
    assert await held == (200, b"done")
    assert await asyncio.wait_for(waiting, 10) == (200, b"hi")


def test_wsgi_worker_thread_blocks_until_the_slot_is_given_back(store: dict[str, Any]) -> None:
    entered, opened = threading.Event(), threading.Event()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/held":
            entered.set()
            opened.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    middleware = WSGIRateLimitMiddleware(
        app, config=config(store, 10.0, max_concurrent=1, key="global")
    )
    statuses: dict[str, int] = {}

    def get(path: str) -> None:
        with Client(middleware).get(path) as response:
            statuses[path] = response.status_code

    try:
        holder = threading.Thread(target=get, args=("/held",))
        holder.start()
        assert entered.wait(10)
        waiter = threading.Thread(target=get, args=("/",))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # its thread waits for the slot
        opened.set()
        holder.join(10)
        waiter.join(10)
        assert statuses == {"/held": 200, "/": 200}
    finally:
        opened.set()
        middleware.close()
