"""Tiers (issue 14, item 6) through real apps: `tier = "pkg.mod:func"` names the request's tier,
`[limiters.X.tiers]` gives each tier its rate; no tier (or one the table does not have) is the
limiter's own rate. A group's state under each tier is its own, so an upgraded user gets the new
rate on the very next request. Memory and NATS stores; Starlette, Flask, WSGI, Django.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from ratesync_middleware import (
    AsyncRateLimiter,
    ConfigError,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    load_config,
)
from ratesync_middleware.stores.nats import NatsStore
from tests import request_functions
from tests.test_django import (  # noqa: F401  (the Django sites, and their settings)
    SITES,
    Site,
    django_project,
    for_the_project,
    with_config,
)
from tests.test_policies import APPS, Get, _serving, remaining

FREE_POLICY = '"search:free";q=2;w=60'
PRO_POLICY = '"search:pro:5/minute";q=5;w=60, "search:pro:100/hour";q=100;w=3600'


def tiered(store: dict[str, Any] | None = None, **search: Any) -> dict[str, Any]:
    """`search`, keyed by user: 1/minute without a tier, free 2/minute, pro 5/minute + 100/hour."""
    settings: dict[str, Any] = {
        "limiters": {
            "search": {
                "limit": "1/minute",
                "key": "header:X-User",
                "tier": "tests.request_functions:account_tier",
                "tiers": {"free": "2/minute", "pro": ["5/minute", "100/hour"]},
                **search,
            },
            "api": {"limit": "100/minute"},  # what the apps' decorated views name
        },
        "middleware": {"default": "search"},
    }
    if store is not None:
        settings["stores"] = {"default": store}
    return settings


@pytest.fixture(autouse=True)
def accounts() -> Iterator[dict[str, str]]:
    """The app's users and their plans: alice is on free, bob on pro, carol has no plan."""
    request_functions.ACCOUNTS.clear()
    request_functions.ACCOUNTS.update({"alice": "free", "bob": "pro"})
    yield request_functions.ACCOUNTS
    request_functions.ACCOUNTS.clear()


@pytest.fixture(params=sorted(APPS))
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Any]], Get]]:
    """serve(config) -> get: the adapter's app under this configuration."""
    yield from _serving(request.param)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def as_user(get: Get, user: str, count: int) -> list[int]:
    return [get("/", headers={"X-User": user})[0] for _ in range(count)]


# --- every adapter, memory store -------------------------------------------------------------


def test_a_free_user_is_refused_after_their_tiers_rate_while_a_pro_user_continues(
    serve: Callable[..., Get],
) -> None:
    get = serve(tiered())
    assert as_user(get, "alice", 3) == [200, 200, 429]
    assert as_user(get, "bob", 5) == [200] * 5
    assert as_user(get, "bob", 1) == [429]


def test_a_tier_is_refunded_what_its_responses_do_not_count(serve: Callable[..., Get]) -> None:
    # count_status = [429]: the apps' 200s are refunded, to the tier's own state they spent.
    get = serve(tiered(count_status=[429]))
    assert as_user(get, "alice", 6) == [200] * 6  # free is 2/minute: every one given back
    status, headers = get("/", headers={"X-User": "alice"})
    assert (status, lower(headers)["ratelimit-policy"]) == (200, FREE_POLICY)
    assert remaining(headers) == 1


def test_the_headers_report_the_tiers_policy(serve: Callable[..., Get]) -> None:
    get = serve(tiered())
    status, free = get("/", headers={"X-User": "alice"})
    assert (status, lower(free)["ratelimit-policy"]) == (200, FREE_POLICY)
    assert remaining(free) == 1
    status, pro = get("/", headers={"X-User": "bob"})
    assert (status, lower(pro)["ratelimit-policy"]) == (200, PRO_POLICY)
    assert lower(pro)["ratelimit"].startswith('"search:pro:5/minute";r=4;')
    assert as_user(get, "alice", 1) == [200]
    status, refused = get("/", headers={"X-User": "alice"})
    assert status == 429
    assert lower(refused)["ratelimit-policy"] == FREE_POLICY


def test_an_upgraded_user_gets_the_new_rate_on_the_next_request(
    serve: Callable[..., Get], accounts: dict[str, str]
) -> None:
    get = serve(tiered())
    assert as_user(get, "alice", 3) == [200, 200, 429]
    accounts["alice"] = "pro"  # she paid
    status, headers = get("/", headers={"X-User": "alice"})
    assert status == 200
    assert lower(headers)["ratelimit-policy"] == PRO_POLICY
    assert as_user(get, "alice", 5) == [200] * 4 + [429]
    accounts["alice"] = "free"  # and stopped paying: free's state is where she left it
    assert as_user(get, "alice", 1) == [429]


