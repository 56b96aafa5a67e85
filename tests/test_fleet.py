"""The fleet's control plane on real servers: what one process resets, every process sees.

Each test runs two limiters on one bucket, as two processes of a fleet would (each has its own
connection and its own cache); tests/test_fleet_processes.py does it with real app processes. A frozen clock keeps the cached denials' one-second re-check
from firing, so a process can only learn of a reset through the control plane.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import AsyncRateLimiter, Decision, RateLimiter, RateLimitMiddleware
from ratesync_middleware.config import load_config
from ratesync_middleware.errors import ConfigError
from tests.conftest import start_server
from tests.tcpproxy import TcpProxy
from tests.test_cli import ratesync, write_config

pytestmark = pytest.mark.nats

_PATIENCE = 10.0  # seconds a test waits for something that should take milliseconds


class FrozenClock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now_ns = time.time_ns()

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


def fleet_config(url: str, bucket: str) -> dict[str, Any]:
    return {
        "stores": {"prod": {"engine": "nats", "url": url, "bucket_name": bucket}},
        "limiters": {"login": {"store": "prod", "limit": "2/hour"}},
    }


async def exhaust(limiter: AsyncRateLimiter, key: str) -> None:
    """Spend the group's whole burst, so that its next request is refused from the cache."""
    while (await limiter.hit("login", key=key)).allowed:
        pass
    assert not (await limiter.hit("login", key=key)).allowed


def admitted(decision: Decision) -> bool:
    return decision.allowed and not decision.degraded


def refused(decision: Decision) -> bool:
    return not decision.allowed


async def eventually(
    hit: Callable[[], Any], wanted: Callable[[Decision], bool] = admitted
) -> Decision:
    """Hit until a decision is `wanted` (a real admission); fails after `_PATIENCE` seconds."""
    deadline = time.monotonic() + _PATIENCE
    while True:
        decision: Decision = await hit()
        if wanted(decision):
            return decision
        assert time.monotonic() < deadline, f"still: {decision}"
        await asyncio.sleep(0.01)


async def test_a_reset_reaches_another_process_that_cached_the_denial(
    nats_url: str, bucket_name: str
) -> None:
    config = fleet_config(nats_url, bucket_name)
    clock = FrozenClock()
    async with AsyncRateLimiter(config, clock=clock) as a, AsyncRateLimiter(config) as b:
        await exhaust(a, "kim")
        await b.reset("login", key="kim")
        await eventually(lambda: a.hit("login", key="kim"))


async def test_a_plain_kv_delete_is_seen_once_the_cached_denial_is_a_second_old(
    nats_url: str, bucket_name: str
) -> None:
    clock = FrozenClock()
    async with AsyncRateLimiter(fleet_config(nats_url, bucket_name), clock=clock) as limiter:
        await exhaust(limiter, "kim")
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bucket_name)
            await kv.delete("login.kim")  # what `nats kv del` does: no control message
        finally:
            await nc.close()
        # Within the second, the cache still proves the bucket empty: no round trip.
        assert not (await limiter.hit("login", key="kim")).allowed
        clock.advance(1.0)  # (2/hour: a second refills nothing)
        decision = await limiter.hit("login", key="kim")
    assert decision.allowed
    assert not decision.degraded


async def test_a_process_disconnected_during_a_reset_reads_again_on_reconnect(
    nats_url: str, nats_server: Any, bucket_name: str
) -> None:
    proxy = TcpProxy(nats_server.port).start()
    behind_proxy = fleet_config(proxy.url, bucket_name)
    clock = FrozenClock()
    try:
        async with AsyncRateLimiter(behind_proxy, clock=clock) as a:
            await exhaust(a, "kim")
            proxy.stop()  # a's connection drops; nats-py keeps trying to reconnect
            async with AsyncRateLimiter(fleet_config(nats_url, bucket_name)) as b:
                await b.reset("login", key="kim")  # a cannot hear this
            proxy = TcpProxy(nats_server.port, port=proxy.port).start()
            await eventually(lambda: a.hit("login", key="kim"))
    finally:
        proxy.stop()


