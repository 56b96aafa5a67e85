"""Our overhead per request in two versions of the package, side by side in ONE process.

    .venv/bin/python bench/compare_trees.py e058938 .          # a commit against this tree
    .venv/bin/python bench/compare_trees.py HEAD~3 HEAD --only asgi --scenario denied

A before/after of a change to the request path is a fraction of a microsecond, less than this
machine's noise between two runs of `bench/overhead.py`. Here both versions are loaded at once,
as renamed copies of the package (`rs_before`, `rs_after`: every import inside the package is
relative), each behind the same framework app, and timed in alternation: one repetition times
the bare app, before and after back to back (the order reversed every other repetition), so a
slow phase of the machine costs all three alike. Times are this thread's CPU time
(`time.thread_time_ns`), so what other processes take from it does not count. Each is `git archive`d from this repository
when given a commit, or copied when given a directory holding `ratesync_middleware/`.

Reported per framework: the median over repetitions of each overhead (time per request minus
the bare app's in the same repetition), the median of the per-repetition difference
after - before (negative: after is faster), and the median ratio. Frameworks: Starlette (ASGI),
Flask, Django (WSGIHandler), and `nats`: `AsyncRateLimiter.hit` on a NATS store (a nats-server
of its own) with no framework, its denials answered from the cache (the denial flood's path) or
its admissions written. The scenarios are `bench/overhead.py`'s: `allowed` (a limit never
reached) and `denied` (every request refused, 429). One memory-store limiter, default headers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from overhead import (  # noqa: E402
    SCENARIOS,
    AsgiDriver,
    Driver,
    WsgiDriver,
    _django_handler,
    _django_setup,
    _use_urlconf,
    ours_config,
)


def install(version: str, name: str, into: Path) -> str:
    """Put `version` (a commit, or a directory with ratesync_middleware/) at `into/name`."""
    target = into / name
    source = Path(version)
    if (source / "ratesync_middleware").is_dir():
        shutil.copytree(source / "ratesync_middleware", target)
    else:
        with tempfile.TemporaryDirectory() as unpacked:
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", version, "ratesync_middleware"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", unpacked], input=archive, check=True)
            shutil.move(str(Path(unpacked) / "ratesync_middleware"), target)
    return name


def starlette(package: str | None, scenario: str, expected: int) -> Driver:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", home)])
    if package is not None:
        middleware = importlib.import_module(f"{package}.asgi").RateLimitMiddleware
        app.add_middleware(middleware, config=ours_config(SCENARIOS[scenario]))
    return AsgiDriver(app, expected)


def flask(package: str | None, scenario: str, expected: int) -> Driver:
    from flask import Flask

    app = Flask(f"compare_{package}")

    @app.get("/")
    def index() -> str:
        return "ok"

    if package is not None:
        extension = importlib.import_module(f"{package}.flask").RateLimit
        extension(app, config=ours_config(SCENARIOS[scenario]))
    return WsgiDriver(app, expected)


def django(package: str | None, scenario: str, expected: int) -> Driver:
    _django_setup()
    middleware = [] if package is None else [f"{package}.django.RateLimitMiddleware"]
    handler = _django_handler("wsgi", middleware, ours_config(SCENARIOS[scenario]))
    return WsgiDriver(handler, expected, _use_urlconf("plain_sync"))


class StoreDriver(Driver):
    """`AsyncRateLimiter.hit` on a NATS store, back to back, without a framework: the store's
    own path (`denied`: every decision answered from the cache, the denial flood's; `allowed`:
    one compare-and-set each). Bare: an empty coroutine awaited as often."""

    def __init__(self, package: str | None, scenario: str, url: str) -> None:
        self.limiter: Any = None
        self.allowed = scenario == "allowed"
        if package is not None:
            rate = {"rate_per_second": 1e6, "burst": 1_000_000} if self.allowed else {}
            config = {
                "stores": {
                    "nats": {"engine": "nats", "url": url, "bucket_name": f"{package}_{scenario}"}
                },
                "limiters": {
                    "api": {"store": "nats", "rate_per_second": 0.001, "burst": 10, **rate}
                },
            }
            self.limiter = importlib.import_module(package).AsyncRateLimiter(config)

    async def run(self, n: int) -> tuple[int, int]:
        wrong = 0
        if self.limiter is None:
            for _ in range(n):
                await _nothing()
            return 0, 0
        hit, expected = self.limiter.hit, self.allowed
        for _ in range(n):
            if (await hit("api", "client")).allowed is not expected:
                wrong += 1
        return 0, wrong

    async def start(self) -> None:
        if self.limiter is not None and not self.allowed:
            for _ in range(10):  # the burst: the bucket is exhausted for 1,000 s after it
                await self.limiter.hit("api", "client")

    async def close(self) -> None:
        if self.limiter is not None:
            await self.limiter.aclose()


async def _nothing() -> None:
    return None


def compare(
    name: str,
    drivers: dict[str, Driver],
    loop: asyncio.AbstractEventLoop,
    reps: int,
    n: int,
    scenario: str,
) -> tuple[str, int]:
    """Time the bare app, before and after in alternation; one table row and the wrong count."""

    def run(driver: Driver, count: int) -> tuple[int, int]:
        """(ns of this thread's CPU time, wrong statuses): time another process takes from
        this one does not count, which wall-clock time on a shared machine would."""
        started = time.thread_time_ns()
        result = driver.run(count)
        _, wrong = loop.run_until_complete(result) if asyncio.iscoroutine(result) else result
        return time.thread_time_ns() - started, wrong

    for driver in drivers.values():
        run(driver, 200)  # warm: plans cached, buckets exist, the denied one exhausted
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {variant: [] for variant in drivers}
    wrong = 0
    order = list(drivers)
    for rep in range(reps):
        for variant in order if rep % 2 == 0 else order[::-1]:
            gc.collect()
            elapsed, bad = run(drivers[variant], n)
            times[variant].append(elapsed / n / 1000)
            wrong += bad
    before = [t - bare for t, bare in zip(times["before"], times["bare"], strict=True)]
    after = [t - bare for t, bare in zip(times["after"], times["bare"], strict=True)]
    difference = [a - b for a, b in zip(after, before, strict=True)]
    ratios = [a / b for a, b in zip(after, before, strict=True) if b > 0]
    ratio = f"{statistics.median(ratios):.3f}" if len(ratios) > reps // 2 else "n/a"
    line = (
        f"| {name} | {scenario} | {statistics.median(times['bare']):.2f} "
        f"| {statistics.median(before):.2f} | {statistics.median(after):.2f} "
        f"| {statistics.median(difference):+.2f} | {ratio} |"
    )
    return line, wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a commit of this repository, or a directory")
    parser.add_argument("after", help="a commit of this repository, or a directory")
    parser.add_argument("--reps", type=int, default=41, help="repetitions (default 41)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per sample")
    parser.add_argument(
        "--only", default="asgi,flask,django", help="asgi, flask, django, nats (the store alone)"
    )
    parser.add_argument("--scenario", default="allowed,denied", help="allowed, denied")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    packages = Path(tempfile.mkdtemp(prefix="compare-trees-"))
    sys.path.insert(0, str(packages))
    before = install(args.before, "rs_before", packages)
    after = install(args.after, "rs_after", packages)
    loop = asyncio.new_event_loop()
    builders = {"asgi": starlette, "flask": flask, "django": django}
    server: Any = None
    if "nats" in args.only.split(","):
        sys.path.insert(0, str(REPO))
        from tests.natsserver import NatsServer

        server = NatsServer().start()
        builders["nats"] = lambda package, scenario, expected: StoreDriver(
            package, scenario, server.url
        )
    print(f"before = {args.before}, after = {args.after}; {args.reps} repetitions of ", end="")
    print(f"{args.requests} requests; overheads in us per request (median)\n")
    print("| framework | scenario | bare app | before | after | after - before | after/before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = 0
    for framework in args.only.split(","):
        for scenario in args.scenario.split(","):
            build = builders[framework]
            expected = SCENARIOS[scenario].status
            drivers = {
                "bare": build(None, scenario, 200),  # no limit: 200 in both scenarios
                "before": build(before, scenario, expected),
                "after": build(after, scenario, expected),
            }
            if framework in ("asgi", "nats"):
                for driver in drivers.values():
                    loop.run_until_complete(driver.start())  # type: ignore[attr-defined]
            line, wrong = compare(framework, drivers, loop, args.reps, args.requests, scenario)
            print(line if not wrong else f"{line} {wrong} wrong statuses", flush=True)
            failed += wrong
            for driver in drivers.values():
                closed = driver.close()
                if asyncio.iscoroutine(closed):
                    loop.run_until_complete(closed)
    shutil.rmtree(packages, ignore_errors=True)
    if server is not None:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    if failed:
        print(f"\n{failed} requests got an unexpected status", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
