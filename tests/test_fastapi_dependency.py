"""`ratesync_middleware.fastapi.RateLimit`: a FastAPI dependency, with FastAPI's TestClient."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from ratesync_middleware import ConfigError, RateLimitMiddleware, limit
from ratesync_middleware.fastapi import RateLimit

from .monitored import connections
from .natsserver import NatsServer


def settings(store: dict[str, Any] | None = None, **middleware: Any) -> dict[str, Any]:
    return {
        "stores": {"main": store or {"engine": "memory"}},
        "limiters": {
            "api": {"store": "main", "limit": "2/minute"},
            "search": {"store": "main", "rate_per_second": 0.01, "burst": 5},
            "uploads": {"store": "main", "max_concurrent": 1},
        },
        "middleware": middleware,
    }


def with_middleware(app: FastAPI, config: dict[str, Any]) -> FastAPI:
    app.add_middleware(RateLimitMiddleware, config=config)
    return app


def statuses(client: TestClient, path: str, count: int, **kwargs: Any) -> list[int]:
    return [client.get(path, **kwargs).status_code for _ in range(count)]


def discovered(config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `config` the one the app discovers ($RATE_SYNC_CONFIG), as a TOML file."""
    lines = []
    for table, entries in (("stores", config["stores"]), ("limiters", config["limiters"])):
        for name, values in entries.items():
            lines.append(f"[{table}.{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp_path / "rate-sync.toml"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("RATE_SYNC_CONFIG", str(path))


def test_a_route_dependency_limits_and_refuses_as_the_middleware_does(
    store: dict[str, Any],
) -> None:
    app = with_middleware(FastAPI(), settings(store))

    @app.get("/items", dependencies=[Depends(RateLimit("api"))])
    async def items() -> list[str]:
        return ["a"]

    @app.get("/free")
    async def free() -> str:
        return "free"

    with TestClient(app) as client:
        first, second, refused = (client.get("/items") for _ in range(3))
        assert statuses(client, "/free", 3) == [200, 200, 200]  # no default: not limited

    assert [first.status_code, second.status_code, refused.status_code] == [200, 200, 429]
    assert first.json() == ["a"]
    assert first.headers["RateLimit-Policy"] == '"api";q=2;w=60'
    assert first.headers["RateLimit"].startswith('"api";r=1;')
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["violated-policies"] == ["api"]
    assert refused.headers["RateLimit"].startswith('"api";r=0;')


def test_without_the_middleware_the_configuration_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    discovered(settings(), tmp_path, monkeypatch)
    app = FastAPI()

    @app.get("/items", dependencies=[Depends(RateLimit("api"))])
    async def items() -> list[str]:
        return []

    with TestClient(app) as client:
        responses = [client.get("/items") for _ in range(3)]

    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[-1].headers["Content-Type"] == "application/problem+json"


@pytest.mark.nats
def test_without_the_middleware_one_connection_opened_on_first_use_closed_at_shutdown(
    monitored_nats: tuple[NatsServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, monitoring = monitored_nats
    store = {"engine": "nats", "url": server.url, "bucket_name": "rl_fastapi", "timeout": 2.0}
    discovered(settings(store), tmp_path, monkeypatch)
    app = FastAPI()

    @app.get("/items", dependencies=[Depends(RateLimit("api"))])
    async def items() -> list[str]:
        return []

    @app.get("/search", dependencies=[Depends(RateLimit("search"))])
    async def search() -> list[str]:
        return []

    with TestClient(app) as client:
        assert connections(monitoring) == 0
        assert statuses(client, "/items", 3) == [200, 200, 429]
        assert statuses(client, "/search", 1) == [200]
        assert connections(monitoring) == 1
    assert connections(monitoring) == 0


def test_beside_the_middleware_a_request_is_charged_once() -> None:
    # The middleware's default is the same limiter: the dependency's route is left to it.
    app = with_middleware(FastAPI(), settings(default="api"))

    @app.get("/items", dependencies=[Depends(RateLimit("api"))])
    async def items() -> list[str]:
        return []

    @app.get("/other")
    async def other() -> list[str]:
        return []

    with TestClient(app) as client:
        first = client.get("/items")
        assert statuses(client, "/items", 2) == [200, 429]
        assert statuses(client, "/other", 1) == [429]  # the default elsewhere: the same bucket
    assert first.headers.get_list("RateLimit-Policy") == ['"api";q=2;w=60']  # once, not twice


def test_beside_the_middleware_a_router_dependency_is_charged_once_too() -> None:
    router = APIRouter(prefix="/v1", dependencies=[Depends(RateLimit("api"))])

    @router.get("/items")
    async def items() -> list[str]:
        return []

    app = with_middleware(FastAPI(), settings(default="api"))
    app.include_router(router)
    with TestClient(app) as client:
        assert statuses(client, "/v1/items", 3) == [200, 200, 429]


def user_of(request: Request) -> str:
    """An authentication dependency: the user of the `X-User` header, else 401."""
    user = request.headers.get("X-User")
    if user is None:
        raise HTTPException(401, "who are you?")
    request.state.user = user
    return user


def test_runs_after_the_dependencies_listed_before_it_and_keys_by_what_they_found() -> None:
    app = with_middleware(FastAPI(), settings())
    limited = RateLimit("api", key=lambda request: request.state.user)

    @app.get("/me", dependencies=[Depends(user_of), Depends(limited)])
    async def me() -> str:
        return "me"

    with TestClient(app) as client:
        assert statuses(client, "/me", 3) == [401, 401, 401]  # refused by auth: nothing spent
        assert statuses(client, "/me", 3, headers={"X-User": "kim"}) == [200, 200, 429]
        assert statuses(client, "/me", 2, headers={"X-User": "lee"}) == [200, 200]


def test_an_async_key_function_and_a_key_value() -> None:
    async def tenant(request: Request) -> str | None:
        return request.headers.get("X-Tenant")  # None: the client IP

    app = with_middleware(FastAPI(), settings())

    @app.get("/tenant", dependencies=[Depends(RateLimit("api", key=tenant))])
    async def by_tenant() -> str:
        return "ok"

    @app.get("/partner", dependencies=[Depends(RateLimit("api", key="partner-x"))])
    async def partner() -> str:
        return "ok"

    with TestClient(app) as client:
        assert statuses(client, "/tenant", 3, headers={"X-Tenant": "a"}) == [200, 200, 429]
        assert statuses(client, "/tenant", 1, headers={"X-Tenant": "b"}) == [200]
        assert statuses(client, "/tenant", 3) == [200, 200, 429]  # by IP
        assert statuses(client, "/partner", 3) == [200, 200, 429]  # one bucket, its own


def test_on_a_router_and_on_the_app() -> None:
    router = APIRouter(prefix="/v1", dependencies=[Depends(RateLimit("api"))])

    @router.get("/items")
    async def items() -> list[str]:
        return []

    app = with_middleware(FastAPI(), settings())
    app.include_router(router)
    whole = with_middleware(FastAPI(dependencies=[Depends(RateLimit("api"))]), settings())

    @whole.get("/anything")
    async def anything() -> str:
        return "ok"

    with TestClient(app) as client:
        assert statuses(client, "/v1/items", 3) == [200, 200, 429]
    with TestClient(whole) as client:
        assert statuses(client, "/anything", 3) == [200, 200, 429]


def test_a_cost_function_of_the_request() -> None:
    app = with_middleware(FastAPI(), settings())
    by_size = RateLimit("search", cost=lambda request: int(request.query_params["n"]))

    @app.get("/search", dependencies=[Depends(by_size)])
    async def search() -> str:
        return "ok"

    with TestClient(app) as client:
        assert client.get("/search?n=3").headers["RateLimit"].startswith('"search";r=2;')
        assert client.get("/search?n=3").status_code == 429


def test_a_concurrency_slot_is_given_back_when_the_response_is_done() -> None:
    app = with_middleware(FastAPI(), settings())

    @app.post("/upload", dependencies=[Depends(RateLimit("uploads"))])
    async def upload() -> str:
        return "stored"

    @app.post("/broken", dependencies=[Depends(RateLimit("uploads"))])
    async def broken() -> str:
        raise HTTPException(400, "bad file")

    with TestClient(app) as client:
        assert [client.post("/upload").status_code for _ in range(3)] == [200, 200, 200]
        assert [client.post("/broken").status_code for _ in range(2)] == [400, 400]
        assert client.post("/upload").status_code == 200


def test_an_unknown_limiter_name_fails_the_start_up_with_did_you_mean() -> None:
    app = with_middleware(FastAPI(), settings())

    @app.get("/items", dependencies=[Depends(RateLimit("aip"))])
    async def items() -> list[str]:
        return []

    with (
        pytest.raises(ConfigError, match=r"no limiter 'aip' \(did you mean 'api'\?\)"),
        TestClient(app),
    ):
        pass  # pragma: no cover


def test_an_endpoints_own_limit_mark_still_applies_beside_a_dependency() -> None:
    app = with_middleware(FastAPI(), settings(default="search"))

    @app.get("/both", dependencies=[Depends(RateLimit("search"))])
    @limit("api")
    async def both() -> str:
        return "ok"

    with TestClient(app) as client:
        assert statuses(client, "/both", 3) == [200, 200, 429]  # api (2/minute) refuses


def test_bad_arguments_are_refused_where_they_are_written() -> None:
    with pytest.raises(TypeError, match="limiter names"):
        RateLimit()
    with pytest.raises(TypeError, match="not rates"):
        RateLimit("5/minute")
    with pytest.raises(ValueError, match="cost must be"):
        RateLimit("api", cost=0)


def test_an_app_handler_for_the_refusal_answers_it() -> None:
    from fastapi.responses import PlainTextResponse

    from ratesync_middleware.fastapi import RateLimitRefused

    app = with_middleware(FastAPI(), settings())

    @app.exception_handler(RateLimitRefused)
    async def slow_down(request: Request, exc: RateLimitRefused) -> PlainTextResponse:
        return PlainTextResponse("slow down", 429, headers=exc.headers)

    @app.get("/items", dependencies=[Depends(RateLimit("api"))])
    async def items(user: Annotated[str, Depends(lambda: "x")]) -> str:
        return user

    with TestClient(app) as client:
        refused = [client.get("/items") for _ in range(3)][-1]
    assert (refused.status_code, refused.text) == (429, "slow down")
    assert "Retry-After" in refused.headers


def test_a_key_function_that_raises_is_answered_by_the_fail_rule() -> None:
    def broken(request: Request) -> str:
        raise KeyError("no user on this request")

    config = settings()
    config["limiters"]["strict"] = {"store": "main", "limit": "2/minute", "fail_closed": True}
    app = with_middleware(FastAPI(), config)

    @app.get("/open", dependencies=[Depends(RateLimit("api", key=broken))])
    async def open_() -> str:
        return "ok"

    @app.get("/closed", dependencies=[Depends(RateLimit("strict", key=broken))])
    async def closed() -> str:
        return "ok"

    with TestClient(app) as client:
        assert statuses(client, "/open", 3) == [200, 200, 200]
        assert statuses(client, "/closed", 2) == [503, 503]
