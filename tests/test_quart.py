"""The Quart extension with Quart's test client (memory store, then a real NATS server), and
under a real hypercorn process."""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from quart import Blueprint, Quart, Response, request, websocket
from quart.testing import QuartClient, WebsocketResponseError
from quart.testing.app import LifespanError

from ratesync_middleware import ConfigError, RateLimiter
from ratesync_middleware.flask import RateLimit as FlaskRateLimit
from ratesync_middleware.quart import RateLimit, RateLimitExceeded, limit
from tests.servers import hypercorn_server

PAGE = Path(__file__).resolve().parent.parent / "docs" / "quart.md"

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute"},
    },
    "middleware": {"default": "api"},
}


def create_app(config: Any = CONFIG) -> tuple[Quart, RateLimit]:
    """A default-limited page, a login, a health check."""
    app = Quart(__name__)
    ratelimit = RateLimit(app, config=config)

    @app.get("/")
    async def index() -> str:
        return "hello"

    @app.post("/login")
    @ratelimit.limit("login")
    async def login() -> str:
        return "welcome"

    @app.get("/health")
    @ratelimit.exempt
    async def health() -> str:
        return "ok"

    return app, ratelimit


async def statuses(client: QuartClient, count: int, path: str = "/", **kw: Any) -> list[int]:
    method = kw.pop("method", "GET")
    return [(await client.open(path, method=method, **kw)).status_code for _ in range(count)]


def remaining(response: Any) -> int:
    """The `r=` of the RateLimit header: what was left when the request was admitted."""
    return int(response.headers["RateLimit"].split(";r=")[1].split(";")[0])


# --- the basic contract ----------------------------------------------------------------------


async def test_burst_then_429_problem_json_with_retry_after() -> None:
    app, _ = create_app()
    async with app.test_app() as served:
        client = served.test_client()

        assert await statuses(client, 5) == [200] * 5
        refused = await client.get("/")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert await refused.get_json() == {
        "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Rate limit 'api' exceeded.",
        "violated-policies": ["api"],
    }
    assert refused.headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'


async def test_headers_marks_and_the_exempt_health_check() -> None:
    app, ratelimit = create_app()

    @app.get("/decision")
    async def decision() -> str:
        current = ratelimit.current_decision
        return f"{current.policy} {current.remaining}" if current else "none"

    client = app.test_client()  # without test_app(): the first request starts it
    first = await client.get("/")
    assert first.headers["RateLimit"] == '"api";r=4;t=100'
    assert await first.get_data(as_text=True) == "hello"
    assert await statuses(client, 3, "/login", method="POST") == [200, 200, 429]
    health = await client.get("/health")
    assert health.status_code == 200
    assert "RateLimit" not in health.headers
    assert await (await client.get("/decision")).get_data(as_text=True) == "api 3"


async def test_an_app_factory_with_the_config_in_app_config() -> None:
    ratelimit = RateLimit()
    api = Blueprint("api", __name__)

    @api.get("/items")
    @ratelimit.limit("login")
    async def items() -> str:
        return "items"

    def make_app() -> Quart:
        app = Quart(__name__)
        app.config["RATESYNC_CONFIG"] = CONFIG
        ratelimit.init_app(app)
        app.register_blueprint(api)
        return app

    async with make_app().test_app() as served:
        assert await statuses(served.test_client(), 3, "/items") == [200, 200, 429]


async def test_an_error_handler_answers_the_refusal_and_gets_the_headers() -> None:
    limiters = {**CONFIG["limiters"], "api": {"rate_per_second": 0.01, "burst": 1}}
    app, _ = create_app({**CONFIG, "limiters": limiters})

    @app.errorhandler(RateLimitExceeded)
    async def slow_down(error: RateLimitExceeded) -> tuple[str, int]:
        return f"slow down, {error.decision.policy}", 429

    client = app.test_client()
    await client.get("/")
    refused = await client.get("/")
    assert refused.status_code == 429
    assert await refused.get_data(as_text=True) == "slow down, api"
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'


def test_each_extension_refuses_the_other_frameworks_app() -> None:
    with pytest.raises(TypeError, match=r"use ratesync_middleware\.quart\.RateLimit"):
        FlaskRateLimit(Quart(__name__), config=CONFIG)
    with pytest.raises(TypeError, match=r"use ratesync_middleware\.flask\.RateLimit"):
        RateLimit(Flask(__name__), config=CONFIG)


