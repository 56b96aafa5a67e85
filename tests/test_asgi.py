"""The ASGI middleware on Starlette and FastAPI apps, with the embedded memory store."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from ratesync_middleware import ConfigError, Decision, RateLimitMiddleware, exempt, limit

ROOT = Path(__file__).resolve().parents[1]

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute"},
        "search": {"rate_per_second": 0.01, "burst": 3},
    },
    "middleware": {"default": "api"},
}


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


@limit("login")
async def login(request: Request) -> Response:
    return PlainTextResponse("welcome")


@exempt
async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def starlette_app(
    config: Any = CONFIG, routes: list[Any] | None = None, **options: Any
) -> Starlette:
    routes = routes or [
        Route("/", hello),
        Route("/login", login, methods=["POST"]),
        Route("/health", health),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(RateLimitMiddleware, config=config, **options)]
    )


def statuses(
    client: TestClient, count: int, path: str = "/", method: str = "GET", **kw: Any
) -> list[int]:
    return [client.request(method, path, **kw).status_code for _ in range(count)]


def with_config(**changes: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(CONFIG))
    for section, values in changes.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


# --- the basic contract ----------------------------------------------------------------------


def test_fastapi_burst_then_429_with_retry_after() -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    app.add_middleware(
        RateLimitMiddleware,
        config={
            "limiters": {"api": {"rate_per_second": 1.0, "burst": 5}},
            "middleware": {"default": "api"},
        },
    )
    with TestClient(app) as client:
        assert statuses(client, 5, "/items/1") == [200] * 5
        refused = client.get("/items/2")

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["detail"] == "Rate limit 'api' exceeded."
    assert refused.json()["violated-policies"] == ["api"]


def test_fastapi_limit_decorator_uses_its_own_limiter() -> None:
    app = FastAPI()
    router = APIRouter(prefix="/auth")

    @router.post("/login")
    @limit("login")
    async def fastapi_login() -> dict[str, str]:
        return {"status": "welcome"}

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"hello": "world"}

    @limit("search")  # above the route decorator works too: it marks the same function
    @app.get("/search")
    async def search() -> list[str]:
        return []

    app.include_router(router)
    app.add_middleware(RateLimitMiddleware, config=CONFIG)
    with TestClient(app) as client:
        logged_in = client.post("/auth/login")
        assert logged_in.headers["ratelimit-policy"] == '"login";q=2;w=60'
        assert client.get("/").headers["ratelimit-policy"] == '"api";q=5;w=500'
        assert client.get("/search").headers["ratelimit-policy"] == '"search";q=3;w=300'
        assert statuses(client, 2, "/auth/login", "POST") == [200, 429]
        assert client.get("/").status_code == 200  # another bucket


def test_headers_on_every_allowed_response() -> None:
    with TestClient(starlette_app()) as client:
        first = client.get("/")
        second = client.get("/")

    assert first.headers["ratelimit-policy"] == '"api";q=5;w=500'
    assert first.headers["ratelimit"] == '"api";r=4;t=100'
    assert second.headers["ratelimit"] == '"api";r=3;t=200'


@pytest.mark.parametrize("mode", ["draft", "legacy", "none"])
def test_header_modes_on_allowed_and_refused_responses(mode: str) -> None:
    app = starlette_app(with_config(middleware={"headers": mode}))
    with TestClient(app) as client:
        allowed = [client.get("/") for _ in range(5)][-1]
        refused = client.get("/")

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "100"
    names = {
        "draft": {"ratelimit", "ratelimit-policy"},
        "legacy": {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"},
        "none": set(),
    }[mode]
    for response in (allowed, refused):
        present = {name for name in response.headers if "ratelimit" in name}
        assert present == names
    if mode == "legacy":
        assert allowed.headers["x-ratelimit-limit"] == "5"
        assert allowed.headers["x-ratelimit-remaining"] == "0"


def test_exempt_endpoint_gets_no_limit_and_no_headers() -> None:
    with TestClient(starlette_app()) as client:
        assert statuses(client, 20, "/health") == [200] * 20
        assert "ratelimit" not in client.get("/health").headers


# --- overrides and precedence ----------------------------------------------------------------


def test_precedence_decorator_over_route_rule_over_default() -> None:
    config = with_config(
        routes=[
            {"path": "/login", "limiters": ["search"]},  # the decorator wins: still "login"
            {"path": "/health", "limiters": ["search"]},  # @exempt wins
            {"path": "/ruled*", "limiters": ["search"]},
        ]
    )
    app = starlette_app(
        config,
        routes=[
            Route("/", hello),
            Route("/login", login, methods=["POST"]),
            Route("/health", health),
            Route("/ruled/{rest:path}", hello),
        ],
    )
    with TestClient(app) as client:
        assert client.post("/login").headers["ratelimit-policy"].startswith('"login"')
        assert "ratelimit" not in client.get("/health").headers
        assert client.get("/ruled/a/b").headers["ratelimit-policy"].startswith('"search"')
        assert client.get("/").headers["ratelimit-policy"].startswith('"api"')


def test_route_rule_methods_and_exemption() -> None:
    config = with_config(
        routes=[
            {"path": "/", "methods": ["POST"], "limiters": ["search"]},
            {"path": "/free", "exempt": True},
        ]
    )

    async def both(request: Request) -> Response:
        return PlainTextResponse(request.method)

    app = starlette_app(
        config, routes=[Route("/", both, methods=["GET", "POST"]), Route("/free", hello)]
    )
    with TestClient(app) as client:
        assert client.post("/").headers["ratelimit-policy"].startswith('"search"')
        assert client.get("/").headers["ratelimit-policy"].startswith('"api"')
        assert statuses(client, 10, "/free") == [200] * 10


def test_several_limiters_on_one_route_all_must_allow() -> None:
    @limit("api", "search")
    async def busy(request: Request) -> Response:
        return PlainTextResponse("busy")

    with TestClient(starlette_app(routes=[Route("/busy", busy), Route("/", hello)])) as client:
        responses = [client.get("/busy") for _ in range(4)]
        after = client.get("/")

    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[0].headers["ratelimit"] == '"search";r=2;t=100'  # the most restrictive
    assert responses[3].json()["violated-policies"] == ["search"]
    # "api" comes first, so it also spent on the request that "search" denied
    assert after.headers["ratelimit"] == '"api";r=0;t=500'


def test_marks_inside_mounts_routers_and_endpoint_classes() -> None:
    class Account(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            return PlainTextResponse("account")

        @limit("login")
        async def post(self, request: Request) -> Response:
            return PlainTextResponse("changed")

    inner = Starlette(routes=[Route("/health", health), Route("/account", Account)])
    app = starlette_app(
        routes=[
            Mount(
                "/v1", routes=[Mount("/deep", routes=[Route("/login", login, methods=["POST"])])]
            ),
            Mount("/v2", app=inner),
            Route("/", hello),
        ]
    )
    with TestClient(app) as client:
        assert client.post("/v1/deep/login").headers["ratelimit-policy"].startswith('"login"')
        assert "ratelimit" not in client.get("/v2/health").headers
        assert client.get("/v2/account").headers["ratelimit-policy"].startswith('"api"')
        assert client.post("/v2/account").headers["ratelimit-policy"].startswith('"login"')


def test_exempt_a_whole_mounted_app() -> None:
    static = exempt(Starlette(routes=[Route("/{name}", hello)]))
    app = starlette_app(routes=[Mount("/static", app=static), Route("/", hello)])
    with TestClient(app) as client:
        assert statuses(client, 10, "/static/logo.png") == [200] * 10


def test_a_middleware_on_a_mounted_app_sees_its_own_routes() -> None:
    inner = starlette_app(routes=[Route("/login", login, methods=["POST"]), Route("/", hello)])
    outer = Starlette(routes=[Mount("/api", app=inner)])
    with TestClient(outer) as client:
        assert client.post("/api/login").headers["ratelimit-policy"].startswith('"login"')
        assert client.get("/api/").headers["ratelimit-policy"].startswith('"api"')


def test_not_found_and_wrong_method_are_limited_by_the_default() -> None:
    with TestClient(starlette_app()) as client:
        assert statuses(client, 6, "/nowhere") == [404] * 5 + [429]
    with TestClient(starlette_app()) as client:
        wrong_method = client.get("/login")
        assert wrong_method.status_code == 405
        assert wrong_method.headers["ratelimit-policy"].startswith('"api"')  # not "login"


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_a_wrong_method_spends_nothing_of_the_endpoints_limiters(framework: str) -> None:
    """Five GETs to a POST-only /login answer 405 and leave its login attempts untouched."""
    if framework == "fastapi":
        app: Any = FastAPI()

        @app.post("/login")
        @limit("login")
        async def fastapi_login() -> dict[str, str]:
            return {"hello": "you"}

        app.add_middleware(RateLimitMiddleware, config=CONFIG)
    else:
        app = starlette_app()
    with TestClient(app) as client:
        assert statuses(client, 5, "/login") == [405] * 5
        assert statuses(client, 3, "/login", method="POST") == [200, 200, 429]  # login: 2/minute


class LoginEndpoint(HTTPEndpoint):
    @limit("login")
    async def post(self, request: Request) -> Response:
        return PlainTextResponse("welcome")


def test_a_class_endpoint_without_the_method_handler_is_a_405_limited_by_the_default() -> None:
    marked_class = limit("login")(LoginEndpoint)
    app = starlette_app(routes=[Route("/login", marked_class)])
    with TestClient(app) as client:
        assert statuses(client, 5, "/login") == [405] * 5
        assert client.get("/login").headers["ratelimit-policy"].startswith('"api"')
        assert statuses(client, 3, "/login", method="POST") == [200, 200, 429]


# --- client identity -------------------------------------------------------------------------


def test_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key() -> None:
    app = starlette_app(with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]}))
    with TestClient(app, client=("203.0.113.7", 4000)) as client:
        spoofed = [
            client.get("/", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code
            for n in range(6)
        ]
    assert spoofed == [200] * 5 + [429]


def test_forwarded_for_from_a_trusted_proxy_separates_clients() -> None:
    app = starlette_app(with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]}))
    with TestClient(app, client=("10.0.0.2", 4000)) as client:
        first = statuses(client, 6, headers={"X-Forwarded-For": "198.51.100.1"})
        second = statuses(client, 1, headers={"X-Forwarded-For": "198.51.100.2"})
    assert first == [200] * 5 + [429]
    assert second == [200]


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


def test_user_key_reads_the_authenticated_user() -> None:
    config = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2, "key": "user"}})
    app = Starlette(
        routes=[Route("/", hello)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),  # before the limiter
            Middleware(RateLimitMiddleware, config=config),
        ],
    )
    with TestClient(app) as client:
        assert statuses(client, 3, headers={"X-User": "ada"}) == [200, 200, 429]
        assert statuses(client, 2, headers={"X-User": "bob"}) == [200, 200]
        assert statuses(client, 3) == [200, 200, 429]  # anonymous: by IP


def test_header_and_path_keys() -> None:
    config = with_config(
        limiters={
            "api": {"rate_per_second": 0.01, "burst": 1, "key": "header:X-API-Key"},
            "search": {"rate_per_second": 0.01, "burst": 1, "key": "path"},
        },
        routes=[{"path": "/p/*", "limiters": ["search"]}],
    )
    app = starlette_app(config, routes=[Route("/", hello), Route("/p/{n}", hello)])
    with TestClient(app) as client:
        assert statuses(client, 2, headers={"X-API-Key": "k1"}) == [200, 429]
        assert statuses(client, 1, headers={"X-API-Key": "k2"}) == [200]
        assert statuses(client, 2, "/p/1") == [200, 429]
        assert statuses(client, 1, "/p/2") == [200]


# --- responses -------------------------------------------------------------------------------


def test_on_limited_builds_the_refusal() -> None:
    seen: list[Decision] = []

    def on_limited(request: Request, decision: Decision) -> Response:
        seen.append(decision)
        return JSONResponse({"error": "slow down", "path": request.url.path}, status_code=429)

    with TestClient(starlette_app(on_limited=on_limited)) as client:
        refused = [client.get("/") for _ in range(6)][-1]

    assert refused.status_code == 429
    assert refused.json() == {"error": "slow down", "path": "/"}
    assert refused.headers["retry-after"] == "100"
    assert refused.headers["ratelimit"] == '"api";r=0;t=100'
    assert seen[0].policy == "api"
    assert not seen[0].allowed


def test_async_on_limited_keeps_its_own_retry_after() -> None:
    async def on_limited(request: Request, decision: Decision) -> Response:
        return PlainTextResponse("later", status_code=429, headers={"Retry-After": "3600"})

    with TestClient(starlette_app(on_limited=on_limited)) as client:
        refused = [client.get("/") for _ in range(6)][-1]

    assert refused.text == "later"
    assert refused.headers.get_list("retry-after") == ["3600"]


def test_app_headers_are_kept() -> None:
    async def custom(request: Request) -> Response:
        return PlainTextResponse("x", headers={"X-App": "1"})

    with TestClient(starlette_app(routes=[Route("/", custom)])) as client:
        response = client.get("/")
    assert response.headers["x-app"] == "1"
    assert "ratelimit" in response.headers


# --- websockets and lifespan -----------------------------------------------------------------


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def test_websocket_checked_once_at_connect_and_refused_before_accept() -> None:
    config = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2}})
    with TestClient(starlette_app(config, routes=[WebSocketRoute("/ws", echo)])) as client:
        for _ in range(2):
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("ping")
                assert websocket.receive_text() == "ping"
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
            pass  # pragma: no cover

    assert refused.value.code == 1008


def test_exempt_websocket() -> None:
    config = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}})
    with TestClient(starlette_app(config, routes=[WebSocketRoute("/ws", exempt(echo))])) as client:
        for _ in range(3):
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("ping")
                assert websocket.receive_text() == "ping"


def test_an_unknown_limiter_in_a_decorator_fails_the_start_up() -> None:
    @limit("logn")
    async def typo(request: Request) -> Response:
        return PlainTextResponse("x")

    with (
        pytest.raises(ConfigError, match=r"no limiter 'logn' \(did you mean 'login'\?\)"),
        TestClient(starlette_app(routes=[Route("/", typo)])),
    ):
        pass  # pragma: no cover


def test_app_lifespan_still_runs() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(
        routes=[Route("/", hello)],
        lifespan=lifespan,
        middleware=[Middleware(RateLimitMiddleware, config=CONFIG)],
    )
    with TestClient(app) as client:
        assert client.get("/").status_code == 200
    assert events == ["startup", "shutdown"]


def test_without_lifespan_the_stores_open_on_first_use() -> None:
    client = TestClient(starlette_app())  # no `with`: no lifespan, a new loop per request
    assert statuses(client, 6) == [200] * 5 + [429]


# --- configuration sources -------------------------------------------------------------------

TOML = """
[limiters.api]
rate_per_second = 0.01
burst = 2