def test_no_tier_and_an_unknown_tier_use_the_limiters_own_rate(
    serve: Callable[..., Get], accounts: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    get = serve(tiered())
    status, headers = get("/", headers={"X-User": "carol"})  # no plan: None
    assert (status, lower(headers)["ratelimit-policy"]) == (200, '"search";q=1;w=60')
    assert as_user(get, "carol", 1) == [429]
    accounts["dave"] = "gold"  # a plan the limiter has no tier for
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        assert as_user(get, "dave", 3) == [200, 429, 429]
    [warning] = [r for r in caplog.records if "no tier" in r.getMessage()]  # once per name
    assert warning.getMessage() == (
        "limiter 'search' has no tier 'gold' (tiers: free, pro): its own rate applies"
    )


def test_a_tier_function_returning_junk_is_answered_by_the_fail_rule(
    serve: Callable[..., Get], caplog: pytest.LogCaptureFixture
) -> None:
    get = serve(tiered(tier="tests.request_functions:numbered_tier"))
    with caplog.at_level(logging.ERROR, logger="ratesync_middleware"):
        assert as_user(get, "alice", 3) == [200] * 3  # fail-open by default
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "tier function 'tests.request_functions:numbered_tier' returned int 2" in (
        error.getMessage()
    )
    closed = serve(tiered(tier="tests.request_functions:broken", fail_closed=True))
    status, headers = closed("/", headers={"X-User": "alice"})
    assert (status, lower(headers)["retry-after"]) == (503, "1")


def test_sliding_window_tiers_are_sliding_windows() -> None:
    settings = tiered(algorithm="sliding_window", limit=1, window_seconds=60)
    settings["limiters"]["search"]["tiers"] = {"free": "2/minute", "pro": "5/hour"}
    get = next(_serving("starlette"))(settings)
    assert as_user(get, "alice", 3) == [200, 200, 429]
    status, headers = get("/", headers={"X-User": "bob"})
    assert (status, lower(headers)["ratelimit-policy"]) == (200, '"search:pro";q=5;w=3600')


# --- Django, sync and async views ------------------------------------------------------------


@pytest.fixture(params=list(SITES))
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    served = SITES[request.param]()
    yield served
    served.close()


def test_django_tiers_free_pro_and_an_upgrade(site: Site, accounts: dict[str, str]) -> None:
    from django.test import override_settings

    with override_settings(RATESYNC=with_config(**tiered())):
        alice = [site.get("/", headers={"X-User": "alice"}) for _ in range(3)]
        assert [response.status_code for response in alice] == [200, 200, 429]
        assert alice[0].headers["RateLimit-Policy"] == FREE_POLICY
        assert site.statuses(5, "/async", headers={"X-User": "bob"}) == [200] * 5
        accounts["alice"] = "pro"
        upgraded = site.get("/async", headers={"X-User": "alice"})
        assert upgraded.status_code == 200
        assert upgraded.headers["RateLimit-Policy"] == PRO_POLICY


# --- the framework-free API ------------------------------------------------------------------


async def test_hit_takes_a_tier_and_reset_refills_every_tier() -> None:
    async with AsyncRateLimiter(tiered()) as limiter:
        assert [(await limiter.hit("search", "u1", tier="free")).allowed for _ in range(3)] == [
            True,
            True,
            False,
        ]
        assert (await limiter.hit("search", "u1")).allowed  # its own rate: its own state
        assert (await limiter.peek("search", "u1", tier="free")).remaining == 0
        await limiter.reset("search", "u1")
        assert (await limiter.peek("search", "u1", tier="free")).remaining == 2
        assert (await limiter.peek("search", "u1")).remaining == 1


async def test_acquire_takes_a_tier_and_its_permit_settles_the_tiers_state() -> None:
    async with AsyncRateLimiter(tiered()) as limiter:
        permit = await limiter.acquire("search", "u1", cost=2, tier="free")  # all of free
        with pytest.raises(RateLimitExceeded):
            await limiter.acquire("search", "u1", tier="free")
        assert (await limiter.peek("search", "u1")).remaining == 1  # its own rate: untouched
        await permit.settle(1)  # one of the two refunded, to free's state
        assert (await limiter.peek("search", "u1", tier="free")).remaining == 1


def test_the_sync_limiter_takes_a_tier_too() -> None:
    with RateLimiter(tiered()) as limiter:
        assert [limiter.hit("search", "u1", tier="free").allowed for _ in range(3)] == [
            True,
            True,
            False,
        ]
        with limiter.acquire("search", "u2", tier="pro") as permit:
            assert permit.decision.policy.startswith("search:pro")
        assert limiter.peek("search", "u2", tier="pro").remaining == 4


# --- the configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            {"tiers": {"pro": "5/fortnight"}},
            '<dict>: [limiters.search.tiers] pro: expected "N/second", "N/minute", "N/hour" or'
            " \"N/day\", or a list of them, got '5/fortnight' (str)",
        ),
        (
            {"tiers": {"pro": 5}},
            '[limiters.search.tiers] pro: expected "N/second", "N/minute", "N/hour" or'
            ' "N/day", or a list of them, got 5 (int)',
        ),
        ({"tiers": {"pro": ["5/minute", "5/minute"]}}, "pro: the same rate is listed twice"),
        ({"tiers": "pro"}, "[limiters.search] tiers: expected a table of tier names to rates"),
        ({"tiers": {"p.ro": "1/second"}}, "tier names may only use letters, digits"),
        ({"tier": "no colon"}, '[limiters.search] tier: expected "package.module:function"'),
        ({"tiers": None}, "[limiters.search] tiers: tier needs a [limiters.search.tiers] table"),
        ({"tier": None}, '[limiters.search] tier: missing: tiers need tier = "package.module'),
        (
            {
                "algorithm": "sliding_window",
                "limit": 1,
                "window_seconds": 60,
                "tiers": {"pro": ["1/second", "9/minute"]},
            },
            "[limiters.search.tiers] pro: a sliding window's tier takes one rate, not a list",
        ),
        (
            {"limit": None, "max_concurrent": 3},
            "tiers: tiers need the limiter's own rate too (for requests without a tier)",
        ),
    ],
)
def test_bad_tiers_are_config_errors(search: dict[str, Any], expected: str) -> None:
    settings = tiered(**search)
    table = settings["limiters"]["search"]
    for key in [key for key, value in table.items() if value is None]:
        del table[key]
    with pytest.raises(ConfigError) as raised:
        load_config(settings)
    assert expected in str(raised.value)