async def test_a_websocket_is_checked_when_it_opens() -> None:
    app, ratelimit = create_app()

    @app.websocket("/ws")
    @ratelimit.limit("login")
    async def echo() -> None:
        decision = ratelimit.current_decision
        await websocket.send(f"{decision.remaining} left" if decision else "not limited")
        while True:
            await websocket.send(await websocket.receive())

    client = app.test_client()
    for left in (1, 0):
        async with client.websocket("/ws") as socket:
            assert await socket.receive() == f"{left} left"
            await socket.send("hello")
            assert await socket.receive() == "hello"
    with pytest.raises(WebsocketResponseError) as refused:
        async with client.websocket("/ws") as socket:
            await socket.send("hello")
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers["RateLimit"].startswith('"login";r=0;')


def test_per_message_limits_are_not_applied_and_it_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {**CONFIG, "routes": [{"path": "/ws/*", "messages": ["login"]}]}
    with caplog.at_level(logging.WARNING, "ratesync_middleware"):
        create_app(config)
    assert "[[routes]] messages: the Quart extension checks a websocket when it opens" in (
        caplog.text
    )


# --- a typo in a mark --------------------------------------------------------------------------


def test_a_typo_in_a_mark_fails_when_the_decorator_runs() -> None:
    app, ratelimit = create_app()

    with pytest.raises(ConfigError, match="did you mean 'login'") as raised:

        @app.get("/typo")
        @ratelimit.limit("logn")
        async def typo() -> str:
            return "never"

    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("init_app_first", [True, False])
def test_a_typo_in_a_mark_fails_in_an_app_factory(init_app_first: bool) -> None:
    ratelimit = RateLimit()
    app = Quart(__name__)
    app.config["RATESYNC_CONFIG"] = CONFIG

    def accounts() -> Blueprint:
        blueprint = Blueprint("accounts", __name__)

        @blueprint.post("/login")
        @ratelimit.limit("logn")
        async def login() -> str:
            return "welcome"

        return blueprint

    if init_app_first:
        ratelimit.init_app(app)
        with pytest.raises(ConfigError, match="did you mean 'login'"):
            accounts()  # when the decorator runs
    else:
        app.register_blueprint(accounts())
        with pytest.raises(ConfigError, match="did you mean 'login'"):
            ratelimit.init_app(app)


async def test_a_bare_mark_with_a_typo_fails_start_up() -> None:
    app, _ = create_app()

    @app.get("/typo")
    @limit("logn")  # not checked by the extension: found when the app starts serving
    async def typo() -> str:
        return "never"

    # What a server is told: lifespan.startup.failed with the error (hypercorn then exits).
    with pytest.raises(LifespanError, match="did you mean 'login'"):
        async with app.test_app():
            pass


async def test_without_start_up_a_bare_typo_fails_its_own_route_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = create_app()

    @app.get("/typo")
    @limit("logn")
    async def typo() -> str:
        return "never"

    client = app.test_client()
    with caplog.at_level(logging.ERROR, "ratesync_middleware"):
        assert (await client.get("/health")).status_code == 200
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/typo")).status_code == 500
    logged = [record.getMessage() for record in caplog.records]
    assert any("no limiter 'logn' (did you mean 'login'?)" in line for line in logged)


# --- the end of a request: count_status, settle_header, max_concurrent ----------------------

SETTLING: dict[str, Any] = {
    "limiters": {
        "login": {"limit": "3/minute", "count_status": [401]},
        "llm": {"limit": 100, "window_seconds": 86400, "cost": 50, "settle_header": "X-Tokens"},
        "upload": {"max_concurrent": 1},
    },
    "routes": [
        {"path": "/login", "limiters": ["login"]},
        {"path": "/complete", "limiters": ["llm"]},
        {"path": "/stream", "limiters": ["llm"]},
        {"path": "/upload", "limiters": ["upload"]},
    ],
}


class Gate:
    """Holds a streamed body or an upload half-way until the test opens it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()


def settling_app(config: dict[str, Any], gate: Gate) -> Quart:
    app = Quart(__name__)
    RateLimit(app, config=config)

    @app.post("/login")
    async def login() -> tuple[str, int]:
        right = request.headers.get("X-Password") == "s3cret"
        return ("welcome", 200) if right else ("no", 401)

    @app.get("/complete")
    async def complete() -> tuple[str, dict[str, str]]:
        return "an answer", {"X-Tokens": "10"}

    @app.get("/stream")
    async def stream() -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"an "
            await gate.wait()
            yield b"answer"

        return Response(chunks(), headers={"X-Tokens": "10"})

    @app.post("/upload")
    async def upload() -> str:
        await gate.wait()
        return "stored"

    return app


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def settling(request: pytest.FixtureRequest) -> AsyncIterator[tuple[QuartClient, Gate]]:
    """Quart's test client on the settling app, on the memory store, then a real NATS."""
    config = dict(SETTLING)
    if request.param == "nats":
        store = request.getfixturevalue("nats_store")
        config["stores"] = {"shared": {**store, "timeout": 2.0}}
    gate = Gate()
    async with settling_app(config, gate).test_app() as served:
        yield served.test_client(), gate


