"""Decisions as HTTP: the rate-limit header modes, Retry-After and the problem+json bodies."""

from __future__ import annotations

import json
import math
import time

import pytest

from ratesync_middleware.bucket import NS_PER_SECOND, Decision, Policy, consume
from ratesync_middleware.headers import QUOTA_EXCEEDED, RateLimitHeaders, retry_after_seconds

API = Policy.per_second("api", 2.0, burst=10)  # a full refill takes 5 s
NOW = 1_000 * NS_PER_SECOND


def spend(policy: Policy, times: int, cost: int = 1) -> Decision:
    """The decision of the `times`-th request on a fresh bucket, all at the same instant."""
    tat = 0
    decision = None
    for _ in range(times):
        new_tat, decision = consume(policy, tat, NOW, cost)
        tat = tat if new_tat is None else new_tat
    assert decision is not None
    return decision


def as_text(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers}


def test_draft_headers_on_an_allowed_request() -> None:
    headers = as_text(RateLimitHeaders("draft", [API]).headers(spend(API, 3)))

    assert headers == {
        "ratelimit-policy": '"api";q=10;w=5',
        "ratelimit": '"api";r=7;t=2',  # 3 units spent, back in 1.5 s, rounded up
    }


def test_draft_headers_on_a_denial_point_to_the_retry() -> None:
    denied = spend(API, 11)
    headers = as_text(RateLimitHeaders("draft", [API]).headers(denied))

    assert not denied.allowed
    assert headers["ratelimit"] == '"api";r=0;t=1'  # never before Retry-After
    assert retry_after_seconds(denied.retry_after) == 1


def test_policy_window_is_whole_seconds_and_never_zero() -> None:
    fast = Policy.per_second("fast", 100.0, burst=1)  # refills in 10 ms
    daily = Policy.per_period("daily", 1000, 86_400, burst=1000)
    builder = RateLimitHeaders("draft", [fast, daily])

    assert as_text(builder.headers(spend(fast, 1)))["ratelimit-policy"] == '"fast";q=1;w=1'
    assert as_text(builder.headers(spend(daily, 1)))["ratelimit-policy"] == '"daily";q=1000;w=86400'


def test_legacy_headers() -> None:
    before = math.ceil(time.time())
    headers = as_text(RateLimitHeaders("legacy", [API]).headers(spend(API, 4)))
    after = math.ceil(time.time())

    assert headers["x-ratelimit-limit"] == "10"
    assert headers["x-ratelimit-remaining"] == "6"
    assert before + 2 <= int(headers["x-ratelimit-reset"]) <= after + 2  # Unix time when full


def test_mode_none_and_no_decision_give_no_headers() -> None:
    assert RateLimitHeaders("none", [API]).headers(spend(API, 1)) == []
    assert RateLimitHeaders("draft", [API]).headers(None) == []


def test_a_fail_open_guess_gets_no_headers() -> None:
    guess = Decision(True, 10, 10, 0.0, 0.0, "api", "store down", degraded=True)
    assert RateLimitHeaders("draft", [API]).headers(guess) == []


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, 1), (0.001, 1), (1.0, 1), (1.000001, 2), (29.5, 30), (math.inf, None)],
)
def test_retry_after_is_whole_seconds_rounded_up_never_zero(
    seconds: float, header: int | None
) -> None:
    assert retry_after_seconds(seconds) == header


def test_429_is_problem_json_naming_the_limiter() -> None:
    denial = RateLimitHeaders("draft", [API]).denial(spend(API, 11))
    headers = as_text(denial.headers)
    body = json.loads(denial.body)

    assert denial.status == 429
    assert headers["content-type"] == "application/problem+json"
    assert headers["content-length"] == str(len(denial.body))
    assert headers["retry-after"] == "1"
    assert headers["ratelimit"] == '"api";r=0;t=1'
    assert body == {
        "type": QUOTA_EXCEEDED,
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Rate limit 'api' exceeded.",
        "violated-policies": ["api"],
    }


def test_a_cost_above_the_burst_gets_429_without_retry_after() -> None:
    impossible = spend(API, 1, cost=11)
    denial = RateLimitHeaders("draft", [API]).denial(impossible)

    assert denial.status == 429
    assert "retry-after" not in as_text(denial.headers)
    assert "can never be allowed" in json.loads(denial.body)["detail"]


def test_a_fail_closed_store_failure_is_503_with_retry_after() -> None:
    down = Decision(False, 10, 0, 1.0, 0.0, "api", "store 'main' unavailable", degraded=True)
    denial = RateLimitHeaders("draft", [API]).denial(down)
    headers = as_text(denial.headers)

    assert denial.status == 503
    assert headers["retry-after"] == "1"
    assert "ratelimit" not in headers
    assert json.loads(denial.body)["status"] == 503


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="headers mode"):
        RateLimitHeaders("ietf", [API])  # type: ignore[arg-type]
