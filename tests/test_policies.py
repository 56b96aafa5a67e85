"""Request-aware policies (issue 14) through real apps: costs, exemptions, shadow mode.

`cost` is a whole number or a `"pkg.mod:func"` of the framework's request, on a limiter, on a
`[[routes]]` rule (which wins) or in `@limit(..., cost=...)` (which wins over both);
`exempt_when = "pkg.mod:func"` leaves the limiter out of a request for which it is true. A
function that raises or returns junk is answered by the limiter's fail rule, never a 500.
`mode = "shadow"` decides and reports every request and refuses none. Django's sites are
covered in tests/test_django.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from flask import Request as FlaskRequest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from werkzeug.test import Client

from ratesync_middleware import (
    AsyncRateLimiter,
    ConfigError,
    RateLimiter,
    RateLimitMiddleware,
    callables,
    limit,
)
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.limiter import DecisionEvent
from ratesync_middleware.throttle import LogThrottle
from ratesync_middleware.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware
from tests import request_functions

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def config(**api: Any) -> dict[str, Any]:
    """One limiter, `api` (burst 10, refilling once a day), the default of every request."""
    return {
        "limiters": {"api": {"limit": 10, "window_seconds": 86400, **api}},
        "middleware": {"default": "api"},
    }


Get = Callable[..., tuple[int, dict[str, str]]]  # (path, headers) -> (status, headers)


# --- one small app per adapter, each with "/" and a decorated "/marked" --------------------------


def _server_like(client: Client) -> Get:
    """`get` through a werkzeug test client (Flask's is one), closing each response once its
    body is read, as a server does: the request's `finish`."""

    def get(path: str = "/", headers: dict[str, str] | None = None) -> Any:
        response = client.get(path, headers=headers)
        response.get_data()
        response.close()
        return response.status_code, dict(response.headers)

    return get


def starlette(settings: dict[str, Any]) -> Iterator[Get]:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    @limit("api", cost=lambda request: 4)
    async def marked(request: Request) -> Response:
        return PlainTextResponse("marked")

    app = Starlette(
        routes=[Route("/", hello), Route("/marked", marked), Route("/ruled", hello)],
        middleware=[Middleware(RateLimitMiddleware, config=settings)],
    )
    with TestClient(app) as client:

        def get(path: str = "/", headers: dict[str, str] | None = None) -> Any:
            response = client.get(path, headers=headers)
            return response.status_code, dict(response.headers)

        yield get


def flask(settings: dict[str, Any]) -> Iterator[Get]:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=settings)

    @app.get("/")
    @app.get("/ruled")
    def hello() -> str:
        return "hello"

    @app.get("/marked")
    @ratelimit.limit("api", cost=lambda request: 4)
    def marked() -> str:
        return "marked"

    client = app.test_client()

    get = _server_like(client)

    yield get
    ratelimit.close()


def wsgi(settings: dict[str, Any]) -> Iterator[Get]:
    def hello(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    middleware = WSGIRateLimitMiddleware(hello, config=settings)
    client = Client(middleware)

    get = _server_like(client)

    yield get
    middleware.close()


APPS = {"starlette": starlette, "flask": flask, "wsgi": wsgi}
REQUEST_TYPES = {"starlette": Request, "flask": FlaskRequest, "wsgi": dict}


def _serving(adapter: str) -> Iterator[Callable[[dict[str, Any]], Get]]:
    opened: list[Iterator[Get]] = []

    def start(settings: dict[str, Any]) -> Get:
        served = APPS[adapter](settings)
        opened.append(served)
        return next(served)

    request_functions.SEEN.clear()
    yield start
    for served in opened:
        for _ in served:  # run its clean-up
            pass


@pytest.fixture(params=sorted(APPS))
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Any]], Get]]:
    """serve(config) -> get: the adapter's app under this configuration."""
    yield from _serving(request.param)


@pytest.fixture(params=["flask", "starlette"])
def serve_views(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Any]], Get]]:
    """`serve` for the adapters that see the view, and so its decorators (not plain WSGI)."""
    yield from _serving(request.param)


def remaining(headers: dict[str, str]) -> int:
    """The `r=` of the RateLimit header: units left."""
    value = {k.lower(): v for k, v in headers.items()}["ratelimit"]
    return int(value.split(";r=")[1].split(";")[0])