async def test_a_ban_and_an_unban_reach_another_process(nats_url: str, bucket_name: str) -> None:
    config = fleet_config(nats_url, bucket_name)
    async with AsyncRateLimiter(config) as app, AsyncRateLimiter(config) as operator:
        assert (await app.hit("login", key="kim")).allowed
        await operator.ban("login", key="kim", ttl=600.0)
        banned = await eventually(lambda: app.hit("login", key="kim"), refused)
        assert banned.reason == "banned"
        assert 590 < banned.retry_after <= 600
        assert (await app.hit("login", key="someone-else")).allowed
        await operator.unban("login", key="kim")
        # (a hit admitted before the ban arrived may have spent the group: 2/hour)
        await eventually(lambda: app.hit("login", key="kim"), lambda d: d.reason != "banned")


async def test_a_process_started_later_loads_the_bans_in_force(
    nats_url: str, bucket_name: str
) -> None:
    config = fleet_config(nats_url, bucket_name)
    async with AsyncRateLimiter(config) as operator:
        await operator.ban("login", key="kim")
    async with AsyncRateLimiter(config) as app:
        banned = await eventually(lambda: app.hit("login", key="kim"), refused)
    assert banned.retry_after == float("inf")  # no ttl: until unbanned


async def test_an_override_admits_an_exhausted_group_at_once_and_ends_with_its_ttl(
    nats_url: str, bucket_name: str
) -> None:
    config = fleet_config(nats_url, bucket_name)
    clock = FrozenClock()
    async with AsyncRateLimiter(config, clock=clock) as app, AsyncRateLimiter(config) as op:
        await exhaust(app, "kim")
        await op.override("login", key="kim", limit="100/second", burst=50, ttl=30.0)
        decision = await eventually(lambda: app.hit("login", key="kim"))
        assert (decision.limit, decision.policy) == (50, "login:100/second:burst=50")
        clock.advance(31.0)  # the override's ttl has passed: the TOML rule again, still spent
        assert not (await app.hit("login", key="kim")).allowed


async def test_overrides_and_bans_on_a_memory_store() -> None:
    async with AsyncRateLimiter({"limiters": {"login": {"limit": "1/hour"}}}) as limiter:
        assert (await limiter.hit("login", key="kim")).allowed
        assert not (await limiter.hit("login", key="kim")).allowed
        await limiter.override("login", key="kim", limit="5/minute")
        assert (await limiter.hit("login", key="kim")).remaining == 4
        await limiter.override("login", key="kim", limit=None)
        assert not (await limiter.hit("login", key="kim")).allowed
        await limiter.ban("login", key="ann", ttl=60.0)
        assert (await limiter.hit("login", key="ann")).reason == "banned"
        with pytest.raises(ValueError, match="limit must be"):
            await limiter.override("login", key="kim", limit="fast")


def poll(client: TestClient, status: int) -> Any:
    """GET / until it answers `status`; fails after `_PATIENCE` seconds."""
    deadline = time.monotonic() + _PATIENCE
    while (response := client.get("/")).status_code != status:
        assert time.monotonic() < deadline, f"still {response.status_code}, not {status}"
        time.sleep(0.01)
    return response


def test_a_banned_client_gets_a_403_problem_and_an_override_its_own_headers(
    nats_url: str, bucket_name: str
) -> None:
    config = {**fleet_config(nats_url, bucket_name), "middleware": {"default": "login"}}
    app = Starlette(
        routes=[Route("/", lambda request: PlainTextResponse("ok"))],
        middleware=[Middleware(RateLimitMiddleware, config=config)],
    )
    operator = RateLimiter(config)
    operator.unban("login", key="nobody")  # the rules bucket exists: the app watches it at once
    with TestClient(app) as client, operator:
        assert client.get("/").status_code == 200
        operator.ban("login", key="testclient", ttl=120.0)
        banned = poll(client, 403)
        assert banned.headers["content-type"] == "application/problem+json"
        assert banned.json()["type"].endswith("banned")
        assert banned.json()["status"] == 403
        assert 110 <= int(banned.headers["retry-after"]) <= 120
        operator.unban("login", key="testclient")
        poll(client, 200)
        poll(client, 429)  # 2/hour spent
        operator.override("login", key="testclient", limit="10/second")
        response = poll(client, 200)
    assert response.headers["ratelimit-policy"] == '"login:10/second";q=10;w=1'
    assert response.headers["ratelimit"].startswith('"login:10/second";r=9;')


