"""Inline limits (issue 14, item 7): `@limit("2/minute")` limits an endpoint by a rate written on
it, with no `[limiters.X]` table at all (and with no configuration file: the embedded memory
store). Its policy is named after the endpoint; a malformed rate stops the app at start-up and
fails Django's `manage.py check`. Starlette, FastAPI, Flask and Django (sync and async views);
plain WSGI has no endpoints, so no marks. Memory and NATS stores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import ConfigError, RateLimitMiddleware, limit
from ratesync_middleware.config import reset_no_config_warning
from ratesync_middleware.flask import RateLimit
from tests.test_django import (  # noqa: F401  (the Django sites, and their settings)
    SITES,
    Site,
    django_project,
    for_the_project,
)

SEARCH = "tests-test_inline_limits-starlette_app-locals-search"


def starlette_app(config: Any = None, rate: str = "2/minute", **options: Any) -> Starlette:
    @limit(rate, **options)
    async def search(request: Request) -> Response:
        return PlainTextResponse("results")

    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    settings = {} if config is None else {"config": config}
    return Starlette(
        routes=[Route("/search", search), Route("/", hello)],
        middleware=[Middleware(RateLimitMiddleware, **settings)],
    )


def statuses(client: Any, count: int, path: str = "/search", **options: Any) -> list[int]:
    return [client.get(path, **options).status_code for _ in range(count)]


@pytest.fixture
def no_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty working directory and no $RATE_SYNC_CONFIG: nothing to discover."""
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_no_config_warning()
    yield
    reset_no_config_warning()


# --- Starlette and FastAPI -------------------------------------------------------------------


def test_an_inline_rate_needs_no_limiter_table() -> None:
    with TestClient(starlette_app({"middleware": {}})) as client:
        responses = [client.get("/search") for _ in range(3)]
        assert [response.status_code for response in responses] == [200, 200, 429]
        assert responses[0].headers["RateLimit-Policy"] == f'"{SEARCH}";q=2;w=60'
        assert responses[0].headers["RateLimit"] == f'"{SEARCH}";r=1;t=30'
        assert responses[2].json()["violated-policies"] == [SEARCH]
        assert statuses(client, 3, "/") == [200] * 3  # the other endpoint is not limited


def test_with_no_configuration_at_all_inline_rates_still_apply(
    no_configuration: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        app = starlette_app()  # RateLimitMiddleware(app): discovery finds nothing
        with TestClient(app) as client:
            assert statuses(client, 3) == [200, 200, 429]
    assert any("only inline @limit" in record.getMessage() for record in caplog.records)


def test_an_inline_key_groups_requests_like_a_toml_key() -> None:
    with TestClient(starlette_app({}, key="header:X-User")) as client:
        assert statuses(client, 3, headers={"X-User": "ann"}) == [200, 200, 429]
        assert statuses(client, 2, headers={"X-User": "ben"}) == [200, 200]


@limit("2/minute", "3/day")
async def rated(request: Request) -> Response:
    return PlainTextResponse("results")


@limit("api")
@limit("1/minute")
async def mixed(request: Request) -> Response:
    return PlainTextResponse("results")


def test_several_rates_in_one_limit_all_must_allow() -> None:
    app = Starlette(routes=[Route("/search", rated)], middleware=[Middleware(RateLimitMiddleware)])
    name = "tests-test_inline_limits-rated"
    with TestClient(app) as client:
        first = client.get("/search")
        assert first.headers["RateLimit-Policy"] == (
            f'"{name}:2/minute";q=2;w=60, "{name}:3/day";q=3;w=86400'
        )
        refused = client.get("/search"), client.get("/search")
        assert [response.status_code for response in refused] == [200, 429]
        assert refused[1].headers["RateLimit"].startswith(f'"{name}:2/minute";r=0;')


def test_an_inline_rate_beside_a_named_limiter() -> None:
    config = {"limiters": {"api": {"limit": "5/minute"}}}
    app = Starlette(
        routes=[Route("/search", mixed)],
        middleware=[Middleware(RateLimitMiddleware, config=config)],
    )
    with TestClient(app) as client:
        first = client.get("/search")
        assert first.headers["RateLimit"].startswith('"tests-test_inline_limits-mixed";r=0;')
        refused = client.get("/search")
        assert refused.status_code == 429
        assert refused.json()["violated-policies"] == ["tests-test_inline_limits-mixed"]


def test_a_long_endpoint_name_is_cut_and_hashed_stably() -> None:
    from ratesync_middleware.plans import _inline_name

    endpoint = "app.views." + "very_long_" * 12 + "view"
    name = _inline_name(endpoint, 1)
    assert len(name) == 80
    assert name.startswith("app-views-very_long_")
    assert name == _inline_name(endpoint, 1) != _inline_name(endpoint, 2)
    assert _inline_name("app.views.Search.get", 2) == "app-views-Search-get-2"


def test_fastapi_path_operations_take_inline_rates() -> None:
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, config={})

    @app.get("/items")
    @limit("2/minute")
    async def items() -> dict[str, str]:
        return {"items": "all"}

    with TestClient(app) as client:
        assert statuses(client, 3, "/items") == [200, 200, 429]