def test_a_tier_function_is_imported_at_start_up() -> None:
    app = Starlette(
        routes=[],
        middleware=[
            Middleware(RateLimitMiddleware, config=tiered(tier="tests.request_functions:nope"))
        ],
    )
    with (
        pytest.raises(ConfigError, match=r"\[limiters.search\] tier: cannot import"),
        TestClient(app),
    ):
        pass


def test_a_tiers_window_is_what_a_nats_bucket_must_keep() -> None:
    from ratesync_middleware.stores import limiter_windows_ns

    settings = tiered({"engine": "nats", "url": "nats://localhost:4222"})
    settings["limiters"]["search"]["tiers"]["pro"] = ["5/second", "1000/day"]
    windows = limiter_windows_ns(load_config(settings), "default")
    assert windows["search"] == 86400 * 10**9  # its own rate refills in a minute


# --- NATS ------------------------------------------------------------------------------------


@pytest.mark.nats
def test_tiers_on_nats_free_pro_and_an_upgrade(
    nats_store: dict[str, Any], accounts: dict[str, str]
) -> None:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    settings = tiered({**nats_store, "timeout": 5.0})
    app = Starlette(
        routes=[Route("/", hello)], middleware=[Middleware(RateLimitMiddleware, config=settings)]
    )
    with TestClient(app) as client:

        def get(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
            response = client.get(path, headers=headers)
            return response.status_code, dict(response.headers)

        assert as_user(get, "alice", 3) == [200, 200, 429]
        assert as_user(get, "bob", 6) == [200] * 5 + [429]
        accounts["alice"] = "pro"
        status, headers = get("/", headers={"X-User": "alice"})
        assert (status, lower(headers)["ratelimit-policy"]) == (200, PRO_POLICY)


@pytest.mark.nats
async def test_a_lease_taken_under_one_tier_is_never_spent_under_another(
    nats_store: dict[str, Any],
) -> None:
    settings = {
        "stores": {"prod": {**nats_store, "timeout": 5.0}},
        "limiters": {
            "api": {
                "store": "prod",
                "key": "global",
                "limit": "3/day",
                "tier": "tests.request_functions:account_tier",
                "tiers": {"pro": "1000000/day", "free": "5/day"},
            }
        },
    }
    async with AsyncRateLimiter(settings) as limiter:

        async def pro_worker() -> None:
            for _ in range(1000):
                assert (await limiter.hit("api", tier="pro")).allowed

        store = limiter.store("prod")
        assert isinstance(store, NatsStore)
        await limiter.hit("api", tier="pro")  # connected
        assert store._nc is not None
        before = store._nc.stats["out_msgs"]
        await asyncio.gather(*(pro_worker() for _ in range(8)))  # hot: pro's key is leased
        writes = store._nc.stats["out_msgs"] - before
        assert writes < 0.1 * 8000, writes  # batches of 8 alone would be 1,000 writes
        assert store._cache["api.=tier-pro"].lease is not None
        free = await asyncio.gather(*(limiter.hit("api", tier="free") for _ in range(8)))
        assert [decision.allowed for decision in free] == [True] * 5 + [False] * 3
        assert {decision.policy for decision in free} == {"api:free"}
        own = [await limiter.hit("api") for _ in range(4)]
        assert [decision.allowed for decision in own] == [True] * 3 + [False]
        assert store._cache["api.=tier-free"].lease is None


@pytest.mark.nats
def test_ratesync_get_and_reset_cover_the_group_under_every_tier(
    nats_store: dict[str, Any], tmp_path: Path
) -> None:
    from tests.test_cli import ratesync

    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{nats_store["url"]}"
bucket_name = "{nats_store["bucket_name"]}"

[limiters.search]
store = "prod"
limit = "1/minute"
key = "header:X-User"
tier = "tests.request_functions:account_tier"
tiers = {{ free = "2/minute", pro = "5/minute" }}
"""
    )

    async def spend() -> None:
        async with AsyncRateLimiter(str(path)) as limiter:
            for _ in range(2):
                await limiter.hit("search", "alice", tier="free")

    asyncio.run(spend())
    status, output = ratesync("get", "search", "--key", "alice", "--config", path)
    assert status == 0, output
    assert "search.alice.=tier-free" in output
    assert "available    0 of 2" in output
    reset = ratesync("reset", "search", "--key", "alice", "--config", path)
    assert reset[0] == 0
    assert "search header:X-User=alice (tier free): reset" in reset[1]

    async def free_left() -> int:
        async with AsyncRateLimiter(str(path)) as limiter:
            return (await limiter.peek("search", "alice", tier="free")).remaining

    assert asyncio.run(free_left()) == 2


@pytest.mark.nats
@pytest.mark.parametrize("served", ["client", "asgi"])
def test_django_tiers_on_nats(
    nats_store: dict[str, Any], accounts: dict[str, str], served: str
) -> None:
    from django.test import override_settings

    site = SITES[served]()
    try:
        with override_settings(RATESYNC=for_the_project(tiered({**nats_store, "timeout": 5.0}))):
            assert site.statuses(3, headers={"X-User": "alice"}) == [200, 200, 429]
            accounts["alice"] = "pro"
            upgraded = site.get("/async", headers={"X-User": "alice"})
            assert upgraded.status_code == 200
            assert upgraded.headers["RateLimit-Policy"] == PRO_POLICY
    finally:
        site.close()


def test_django_checks_report_a_tier_function_that_cannot_be_imported() -> None:
    from django.core import checks
    from django.test import override_settings

    broken = with_config(**tiered(tier="tests.request_functions:no_such_plan"))
    with override_settings(RATESYNC=broken):
        errors = [m for m in checks.run_checks(tags=["ratesync"]) if m.id == "ratesync.E011"]
    [error] = errors
    assert "[limiters.search] tier: cannot import 'tests.request_functions:no_such_plan'" in (
        error.msg
    )


def test_websocket_messages_spend_from_the_senders_tier() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):  # the client left, or was closed on
            while True:
                await websocket.send_text(await websocket.receive_text())

    settings = tiered()
    settings["middleware"] = {}  # the handshake is not limited: only the messages
    settings["routes"] = [{"path": "/ws", "messages": ["search"]}]
    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(RateLimitMiddleware, config=settings)],
    )

    def sent_until_closed(client: TestClient, user: str) -> int:
        """How many messages were echoed before the socket was closed with 1008."""
        with client.websocket_connect("/ws", headers={"X-User": user}) as socket:
            for echoed in range(10):
                socket.send_text("hi")
                message = socket.receive()
                if message["type"] == "websocket.close":
                    assert message["code"] == 1008
                    return echoed
        return 10

    with TestClient(app) as client:
        assert sent_until_closed(client, "alice") == 2  # free: 2/minute
        assert sent_until_closed(client, "bob") == 5  # pro: 5/minute (and 100/hour)
        assert sent_until_closed(client, "carol") == 1  # no plan: the limiter's 1/minute