def test_flask_answers_a_ban_with_its_403_and_retry_after(nats_url: str, bucket_name: str) -> None:
    from flask import Flask

    from ratesync_middleware.flask import RateLimit

    config = {**fleet_config(nats_url, bucket_name), "middleware": {"default": "login"}}
    app = Flask(__name__)
    app.add_url_rule("/", "index", lambda: "ok")
    RateLimit(app, config=config)
    client = app.test_client()
    with RateLimiter(config) as operator:
        operator.ban("login", key="127.0.0.1", ttl=30.0)
        deadline = time.monotonic() + _PATIENCE
        while (response := client.get("/")).status_code != 403:
            assert time.monotonic() < deadline, response.status_code
            time.sleep(0.01)
    assert response.json is not None
    assert response.json["type"].endswith("banned")
    assert 20 <= int(response.headers["Retry-After"]) <= 30


async def test_each_process_counts_its_live_peers(nats_url: str, bucket_name: str) -> None:
    config = fleet_config(nats_url, bucket_name)
    async with AsyncRateLimiter(config) as a:
        store: Any = a.store("prod")
        await store.ready()
        async with AsyncRateLimiter(config) as b:
            await b.store("prod").ready()  # type: ignore[attr-defined]
            deadline = time.monotonic() + _PATIENCE
            while store.live_processes() != 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        deadline = time.monotonic() + _PATIENCE
        while store.live_processes() != 1:  # b said goodbye as it closed
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


# -- fail_mode = "local" ----------------------------------------------------------------------


def test_fail_mode_takes_open_closed_local_and_fail_closed_stays_its_alias() -> None:
    def limiter(**options: object) -> Any:
        return load_config({"limiters": {"api": {"limit": "1/second", **options}}}).limiters["api"]

    assert limiter().fail_mode == "open"
    assert limiter(fail_mode="local").fail_mode == "local"
    assert limiter(fail_closed=True).fail_mode == "closed"
    assert limiter(fail_mode="closed").fail_closed is True
    with pytest.raises(ConfigError, match="contradicts"):
        limiter(fail_mode="local", fail_closed=True)
    with pytest.raises(ConfigError, match="fail_mode"):
        limiter(fail_mode="sometimes")


# -- the permissions docs/setup/nats-setup.md lists ------------------------------------------------


def test_an_app_user_with_the_documented_permissions_gets_the_whole_control_plane(
    bucket_name: str, tmp_path: Path
) -> None:
    b = bucket_name
    app_publish = [
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.>",
        "$JS.API.DIRECT.GET.>",
        f"$KV.{b}.>",
        "_INBOX.>",
        f"$JS.API.CONSUMER.CREATE.KV_{b}_rules",
        f"$JS.API.CONSUMER.CREATE.KV_{b}_rules.>",
        f"$JS.API.CONSUMER.INFO.KV_{b}_rules.>",
        "$JS.FC.>",
        f"ratesync.{b}.>",
    ]
    subscribe = ["_INBOX.>", f"ratesync.{b}.>"]
    server = start_server(
        jetstream=False,
        config=f"""
        jetstream {{ store_dir: "{{store_dir}}" }}
        authorization {{
          users = [
            {{ user: admin, password: "adm1n-pw" }}
            {{ user: app, password: "app-pw", permissions: {{
                publish: {{ allow: {json.dumps(app_publish)} }},
                subscribe: {{ allow: {json.dumps(subscribe)} }} }} }}
          ]
        }}
        """,
        login="admin:adm1n-pw",
    )
    try:
        admin = fleet_config(server.url.replace("://", "://admin:adm1n-pw@"), b)
        app = fleet_config(server.url.replace("://", "://app:app-pw@"), b)
        app["stores"]["prod"]["auto_create"] = False

        async def run() -> None:
            async with AsyncRateLimiter(admin) as operator:
                await operator.ban("login", key="someone")  # creates both buckets
                async with AsyncRateLimiter(app) as process:
                    await exhaust(process, "kim")
                    await operator.reset("login", key="kim")
                    await eventually(lambda: process.hit("login", key="kim"))
                    await operator.ban("login", key="kim", ttl=60.0)
                    await eventually(lambda: process.hit("login", key="kim"), refused)
                    assert (await process.hit("login", key="someone")).reason == "banned"
                    store: Any = process.store("prod")
                    deadline = time.monotonic() + _PATIENCE
                    while store.live_processes() != 2:  # presence: heard each other
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)

        asyncio.run(run())
        url = server.url.replace("://", "://app:app-pw@")
        config = write_config(tmp_path, url, b, auto_create=False)
        status, output = ratesync("check", "--config", config)
        assert "ok    control subject" in output
        assert "ok    rules bucket" in output
        assert status == 0, output
    finally:
        server.cleanup()


