"""No configuration anywhere: every entry point says so once per process, naming where it looked.

Without `config`, `$RATE_SYNC_CONFIG` or a rate-sync.toml, an app meant to be limited is limited
by nothing; one WARNING on the `ratesync_middleware` logger makes that visible at start-up.
Django's middleware has its test in test_django_config.py, with the Django settings of the suite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter, RateLimiter, load_config
from ratesync_middleware.config import reset_no_config_warning

LOGGER = "ratesync_middleware"


@pytest.fixture(autouse=True)
def empty_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty working directory, no $RATE_SYNC_CONFIG, and a process that has not warned yet."""
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_no_config_warning()
    yield tmp_path
    reset_no_config_warning()


def no_config_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == LOGGER and "No rate-sync configuration found" in record.getMessage()
    ]


def assert_warned_once(caplog: pytest.LogCaptureFixture, directory: Path) -> None:
    [record] = no_config_records(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "$RATE_SYNC_CONFIG is not set" in message
    assert str(directory / "rate-sync.toml") in message
    assert str(directory / "config" / "rate-sync.toml") in message


# --- the framework-free API ------------------------------------------------------------------


def test_async_rate_limiter_without_configuration_warns(
    caplog: pytest.LogCaptureFixture, empty_directory: Path
) -> None:
    async def build() -> None:
        limiter = AsyncRateLimiter()
        await limiter.aclose()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        asyncio.run(build())
    assert_warned_once(caplog, empty_directory)


def test_rate_limiter_without_configuration_warns(
    caplog: pytest.LogCaptureFixture, empty_directory: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        RateLimiter().close()
    assert_warned_once(caplog, empty_directory)


def test_the_warning_comes_once_per_process(
    caplog: pytest.LogCaptureFixture, empty_directory: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            load_config()
        RateLimiter().close()
    assert_warned_once(caplog, empty_directory)
    reset_no_config_warning()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_config()
    assert len(no_config_records(caplog)) == 2


def test_a_discovered_or_given_configuration_does_not_warn(
    caplog: pytest.LogCaptureFixture, empty_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_config({})
        (empty_directory / "config").mkdir()
        (empty_directory / "config" / "rate-sync.toml").write_text("[stores.main]\n")
        assert list(load_config().stores) == ["main"]
        elsewhere = empty_directory / "elsewhere.toml"
        elsewhere.write_text("[stores.other]\n")
        monkeypatch.setenv("RATE_SYNC_CONFIG", str(elsewhere))
        assert list(load_config().stores) == ["other"]
    assert no_config_records(caplog) == []


# --- every adapter built without a configuration ---------------------------------------------


def asgi_middleware() -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ratesync_middleware import RateLimitMiddleware

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", home)], middleware=[Middleware(RateLimitMiddleware)])
    with TestClient(app) as client:
        assert client.get("/").status_code == 200


def wsgi_middleware() -> Any:
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    from ratesync_middleware.wsgi import RateLimitMiddleware

    def app(environ: Any, start_response: Any) -> Any:
        return Response("ok")(environ, start_response)

    assert Client(RateLimitMiddleware(app)).get("/").status_code == 200


def flask_extension() -> Any:
    from flask import Flask

    from ratesync_middleware.flask import RateLimit

    app = Flask(__name__)
    RateLimit(app)

    @app.get("/")
    def home() -> str:
        return "ok"

    assert app.test_client().get("/").status_code == 200


def flask_init_app() -> Any:
    from flask import Flask

    from ratesync_middleware.flask import RateLimit

    ratelimit = RateLimit()
    app = Flask(__name__)
    ratelimit.init_app(app)
    assert app.test_client().get("/missing").status_code == 404


@pytest.mark.parametrize(
    "build",
    [asgi_middleware, wsgi_middleware, flask_extension, flask_init_app],
    ids=["asgi", "wsgi", "flask", "flask-init-app"],
)
def test_an_adapter_without_configuration_warns(
    build: Callable[[], None], caplog: pytest.LogCaptureFixture, empty_directory: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build()
    assert_warned_once(caplog, empty_directory)
