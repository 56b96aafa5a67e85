"""The GCRA maths: exact limits, honest numbers, properties checked by hypothesis."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratesync_middleware.bucket import NS_PER_SECOND, Policy, consume, peek

NOW = 1_800_000_000 * NS_PER_SECOND

rates = st.one_of(
    st.floats(min_value=0.001, max_value=100_000, allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 3.0, 10.0, 7.5, 1 / 3]),
)
bursts = st.integers(min_value=1, max_value=200)
steps = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3 * NS_PER_SECOND), st.integers(1, 5)),
    min_size=1,
    max_size=80,
)


def test_burst_then_refill() -> None:
    policy = Policy.per_second("api", 10.0, 5)
    tat = 0
    for expected_remaining in (4, 3, 2, 1, 0):
        new_tat, decision = consume(policy, tat, NOW)
        assert decision.allowed
        assert decision.remaining == expected_remaining
        assert new_tat is not None
        tat = new_tat
    new_tat, denied = consume(policy, tat, NOW)
    assert new_tat is None
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.1)
    assert denied.reset_after == pytest.approx(0.5)
    assert denied.limit == 5
    assert denied.policy == "api"
    _, later = consume(policy, tat, NOW + NS_PER_SECOND // 10)
    assert later.allowed


def test_n_per_period_is_exact() -> None:
    policy = Policy.per_period("login", 600, 60, burst=600)
    assert policy.interval_ns == 100_000_000
    assert policy.rate == 10.0


def test_a_cost_above_the_burst_is_denied_and_says_why() -> None:
    policy = Policy.per_second("upload", 1.0, 3)
    new_tat, decision = consume(policy, 0, NOW, cost=4)
    assert new_tat is None
    assert not decision.allowed
    assert decision.retry_after == math.inf
    assert "cost 4 exceeds the burst 3" in decision.reason
    assert decision.remaining == 3  # the bucket is untouched and full


@given(rate=rates, burst=bursts, requests=steps)
def test_never_more_than_burst_plus_rate_times_t(
    rate: float, burst: int, requests: list[tuple[int, int]]
) -> None:
    policy = Policy.per_second("p", rate, burst)
    now, tat = NOW, 0
    admitted: list[tuple[int, int]] = []
    for gap, cost in requests:
        now += gap
        new_tat, decision = consume(policy, tat, now, cost)
        assert decision.allowed == (new_tat is not None)
        if new_tat is not None:
            tat = new_tat
            admitted.append((now, cost))
    for i, (start, _) in enumerate(admitted):
        spent = 0
        for end, cost in admitted[i:]:
            spent += cost
            allowance = burst + Fraction(rate) * Fraction(end - start, NS_PER_SECOND)
            assert spent <= allowance


@given(rate=rates, burst=bursts, requests=steps, cost=st.integers(1, 5))
def test_remaining_and_retry_after_tell_the_truth(
    rate: float, burst: int, requests: list[tuple[int, int]], cost: int
) -> None:
    policy = Policy.per_second("p", rate, burst)
    now, tat = NOW, 0
    for gap, step_cost in requests:
        now += gap
        new_tat, _ = consume(policy, tat, now, step_cost)
        tat = new_tat if new_tat is not None else tat

    state = peek(policy, tat, now)
    if state.remaining >= 1:  # a request of `remaining` fits now, one more does not
        assert consume(policy, tat, now, state.remaining)[0] is not None
    if state.remaining < burst:
        assert consume(policy, tat, now, state.remaining + 1)[0] is None

    new_tat, decision = consume(policy, tat, now, cost)
    if cost > burst:
        assert not decision.allowed
        assert decision.retry_after == math.inf
        return
    if decision.allowed:
        assert decision.retry_after == 0
        assert new_tat is not None
        full_at = now + round(decision.reset_after * NS_PER_SECOND)
        assert peek(policy, new_tat, full_at + 1).remaining == burst
    else:
        assert new_tat is None  # a denial changes nothing
        wait_ns = math.ceil(decision.retry_after * NS_PER_SECOND)
        assert consume(policy, tat, now + wait_ns + 1, cost)[0] is not None
        assert consume(policy, tat, now + wait_ns - 2, cost)[0] is None or wait_ns < 2


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        Policy.per_second("p", 0.0, 1)
    with pytest.raises(ValueError, match="burst"):
        Policy.per_second("p", 1.0, 0)
