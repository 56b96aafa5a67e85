"""Observability: the on_decision hook, Prometheus metrics, and logs that keep secrets out."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ratesync_middleware import AsyncRateLimiter, RateLimiter, RateLimitMiddleware
from ratesync_middleware.limiter import DecisionEvent
from ratesync_middleware.metrics import PrometheusMetrics

SLOW = "tests.request_functions:slow"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


LIMITS = {"limiters": {"api": {"rate_per_second": 1.0, "burst": 2}}}
DOWN = {
    "stores": {
        "down": {
            "engine": "nats",
            "url": "nats://admin:hunter2-password@127.0.0.1:1",
            "token": "",
            "connect_timeout": 0.1,
        }
    },
    "limiters": {
        "open": {"store": "down", "rate_per_second": 1.0},
        "closed": {"store": "down", "rate_per_second": 1.0, "fail_closed": True},
        "local": {"store": "down", "limit": "1/hour", "fail_mode": "local"},
    },
}


async def test_on_decision_sees_every_decision() -> None:
    events: list[DecisionEvent] = []
    async with AsyncRateLimiter(LIMITS, on_decision=events.append) as limiter:
        for _ in range(3):
            await limiter.hit("api", key="user-1")
    assert [e.decision.allowed for e in events] == [True, True, False]
    assert {(e.limiter, e.key, e.store) for e in events} == {("api", "user-1", "default")}
    assert all(e.seconds >= 0 and e.error is None for e in events)


def test_sync_limiter_calls_the_hook_too() -> None:
    events: list[DecisionEvent] = []
    with RateLimiter(LIMITS, on_decision=events.append) as limiter:
        limiter.hit("api", key="k")
    assert len(events) == 1
    assert events[0].decision.allowed


async def test_a_failing_hook_never_breaks_a_decision(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: DecisionEvent) -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="ratesync_middleware"):
        async with AsyncRateLimiter(LIMITS, on_decision=broken) as limiter:
            assert (await limiter.hit("api", key="k")).allowed
            assert (await limiter.hit("api", key="k")).allowed
    assert len([r for r in caplog.records if "on_decision hook failed" in r.getMessage()]) == 1


async def test_prometheus_metrics() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    async with AsyncRateLimiter(LIMITS, on_decision=metrics) as limiter:
        for _ in range(3):
            await limiter.hit("api", key="k")
    async with AsyncRateLimiter(DOWN, on_decision=metrics) as limiter:
        await limiter.hit("open", key="k")
        await limiter.hit("closed", key="k")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("ratesync_decisions_total", limiter="api", outcome="allowed") == 2
    assert value("ratesync_decisions_total", limiter="api", outcome="denied") == 1
    assert value("ratesync_decisions_total", limiter="open", outcome="fail_open") == 1
    assert value("ratesync_decisions_total", limiter="closed", outcome="fail_closed") == 1
    assert value("ratesync_store_errors_total", store="down", error="ConnectionRefusedError") == 2
    assert value("ratesync_store_seconds_count", store="default") == 3


def test_prometheus_metrics_count_slow_request_functions() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    slow = {
        "limiters": {"api": {"limit": 10, "window_seconds": 60, "cost": SLOW}},
        "middleware": {"default": "api"},
    }
    app = Starlette(
        routes=[Route("/", hello)],
        middleware=[
            Middleware(RateLimitMiddleware, config=AsyncRateLimiter(slow, on_decision=metrics))
        ],
    )
    with TestClient(app) as client:
        assert client.get("/").status_code == 200
    assert registry.get_sample_value("ratesync_slow_functions_total", {"function": SLOW}) == 1


async def test_fail_local_decisions_have_outcomes_of_their_own() -> None:
    """A fail-local answer is a real decision from the process's share, not a degraded guess:
    neither `allowed` nor `fail_open`, so a dashboard sees the outage."""
    registry = CollectorRegistry()
    async with AsyncRateLimiter(DOWN, on_decision=PrometheusMetrics(registry=registry)) as limiter:
        assert (await limiter.hit("local", key="k")).allowed
        assert not (await limiter.hit("local", key="k")).allowed  # its burst of 1, spent locally

    def value(outcome: str) -> float | None:
        labels = {"limiter": "local", "outcome": outcome}
        return registry.get_sample_value("ratesync_decisions_total", labels)

    assert value("fail_local_allowed") == 1
    assert value("fail_local_denied") == 1
    assert value("allowed") is None
    assert value("denied") is None
    errors = {"store": "down", "error": "ConnectionRefusedError"}
    assert registry.get_sample_value("ratesync_store_errors_total", errors) == 2


async def test_outage_logs_are_throttled_and_hold_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with AsyncRateLimiter(DOWN) as limiter:
            for _ in range(50):
                await limiter.hit("open", key="k")
            text = repr(limiter.store("down")) + repr(limiter.config)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("store 'down' failed") == 1
    assert "hunter2-password" not in logged
    assert "hunter2-password" not in text
