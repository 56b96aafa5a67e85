"""An operator names a composite identity part by part and reaches the very group the app uses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import RateLimitMiddleware
from tests.test_cli import ratesync

pytestmark = pytest.mark.nats


class HeaderUser(AuthenticationBackend):
    """The smallest authentication: the user named by an `X-User` header."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["authenticated"]), SimpleUser(name)) if name else None


def login_app(config: Path) -> Starlette:
    async def login(request: Request) -> PlainTextResponse:
        return PlainTextResponse("welcome")

    app = Starlette(routes=[Route("/login", login, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, config=str(config))
    app.add_middleware(AuthenticationMiddleware, backend=HeaderUser())  # runs first
    return app


@pytest.fixture
def config(nats_url: str, bucket_name: str, tmp_path: Path) -> Path:
    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{nats_url}"
bucket_name = "{bucket_name}"

[limiters.login]
store = "prod"
limit = "100/minute"
key = ["ip", "user"]

[middleware]
default = "login"
"""
    )
    return path


def test_a_ban_by_parts_refuses_the_apps_next_request(config: Path) -> None:
    with TestClient(login_app(config), client=("127.0.0.13", 50000)) as client:
        kim = {"X-User": "kim"}
        assert client.post("/login", headers=kim).status_code == 200

        ban = ("ban", "login", "--key", "ip=127.0.0.13", "--key", "user=kim", "--config", config)
        assert ratesync(*ban) == (0, "login ip=127.0.0.13 user=kim: banned until removed\n")

        deadline = time.monotonic() + 10  # a ban reaches every process within a second
        while (status := client.post("/login", headers=kim).status_code) == 200:
            assert time.monotonic() < deadline, "the ban never reached the application"
            time.sleep(0.05)
        assert status == 403
        assert client.post("/login", headers={"X-User": "ann"}).status_code == 200

        status_code, output = ratesync("overrides", "--config", config)
        assert status_code == 0
        assert output.startswith("ban       login ip=127.0.0.13 user=kim ")
        rules = json.loads(ratesync("overrides", "--json", "--config", config)[1])
        assert rules[0]["identity"] == {"ip": "127.0.0.13", "user": "kim"}
        assert rules[0]["group"] == "login.10_3A127_2E0_2E0_2E133_3Akim"

        unban = ("unban", "login", "--key", "user=kim", "--key", "ip=127.0.0.13")
        assert ratesync(*unban, "--config", config)[0] == 0
        deadline = time.monotonic() + 10
        while client.post("/login", headers=kim).status_code != 200:
            assert time.monotonic() < deadline, "the unban never reached the application"
            time.sleep(0.05)