def statuses(get: Get, count: int, path: str = "/", **options: Any) -> list[int]:
    return [get(path, **options)[0] for _ in range(count)]


# --- cost ------------------------------------------------------------------------------------


def test_a_limiters_cost_is_what_each_request_spends(serve: Callable[..., Get]) -> None:
    get = serve(config(cost=3))
    assert [remaining(get()[1]) for _ in range(3)] == [7, 4, 1]
    assert get()[0] == 429  # 3 more than the 1 left


def test_a_cost_function_receives_the_frameworks_request(
    serve: Callable[..., Get], request: pytest.FixtureRequest
) -> None:
    get = serve(config(cost="tests.request_functions:units"))
    status, headers = get(headers={"X-Units": "6"})
    assert (status, remaining(headers)) == (200, 4)
    assert remaining(get()[1]) == 3  # no header: 1
    assert get(headers={"X-Units": "4"})[0] == 429
    adapter = request.node.callspec.params["serve"]
    assert set(request_functions.SEEN) == {REQUEST_TYPES[adapter]}


def test_a_route_rules_cost_wins_over_the_limiters(serve: Callable[..., Get]) -> None:
    settings = config(cost=1)
    settings["routes"] = [{"path": "/ruled", "limiters": ["api"], "cost": 5}]
    get = serve(settings)
    assert remaining(get("/ruled")[1]) == 5
    assert remaining(get("/")[1]) == 4


def test_a_decorators_cost_function_wins(serve_views: Callable[..., Get]) -> None:
    get = serve_views(config(cost=1))
    assert remaining(get("/marked")[1]) == 6
    assert remaining(get("/")[1]) == 5


# --- exempt_when -----------------------------------------------------------------------------


def test_exempt_when_leaves_the_limiter_out(serve: Callable[..., Get]) -> None:
    get = serve(config(limit=2, exempt_when="tests.request_functions:internal"))
    internal = {"X-Internal": "yes"}
    assert statuses(get, 5, headers=internal) == [200] * 5
    assert not any(name.lower() == "ratelimit" for name in get(headers=internal)[1])
    assert statuses(get, 3) == [200, 200, 429]  # the others spent nothing of it


# --- failures: the limiter's fail rule, never a 500 ------------------------------------------


@pytest.mark.parametrize("function", ["broken", "not_a_number"])
def test_a_failing_cost_function_fails_open_by_default(
    serve: Callable[..., Get], caplog: pytest.LogCaptureFixture, function: str
) -> None:
    get = serve(config(cost=f"tests.request_functions:{function}"))
    with caplog.at_level(logging.ERROR, logger="ratesync_middleware"):
        assert statuses(get, 3) == [200, 200, 200]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # throttled: one line per limiter per 10 s
    message = errors[0].getMessage()
    assert "limiter 'api'" in message
    assert f"tests.request_functions:{function}" in message
    assert "abc123" not in message  # what the function said is not logged: it may be secret
    assert errors[0].exc_info is None  # a line, not a traceback


def test_a_failing_exempt_when_of_a_fail_closed_limiter_refuses_with_503(
    serve: Callable[..., Get],
) -> None:
    get = serve(config(fail_closed=True, exempt_when="tests.request_functions:broken"))
    status, headers = get()
    assert status == 503
    assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1"


def test_a_raising_key_function_fails_open_by_default(
    serve: Callable[..., Get], caplog: pytest.LogCaptureFixture
) -> None:
    get = serve(config(key="tests.request_functions:broken"))
    with caplog.at_level(logging.ERROR, logger="ratesync_middleware"):
        assert statuses(get, 3) == [200, 200, 200]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # throttled: one line per limiter per 10 s
    message = errors[0].getMessage()
    assert "limiter 'api': key function 'tests.request_functions:broken' raised KeyError" in message
    assert "abc123" not in message  # what the function said is not logged: it may be secret
    assert errors[0].exc_info is None


def test_a_raising_key_function_of_a_fail_closed_limiter_refuses_with_503(
    serve: Callable[..., Get],
) -> None:
    get = serve(config(fail_closed=True, key=["ip", "tests.request_functions:broken"]))
    assert statuses(get, 2) == [503, 503]