@pytest.mark.parametrize("rate", ["5/fortnight", "0/minute", "5/minute/extra", "x/second"])
def test_a_malformed_rate_stops_the_app_at_start_up(rate: str) -> None:
    with pytest.raises(ConfigError) as raised, TestClient(starlette_app({}, rate=rate)):
        pass
    message = str(raised.value)
    assert message.startswith(
        "tests.test_inline_limits.starlette_app.<locals>.search: @limit: expected"
        ' "N/second", "N/minute", "N/hour" or "N/day", or a list of them, got'
    )
    assert repr(rate) in message


def test_a_malformed_inline_key_stops_the_app_at_start_up() -> None:
    with (
        pytest.raises(ConfigError, match="@limit key: expected"),
        TestClient(starlette_app({}, key="header:")),
    ):
        pass


def test_limit_key_goes_with_a_rate() -> None:
    with pytest.raises(TypeError, match="goes with an inline rate"):
        limit("api", key="ip")


def test_an_inline_rate_needs_a_default_store_among_several() -> None:
    stores = {"a": {"engine": "memory"}, "b": {"engine": "memory"}}
    with (
        pytest.raises(ConfigError, match=r"none of the stores \(a, b\) is called 'default'"),
        TestClient(starlette_app({"stores": stores})),
    ):
        pass


# --- Flask -----------------------------------------------------------------------------------


def flask_search() -> str:
    return "results"


def test_flask_views_take_inline_rates() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config={})
    app.get("/search")(ratelimit.limit("2/minute", key="header:X-User")(flask_search))

    client = app.test_client()
    ann = [client.get("/search", headers={"X-User": "ann"}) for _ in range(3)]
    assert [response.status_code for response in ann] == [200, 200, 429]
    assert ann[0].headers["RateLimit-Policy"] == '"tests-test_inline_limits-flask_search";q=2;w=60'
    assert client.get("/search", headers={"X-User": "ben"}).status_code == 200
    ratelimit.close()


def test_flask_refuses_a_malformed_rate_when_the_decorator_runs() -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config={})

    with pytest.raises(ConfigError, match="@limit: expected"):

        @app.get("/search")
        @ratelimit.limit("5/fortnight")
        def search() -> str:
            return "results"

    ratelimit.close()


# --- Django, sync and async views ------------------------------------------------------------


@pytest.fixture(params=list(SITES))
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    served = SITES[request.param]()
    yield served
    served.close()


