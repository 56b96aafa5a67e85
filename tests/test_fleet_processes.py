"""The fleet's control plane across real application processes: three uvicorn servers, and
gunicorn with three forked sync workers (`--preload`: the master opened the store before the fork).

Every answer names the process that gave it (`X-Worker`, its pid), so a test keeps asking, a few
connections at once, until each process has shown what it waits for. The figures printed here
(`pytest -s`) are those of docs/engines/nats.md and docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.keys import group_key
from tests.conftest import start_server
from tests.servers import gunicorn_server, uvicorn_servers
from tests.test_cli import ratesync

pytestmark = [pytest.mark.nats, pytest.mark.slow]

_PATIENCE = 10.0  # seconds a test waits for something that should take milliseconds
CLIENT = "127.0.0.1"  # the identity of every request (`key = "ip"`)
PROCESSES = 3
BURST = 1000  # of `login`, per hour: spent by one call of the test, never by its requests


@dataclass(frozen=True)
class Fleet:
    """The application processes of a test: where to send requests, and who must answer."""

    urls: list[str]  # one per uvicorn process; gunicorn's one address for all its workers
    pids: set[str]


@contextmanager
def app_fleet(server: str, config: Path, tmp_path: Path) -> Iterator[Fleet]:
    """Three processes serving the same app on `config`: uvicorn servers (Starlette), or the
    sync workers of one `gunicorn --preload -w 3` (Flask)."""
    env = {"RATE_SYNC_CONFIG": str(config)}
    if server == "gunicorn":
        log = tmp_path / "gunicorn.log"
        with gunicorn_server("tests.apps.flask_app:app", PROCESSES, env, log) as gunicorn:
            yield Fleet([gunicorn.url], gunicorn.workers)
        return
    with uvicorn_servers("tests.apps.starlette_app:app", PROCESSES, env) as urls:
        pids = {httpx.get(f"{url}/health").headers["x-worker"] for url in urls}  # exempt
        yield Fleet(urls, pids)


def store_table(url: str, bucket: str, **options: float) -> str:
    """The `[stores.prod]` table of the apps' configuration."""
    lines = ["[stores.prod]", 'engine = "nats"', f'url = "{url}"', f'bucket_name = "{bucket}"']
    lines += [f"{name} = {value}" for name, value in options.items()]
    return "\n".join(lines) + "\n"


def write_app_config(path: Path, url: str, bucket: str, burst: int = 5) -> Path:
    path.write_text(
        f"""{store_table(url, bucket, timeout=2.0)}
[limiters.login]
store = "prod"
limit = "{burst}/hour"
key = "ip"

[middleware]
default = "login"

[[routes]]
path = "/health"
exempt = true
"""
    )
    return path


Answer = Callable[[httpx.Response], bool]


def status(code: int) -> Answer:
    """A response with this status (a 200 counted by the bucket: it has a RateLimit header)."""
    return lambda r: r.status_code == code and (code != 200 or "ratelimit" in r.headers)


def overridden(response: httpx.Response) -> bool:
    return "1000/second" in response.headers.get("ratelimit-policy", "")


def not_overridden(response: httpx.Response) -> bool:
    return "ratelimit-policy" in response.headers and not overridden(response)


async def every_process(
    client: httpx.AsyncClient,
    fleet: Fleet,
    shows: Answer,
    since: float | None = None,
    connections: int = 6,
) -> list[float]:
    """Ask GET / until every process has given an answer that `shows` what is awaited; the
    seconds from `since` (default: now) to each process's first such answer."""
    started = time.monotonic() if since is None else since
    first: dict[str, float] = {}
    deadline = time.monotonic() + _PATIENCE

    async def ask(turn: int) -> None:
        for url in itertools.islice(itertools.cycle(fleet.urls), turn, None):
            if len(first) >= len(fleet.pids):
                return
            response = await client.get(url + "/")
            worker = response.headers["x-worker"]
            if worker not in first and shows(response):
                first[worker] = time.monotonic() - started
            missing = sorted(fleet.pids - set(first))
            assert time.monotonic() < deadline, f"{missing} not yet; {response.status_code}"

    await asyncio.gather(*(ask(turn) for turn in range(connections)))
    assert set(first) == fleet.pids
    return list(first.values())


async def refused_everywhere(
    client: httpx.AsyncClient, fleet: Fleet, operator: AsyncRateLimiter
) -> None:
    """Spend what is left of the group in one call, then ask until each process has refused it:
    each holds the group as empty in its cache, a denial it would believe for the whole
    Retry-After if nothing told it otherwise. (A large burst, so that once the group is
    refilled, the first process to see it does not spend it all before the others do.)"""
    left = (await operator.peek("login", key=CLIENT)).remaining
    if left:
        assert (await operator.hit("login", key=CLIENT, cost=left)).allowed
    await every_process(client, fleet, status(429))