def test_a_slow_request_function_is_named_in_a_warning(
    serve: Callable[..., Get], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callables, "_slow_throttle", LogThrottle(10.0))  # the process's
    get = serve(config(cost="tests.request_functions:slow"))
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        assert statuses(get, 2) == [200, 200]
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(slow) == 1  # throttled: one line per function per 10 s
    assert slow[0].startswith("request function 'tests.request_functions:slow' took 0.1")
    assert "move blocking work to a thread" in slow[0]


# --- the configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("cost", 0, "[limiters.api] cost: expected an integer >= 1"),
        ("cost", "three", '"package.module:function"'),
        ("exempt_when", 1, '"package.module:function"'),
    ],
)
def test_bad_values_are_config_errors(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        AsyncRateLimiter(config(**{key: value}))
    assert expected in str(raised.value)


@pytest.mark.parametrize(
    ("key", "spec", "expected"),
    [
        ("cost", "tests.request_functions:missing", "cannot import"),
        ("exempt_when", "tests.no_such_module:f", "cannot import"),
        ("cost", "tests.request_functions:asynchronous", "is an async function"),
    ],
)
def test_functions_are_imported_at_start_up(key: str, spec: str, expected: str) -> None:
    # Starlette's lifespan runs the start-up: a typo fails the deploy, not the first request.
    app = Starlette(middleware=[Middleware(RateLimitMiddleware, config=config(**{key: spec}))])
    with pytest.raises(ConfigError) as raised, TestClient(app):
        pass
    assert f"[limiters.api] {key}: " in str(raised.value)
    assert expected in str(raised.value)


def test_a_route_rules_cost_needs_limiters() -> None:
    settings = config()
    settings["routes"] = [{"path": "/x", "exempt": True, "cost": 2}]
    with pytest.raises(
        ConfigError, match=r"\[\[routes\]\] #1 cost: goes with limiters or messages"
    ):
        AsyncRateLimiter(settings)


def test_limit_takes_a_whole_number_or_a_function() -> None:
    with pytest.raises(ValueError, match="cost"):
        limit("api", cost=0)
    with pytest.raises(ValueError, match="cost"):
        limit("api", cost=1.5)  # type: ignore[arg-type]
    limit("api", cost=lambda request: 1)


# --- shadow mode -----------------------------------------------------------------------------


def shadowed(settings: dict[str, Any]) -> tuple[AsyncRateLimiter, list[DecisionEvent]]:
    events: list[DecisionEvent] = []
    return AsyncRateLimiter(settings, on_decision=events.append), events


def test_a_shadow_limiter_decides_and_reports_but_never_refuses(
    serve: Callable[..., Get], caplog: pytest.LogCaptureFixture
) -> None:
    limiter, events = shadowed(config(limit=2, mode="shadow"))
    get = serve(limiter)
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        answers = [get() for _ in range(5)]
    assert [status for status, _ in answers] == [200] * 5
    for _, headers in answers:  # invisible to clients
        assert not {"ratelimit", "ratelimit-policy", "retry-after"} & {h.lower() for h in headers}
    assert [event.enforced for event in events] == [True, True, False, False, False]
    assert [event.decision.allowed for event in events] == [True, True, False, False, False]
    warnings = [r.getMessage() for r in caplog.records if "shadow mode" in r.getMessage()]
    assert warnings == [
        "limiter 'api' (shadow mode) would have refused a request: rate limit 'api' exceeded"
    ]  # one line per 10 s


def test_a_shadow_limiter_spends_as_if_enforced(serve: Callable[..., Get]) -> None:
    # Switching it to enforce later starts from the state shadow mode built.
    limiter, events = shadowed(config(limit=3, mode="shadow"))
    get = serve(limiter)
    assert statuses(get, 2) == [200, 200]
    client = events[0].key  # the test client's address, as the adapter saw it
    assert asyncio.run(limiter.peek("api", client)).remaining == 1


def test_middleware_mode_shadow_is_every_limiters(serve: Callable[..., Get]) -> None:
    settings = config(limit=1)
    settings["middleware"]["mode"] = "shadow"
    limiter, events = shadowed(settings)
    get = serve(limiter)
    assert statuses(get, 3) == [200] * 3
    assert [event.enforced for event in events] == [True, False, False]


def test_an_enforced_limiter_beside_a_shadow_one_still_refuses(serve: Callable[..., Get]) -> None:
    settings = config(limit=1, mode="shadow")
    settings["limiters"]["strict"] = {"limit": 2, "window_seconds": 86400}
    settings["middleware"]["default"] = ["api", "strict"]
    get = serve(settings)
    first, second, third = get(), get(), get()
    assert [first[0], second[0], third[0]] == [200, 200, 429]
    assert {k.lower(): v for k, v in second[1].items()}["ratelimit"].startswith('"strict";r=0;')


def test_shadow_refusals_are_their_own_metric() -> None:
    prometheus = pytest.importorskip("prometheus_client")
    from ratesync_middleware.metrics import PrometheusMetrics

    registry = prometheus.CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    limiter = RateLimiter(config(limit=1, mode="shadow"), on_decision=metrics)
    assert [limiter.hit("api", "k").allowed for _ in range(3)] == [True, False, False]
    count = registry.get_sample_value
    assert count("ratesync_decisions_total", {"limiter": "api", "outcome": "shadow_denied"}) == 2
    assert count("ratesync_decisions_total", {"limiter": "api", "outcome": "denied"}) is None


def test_acquire_under_a_shadow_limiter_never_raises() -> None:
    limiter = RateLimiter(config(limit=1, mode="shadow"))
    limiter.acquire("api", key="k").release()
    permit = limiter.acquire("api", key="k")
    assert not permit.decision.allowed  # the refusal it would have been, not enforced


def test_mode_is_enforce_or_shadow() -> None:
    with pytest.raises(ConfigError, match=r"\[limiters.api\] mode: expected one of"):
        AsyncRateLimiter(config(mode="dry-run"))


# --- WebSocket messages (Starlette; WSGI and Django's handlers have no WebSockets) ------------


def chat_app(routes: list[dict[str, Any]], **limiters: dict[str, Any]) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    settings = {"limiters": limiters, "routes": routes}
    return Starlette(
        routes=[WebSocketRoute("/ws/chat", echo)],
        middleware=[Middleware(RateLimitMiddleware, config=settings)],
    )


CHAT = {"limit": 3, "window_seconds": 86400}


def test_each_message_spends_and_the_one_too_many_closes_the_socket() -> None:
    app = chat_app([{"path": "/ws/*", "messages": ["chat"]}], chat=CHAT)
    with TestClient(app) as client, client.websocket_connect("/ws/chat") as socket:
        for text in ("one", "two", "three"):
            socket.send_text(text)
            assert socket.receive_text() == text
        socket.send_text("four")
        with pytest.raises(WebSocketDisconnect) as closed:
            socket.receive_text()
    assert closed.value.code == 1008
    assert closed.value.reason == "rate limit exceeded"


def test_a_messages_only_rule_leaves_the_handshake_to_the_others() -> None:
    routes = [{"path": "/ws/*", "messages": ["chat"]}]
    app = chat_app(routes, chat=CHAT)
    with TestClient(app) as client:
        for _ in range(5):  # five handshakes: none is charged to "chat"
            with client.websocket_connect("/ws/chat"):
                pass
        with client.websocket_connect("/ws/chat") as socket:
            for _ in range(3):  # all three of its messages are left
                socket.send_text("hi")
                assert socket.receive_text() == "hi"


def test_the_handshake_and_the_messages_have_their_own_limiters() -> None:
    routes = [{"path": "/ws/*", "limiters": ["connect"], "messages": ["chat"]}]
    app = chat_app(routes, chat=CHAT, connect={"limit": 1, "window_seconds": 86400})
    with TestClient(app) as client:
        with client.websocket_connect("/ws/chat") as socket:
            socket.send_text("hi")
            assert socket.receive_text() == "hi"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws/chat"):
            pass
    assert refused.value.code == 1008  # the second handshake: "connect" is spent


def test_a_rule_needs_limiters_exempt_or_messages() -> None:
    settings = {"limiters": {"chat": CHAT}, "routes": [{"path": "/ws/*"}]}
    with pytest.raises(ConfigError, match="or only messages"):
        AsyncRateLimiter(settings)
    settings["routes"] = [{"path": "/ws/*", "messages": ["chta"]}]
    with pytest.raises(ConfigError, match="messages: no limiter named 'chta'"):
        AsyncRateLimiter(settings)