def test_django_views_take_inline_rates(site: Site) -> None:
    with override_settings(RATESYNC=for_the_project({"limiters": {}})):
        responses = [site.get("/inline") for _ in range(3)]
        assert [response.status_code for response in responses] == [200, 200, 429]
        assert responses[0].headers["RateLimit-Policy"] == (
            '"tests-django_project-views-inline";q=2;w=60'
        )
        ann = [site.get("/inline-async", headers={"X-User": "ann"}) for _ in range(3)]
        assert [response.status_code for response in ann] == [200, 200, 429]
        assert site.get("/inline-async", headers={"X-User": "ben"}).status_code == 200


def test_django_checks_report_a_malformed_inline_rate() -> None:
    with override_settings(ROOT_URLCONF="tests.django_project.bad_rate_urls"):
        [error] = [m for m in checks.run_checks(tags=["urls"]) if m.id.startswith("ratesync")]
        assert error.id == "ratesync.E013"
        assert error.obj == "tests.django_project.bad_rate_urls.fortnightly"
        assert "@limit: expected" in error.msg
        assert "'5/fortnight'" in error.msg
        with pytest.raises(SystemCheckError, match=r"ratesync\.E013"):
            call_command("check")


def test_django_checks_accept_the_projects_inline_rates() -> None:
    assert [m for m in checks.run_checks(tags=["urls"]) if m.id.startswith("ratesync")] == []


# --- NATS ------------------------------------------------------------------------------------


@pytest.mark.nats
def test_an_inline_rate_on_a_nats_default_store(nats_store: dict[str, Any]) -> None:
    config = {"stores": {"default": {**nats_store, "timeout": 5.0}}}
    with TestClient(starlette_app(config)) as client:
        assert statuses(client, 3) == [200, 200, 429]
    with TestClient(starlette_app(config)) as restarted:  # the state is in NATS, not here
        refused = restarted.get("/search")
        assert refused.status_code == 429
        assert refused.headers["RateLimit-Policy"] == f'"{SEARCH}";q=2;w=60'


@pytest.mark.nats
def test_flask_inline_rate_on_nats(nats_store: dict[str, Any]) -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config={"stores": {"default": {**nats_store, "timeout": 5.0}}})

    @app.get("/search")
    @ratelimit.limit("2/minute")
    def search() -> str:
        return "results"

    ratelimit.startup()
    client = app.test_client()
    assert [client.get("/search").status_code for _ in range(3)] == [200, 200, 429]
    ratelimit.close()


def test_an_inline_key_may_be_a_list_of_parts() -> None:
    with TestClient(starlette_app({}, key=["ip", "header:X-User"])) as client:
        assert statuses(client, 3, headers={"X-User": "ann"}) == [200, 200, 429]
        assert statuses(client, 1, headers={"X-User": "ben"}) == [200]


@pytest.mark.nats
@pytest.mark.parametrize("served", ["client", "asgi"])
def test_django_inline_rates_on_a_nats_default_store(
    nats_store: dict[str, Any], served: str
) -> None:
    site = SITES[served]()
    try:
        default_store = {"stores": {"default": {**nats_store, "timeout": 5.0}}}
        with override_settings(RATESYNC=for_the_project(default_store)):
            assert site.statuses(3, "/inline") == [200, 200, 429]
            ann = [site.get("/inline-async", headers={"X-User": "ann"}) for _ in range(3)]
            assert [response.status_code for response in ann] == [200, 200, 429]
    finally:
        site.close()


def test_an_inline_key_function_that_cannot_be_imported_names_the_endpoint() -> None:
    with (
        pytest.raises(ConfigError) as raised,
        TestClient(starlette_app({}, key="tests.request_functions:nope")),
    ):
        pass
    assert str(raised.value).startswith(
        "tests.test_inline_limits.starlette_app.<locals>.search: @limit key: cannot import"
    )


def test_middleware_shadow_mode_covers_inline_rates() -> None:
    with TestClient(starlette_app({"middleware": {"mode": "shadow"}})) as client:
        responses = [client.get("/search") for _ in range(3)]
    assert [response.status_code for response in responses] == [200] * 3
    assert not any("RateLimit" in response.headers for response in responses)