[middleware]
default = "api"
"""


def test_config_from_a_path_and_from_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rate-sync.toml"
    path.write_text(TOML)
    with TestClient(starlette_app(path, routes=[Route("/", hello)])) as client:
        assert statuses(client, 3) == [200, 200, 429]

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    app = Starlette(routes=[Route("/", hello)], middleware=[Middleware(RateLimitMiddleware)])
    with TestClient(app) as client:
        assert statuses(client, 3) == [200, 200, 429]


def test_nothing_to_discover_limits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    app = Starlette(routes=[Route("/", hello)], middleware=[Middleware(RateLimitMiddleware)])
    with TestClient(app) as client:
        assert statuses(client, 20) == [200] * 20
        assert "ratelimit" not in client.get("/").headers


def test_non_http_scopes_pass_through() -> None:
    received: list[str] = []

    async def app(
        scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        received.append(scope["type"])

    middleware = RateLimitMiddleware(app, CONFIG)
    asyncio.run(middleware({"type": "custom"}, None, None))  # type: ignore[arg-type]
    assert received == ["custom"]


# --- the example -----------------------------------------------------------------------------


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "fastapi_example", ROOT / "examples" / "fastapi" / "app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fastapi_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATESYNC_ENGINE", raising=False)
    example = load_example()
    with TestClient(example.app) as client:
        assert statuses(client, 6) == [200] * 5 + [429]
        assert statuses(client, 4, "/login", "POST") == [200, 200, 200, 429]
        assert statuses(client, 10, "/health") == [200] * 10
        assert statuses(client, 10, "/docs") == [200] * 10
