"""Costs and exemptions that depend on the request (issue 14, items 1 and 4), through real apps.

`cost` is a whole number or a `"pkg.mod:func"` of the framework's request, on a limiter, on a
`[[routes]]` rule (which wins) or in `@limit(..., cost=...)` (which wins over both);
`exempt_when = "pkg.mod:func"` leaves the limiter out of a request for which it is true. A
function that raises or returns junk is answered by the limiter's fail rule, never a 500.
Django's sites are covered in tests/test_django.py.
"""

from __future__ import annotations

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
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.test import Client

from ratesync_middleware import AsyncRateLimiter, ConfigError, RateLimitMiddleware, limit
from ratesync_middleware.flask import RateLimit
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

    def get(path: str = "/", headers: dict[str, str] | None = None) -> Any:
        response = client.get(path, headers=headers)
        return response.status_code, dict(response.headers)

    yield get
    ratelimit.close()


def wsgi(settings: dict[str, Any]) -> Iterator[Get]:
    def hello(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    middleware = WSGIRateLimitMiddleware(hello, config=settings)
    client = Client(middleware)

    def get(path: str = "/", headers: dict[str, str] | None = None) -> Any:
        response = client.get(path, headers=headers)
        return response.status_code, dict(response.headers)

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
    with pytest.raises(ConfigError, match=r"\[\[routes\]\] #1 cost: goes with limiters"):
        AsyncRateLimiter(settings)


def test_limit_takes_a_whole_number_or_a_function() -> None:
    with pytest.raises(ValueError, match="cost"):
        limit("api", cost=0)
    with pytest.raises(ValueError, match="cost"):
        limit("api", cost=1.5)  # type: ignore[arg-type]
    limit("api", cost=lambda request: 1)
