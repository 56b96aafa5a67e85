"""The Grafana dashboard and the Prometheus alert rules of examples/observability/ query only what
`PrometheusMetrics` really exports: every metric name, label and outcome value in their PromQL is
read back from a registry filled by real decisions (memory store, a real nats-server, and a NATS
store that refuses connections, for the degraded answers and the store errors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ratesync_middleware import RateLimiter
from ratesync_middleware.metrics import PrometheusMetrics
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "observability"
METRIC = re.compile(r"\bratesync_[A-Za-z0-9_]+")
SELECTOR = re.compile(r"(ratesync_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
ALERT_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


class Exported:
    """Sample names, their label names, and the values seen for each label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.labels: dict[str, set[str]] = {}
        self.values: dict[str, set[str]] = {}
        for family in registry.collect():
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    self.values.setdefault(label, set()).add(value)


@pytest.fixture(scope="module")
def exported(nats_server: NatsServer) -> Exported:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    config: dict[str, Any] = {
        "stores": {
            "local": {"engine": "memory"},
            "prod": {"engine": "nats", "url": nats_server.url, "bucket_name": "rl_dashboards"},
            "down": {"engine": "nats", "url": "nats://127.0.0.1:1", "connect_timeout": 0.1},
        },
        "limiters": {
            "api": {"store": "local", "rate_per_second": 1.0, "burst": 2},
            "shared": {"store": "prod", "rate_per_second": 1.0, "burst": 1},
            "open": {"store": "down", "rate_per_second": 1.0},
            "closed": {"store": "down", "rate_per_second": 1.0, "fail_closed": True},
            "local": {"store": "down", "limit": "1/hour", "fail_mode": "local"},
        },
    }
    with RateLimiter(config, on_decision=metrics) as limiter:
        outcomes = [limiter.hit(name, key="k").allowed for name in ("api", "api", "api")]
        outcomes += [limiter.hit("shared", key="k").allowed for _ in range(2)]
        outcomes += [limiter.hit("open", key="k").allowed, limiter.hit("closed", key="k").allowed]
        outcomes += [limiter.hit("local", key="k").allowed for _ in range(2)]
    assert outcomes == [True, True, False, True, False, True, False, True, False]
    seen = Exported(registry)
    # The decisions above produced every outcome and a store error, so each name is really there.
    assert seen.values["outcome"] == {
        *("allowed", "denied", "fail_open", "fail_closed"),
        *("fail_local_allowed", "fail_local_denied"),
    }
    assert seen.values["store"] == {"local", "prod", "down"}
    return seen


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    """`(expr, legendFormat)` of every panel target, and the template variables' queries."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            queries.append((target["expr"], target.get("legendFormat", "")))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((variable["definition"], ""))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def check_expression(expr: str, exported: Exported, shown_labels: set[str]) -> None:
    names = set(METRIC.findall(expr))
    assert names, f"no ratesync metric in {expr!r}"
    for name in names:
        assert name in exported.labels, f"{name} is not exported (in {expr!r})"
    available = set().union(*(exported.labels[name] for name in names))
    for name, matchers in SELECTOR.findall(expr):
        for label, operator, value in MATCHER.findall(matchers):
            assert label in exported.labels[name], f"{name} has no label {label!r}"
            if value.startswith("$") or label != "outcome":
                continue  # a Grafana variable, or an open set (limiter and store names)
            wanted = set(value.split("|")) if "~" in operator else {value}
            assert wanted <= exported.values["outcome"], f"unknown outcome in {expr!r}"
    groupings = [{label.strip() for label in group.split(",")} for group in GROUPING.findall(expr)]
    for group in groupings:
        assert group <= available, f"{group - available} not labels of {names} ({expr!r})"
    outermost = groupings[-1] if groupings else available
    label_values = re.search(r"label_values\(\s*[A-Za-z0-9_]+\s*,\s*([A-Za-z_]+)\s*\)", expr)
    if label_values:
        outermost = {label_values.group(1)}
        assert outermost <= available
    assert shown_labels <= outermost | {"le"}, f"{shown_labels} not kept by {expr!r}"


def test_every_dashboard_query_uses_exported_names(exported: Exported) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 8
    for expr, legend in queries:
        check_expression(expr, exported, set(LEGEND_LABEL.findall(legend)))


def test_every_alert_rule_uses_exported_names(exported: Exported) -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {"RateSyncStoreDegraded", "RateSyncDenialSpike"}
    for rule in rules:
        text = " ".join(rule.get("annotations", {}).values())
        # `and` keeps the left side's labels: the first aggregation's grouping is what is shown.
        check_expression(rule["expr"], exported, set(ALERT_LABEL.findall(text)))
        assert rule["labels"]["severity"] in {"critical", "warning"}


def test_the_dashboard_shows_every_exported_metric_and_what_the_issue_asks(
    exported: Exported,
) -> None:
    exprs = " ".join(expr for expr, _ in dashboard_queries())
    families = {"ratesync_decisions_total", "ratesync_store_seconds", "ratesync_store_errors_total"}
    for family in families:
        assert family in exprs, f"the dashboard never shows {family}"
    assert 'outcome="denied"' in exprs  # denials
    assert "fail_open|fail_closed" in exprs  # degraded answers
    assert "histogram_quantile(0.99" in exprs  # store latency
    assert "by (limiter" in exprs  # per limiter
    variables = {variable["name"] for variable in dashboard()["templating"]["list"]}
    assert variables == {"datasource", "limiter", "store"}
    datasources = {
        json.dumps(target["datasource"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    }
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
