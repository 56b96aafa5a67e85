"""A rate-sync file means what it meant under rate-sync, on the memory store and on NATS.

Each test states one of rate-sync's documented behaviours in its own words (its engine
compliance suite's): pacing at `rate_per_second`, the sliding window's count, `max_concurrent`
with a rate, `reset()` with slots held, and `fail_closed` on a dead store. Waits are asserted on
the wait the limiter computed (`retry_after`, `Decision.wait`), never on wall-clock sleeps.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ratesync_middleware import (
    AsyncRateLimiter,
    ConfigError,
    RateLimiter,
    RateLimitExceeded,
    load_config,
)
from ratesync_middleware.bucket import Policy
from tests.test_asgi_nats import closed_port
from tests.test_cli import ratesync

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def config(store: dict[str, Any], **limiter: Any) -> dict[str, Any]:
    return {"stores": {"s": store}, "limiters": {"api": {"store": "s", **limiter}}}


# -- rate_per_second: one acquisition every 1/rate ----------------------------------------------


def test_rate_per_second_alone_spaces_acquisitions_a_burst_is_ours_to_ask() -> None:
    limiters = load_config(
        {
            "limiters": {
                "paced": {"rate_per_second": 90.0},  # rate-sync's "stay under Stripe's 100/s"
                "bursty": {"rate_per_second": 10.0, "burst": 20},
                "per_minute": {"limit": "600/minute"},
            }
        }
    ).limiters
    assert limiters["paced"].policy == Policy.per_second("paced", 90.0, 1)
    assert limiters["bursty"].policy == Policy.per_second("bursty", 10.0, 20)
    assert limiters["per_minute"].policy == Policy.per_period("per_minute", 600, 60, 600)


async def test_the_second_acquire_at_10_per_second_waits_a_tenth_of_a_second(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(config(store, rate_per_second=10.0)) as limiter:
        started = time.monotonic()
        first = await limiter.hit("api", key="u1")
        second = await limiter.hit("api", key="u1")  # "subsequent acquires respect the rate"
        elapsed = time.monotonic() - started
        assert first.allowed
        assert not second.allowed
        # The wait is what is left of 1/rate after the first acquisition.
        assert 0.1 - elapsed <= second.retry_after <= 0.1
        assert (first.limit, first.remaining) == (1, 0)


async def test_an_acquire_with_a_timeout_waits_its_turn_at_1_over_rate(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(config(store, rate_per_second=10.0, timeout=1.0)) as limiter:
        first = await limiter.acquire("api", key="u1")
        second = await limiter.acquire("api", key="u1")
        assert first.decision.wait == 0
        assert second.decision.allowed
        assert 0 < second.decision.wait <= 0.1
        # Admitted exactly 1/rate after the first (the instants the store admitted them for).
        assert first.decision.receipt is not None
        assert second.decision.receipt is not None
        assert second.decision.receipt - first.decision.receipt == 100_000_000


def paced_config(store: dict[str, Any]) -> dict[str, Any]:
    return {**config(store, rate_per_second=10.0), "middleware": {"default": "api"}}


def test_an_asgi_app_paces_rate_per_second(store: dict[str, Any]) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ratesync_middleware import RateLimitMiddleware

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    middleware = [Middleware(RateLimitMiddleware, config=paced_config(store))]
    app = Starlette(routes=[Route("/", home)], middleware=middleware)
    with TestClient(app) as client:
        first, second = client.get("/"), client.get("/")
    assert (first.status_code, second.status_code) == (200, 429)
    assert first.headers["RateLimit-Policy"] == '"api";q=1;w=1'
    assert second.headers["Retry-After"] == "1"  # 0.1 s, in whole seconds


def test_a_flask_app_paces_rate_per_second(store: dict[str, Any]) -> None:
    from flask import Flask

    from ratesync_middleware.flask import RateLimit

    app = Flask(__name__)
    app.add_url_rule("/", "home", lambda: "ok")
    ratelimit = RateLimit(app, config=paced_config(store))
    client = app.test_client()
    try:
        assert [client.get("/").status_code for _ in range(2)] == [200, 429]
    finally:
        ratelimit.close(app)


# -- the sliding window ---------------------------------------------------------------------------


async def test_the_sliding_window_allows_exactly_limit_requests_in_the_window(
    store: dict[str, Any],
) -> None:
    table = {"algorithm": "sliding_window", "limit": 5, "window_seconds": 300}
    async with AsyncRateLimiter(config(store, **table)) as limiter:
        admitted = [await limiter.hit("api", key="u1") for _ in range(5)]
        assert [d.allowed for d in admitted] == [True] * 5
        assert [d.remaining for d in admitted] == [4, 3, 2, 1, 0]
        sixth = await limiter.hit("api", key="u1")
        assert not sixth.allowed
        assert 299 < sixth.retry_after <= 300  # until the oldest leaves the window
        assert (await limiter.peek("api", key="u1")).remaining == 0
        assert (await limiter.hit("api", key="u2")).allowed  # each identity has its own


def test_rate_per_second_with_limit_and_window_seconds_is_refused_naming_both() -> None:
    table = {"rate_per_second": 10.0, "limit": 5, "window_seconds": 300}
    for extra in ({}, {"algorithm": "sliding_window"}):
        with pytest.raises(ConfigError) as refused:
            load_config({"limiters": {"login": {**table, **extra}}})
        message = str(refused.value)
        assert "token_bucket (from rate_per_second)" in message
        assert "sliding_window (from limit + window_seconds)" in message
        assert (refused.value.table, refused.value.key) == ("[limiters.login]", "rate_per_second")


# -- max_concurrent with a rate -------------------------------------------------------------------


async def test_rate_plus_concurrency_both_enforced(store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(config(store, rate_per_second=10.0, max_concurrent=1)) as limiter:
        held = await limiter.acquire("api", key="u1")
        with pytest.raises(RateLimitExceeded) as by_concurrency:  # "concurrency limit blocks"
            await limiter.acquire("api", key="u1", timeout=0)
        assert by_concurrency.value.decision.policy == "api:concurrent"
        await held.release()
        with pytest.raises(RateLimitExceeded) as by_rate:  # "now blocked by the rate limit"
            await limiter.acquire("api", key="u1", timeout=0)
        assert by_rate.value.decision.policy == "api"
        assert 0 < by_rate.value.decision.retry_after <= 0.1
        waited = await limiter.acquire("api", key="u1", timeout=1.0)
        assert 0 < waited.decision.wait <= 0.1
        await waited.release()


# -- reset() frees the slots too ------------------------------------------------------------------


async def test_reset_frees_the_slots_held_and_a_late_release_frees_nothing(
    store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(config(store, max_concurrent=2, rate_per_second=100.0)) as limiter:
        old = [await limiter.acquire("api", key="u1", timeout=0.5) for _ in range(2)]
        with pytest.raises(RateLimitExceeded):
            await limiter.acquire("api", key="u1", timeout=0)
        await limiter.reset("api", key="u1")
        new = [await limiter.acquire("api", key="u1", timeout=0.5) for _ in range(2)]
        for permit in old:
            await permit.release()  # freed by the reset already: harmless, gives nothing back
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.acquire("api", key="u1", timeout=0.5)
        assert refused.value.decision.policy == "api:concurrent"  # still two in flight
        await new[0].release()
        after = await limiter.acquire("api", key="u1", timeout=0.5)
        assert after.decision.allowed
        await after.release()
        await new[1].release()


async def test_a_waiting_acquire_gets_a_slot_that_a_reset_frees(store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(config(store, max_concurrent=1)) as limiter:
        held = await limiter.acquire("api", key="u1")
        waiting = asyncio.ensure_future(limiter.acquire("api", key="u1", timeout=10.0))
        await asyncio.sleep(0.05)  # let it find the group full (and wait)
        await limiter.reset("api", key="u1")
        permit = await waiting
        assert permit.decision.allowed
        await held.release()
        with pytest.raises(RateLimitExceeded):  # the waiter's slot is still taken
            await limiter.acquire("api", key="u1", timeout=0)
        await permit.release()


@pytest.mark.nats
async def test_a_reset_by_another_process_frees_this_ones_slots(nats_store: dict[str, Any]) -> None:
    shared = config({**nats_store, "timeout": 2.0}, max_concurrent=1)
    async with AsyncRateLimiter(shared) as here, AsyncRateLimiter(shared) as there:
        held = await here.acquire("api", key="u1")
        with pytest.raises(RateLimitExceeded):
            await there.acquire("api", key="u1", timeout=0)
        await there.reset("api", key="u1")
        theirs = await there.acquire("api", key="u1", timeout=0)
        await held.release()  # freed by the reset: it must not free the slot taken since
        for limiter in (here, there):
            with pytest.raises(RateLimitExceeded):
                await limiter.acquire("api", key="u1", timeout=0)
        await theirs.release()
        mine = await here.acquire("api", key="u1", timeout=2.0)
        await mine.release()


def test_the_synchronous_reset_frees_slots_too() -> None:
    with RateLimiter({"limiters": {"upload": {"max_concurrent": 1}}}) as limiter:
        held = limiter.acquire("upload", key="kim")
        limiter.reset("upload", key="kim")
        with limiter.acquire("upload", key="kim", timeout=0):
            held.release()
            with pytest.raises(RateLimitExceeded):
                limiter.acquire("upload", key="kim", timeout=0)


@pytest.mark.nats
def test_ratesync_reset_frees_the_slots_of_a_group(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f'[stores.prod]\nengine = "nats"\nurl = "{nats_url}"\nbucket_name = "{bucket_name}"\n'
        '[limiters.upload]\nstore = "prod"\nmax_concurrent = 1\nkey = "user"\n'
    )

    async def run() -> None:
        async with AsyncRateLimiter(str(path)) as limiter:
            held = await limiter.acquire("upload", key="kim")
            command = ("reset", "upload", "--key", "kim", "--config", path)
            status, output = await asyncio.to_thread(ratesync, *command)
            assert status == 0, output
            permit = await limiter.acquire("upload", key="kim", timeout=2.0)
            await held.release()
            with pytest.raises(RateLimitExceeded):
                await limiter.acquire("upload", key="kim", timeout=0)
            await permit.release()

    asyncio.run(run())


# -- fail_closed on a dead store ------------------------------------------------------------------


@pytest.mark.parametrize("fail_closed", [True, False])
async def test_fail_closed_blocks_and_fail_open_admits_when_the_store_is_down(
    fail_closed: bool,
) -> None:
    dead = {"engine": "nats", "url": f"nats://127.0.0.1:{closed_port()}", "connect_timeout": 0.3}
    table = {"rate_per_second": 10.0, "max_concurrent": 1, "fail_closed": fail_closed}
    async with AsyncRateLimiter(config(dead, **table)) as limiter:
        decision = await limiter.hit("api", key="u1")
        assert decision.degraded
        assert decision.allowed is not fail_closed
        if fail_closed:
            with pytest.raises(RateLimitExceeded) as refused:
                await limiter.acquire("api", key="u1")
            assert refused.value.decision.degraded
        else:
            permit = await limiter.acquire("api", key="u1")
            assert permit.decision.degraded
            await permit.release()  # holds nothing: a release is harmless


# -- every rate-sync file we show still loads -----------------------------------------------------


def is_array_of_tables(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def shown_files() -> list[Any]:
    """Each whole TOML file in the README, the docs and the examples (not the fragments of a
    table that some pages show as lines of keys)."""
    files = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    for page in pages:
        for number, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
            tables = tomllib.loads(block).values()
            if all(isinstance(value, dict) or is_array_of_tables(value) for value in tables):
                files.append(pytest.param(block, id=f"{page.relative_to(ROOT)}:{number}"))
    for example in sorted((ROOT / "examples").glob("**/*.toml")):
        files.append(pytest.param(example.read_text(), id=str(example.relative_to(ROOT))))
    return files


@pytest.mark.parametrize("text", shown_files())
def test_every_toml_file_shown_loads(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
        monkeypatch.setenv(variable, "secret")  # a ${VAR} without default must be set
    path = tmp_path / "rate-sync.toml"
    path.write_text(text)
    assert load_config(str(path)).source == str(path)
