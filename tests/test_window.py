"""The exact sliding window and several rates on one group, against brute-force references."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratesync_middleware.bucket import NS_PER_SECOND, Policy, Rates, consume
from ratesync_middleware.window import EMPTY_LOG, Log, SlidingWindow

NOW = 1_800_000_000 * NS_PER_SECOND
SECOND = NS_PER_SECOND


def test_five_logins_per_five_minutes_means_five_in_any_five_minutes() -> None:
    """The token bucket of "5/minute" admits 9 in a minute; the window admits 5, exactly."""
    window = SlidingWindow("login", 5, 300 * SECOND)
    log: Log = EMPTY_LOG
    admitted = []
    for second in range(0, 600, 12):  # one attempt every 12 s for 10 minutes
        new_log, _ = window.consume(log, NOW + second * SECOND)
        if new_log is not None:
            log = new_log
            admitted.append(second)
    assert admitted == [0, 12, 24, 36, 48, 300, 312, 324, 336, 348]


def test_retry_after_is_when_the_oldest_admission_leaves() -> None:
    window = SlidingWindow("login", 2, 60 * SECOND)
    log, _ = window.consume(EMPTY_LOG, NOW)
    assert log is not None
    log, _ = window.consume(log, NOW + 10 * SECOND)
    assert log is not None
    new_log, denied = window.consume(log, NOW + 20 * SECOND)
    assert new_log is None
    assert not denied.allowed
    assert denied.remaining == 0
    assert denied.retry_after == pytest.approx(40.0)  # the first leaves at 60 s
    assert denied.reset_after == pytest.approx(50.0)  # the second at 70 s
    assert denied.reason == "rate limit 'login' exceeded"
    _, at_the_edge = window.consume(log, NOW + 60 * SECOND)  # half-open: out at exactly 60 s
    assert at_the_edge.allowed
    assert at_the_edge.remaining == 0


def test_a_cost_above_the_limit_can_never_pass() -> None:
    new_log, decision = SlidingWindow("upload", 3, SECOND).consume(EMPTY_LOG, NOW, cost=4)
    assert new_log is None
    assert decision.retry_after == math.inf
    assert "cost 4 exceeds the limit 3" in decision.reason


def test_the_log_holds_one_entry_per_instant_and_only_what_is_in_the_window() -> None:
    window = SlidingWindow("api", 10, SECOND)
    log: Log = EMPTY_LOG
    for _ in range(4):
        new_log, _ = window.consume(log, NOW)
        assert new_log is not None
        log = new_log
    assert log == ((NOW, 4),)
    log2, _ = window.consume(log, NOW + 2 * SECOND, cost=3)
    assert log2 == ((NOW + 2 * SECOND, 3),)
    assert window.peek(log2, NOW + 2 * SECOND).remaining == 7


# --- properties against a brute-force reference ------------------------------------------------

requests = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4 * SECOND), st.integers(1, 4)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 12),
    window_ms=st.integers(1, 3000),
    gaps=requests,
)
def test_the_window_admits_exactly_what_a_brute_force_count_allows(
    limit: int, window_ms: int, gaps: list[tuple[int, int]]
) -> None:
    """Never more than `limit` in any window, and never a refusal when the window has room."""
    window = SlidingWindow("w", limit, window_ms * 1_000_000)
    log: Log = EMPTY_LOG
    history: list[tuple[int, int]] = []  # every admission: (time, units)
    now = NOW
    for gap, cost in gaps:
        now += gap
        in_window = sum(u for t, u in history if now - window.window_ns < t <= now)
        new_log, decision = window.consume(log, now, cost)
        assert decision.allowed == (in_window + cost <= limit)
        if new_log is None:
            if cost <= limit:
                wait = round(decision.retry_after * NS_PER_SECOND)
                later = now + wait
                free = sum(u for t, u in history if later - window.window_ns < t <= later)
                assert free + cost <= limit  # at retry_after the request would pass
                before = later - 1
                busy = sum(u for t, u in history if before - window.window_ns < t <= before)
                assert busy + cost > limit or wait == 0  # and not a nanosecond earlier
        else:
            log = new_log
            history.append((now, cost))
            assert decision.remaining == limit - in_window - cost
        assert sum(u for _, u in log) <= limit  # bounded by the limit
    # Any window of the whole history holds at most `limit` units.
    for start, _ in history:
        assert sum(u for t, u in history if start <= t < start + window.window_ns) <= limit


periods = st.sampled_from([(1, 1), (3, 1), (5, 2), (20, 10), (2, 3)])


@settings(max_examples=300, deadline=None)
@given(rate_specs=st.lists(periods, min_size=2, max_size=3), gaps=requests)
def test_several_rates_charge_all_or_none(
    rate_specs: list[tuple[int, int]], gaps: list[tuple[int, int]]
) -> None:
    """Each rate alone, fed only the requests the combination admitted, agrees with it."""
    rates = tuple(
        Policy.per_period(f"r{i}", count, seconds, count)
        for i, (count, seconds) in enumerate(rate_specs)
    )
    combined = Rates("api", rates)
    tats: tuple[int, ...] = ()
    alone = [0] * len(rates)
    now = NOW
    for gap, cost in gaps:
        now += gap
        would = [consume(rate, tat, now, cost) for rate, tat in zip(rates, alone, strict=True)]
        new_tats, decision = combined.consume(tats, now, cost)
        assert decision.allowed == all(new is not None for new, _ in would)
        if new_tats is None:
            wait = max(d.retry_after for new, d in would if new is None)
            assert decision.retry_after == wait  # allowed only once every rate allows
            continue
        tats = new_tats
        alone = [new for new, _ in would]  # type: ignore[misc]
        assert list(tats) == alone
        assert decision.remaining == min(d.remaining for _, d in would)


def test_a_daily_denial_spends_nothing_per_second() -> None:
    per_second = Policy.per_period("api:10/second", 10, 1, 10)
    per_day = Policy.per_period("api:3/day", 3, 86400, 3)
    rates = Rates("api", (per_second, per_day))
    tats: tuple[int, ...] = ()
    for _ in range(3):
        new_tats, decision = rates.consume(tats, NOW)
        assert new_tats is not None
        tats = new_tats
    assert decision.policy == "api:3/day"  # the binding rate: 0 left
    refused, denied = rates.consume(tats, NOW)
    assert refused is None
    assert denied.policy == "api:3/day"
    assert denied.retry_after == pytest.approx(86400 / 3)
    assert rates.peek(tats, NOW).remaining == 0
    _, per_second_view = consume(per_second, tats[0], NOW, 7)
    assert per_second_view.allowed  # 3 spent of 10: the denied fourth spent nothing


# --- waiting (`timeout`): a reservation is an admission at its future instant --------------------


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 12),
    window_ms=st.integers(1, 3000),
    max_wait_ms=st.integers(0, 3000),
    gaps=requests,
)
def test_a_window_that_waits_still_admits_at_most_limit_in_any_window(
    limit: int, window_ms: int, max_wait_ms: int, gaps: list[tuple[int, int]]
) -> None:
    """Admissions reserved for later count from their instant: any window holds at most
    `limit`; a request is refused only when its earliest instant is beyond its wait."""
    window = SlidingWindow("w", limit, window_ms * 1_000_000)
    max_wait = max_wait_ms * 1_000_000
    log: Log = EMPTY_LOG
    history: list[tuple[int, int]] = []  # every admission at the instant it proceeds
    now = NOW
    for gap, cost in gaps:
        now += gap
        new_log, decision = window.consume(log, now, cost, max_wait)
        if new_log is None:
            assert cost > limit or decision.retry_after * NS_PER_SECOND > max_wait
            continue
        at = now + round(decision.wait * NS_PER_SECOND)
        assert decision.allowed
        assert at - now <= max_wait
        log = new_log
        history.append((at, cost))
    for start, _ in history:
        assert sum(u for t, u in history if start <= t < start + window.window_ns) <= limit


@settings(max_examples=300, deadline=None)
@given(
    rate_specs=st.lists(periods, min_size=1, max_size=3),
    max_wait_ms=st.integers(0, 5000),
    gaps=requests,
)
def test_rates_that_wait_admit_at_the_instant_every_rate_allows(
    rate_specs: list[tuple[int, int]], max_wait_ms: int, gaps: list[tuple[int, int]]
) -> None:
    """A waited admission is the same as a request arriving at its instant: every rate, fed
    the admissions at their instants, agrees; the instant is the earliest all of them allow."""
    rates = tuple(
        Policy.per_period(f"r{i}", count, seconds, count)
        for i, (count, seconds) in enumerate(rate_specs)
    )
    algorithm: Policy | Rates = rates[0] if len(rates) == 1 else Rates("api", rates)
    max_wait = max_wait_ms * 1_000_000
    state: int | tuple[int, ...] = algorithm.empty
    alone = [0] * len(rates)
    now = NOW
    for gap, cost in gaps:
        now += gap
        new_state, decision = algorithm.consume(state, now, cost, max_wait)  # type: ignore[arg-type]
        if new_state is None:
            assert decision.retry_after * NS_PER_SECOND > max_wait
            continue
        at = now + round(decision.wait * NS_PER_SECOND)
        assert at - now <= max_wait
        would = [consume(rate, tat, at, cost) for rate, tat in zip(rates, alone, strict=True)]
        assert all(new is not None for new, _ in would)  # every rate allows it then
        if at > now:  # and not a nanosecond earlier
            early = [
                consume(rate, tat, at - 1, cost) for rate, tat in zip(rates, alone, strict=True)
            ]
            assert any(new is None for new, _ in early)
        alone = [new for new, _ in would]  # type: ignore[misc]
        state = new_state
        assert list(state if isinstance(state, tuple) else (state,)) == alone
