"""The WSGI middleware around plain WSGI apps (werkzeug's test Client) and a Flask app."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from werkzeug.test import Client, EnvironBuilder

from ratesync_middleware.facts import RequestFacts
from ratesync_middleware.wsgi import RateLimitMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute"},
    },
    "middleware": {"default": "api"},
    "routes": [
        {"path": "/auth/*", "methods": ["POST"], "limiters": ["login"]},
        {"path": "/health", "exempt": True},
    ],
}


def with_config(**changes: Any) -> dict[str, Any]:
    merged: dict[str, Any] = json.loads(json.dumps(CONFIG))
    for section, values in changes.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The smallest WSGI app: answers every request with `hello`."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "hello")])
    return [b"hello"]


def client_for(config: Any = CONFIG, app: Any = hello) -> Client:
    return Client(RateLimitMiddleware(app, config=config))


def statuses(
    client: Client, count: int, path: str = "/", method: str = "GET", **kw: Any
) -> list[int]:
    return [client.open(path, method=method, **kw).status_code for _ in range(count)]


def test_burst_then_429_with_retry_after() -> None:
    client = client_for()

    assert statuses(client, 5) == [200] * 5
    refused = client.get("/")

    assert refused.status == "429 Too Many Requests"
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["Content-Length"] == str(len(refused.data))
    assert refused.json is not None
    assert refused.json["detail"] == "Rate limit 'api' exceeded."
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'
    assert "X-App" not in refused.headers  # the app was never called


def test_headers_are_added_to_the_apps_response() -> None:
    response = client_for().get("/")

    assert response.text == "hello"
    assert response.headers["X-App"] == "hello"
    assert response.headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert response.headers["RateLimit"] == '"api";r=4;t=100'


def test_legacy_headers() -> None:
    response = client_for(with_config(middleware={"headers": "legacy"})).get("/")

    assert response.headers["X-RateLimit-Limit"] == "5"
    assert response.headers["X-RateLimit-Remaining"] == "4"
    assert int(response.headers["X-RateLimit-Reset"]) > 0
    assert "RateLimit" not in response.headers


def test_route_rules_and_the_default() -> None:
    client = client_for()

    assert statuses(client, 3, "/auth/login", "POST") == [200, 200, 429]
    assert client.get("/auth/login").headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert statuses(client, 10, "/health") == [200] * 10
    assert "RateLimit" not in client.get("/health").headers


def test_without_a_default_only_named_routes_are_limited() -> None:
    config = with_config()
    del config["middleware"]
    client = client_for(config)

    assert statuses(client, 10) == [200] * 10
    assert statuses(client, 3, "/auth/login", "POST") == [200, 200, 429]


def test_rules_match_the_path_inside_the_app() -> None:
    # Mounted under /shop (SCRIPT_NAME): rules see PATH_INFO, as the app's own routes do.
    client = client_for(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))

    assert statuses(client, 3, "/health", base_url="http://localhost/shop") == [200] * 3
    assert statuses(client, 2, "/", base_url="http://localhost/shop") == [200, 429]


def test_head_refused_without_a_body() -> None:
    client = client_for(with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}}))
    client.head("/")
    refused = client.head("/")

    assert refused.status_code == 429
    assert refused.data == b""
    assert refused.headers["Retry-After"] == "100"


def test_the_decision_is_left_in_the_environ() -> None:
    def show(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        decision = environ.get("ratesync.decision")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"none" if decision is None else str(decision.remaining).encode()]

    client = client_for(app=show)

    assert client.get("/").text == "4"
    assert client.get("/health").text == "none"


def test_the_apps_iterable_is_passed_through_and_closed() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"chunk-1 "
            yield b"chunk-2"

        def close(self) -> None:
            closed.append(True)

    def streaming(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    response = client_for(app=streaming).get("/")
    assert response.text == "chunk-1 chunk-2"
    response.close()

    assert closed == [True]


def test_exc_info_reaches_the_server() -> None:
    # An app that fails after starting its response hands the server exc_info (PEP 3333).
    def failing(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"sorry"]

    started: list[tuple[str, list[tuple[str, str]], Any]] = []

    def server_start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Any:
        started.append((status, headers, exc_info))
        return lambda data: None

    middleware = RateLimitMiddleware(failing, config=CONFIG)
    environ = EnvironBuilder("/", environ_base={"REMOTE_ADDR": "203.0.113.7"}).get_environ()
    body = middleware(environ, server_start_response)

    assert list(body) == [b"sorry"]
    ((status, headers, exc_info),) = started
    assert status == "500 Internal Server Error"
    assert ("RateLimit", '"api";r=4;t=100') in headers
    assert isinstance(exc_info[1], RuntimeError)


def test_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    client = client_for(with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]}))
    peer = {"REMOTE_ADDR": "198.51.100.7"}

    seen = [
        client.get("/", environ_base=peer, headers={"X-Forwarded-For": f"203.0.113.{n}"})
        for n in range(6)
    ]

    assert [response.status_code for response in seen] == [200] * 5 + [429]


def test_forwarded_from_a_trusted_proxy_separates_clients() -> None:
    client = client_for(
        with_config(middleware={"trusted_proxies": ["10.0.0.0/8"], "forwarded_header": "forwarded"})
    )
    proxy = {"REMOTE_ADDR": "10.0.0.2"}

    first = statuses(client, 6, environ_base=proxy, headers={"Forwarded": "for=203.0.113.1"})
    second = statuses(client, 1, environ_base=proxy, headers={"Forwarded": "for=203.0.113.2"})

    assert first == [200] * 5 + [429]
    assert second == [200]


def test_keys_from_headers_and_the_user_is_the_address() -> None:
    client = client_for(
        with_config(
            limiters={
                "api": {"rate_per_second": 0.01, "burst": 1, "key": "header:X-API-Key"},
                "login": {"rate_per_second": 0.01, "burst": 1, "key": "user"},
            }
        )
    )

    assert statuses(client, 2, headers={"X-API-Key": "k1"}) == [200, 429]
    assert statuses(client, 1, headers={"X-API-Key": "k2"}) == [200]
    # No server-checked user in WSGI: REMOTE_USER can come from an unchecked Basic header.
    assert statuses(client, 1, "/auth/x", "POST", environ_base={"REMOTE_USER": "ada"}) == [200]
    assert statuses(client, 1, "/auth/x", "POST", environ_base={"REMOTE_USER": "bob"}) == [429]


def tenant(facts: RequestFacts) -> str | None:
    """A `"pkg.mod:func"` key: `facts.request` is the WSGI environ."""
    value: str | None = facts.request.get("HTTP_X_TENANT")
    return value


def test_a_key_function_reads_the_environ() -> None:
    client = client_for(
        with_config(
            limiters={"api": {"rate_per_second": 0.01, "burst": 1, "key": "tests.test_wsgi:tenant"}}
        )
    )

    assert statuses(client, 2, headers={"X-Tenant": "a"}) == [200, 429]
    assert statuses(client, 1, headers={"X-Tenant": "b"}) == [200]


def test_around_a_flask_app() -> None:
    app = Flask(__name__)
    calls: list[str] = []

    @app.get("/")
    def index() -> str:
        calls.append("index")
        return "hello"

    app.wsgi_app = RateLimitMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, config=with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2}})
    )
    client = app.test_client()

    assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]
    assert calls == ["index", "index"]
    assert client.get("/").headers["Retry-After"] == "100"


# --- on a real NATS server -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def on_store(store: dict[str, Any], **limiter: Any) -> dict[str, Any]:
    return {
        "stores": {"shared": store},
        "limiters": {"api": {"store": "shared", "rate_per_second": 0.01, "burst": 3, **limiter}},
        "middleware": {"default": "api"},
        "routes": [{"path": "/health", "exempt": True}],
    }


@pytest.mark.nats
def test_nats_burst_then_429(nats_store: dict[str, Any]) -> None:
    middleware = RateLimitMiddleware(hello, config=on_store(nats_store))
    client = Client(middleware)
    try:
        assert statuses(client, 4) == [200, 200, 200, 429]
        assert client.get("/").headers["Retry-After"] == "100"
        assert statuses(client, 5, "/health") == [200] * 5
    finally:
        middleware.close()


@pytest.mark.nats
def test_a_dead_nats_under_fail_closed_answers_503() -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.2}
    middleware = RateLimitMiddleware(hello, config=on_store(dead, fail_closed=True))
    client = Client(middleware)
    try:
        refused = client.get("/")
        assert refused.status == "503 Service Unavailable"
        assert refused.headers["Retry-After"] == "1"
        assert refused.json is not None
        assert refused.json["status"] == 503
        assert client.get("/health").status_code == 200
    finally:
        middleware.close()
