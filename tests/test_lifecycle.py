"""The request lifecycle that every adapter shares: `begin` decides, `Admission.finish` ends.

Each adapter must finish an admitted request exactly once, with its status, after the last
byte of its body, also when the app raises or the client goes away. Django's handlers are
covered in tests/test_django.py ("the request lifecycle").
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from flask import Flask, stream_with_context
from flask import Response as FlaskResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratesync_middleware import AsyncRateLimiter, RateLimiter, RateLimitMiddleware
from ratesync_middleware.client_ip import ClientAddress
from ratesync_middleware.errors import BucketTtlTooShortError
from ratesync_middleware.facts import RequestFacts
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.sync import SyncRequestLimiter
from ratesync_middleware.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

ROOT = Path(__file__).resolve().parents[1]

# max_concurrent gives finish its work (a slot to give back), so every adapter must call it.
CONFIG: dict[str, Any] = {
    "limiters": {"api": {"rate_per_second": 0.01, "burst": 5, "max_concurrent": 100}},
    "middleware": {"default": "api"},
}
PLAIN: dict[str, Any] = {
    "limiters": {"api": {"rate_per_second": 0.01, "burst": 5}},
    "middleware": {"default": "api"},
}


# --- ASGI ----------------------------------------------------------------------------------------


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def broken(request: Request) -> Response:
    raise RuntimeError("the endpoint failed")


async def streamed(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"one ", b"two ", b"three"):
            await asyncio.sleep(0)
            yield chunk

    return StreamingResponse(chunks())


def asgi_app() -> Starlette:
    return Starlette(
        routes=[Route("/", hello), Route("/broken", broken), Route("/streamed", streamed)],
        middleware=[Middleware(RateLimitMiddleware, config=CONFIG)],
    )


def test_asgi_finishes_each_admitted_request_once(finished: list[int | None]) -> None:
    with TestClient(asgi_app(), raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
        assert client.get("/nowhere").status_code == 404
        assert client.get("/streamed").text == "one two three"
        assert client.get("/broken").status_code == 500
    assert finished == [200, 404, 200, 500]


def test_without_work_at_the_end_nothing_is_arranged(finished: list[int | None]) -> None:
    """A plain rate has nothing to settle: no adapter pays for calling finish."""
    starlette = Starlette(
        routes=[Route("/", hello)], middleware=[Middleware(RateLimitMiddleware, config=PLAIN)]
    )
    with TestClient(starlette) as client:
        assert client.get("/").status_code == 200
    with Client(WSGIRateLimitMiddleware(plain_wsgi_app, config=PLAIN)).get("/") as response:
        assert response.status_code == 200
    app = Flask(__name__)
    RateLimit(app, config=PLAIN)
    app.add_url_rule("/", "index", lambda: "hello")
    with app.test_client().get("/") as response:
        assert response.status_code == 200
    assert finished == []


async def test_asgi_finishes_a_request_whose_client_went_away(
    finished: list[int | None],
) -> None:
    """The server cancels the app when the client disconnects mid-body: finish still runs."""
    started = asyncio.Event()

    async def endless(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            while True:
                started.set()
                yield b"more "
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks())

    app = Starlette(
        routes=[Route("/endless", endless)],
        middleware=[Middleware(RateLimitMiddleware, config=CONFIG)],
    )
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await messages.put({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return await messages.get()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/endless",
        "raw_path": b"/endless",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("203.0.113.7", 5000),
        "server": ("testserver", 80),
        "app": app,
    }
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()  # what uvicorn does when the connection is lost
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [200]
    assert sent[0]["status"] == 200


# --- WSGI ----------------------------------------------------------------------------------------


def plain_wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/broken":
        raise RuntimeError("the app failed")
    if path == "/streamed":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (chunk for chunk in (b"one ", b"two ", b"three"))
    start_response("404 Not Found" if path == "/nowhere" else "200 OK", [])
    return [b"hello"]


def test_wsgi_finishes_when_the_server_closes_the_body(finished: list[int | None]) -> None:
    client = Client(WSGIRateLimitMiddleware(plain_wsgi_app, config=CONFIG))
    response = client.get("/streamed")
    assert finished == []  # the body is not consumed yet: the request is still on
    assert response.get_data() == b"one two three"
    response.close()
    with client.get("/nowhere") as not_found:
        assert not_found.status_code == 404
    assert finished == [200, 404]


def test_wsgi_finishes_a_request_whose_app_raised(finished: list[int | None]) -> None:
    client = Client(WSGIRateLimitMiddleware(plain_wsgi_app, config=CONFIG))
    with pytest.raises(RuntimeError, match="the app failed"):
        client.get("/broken")
    assert finished == [500]


# --- Flask ---------------------------------------------------------------------------------------


def flask_app(propagate_exceptions: bool) -> Flask:
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = propagate_exceptions
    RateLimit(app, config=CONFIG)

    @app.get("/")
    def index() -> str:
        return "hello"

    @app.get("/broken")
    def broken_view() -> str:
        raise RuntimeError("the view failed")

    @app.get("/streamed")
    def streamed_view() -> FlaskResponse:
        @stream_with_context
        def chunks() -> Iterator[str]:
            yield from ("one ", "two ", "three")

        return FlaskResponse(chunks())

    return app


def test_flask_finishes_each_admitted_request_once(finished: list[int | None]) -> None:
    client = flask_app(propagate_exceptions=False).test_client()
    for path, status in [("/", 200), ("/nowhere", 404), ("/broken", 500)]:
        with client.get(path) as response:  # a server closes every response it sent
            assert response.status_code == status
    streamed_response = client.get("/streamed")
    assert finished == [200, 404, 500]  # still streaming
    assert streamed_response.get_data() == b"one two three"
    streamed_response.close()
    assert finished == [200, 404, 500, 200]


def test_flask_finishes_a_request_whose_exception_propagates(finished: list[int | None]) -> None:
    client = flask_app(propagate_exceptions=True).test_client()
    with pytest.raises(RuntimeError, match="the view failed"):
        client.get("/broken")
    assert finished == [500]


# --- the sync driver -----------------------------------------------------------------------------


class Facts(RequestFacts):
    def __init__(self) -> None:
        super().__init__("GET", "/", "203.0.113.7", ClientAddress())


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word: a hung NATS."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"nats://127.0.0.1:{listener.getsockname()[1]}"


def test_when_the_loop_does_not_answer_any_fail_closed_limiter_refuses(silent_server: str) -> None:
    """A plan [memory fail-open, NATS fail-closed] refuses: the strictest rule, not the first."""
    config = {
        "stores": {
            "local": {"engine": "memory"},
            "shared": {"engine": "nats", "url": silent_server, "connect_timeout": 5.0},
        },
        "limiters": {
            "first": {"store": "local", "rate_per_second": 10.0},
            "second": {"store": "shared", "rate_per_second": 10.0, "fail_closed": True},
        },
        "middleware": {"default": ["first", "second"]},
    }
    driver = SyncRequestLimiter(config)
    driver.deadline = 0.3  # the loop thread is still connecting when the caller gives up
    started = time.monotonic()
    admission = driver.begin(Facts(), driver.plans.plan("GET", "/"))
    assert time.monotonic() - started < 3.0
    assert not admission.allowed
    assert admission.denial().status == 503
    assert admission.decision is not None
    assert admission.decision.policy == "second"


def test_rate_limiter_rejects_costs_that_would_corrupt_a_bucket() -> None:
    with RateLimiter(PLAIN) as limiter:
        for cost in (1.5, True, "2", None):
            with pytest.raises(TypeError, match="cost must be an int"):
                limiter.hit("api", key="k", cost=cost)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cost must be a whole number"):
            limiter.hit("api", key="k", cost=0)
        assert limiter.hit("api", key="k", cost=2).remaining == 3


# --- start-up ------------------------------------------------------------------------------------


def test_the_active_stores_are_logged_once_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    config = {
        "stores": {
            "prod": {"engine": "nats", "url": "nats://ops:hunter2@nats-1:4222, nats://nats-2:4222"},
            "local": {"engine": "memory"},
        },
        "limiters": {
            "api": {"store": "prod", "rate_per_second": 1.0},
            "hits": {"store": "local", "rate_per_second": 1.0},
        },
    }
    with caplog.at_level(logging.INFO, logger="ratesync_middleware"):
        AsyncRateLimiter(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "ratesync_middleware"]
    assert lines == [
        "store 'prod': engine nats, bucket 'rate_limits', servers nats://***@nats-1:4222,"
        " nats://nats-2:4222",
        "store 'local': engine memory (this process only)",
    ]
    assert "hunter2" not in caplog.text


def test_no_adapter_names_a_store_class_or_a_fast_path() -> None:
    """Adapters translate; which store decides how is the core's business (capabilities)."""
    adapters = ["asgi.py", "wsgi.py", "flask.py", "django/middleware.py"]
    forbidden = re.compile(
        r"MemoryStore|NatsStore|\.stores\b|hit_now|begin_now|decides_now|check_now|immediate"
    )
    for name in adapters:
        source = (ROOT / "ratesync_middleware" / name).read_text()
        assert not forbidden.findall(source), name