# -- events and `ratesync top` ----------------------------------------------------------------------


async def test_denials_are_summed_once_a_second_and_bans_are_events(
    nats_url: str, bucket_name: str
) -> None:
    events: list[dict[str, Any]] = []
    nc = await nats.connect(nats_url)

    async def record(message: Any) -> None:
        events.append(json.loads(message.data))

    await nc.subscribe(f"ratesync.{bucket_name}.events", cb=record)
    try:
        async with AsyncRateLimiter(fleet_config(nats_url, bucket_name)) as limiter:
            await exhaust(limiter, "kim")  # one denial
            started = time.monotonic()
            for _ in range(99):
                assert not (await limiter.hit("login", key="kim")).allowed
            await limiter.ban("login", key="ann", ttl=30.0)
            deadline = time.monotonic() + _PATIENCE
            while sum(e.get("count", 0) for e in events) < 100:
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - started
    finally:
        await nc.close()
    summaries = [e for e in events if e["type"] == "denied"]
    assert {(e["limiter"], e["group"]) for e in summaries} == {("login", "login.kim")}
    assert len(summaries) <= seconds + 1  # at most one per group per second
    assert summaries[0]["pid"] == os.getpid()
    (ban,) = [e for e in events if e["type"] == "ban"]
    assert ban["group"] == "login.ann"
    assert ban["until_ns"] > time.time_ns()


def test_top_once_shows_the_busiest_and_most_refused_groups(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = tmp_path / "rate-sync.toml"
    config.write_text(
        f'[stores.prod]\nengine = "nats"\nurl = "{nats_url}"\nbucket_name = "{bucket_name}"\n'
        '[limiters.login]\nstore = "prod"\nlimit = "2/hour"\n'
    )

    async def traffic() -> tuple[int, str]:
        async with AsyncRateLimiter(str(config)) as limiter:
            await limiter.hit("login", key="warm-up")  # the bucket exists before top watches
            command = ("top", "--once", "--interval", "2", "--json", "--config", config)
            table = asyncio.create_task(asyncio.to_thread(ratesync, *command))
            await asyncio.sleep(0.5)  # top is listening
            for _ in range(30):
                await limiter.hit("login", key="kim")
                await limiter.hit("login", key=f"user-{_}")
            return await table

    status, output = asyncio.run(traffic())
    assert status == 0
    rows = {row["group"]: row for row in json.loads(output)}
    assert rows["login.kim"]["refused_per_second"] > 0
    assert rows["login.kim"]["writes_per_second"] > 0
    assert rows["login.user-0"]["refused_per_second"] == 0  # (20 rows at most: the first)
    assert next(iter(rows)) == "login.kim"  # the most refused first
    assert rows["login.kim"]["name"] == "login ip=kim"  # shown as the application's identity
    assert rows["login.kim"]["identity"] == {"ip": "kim"}


def test_watch_events_prints_a_ban(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, nats_url, bucket_name)
    command = [sys.executable, "-m", "ratesync_middleware.cli", "watch", "--events", "--json"]
    process = subprocess.Popen(
        [*command, "--config", str(config)], stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + _PATIENCE
        with RateLimiter(config) as operator:
            while not lines:  # until the watcher listens, ban again
                assert time.monotonic() < deadline, "no event printed"
                operator.ban("api_external", ttl=5.0)
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(10)
        reader.join(5)
    event = json.loads(lines[0])
    assert (event["type"], event["group"]) == ("ban", "api_external")
