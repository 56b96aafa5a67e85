"""What a request-aware policy adds to a request (issue 14): the same app, one policy at a time.

    .venv/bin/python bench/policies.py                 # Starlette and Flask, ~1 minute
    .venv/bin/python bench/policies.py --only flask --reps 21

One memory-store limiter that is never exhausted, the default of every request, in several
variants timed in alternation in one process (the order reversed every other repetition):
plain; `mode = "shadow"`; `cost = "pkg.mod:func"` (a function reading a header); `exempt_when`
(a function that returns False, so the limiter still applies); `@limit(cost=lambda)` on the
view; `tier = "pkg.mod:func"` (a function returning "pro", a tier as generous as plain's rate);
an inline `@limit("1000000000/second")` on the view instead of the TOML limiter;
`count_status = [401]` (every 200 is refunded); `settle_header` (2 reserved, the response's
`X-Cost: 1` charged: a refund of 1 each; every variant's view sends that header).
Reported: the median time per request of each, and the median per-repetition difference
to plain (what the policy adds). Times are this thread's CPU time (see compare_trees.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from overhead import AsgiDriver, Driver, WsgiDriver  # noqa: E402

FUNCTIONS = types.ModuleType("bench_policies_functions")


def _units(request: Any) -> int:
    return int(request.headers.get("x-units", "1"))


def _internal(request: Any) -> bool:
    return request.headers.get("x-internal") == "yes"


def _plan(request: Any) -> str:
    return "pro"


FUNCTIONS.plan = _plan  # type: ignore[attr-defined]
FUNCTIONS.units = _units  # type: ignore[attr-defined]
FUNCTIONS.internal = _internal  # type: ignore[attr-defined]
sys.modules[FUNCTIONS.__name__] = FUNCTIONS

LIMIT = {"rate_per_second": 1_000_000.0, "burst": 1_000_000_000}
INLINE = "1000000000/second"  # as generous as LIMIT
TIER = {"tier": f"{FUNCTIONS.__name__}:plan", "tiers": {"pro": INLINE}}
# name -> (limiter table, the view's mark: "cost" for @limit("api", cost=lambda), "inline")
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "plain": ({}, None),
    "shadow": ({"mode": "shadow"}, None),
    "cost function": ({"cost": f"{FUNCTIONS.__name__}:units"}, None),
    "exempt_when": ({"exempt_when": f"{FUNCTIONS.__name__}:internal"}, None),
    "@limit(cost=lambda)": ({}, "cost"),
    "tier function": (TIER, None),
    "inline @limit": ({}, "inline"),
    "count_status": ({"count_status": [401]}, None),
    "settle_header": ({"cost": 2, "settle_header": "X-Cost"}, None),
}
COST_HEADER = {"X-Cost": "1"}  # every variant's view sends it: only settle_header reads it


def mark(marked: str | None) -> Callable[[Any], Any] | None:
    from ratesync_middleware import limit

    if marked == "cost":
        return limit("api", cost=lambda request: 1)
    return limit(INLINE) if marked == "inline" else None


def config(extra: dict[str, Any]) -> dict[str, Any]:
    return {"limiters": {"api": {**LIMIT, **extra}}, "middleware": {"default": "api"}}


def starlette(extra: dict[str, Any], marked: str | None) -> Driver:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ratesync_middleware import RateLimitMiddleware

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok", headers=COST_HEADER)

    decorator = mark(marked)
    endpoint = decorator(home) if decorator else home
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(RateLimitMiddleware, config=config(extra))
    return AsgiDriver(app, 200)


def flask(extra: dict[str, Any], marked: str | None) -> Driver:
    from flask import Flask

    from ratesync_middleware.flask import RateLimit

    app = Flask(f"policies_{len(extra)}_{marked}")
    RateLimit(app, config=config(extra))

    def index() -> tuple[str, dict[str, str]]:
        return "ok", COST_HEADER

    decorator = mark(marked)
    view = decorator(index) if decorator else index
    app.add_url_rule("/", view_func=view)
    return WsgiDriver(app, 200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", default="asgi,flask", help="asgi, flask")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    loop = asyncio.new_event_loop()

    def run(driver: Driver, count: int) -> tuple[int, int]:
        started = time.thread_time_ns()
        result = driver.run(count)
        _, wrong = loop.run_until_complete(result) if asyncio.iscoroutine(result) else result
        return time.thread_time_ns() - started, wrong

    builders: dict[str, Callable[[dict[str, Any], str | None], Driver]] = {
        "asgi": starlette,
        "flask": flask,
    }
    print(f"{args.reps} repetitions of {args.requests} requests; us per request (median)\n")
    print("| framework | variant | time/request | added to plain |")
    print("| --- | --- | ---: | ---: |")
    failed = 0
    for framework in args.only.split(","):
        drivers = {name: builders[framework](*variant) for name, variant in VARIANTS.items()}
        for driver in drivers.values():
            start = getattr(driver, "start", None)
            if start is not None:
                loop.run_until_complete(start())
            run(driver, 200)
        gc.collect()
        gc.freeze()
        times: dict[str, list[float]] = {name: [] for name in drivers}
        order = list(drivers)
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                gc.collect()
                elapsed, wrong = run(drivers[name], args.requests)
                times[name].append(elapsed / args.requests / 1000)
                failed += wrong
        for name, samples in times.items():
            added = [t - p for t, p in zip(samples, times["plain"], strict=True)]
            extra = "" if name == "plain" else f"{statistics.median(added):+.2f}"
            print(f"| {framework} | {name} | {statistics.median(samples):.2f} | {extra} |")
        for driver in drivers.values():
            closed = driver.close()
            if asyncio.iscoroutine(closed):
                loop.run_until_complete(closed)
    if failed:
        print(f"\n{failed} requests got an unexpected status", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
