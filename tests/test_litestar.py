"""`ratesync_middleware.litestar.RateLimitPlugin`, with Litestar's own TestClient."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
from litestar import Controller, Litestar, get, post, websocket
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.testing import TestClient

from ratesync_middleware import ConfigError, exempt, limit
from ratesync_middleware.litestar import RateLimitPlugin

from .monitored import connections
from .natsserver import NatsServer

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency there


def settings(store: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "stores": {"main": store or {"engine": "memory"}},
        "limiters": {
            "api": {"store": "main", "limit": "3/minute"},
            "login": {"store": "main", "limit": "2/minute"},
            "chat": {"store": "main", "limit": "2/day"},
        },
        "middleware": {"default": "api"},
        **extra,
    }


@get("/")
async def index() -> str:
    return "hello"


@get("/login")
@limit("login")
async def login() -> str:
    return "welcome"


@limit("login")  # above the route decorator: on the handler
@post("/signup", status_code=200)
async def signup() -> str:
    return "signed up"


@get("/health")
@exempt
async def health() -> str:
    return "ok"


class Accounts(Controller):
    path = "/accounts"

    @get("/")
    async def accounts(self) -> str:
        return "accounts"


limit("login")(Accounts)  # a mark on the controller covers its handlers


def app_with(*handlers: Any, config: dict[str, Any] | None = None) -> Litestar:
    routes = list(handlers) or [index, login, signup, health, Accounts]
    return Litestar(route_handlers=routes, plugins=[RateLimitPlugin(config=config or settings())])


def statuses(client: TestClient[Litestar], method: str, path: str, count: int) -> list[int]:
    return [client.request(method, path).status_code for _ in range(count)]


def test_marks_on_handlers_functions_and_controllers_and_the_default(store: dict[str, Any]) -> None:
    with TestClient(app=app_with(config=settings(store))) as client:
        assert statuses(client, "GET", "/login", 1) == [200]  # login, below @get
        assert statuses(client, "GET", "/accounts", 1) == [200]  # login, on the controller
        assert statuses(client, "POST", "/signup", 1) == [429]  # login, above @post
        assert statuses(client, "GET", "/", 4) == [200, 200, 200, 429]  # the default, api
        assert statuses(client, "GET", "/health", 5) == [200] * 5  # exempt
        assert statuses(client, "GET", "/nowhere", 5) == [404] * 5  # Litestar answers first


def test_the_same_responses_and_headers_as_the_asgi_middleware() -> None:
    with TestClient(app=app_with()) as client:
        allowed = [client.get("/login") for _ in range(2)]
        refused = client.get("/login")
        health_response = client.get("/health")

    assert allowed[0].text == "welcome"
    assert allowed[0].headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert allowed[0].headers["RateLimit"].startswith('"login";r=1;')
    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["violated-policies"] == ["login"]
    assert "RateLimit" not in health_response.headers


class Authentication:
    """A Litestar middleware listed in the app: the user of the `X-User` header in
    `scope["user"]` (an object of the app's own, as Litestar's security backends put there)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        name = dict(scope["headers"]).get(b"x-user")
        scope["user"] = SimpleNamespace(username=name.decode()) if name else None
        await self.app(scope, receive, send)


def test_key_user_reads_the_user_an_authentication_middleware_put_in_the_scope() -> None:
    config = settings()
    config["limiters"]["api"] = {"store": "main", "limit": "2/minute", "key": "user"}
    app = Litestar(
        route_handlers=[index],
        middleware=[Authentication],
        plugins=[RateLimitPlugin(config=config)],
    )
    kim, lee = {"X-User": "kim"}, {"X-User": "lee"}
    with TestClient(app=app) as client:
        assert [client.get("/", headers=kim).status_code for _ in range(3)] == [200, 200, 429]
        assert [client.get("/", headers=lee).status_code for _ in range(2)] == [200, 200]
        assert statuses(client, "GET", "/", 3) == [200, 200, 429]  # anonymous: by address


@websocket("/ws/chat")
async def chat(socket: WebSocket[Any, Any, Any]) -> None:
    await socket.accept()
    try:
        while True:
            await socket.send_text(await socket.receive_text())
    except WebSocketDisconnect:
        pass


def test_websockets_at_connect_and_per_message() -> None:
    per_message = settings(routes=[{"path": "/ws/*", "messages": ["chat"]}])
    per_message["middleware"] = {}
    with TestClient(app=app_with(chat, config=per_message)) as client:
        with client.websocket_connect("/ws/chat") as socket:
            for text in ("one", "two"):
                socket.send_text(text)
                assert socket.receive_text() == text
            socket.send_text("three")
            with pytest.raises(WebSocketDisconnect) as closed:
                socket.receive_text()
        assert closed.value.code == 1008

    connect_limited = settings()  # the default limits the opening handshake (3/minute)
    with TestClient(app=app_with(chat, config=connect_limited)) as client:
        for _ in range(3):
            with client.websocket_connect("/ws/chat") as socket:
                socket.send_text("hi")
                assert socket.receive_text() == "hi"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws/chat"):
            pass  # pragma: no cover
        assert refused.value.code == 1008


def test_an_unknown_limiter_name_fails_the_start_up_with_did_you_mean() -> None:
    @get("/typo")
    @limit("logn")
    async def typo() -> str:
        return "never"

    with (
        pytest.raises((ConfigError, BaseExceptionGroup)) as raised,
        TestClient(app=app_with(index, typo)),
    ):
        pass  # pragma: no cover
    error = config_error_in(raised.value)
    assert "no limiter 'logn' (did you mean 'login'?)" in str(error)


def test_a_configuration_that_cannot_be_used_fails_the_start_up() -> None:
    broken = {"limiters": {"api": {"limit": "many"}}}
    with (
        pytest.raises((ConfigError, BaseExceptionGroup)) as raised,
        TestClient(app=app_with(config=broken)),
    ):
        pass  # pragma: no cover
    assert "[limiters.api]" in str(config_error_in(raised.value))


def config_error_in(error: BaseException) -> ConfigError:
    """The ConfigError Litestar's TestClient raises, inside the exception groups of its tasks."""
    while not isinstance(error, ConfigError):
        inner = getattr(error, "exceptions", None)
        assert inner, f"not a ConfigError: {error!r}"
        error = inner[0]
    return error


@pytest.mark.nats
def test_one_nats_connection_for_all_the_handlers_opened_and_closed_with_the_lifespan(
    monitored_nats: tuple[NatsServer, str],
) -> None:
    server, monitoring = monitored_nats
    store = {"engine": "nats", "url": server.url, "bucket_name": "rl_litestar", "timeout": 2.0}
    assert connections(monitoring) == 0
    with TestClient(app=app_with(config=settings(store))) as client:
        assert connections(monitoring) == 1  # opened at start-up, before any request
        for path in ("/", "/login", "/accounts", "/health"):
            assert client.get(path).status_code == 200
        assert client.post("/signup").status_code == 429  # login's two are spent
        assert connections(monitoring) == 1
    assert connections(monitoring) == 0  # closed at shutdown