async def propagation(fleet: Fleet, config: Path, rounds: int) -> dict[str, list[float]]:
    """Per operation, how long each app process takes to apply it: from the start of the call
    made by another process (an operator's) to the first answer of that process showing it."""
    seconds: dict[str, list[float]] = {}
    async with (
        httpx.AsyncClient(timeout=5.0) as client,
        AsyncRateLimiter(str(config)) as operator,
    ):

        async def timed(name: str, change: Coroutine[Any, Any, None], shows: Answer) -> None:
            started = time.monotonic()
            await change
            seconds.setdefault(name, []).extend(await every_process(client, fleet, shows, started))

        for _ in range(rounds):
            await refused_everywhere(client, fleet, operator)
            await timed("reset", operator.reset("login", key=CLIENT), status(200))
            await timed("ban", operator.ban("login", key=CLIENT, ttl=60.0), status(403))
            await timed("unban", operator.unban("login", key=CLIENT), status(200))
            override = operator.override("login", key=CLIENT, limit="1000/second")
            await timed("override", override, overridden)
            await timed("override removed", operator.override("login", key=CLIENT), not_overridden)
    return seconds


def p99(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_operations_reach_every_process_within_a_second(
    server: str, nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = write_app_config(tmp_path / "rate-sync.toml", nats_url, bucket_name, BURST)
    with app_fleet(server, config, tmp_path) as fleet:
        measured = asyncio.run(propagation(fleet, config, rounds=10))
    for operation, seconds in measured.items():
        ordered = sorted(seconds)
        print(
            f"{server} {operation}: {len(ordered)} samples, p50 {ordered[len(ordered) // 2] * 1000:.0f}"
            f" ms, p99 {p99(ordered) * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"
        )
        assert p99(seconds) < 1.0, operation


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_a_raw_kv_delete_reaches_every_process_within_two_seconds(
    server: str, nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    """What `nats kv del` does: no control message, only the key gone. Each process holds a
    cached denial; the one-second re-check of cached denials finds the key deleted."""
    config = write_app_config(tmp_path / "rate-sync.toml", nats_url, bucket_name, BURST)

    async def delete_while_refused(fleet: Fleet) -> list[float]:
        async with (
            httpx.AsyncClient(timeout=5.0) as client,
            AsyncRateLimiter(str(config)) as operator,
        ):
            await refused_everywhere(client, fleet, operator)
            nc = await nats.connect(nats_url)
            try:
                kv = await nc.jetstream().key_value(bucket_name)
                started = time.monotonic()
                await kv.delete(group_key("login", CLIENT))
            finally:
                await nc.close()
            return await every_process(client, fleet, status(200), started)

    with app_fleet(server, config, tmp_path) as fleet:
        seconds = asyncio.run(delete_while_refused(fleet))
    print(
        f"{server} raw KV delete: admitted again after {', '.join(f'{s:.2f}' for s in seconds)} s"
    )
    assert max(seconds) < 2.0


def fleet_pids(config: Path) -> set[int]:
    status, output = ratesync("fleet", "--json", "--config", config)
    assert status == 0
    return {peer["pid"] for peer in json.loads(output)}


def test_fleet_lists_the_processes_and_forgets_a_stopped_one(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = write_app_config(tmp_path / "rate-sync.toml", nats_url, bucket_name)
    with uvicorn_servers(
        "tests.apps.starlette_app:app", 3, {"RATE_SYNC_CONFIG": str(config)}
    ) as urls:
        deadline = time.monotonic() + _PATIENCE
        while len(pids := fleet_pids(config)) < 3:
            assert time.monotonic() < deadline, pids
        output = ratesync("fleet", "--config", config)[1]
        assert len(output.splitlines()) == 3
        assert all(f"bucket {bucket_name}  limiters login" in line for line in output.splitlines())
        crashed, stopped, alive = sorted(pids)
        os.kill(crashed, signal.SIGKILL)
        os.kill(stopped, signal.SIGTERM)
        deadline = time.monotonic() + _PATIENCE
        while (pids := fleet_pids(config)) != {alive}:
            assert time.monotonic() < deadline, pids
        assert len(urls) == 3


def test_fleet_lists_gunicorn_workers_and_not_their_master(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    """With `--preload` the master opens the store at start-up (it checks the connection) and
    then forks; it serves nothing, so it closes the store as it forks: not listed, not counted
    in a fail-local share. (It was listed until it did.)"""
    config = write_app_config(tmp_path / "rate-sync.toml", nats_url, bucket_name, BURST)

    async def one_request_each(fleet: Fleet) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            await every_process(client, fleet, status(200))  # a worker opens it on first use

    with app_fleet("gunicorn", config, tmp_path) as fleet:
        asyncio.run(one_request_each(fleet))
        assert {str(pid) for pid in fleet_pids(config)} == fleet.pids


# -- fail_mode = "local" ----------------------------------------------------------------------

RATE, LOCAL_BURST, OUTAGE = 20, 20, 6.0
EXACT = 10  # the `exact` limiter's burst: 10/hour, nothing refills during the test


def write_fail_local_config(path: Path, url: str, bucket: str) -> Path:
    path.write_text(
        f"""{store_table(url, bucket, timeout=1.0, backoff=0.5)}
[limiters.api]
store = "prod"
rate_per_second = {RATE}
burst = {LOCAL_BURST}
key = "global"
fail_mode = "local"

[limiters.exact]
store = "prod"
limit = "{EXACT}/hour"
key = "header:X-Client"
fail_mode = "local"

[middleware]
default = "api"

[[routes]]
path = "/exact"
limiters = ["exact"]

[[routes]]
path = "/health"
exempt = true
"""
    )
    return path


async def demand(client: httpx.AsyncClient, url: str, until: float) -> Counter[int]:
    """Far more requests than the rate, until `until`; the statuses answered."""
    statuses: Counter[int] = Counter()
    while time.monotonic() < until:
        statuses[(await client.get(url + "/")).status_code] += 1
        await asyncio.sleep(0.005)
    return statuses


async def admitted_of_fresh_client(client: httpx.AsyncClient, urls: list[str], name: str) -> int:
    """How many of 3 x EXACT concurrent requests of a new client the fleet admits under `exact`:
    EXACT when every process decides from the shared bucket; from its own share (EXACT // 3
    each) when one is still cut off, which makes the total another number."""
    headers = {"X-Client": name}
    asked = [client.get(url + "/exact", headers=headers) for url in urls for _ in range(EXACT)]
    answers = await asyncio.gather(*asked)
    assert {answer.status_code for answer in answers} <= {200, 429}
    return sum(answer.status_code == 200 for answer in answers)


def test_fail_local_keeps_three_processes_near_the_shared_bound_during_an_outage(
    bucket_name: str, tmp_path: Path
) -> None:
    server = start_server()  # of this test's own: it is stopped for the outage
    config = write_fail_local_config(tmp_path / "rate-sync.toml", server.url, bucket_name)
    try:
        with uvicorn_servers(
            "tests.apps.starlette_app:app", PROCESSES, {"RATE_SYNC_CONFIG": str(config)}
        ) as urls:
            # The processes know each other (fleet's call has every one announce itself to all).
            deadline = time.monotonic() + _PATIENCE
            while len(fleet_pids(config)) < PROCESSES:
                assert time.monotonic() < deadline

            async def outage_then_restart() -> tuple[Counter[int], float]:
                async with httpx.AsyncClient(timeout=10.0) as client:
                    assert await admitted_of_fresh_client(client, urls, "before") == EXACT
                    server.kill()
                    ends = time.monotonic() + OUTAGE
                    per_loop = [demand(client, url, ends) for url in urls for _ in range(3)]
                    statuses = sum(await asyncio.gather(*per_loop), Counter[int]())
                    server.start()  # the same port and store directory
                    restarted = time.monotonic()
                    attempt = 0
                    while await admitted_of_fresh_client(client, urls, f"after-{attempt}") != EXACT:
                        assert time.monotonic() - restarted < 30, "not exact again after 30 s"
                        attempt += 1
                        await asyncio.sleep(0.2)
                    return statuses, time.monotonic() - restarted

            statuses, exact_after = asyncio.run(outage_then_restart())
    finally:
        server.cleanup()
    admitted, bound = statuses[200], RATE * OUTAGE + LOCAL_BURST
    print(
        f"fail-local, {PROCESSES} uvicorn processes: {admitted} admitted in a {OUTAGE:g} s outage "
        f"(bound {bound:g}: {admitted / bound:.2f}x; {statuses[429]} refused); exact again "
        f"{exact_after:.1f} s after the restart"
    )
    assert set(statuses) <= {200, 429}, statuses  # real decisions: no 503, no error
    assert 0.4 * bound <= admitted <= 1.3 * bound
    assert exact_after < 20.0
