"""Errors named by their cause, against real servers, and connections that fail for good at once.

A refused port, a name that does not resolve and rejected credentials are answered without
waiting for `connect_timeout`; only a server that does not answer at all costs the deadline.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest

from ratesync_middleware.config import StoreConfig
from ratesync_middleware.errors import (
    AuthenticationError,
    ConnectionRefusedError,
    ConnectTimeoutError,
    NameNotResolvedError,
    StoreError,
)
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.stores.nats import NatsStore
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats

# A deadline far longer than the answers these tests expect: waiting it out would show.
PATIENT = 10.0
AT_ONCE = 3.0  # seconds: how long a failure for good may take on a loaded machine
# A host name the resolver rejects by itself (a label may not start with "-"): no DNS query
# leaves the machine.
UNRESOLVABLE = "-nats-1.invalid"


def nats_store(url: str, **options: Any) -> NatsStore:
    return NatsStore(StoreConfig(name="prod", engine="nats", servers=(url,), **options))


async def failure_of(store: NatsStore) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        await store.ready()
    return raised.value, time.monotonic() - started


async def test_no_token_where_the_server_wants_one(token_server: NatsServer) -> None:
    error, took = await failure_of(nats_store(token_server.url, connect_timeout=PATIENT))
    assert isinstance(error, AuthenticationError)
    assert str(error).startswith("Authentication violation")
    assert "has none configured" in str(error)
    assert "token" in str(error)
    assert "`creds`" in str(error)
    assert took < AT_ONCE


async def test_a_wrong_token_is_rejected(token_server: NatsServer) -> None:
    store = nats_store(token_server.url, token="not-the-token", connect_timeout=PATIENT)
    error, took = await failure_of(store)
    assert isinstance(error, AuthenticationError)
    assert "rejected the credentials" in str(error)
    assert "not-the-token" not in str(error)
    assert took < AT_ONCE


async def test_a_name_that_does_not_resolve() -> None:
    store = nats_store(f"nats://tok3n@{UNRESOLVABLE}:4222", connect_timeout=PATIENT)
    error, took = await failure_of(store)
    assert isinstance(error, NameNotResolvedError)
    assert str(error).startswith("Name not resolved")
    assert UNRESOLVABLE in str(error)
    assert "tok3n" not in str(error)
    assert "refused" not in str(error).lower()
    assert took < AT_ONCE


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refused_port_fails_at_once() -> None:
    port = closed_port()
    error, took = await failure_of(nats_store(f"nats://127.0.0.1:{port}", connect_timeout=PATIENT))
    assert isinstance(error, ConnectionRefusedError)
    assert str(error).startswith("Connection refused")
    assert f"127.0.0.1:{port}" in str(error)
    assert took < AT_ONCE


async def test_every_url_refused_fails_at_once() -> None:
    urls = f"nats://127.0.0.1:{closed_port()},nats://127.0.0.1:{closed_port()}"
    store = NatsStore(
        StoreConfig(
            name="prod", engine="nats", servers=tuple(urls.split(",")), connect_timeout=PATIENT
        )
    )
    error, took = await failure_of(store)
    assert isinstance(error, ConnectionRefusedError)
    assert took < AT_ONCE


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (no INFO)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def test_a_server_that_never_answers_is_bounded_by_the_connect_timeout(
    black_hole: int,
) -> None:
    store = nats_store(f"nats://127.0.0.1:{black_hole}", connect_timeout=0.5)
    error, took = await failure_of(store)
    assert isinstance(error, ConnectTimeoutError)
    assert str(error).startswith("No answer")
    assert "connect_timeout = 0.5s" in str(error)
    assert took < 0.5 + AT_ONCE


async def test_a_refused_port_beside_a_live_server_still_connects(
    nats_server: NatsServer,
) -> None:
    store = NatsStore(
        StoreConfig(
            name="prod",
            engine="nats",
            servers=(f"nats://127.0.0.1:{closed_port()}", nats_server.url),
            bucket_name="rl_errors_beside",
        )
    )
    await store.ready()
    await store.aclose()


def refused_config(tmp_path: Path) -> Path:
    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "nats://127.0.0.1:{closed_port()}"
connect_timeout = {PATIENT}

[limiters.api]
store = "prod"
limit = "10/second"
"""
    )
    return path


async def test_start_up_on_a_refused_port_says_what_happened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ratesync_middleware import RateLimitMiddleware

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(RateLimitMiddleware, config=str(refused_config(tmp_path)))
    started = time.monotonic()
    with TestClient(app) as client:
        took = time.monotonic() - started
        assert client.get("/").status_code == 200  # fail-open
    assert took < AT_ONCE
    assert "did not open at start-up" in caplog.text
    assert "Connection refused" in caplog.text
    assert "not reachable" not in caplog.text


def test_the_first_flask_request_on_a_refused_port_is_answered_at_once(tmp_path: Path) -> None:
    app = flask.Flask(__name__)
    RateLimit(app, config=str(refused_config(tmp_path)))

    @app.get("/")
    def home() -> str:
        return "ok"

    started = time.monotonic()
    response = app.test_client().get("/")
    assert response.status_code == 200  # fail-open
    assert time.monotonic() - started < AT_ONCE


def test_the_cli_on_a_refused_port_exits_at_once_with_status_3(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ratesync_middleware.cli", "status"],
        env={"RATE_SYNC_CONFIG": str(refused_config(tmp_path)), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert result.stderr.startswith("ratesync: Connection refused")
    assert time.monotonic() - started < AT_ONCE + 2.0  # an interpreter starting, on a busy host