# --- a broken configuration under uvicorn --------------------------------------------------------

BROKEN_APP = """
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from ratesync_middleware import RateLimitMiddleware

async def index(request):
    return PlainTextResponse("ok")

app = Starlette(
    routes=[Route("/", index)],
    middleware=[Middleware(RateLimitMiddleware, config={CONFIG!r})],
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn(tmp_path: Path, lifespan: str, port: int) -> subprocess.Popen[str]:
    broken = tmp_path / "rate-sync.toml"
    broken.write_text('[limiters.api]\nrate_per_second = "fast"\n')
    (tmp_path / "broken_app.py").write_text(BROKEN_APP.format(CONFIG=str(broken)))
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "broken_app:app", "--app-dir", str(tmp_path)),
            *("--port", str(port), "--lifespan", lifespan),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_a_broken_config_fails_uvicorns_start_up(tmp_path: Path) -> None:
    server = uvicorn(tmp_path, "auto", free_port())
    try:
        output, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode != 0
    assert "rate_per_second: expected a number > 0" in output
    assert "appears unsupported" not in output


@pytest.mark.slow
def test_without_lifespan_a_broken_config_answers_500_without_a_traceback(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = uvicorn(tmp_path, "off", port)
    try:
        deadline = time.monotonic() + 30
        responses = []
        while len(responses) < 3 and time.monotonic() < deadline:
            try:
                responses.append(httpx.get(f"http://127.0.0.1:{port}/", timeout=5))
            except httpx.TransportError:
                time.sleep(0.1)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert [r.status_code for r in responses] == [500] * 3
    assert all("Traceback" not in r.text and "rate_per_second" not in r.text for r in responses)
    assert output.count("rate_per_second: expected a number > 0") == 1
    assert "Traceback" not in output


@pytest.mark.nats
def test_a_bucket_that_would_forget_keys_early_fails_the_start_up(
    nats_store: dict[str, Any],
) -> None:
    """5 per week on a bucket that keeps keys a day would give a full bucket back each day."""
    daily = {"stores": {"prod": nats_store}, "limiters": {"api": {"limit": "5/day"}}}
    with TestClient(Starlette(middleware=[Middleware(RateLimitMiddleware, config=daily)])):
        pass  # creates the bucket with the guide's 24 h
    weekly = {
        "stores": {"prod": {**nats_store, "auto_create": False}},
        "limiters": {
            "login": {"algorithm": "sliding_window", "limit": 5, "window_seconds": 604800}
        },
    }
    app = Starlette(middleware=[Middleware(RateLimitMiddleware, config=weekly)])
    with pytest.raises(BucketTtlTooShortError, match="168h"), TestClient(app):
        pass  # pragma: no cover
