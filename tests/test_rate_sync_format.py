"""rate-sync's own format through real apps: the exact sliding window and several rates."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import AsyncRateLimiter, RateLimitMiddleware, limit
from ratesync_middleware.bucket import NS_PER_SECOND
from ratesync_middleware.flask import RateLimit

NOW = 1_800_000_000 * NS_PER_SECOND

LOGIN_TOML = """
[limiters.login]
algorithm = "sliding_window"
limit = 5
window_seconds = 300

[limiters.api]
limit = ["3/second", "5/minute"]

[middleware]
default = "api"
"""


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * NS_PER_SECOND)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "rate-sync.toml"
    path.write_text(LOGIN_TOML)
    return path


async def test_five_logins_in_any_five_minutes(config_file: Path) -> None:
    """An attempt every 12 s: 5 pass, then none until the first leaves the window at 300 s."""
    clock = Clock()
    limiter = AsyncRateLimiter(config_file, clock=clock)
    admitted = []
    for attempt in itertools.count():
        if clock.now - NOW >= 600 * NS_PER_SECOND:
            break
        decision = await limiter.hit("login", key="kim")
        if decision.allowed:
            admitted.append(attempt * 12)
        else:
            # The true wait: until the oldest admission leaves the window.
            oldest = admitted[-5]
            assert decision.retry_after == pytest.approx(oldest + 300 - attempt * 12)
        clock.advance(12)
    assert admitted == [0, 12, 24, 36, 48, 300, 312, 324, 336, 348]


def login_app(config: Any) -> Starlette:
    @limit("login")
    async def login(request: Request) -> Response:
        return PlainTextResponse("welcome")

    async def index(request: Request) -> Response:
        return PlainTextResponse("hello")

    return Starlette(
        routes=[Route("/login", login, methods=["POST"]), Route("/", index)],
        middleware=[Middleware(RateLimitMiddleware, config=config)],
    )


def test_the_login_window_through_an_asgi_app(config_file: Path) -> None:
    with TestClient(login_app(config_file)) as client:
        statuses = [client.post("/login").status_code for _ in range(6)]
        refused = client.post("/login")
    assert statuses == [200] * 5 + [429]
    assert refused.headers["ratelimit-policy"] == '"login";q=5;w=300'
    assert refused.headers["ratelimit"] == '"login";r=0;t=300'
    assert refused.headers["retry-after"] == "300"


def test_several_rates_report_each_as_a_policy_item(config_file: Path) -> None:
    with TestClient(login_app(config_file)) as client:
        first = client.get("/")
        statuses = [first.status_code] + [client.get("/").status_code for _ in range(3)]
    assert statuses == [200, 200, 200, 429]  # 3/second binds first
    policies = first.headers["ratelimit-policy"]
    assert policies == '"api:3/second";q=3;w=1, "api:5/minute";q=5;w=60'
    # The rate with the fewest units left speaks in RateLimit: after one, 2 of 3 and 4 of 5.
    assert first.headers["ratelimit"] == '"api:3/second";r=2;t=1'
    assert _structured_list(policies) == [
        ("api:3/second", {"q": "3", "w": "1"}),
        ("api:5/minute", {"q": "5", "w": "60"}),
    ]


async def test_a_denial_by_one_rate_spends_nothing_of_the_others(config_file: Path) -> None:
    clock = Clock()
    limiter = AsyncRateLimiter(config_file, clock=clock)
    outcomes = []
    for _ in range(4):  # the 4th is refused by 3/second: the per-minute rate keeps 2 of 5
        outcomes.append((await limiter.hit("api", key="k")).allowed)
    assert outcomes == [True, True, True, False]
    clock.advance(1)
    later = [await limiter.hit("api", key="k") for _ in range(3)]
    assert [d.allowed for d in later] == [True, True, False]
    assert later[-1].policy == "api:5/minute"  # now the minute binds: it was charged 5, not 6
    assert later[-1].retry_after == pytest.approx(11.0)  # one unit every 12 s since 0 s


def test_flask_app_with_a_sliding_window(config_file: Path) -> None:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=config_file)

    @app.post("/login")
    @ratelimit.limit("login")
    def login() -> str:
        return "welcome"

    client = app.test_client()
    assert [client.post("/login").status_code for _ in range(6)] == [200] * 5 + [429]


def _structured_list(value: str) -> list[tuple[str, dict[str, str]]]:
    """A Structured Fields list of string items with parameters (RFC 8941, just what we send)."""
    items = []
    for member in value.split(", "):
        item, *parameters = member.split(";")
        assert item.startswith('"'), member
        assert item.endswith('"'), member
        params = dict(parameter.split("=", 1) for parameter in parameters)
        assert all(name.isidentifier() and text.isdigit() for name, text in params.items())
        items.append((item[1:-1], params))
    return items
