"""Prometheus metrics as an `on_decision` hook (the `prometheus` extra installs prometheus-client).

from ratesync_middleware.metrics import PrometheusMetrics
app.add_middleware(RateLimitMiddleware, config="rate-sync.toml", on_decision=PrometheusMetrics())
"""

from __future__ import annotations

from typing import Any

from .callables import on_slow_function
from .limiter import DecisionEvent

STORE_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


def outcome(event: DecisionEvent) -> str:
    """`allowed`, `denied`, `shadow_denied` (not enforced), `fail_open`, `fail_closed`, or, for
    a `fail_mode = "local"` limiter deciding from its own share while its store fails (a real
    decision, not degraded, with the store's error), `fail_local_allowed` / `fail_local_denied`."""
    if not event.enforced:
        return "shadow_denied"
    decision = event.decision
    if decision.degraded:
        return "fail_open" if decision.allowed else "fail_closed"
    if event.error is not None:
        return "fail_local_allowed" if decision.allowed else "fail_local_denied"
    return "allowed" if decision.allowed else "denied"


class PrometheusMetrics:
    """Counts decisions by limiter and outcome, times the store, counts store errors and slow
    request functions."""

    def __init__(self, registry: Any = None, namespace: str = "ratesync") -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Histogram
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "PrometheusMetrics needs prometheus-client: pip install 'ratesync-middleware[prometheus]'"
            ) from error
        registry = REGISTRY if registry is None else registry
        self.decisions = Counter(
            "decisions",
            "Rate-limit decisions by limiter and outcome.",
            ["limiter", "outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.store_seconds = Histogram(
            "store_seconds",
            "Time one decision waited for its store.",
            ["store"],
            namespace=namespace,
            buckets=STORE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.slow_functions = Counter(
            "slow_functions",
            "Calls of a key, cost, tier or exempt_when function slower than 100 ms.",
            ["function"],
            namespace=namespace,
            registry=registry,
        )
        on_slow_function(self._slow_function)
        self.store_errors = Counter(
            "store_errors",
            "Decisions whose store failed, by error.",
            ["store", "error"],
            namespace=namespace,
            registry=registry,
        )

    def _slow_function(self, label: str, seconds: float) -> None:
        self.slow_functions.labels(label).inc()

    def __call__(self, event: DecisionEvent) -> None:
        self.decisions.labels(event.limiter, outcome(event)).inc()
        self.store_seconds.labels(event.store).observe(event.seconds)
        if event.error is not None:
            self.store_errors.labels(event.store, type(event.error).__name__).inc()