async def test_count_status_is_settled_before_the_client_sees_the_response(
    settling: tuple[QuartClient, Gate],
) -> None:
    client, _ = settling
    right, wrong = {"X-Password": "s3cret"}, {"X-Password": "guess"}

    assert await statuses(client, 10, "/login", method="POST", headers=right) == [200] * 10
    assert await statuses(client, 4, "/login", method="POST", headers=wrong) == [401] * 3 + [429]


async def test_a_streamed_response_settles_when_its_body_ends(
    settling: tuple[QuartClient, Gate],
) -> None:
    client, gate = settling
    assert remaining(await client.get("/complete")) == 50  # then charged 10 of its 50

    streaming = asyncio.create_task(client.get("/stream"))
    await gate.reached.wait()  # headers sent, body half-way: its 50 stay reserved
    refused = await client.get("/complete")
    assert (refused.status_code, remaining(refused)) == (429, 40)  # 100 - 10 - 50
    gate.opened.set()
    streamed = await streaming
    assert await streamed.get_data(as_text=True) == "an answer"

    assert remaining(await client.get("/complete")) == 30  # 100 - 10 - 10, then 50 reserved


async def test_a_concurrency_slot_is_held_until_the_response_is_sent(
    settling: tuple[QuartClient, Gate],
) -> None:
    client, gate = settling

    first = asyncio.create_task(client.post("/upload"))
    await gate.reached.wait()
    assert (await client.post("/upload")).status_code == 429  # the only slot is taken
    gate.opened.set()
    assert (await first).status_code == 200
    assert await statuses(client, 2, "/upload", method="POST") == [200, 200]


# --- the page ----------------------------------------------------------------------------------


async def test_the_example_of_the_quart_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w*)\n(.*?)```", PAGE.read_text(), re.S):
        blocks.setdefault(language, []).append(body)
    (tmp_path / "app.py").write_text(blocks["python"][0])
    (tmp_path / "rate-sync.toml").write_text(blocks["toml"][0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "app", raising=False)
    app = importlib.import_module("app").app

    page_test: dict[str, Any] = {"app": app}
    exec(blocks["python"][1], page_test)  # the page's own test, as written
    await page_test["test_the_fourth_wrong_password_is_refused"]()

    async with app.test_app() as served:  # and what the page says around it
        client = served.test_client()
        right = {"password": "s3cret"}
        assert await statuses(client, 5, "/login", method="POST", form=right) == [200] * 5
        item = await client.get("/items/7")
        assert (item.status_code, await item.get_json()) == (200, {"id": 7})
        assert item.headers["RateLimit-Policy"] == '"api";q=100;w=60'
        assert "RateLimit" not in (await client.get("/health")).headers


# --- a real server on a real NATS ------------------------------------------------------------

SERVED_CONFIG = """
[stores.shared]
engine = "nats"
url = "${NATS_URL}"
bucket_name = "${RATESYNC_BUCKET}"

[limiters.api]
store = "shared"
limit = "3/hour"
key = "global"          # one group for every client: the test spends from it too

[limiters.login]
store = "shared"
limit = "2/hour"
count_status = [401]    # only failed logins count

[middleware]
default = "api"
"""


@pytest.mark.nats
def test_under_hypercorn_the_limit_is_shared_through_nats(
    nats_url: str, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "rate-sync.toml"
    config.write_text(SERVED_CONFIG)
    env = {"RATE_SYNC_CONFIG": str(config), "NATS_URL": nats_url, "RATESYNC_BUCKET": bucket_name}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    limiter = RateLimiter(config)  # this process, on the same bucket
    with (
        hypercorn_server("tests.apps.quart_app:app", env, tmp_path / "hypercorn.log") as url,
        httpx.Client(base_url=url, timeout=10.0) as client,
    ):
        assert client.get("/").status_code == 200
        try:
            assert limiter.hit("api").remaining == 1  # the server's request is in the bucket
        finally:
            limiter.close()
        answers = [client.get("/") for _ in range(2)]
        assert [answer.status_code for answer in answers] == [200, 429]
        assert answers[1].headers["Retry-After"]
        assert answers[1].headers["Content-Type"] == "application/problem+json"

        right, wrong = {"X-Password": "s3cret"}, {"X-Password": "guess"}
        logins = [client.post("/login", headers=right).status_code for _ in range(4)]
        logins += [client.post("/login", headers=wrong).status_code for _ in range(3)]
        assert logins == [200] * 4 + [401, 401, 429]
    assert "Traceback" not in (tmp_path / "hypercorn.log").read_text()
