"""GCRA token bucket maths: pure functions over one number per group, its theoretical arrival time.

Times are integer nanoseconds so that sums of intervals are exact. With emission interval `T` and
capacity `burst`, a request of `cost` at `now` against a stored `tat` gives
`new_tat = max(tat, now) + cost*T`, allowed iff `new_tat - burst*T <= now`. A denial changes nothing.
The interval is rounded up to whole nanoseconds, so the admitted rate never exceeds the configured one.
A request that may wait (`max_wait`, rate-sync's `timeout`) and would be allowed at
`new_tat - burst*T` within it is admitted now for then: the same `new_tat` is stored (the future
admission is reserved in the same write) and the decision says how long to `wait`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

NS_PER_SECOND = 1_000_000_000

PERIOD_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class Policy:
    """What a limiter allows: `burst` cost at once, refilled one unit every `interval_ns`."""

    name: str
    interval_ns: int
    burst: int
    exceeded: str = field(init=False, repr=False, compare=False)
    """The reason of a denial, made once: every cached denial carries it."""

    def __post_init__(self) -> None:
        if self.interval_ns < 1:
            raise ValueError("interval_ns must be >= 1")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        object.__setattr__(self, "exceeded", f"rate limit {self.name!r} exceeded")

    @classmethod
    def per_second(cls, name: str, rate: float, burst: int) -> Policy:
        """`rate` units per second (may be fractional), capacity `burst`."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive finite number")
        return cls(name, max(1, math.ceil(NS_PER_SECOND / rate)), burst)

    @classmethod
    def per_period(cls, name: str, count: int, period_seconds: int, burst: int) -> Policy:
        """`count` units per `period_seconds`, exact in integers (600/minute: one per 100 ms)."""
        if count < 1 or period_seconds < 1:
            raise ValueError("count and period must be >= 1")
        return cls(name, -(-period_seconds * NS_PER_SECOND // count), burst)

    @property
    def rate(self) -> float:
        """Refill rate in units per second."""
        return NS_PER_SECOND / self.interval_ns

    @property
    def window_ns(self) -> int:
        """Time for an empty bucket to refill completely."""
        return self.burst * self.interval_ns

    # The algorithm interface (algorithms.py): the state is the bucket's `tat`.
    empty = 0

    def consume(
        self, tat: int, now: int, cost: int = 1, max_wait: int = 0
    ) -> tuple[int | None, Decision]:
        """Apply one request to a bucket whose state is `tat`; return the new state (None if denied).

        A request that would be allowed within `max_wait` ns is admitted for then (`Decision.wait`).
        """
        interval = self.interval_ns
        window = self.burst * interval
        start = tat if tat > now else now
        if cost > self.burst:
            return None, Decision(
                allowed=False,
                limit=self.burst,
                remaining=max(0, (window - (start - now)) // interval),
                retry_after=math.inf,
                reset_after=(start - now) / NS_PER_SECOND,
                policy=self.name,
                reason=f"cost {cost} exceeds the burst {self.burst} of limiter {self.name!r}",
            )
        new_tat = start + cost * interval
        allow_at = new_tat - window
        # The two answers of every request: fields in order (keywords cost a third more here).
        if allow_at <= now:
            # allowed, limit, remaining, retry_after, reset_after, policy
            remaining = (now - allow_at) // interval
            reset_after = (new_tat - now) / NS_PER_SECOND
            fields = (True, self.burst, remaining, 0.0, reset_after, self.name, "", False, 0.0, now)
            return new_tat, _new_tuple(Decision, fields)
        if allow_at - now <= max_wait:
            return new_tat, Decision(
                True,
                self.burst,
                0,
                0.0,
                (new_tat - now) / NS_PER_SECOND,
                self.name,
                wait=(allow_at - now) / NS_PER_SECOND,
                receipt=allow_at,
            )
        left = (window - (start - now)) // interval  # < 0 past a full window (waits reserved)
        retry_after = (allow_at - now) / NS_PER_SECOND
        reset_after = (start - now) / NS_PER_SECOND
        denied = (False, self.burst, left if left > 0 else 0, retry_after, reset_after, self.name)
        return None, _new_tuple(Decision, (*denied, self.exceeded, False, 0.0, None))

    def peek(self, tat: int, now: int) -> Decision:
        """See the module function `peek`."""
        return peek(self, tat, now)

    def settle(self, tat: int, now: int, receipt: int, reserved: int, actual: int) -> int | None:
        """See the module function `settle`."""
        return settle(self, tat, now, receipt, reserved, actual)

    @staticmethod
    def idle_at(tat: int) -> int:
        """When the bucket is full again (the same as no state at all)."""
        return tat


class Decision(NamedTuple):
    """The answer for one request.

    `limit` is the burst, `remaining` whole units left after this request, `retry_after` seconds
    until this same request would be allowed (0 when allowed, `inf` when it can never be),
    `reset_after` seconds until the bucket is full again, `policy` the limiter's name.
    `degraded` is true when the store failed and the answer is the limiter's fail-open/closed rule.
    `wait` is the seconds an allowed request must wait before it proceeds: its admission was
    reserved for then (`timeout`); 0 for a request allowed at once.
    `receipt` is when an admission was made (ns, the store's clock; for a reserved one, the
    instant it was admitted for), what `settle` needs; None for a decision that spent nothing
    (a refusal, a fail-open answer). A store's answer to a slot request carries the slot's
    ticket there instead (what `release_slot` needs); the limiter keeps it and answers None.
    An immutable named tuple: built on every request, it costs a third of a frozen dataclass.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    policy: str
    reason: str = ""
    degraded: bool = False
    wait: float = 0.0
    receipt: int | None = None


_new_tuple = tuple.__new__
"""`_new_tuple(Decision, fields)`: a decision of all its fields in order, without the call of
the named tuple's generated `__new__` (half the time of `Decision(...)`: the hot path's)."""


consume = Policy.consume
"""`consume(policy, tat, now, cost, max_wait)`: `Policy.consume` as a function (the memory store's)."""


def settle(
    policy: Policy, tat: int, now: int, receipt: int, reserved: int, actual: int
) -> int | None:
    """The bucket after an admission of `reserved` units, admitted at `receipt` (ns), is
    charged `actual` units instead; None when nothing changes.

    More than reserved overdraws: the extra units are charged now, after every slot taken (the
    bucket may go past empty: later requests wait longer). Fewer refunds the difference, but
    only the part of it still ahead of `now` had the admission's slots started at `receipt`:
    the part behind has refilled already (or may have, had other refunds come first), and
    giving it back again would hand out the same units twice. So a refund never breaks
    `burst + rate*t` counting what was charged, whatever order refunds come in; it never gives
    back more than was reserved, and never fills the bucket past full (`tat` >= `now`).
    """
    interval = policy.interval_ns
    if actual > reserved:
        return (tat if tat > now else now) + (actual - reserved) * interval
    refund = min((reserved - actual) * interval, receipt + reserved * interval - now, tat - now)
    return tat - refund if refund > 0 else None


def allowed_at(policy: Policy, tat: int, now: int, cost: int) -> int | float:
    """When a request of `cost` would be allowed (ns, `now` at the earliest; inf: never)."""
    if cost > policy.burst:
        return math.inf
    start = tat if tat > now else now
    return max(now, start + (cost - policy.burst) * policy.interval_ns)


def peek(policy: Policy, tat: int, now: int, receipt: int | None = None) -> Decision:
    """The bucket as a zero-cost request sees it: remaining units and time to full, changing
    nothing. With `receipt`, the decision of an admission made elsewhere (a lease's)."""
    start = tat if tat > now else now
    interval = policy.interval_ns
    left = (policy.burst * interval - (start - now)) // interval  # < 0: overdrawn
    # Every field in order, without the named tuple's `__new__`: a leased admission's answer.
    fields = (True, policy.burst, left if left > 0 else 0, 0.0, (start - now) / NS_PER_SECOND)
    return _new_tuple(Decision, (*fields, policy.name, "", False, 0.0, receipt))


@dataclass(frozen=True, slots=True)
class Rates:
    """Several token buckets on one group (`limit = ["10/second", "1000/day"]`): all must allow.

    The state is one `tat` per rate, in order. A request is charged to every rate or to none:
    a denial by the daily rate spends nothing of the per-second one. The decision reported
    for an admission is the rate with the fewest units left; for a denial, the rate that
    makes the request wait longest (it is allowed only once all of them allow it).
    """

    name: str
    rates: tuple[Policy, ...]

    def __post_init__(self) -> None:
        if len(self.rates) < 2:
            raise ValueError("Rates needs two rates or more (one rate is a Policy)")

    @property
    def burst(self) -> int:
        """The quota reported when no decision says which rate binds: the smallest."""
        return min(rate.burst for rate in self.rates)

    @property
    def window_ns(self) -> int:
        """Time for every bucket to refill from empty: the longest of the rates'."""
        return max(rate.window_ns for rate in self.rates)

    empty: tuple[int, ...] = ()

    @staticmethod
    def idle_at(tats: tuple[int, ...]) -> int:
        """When every bucket is full again."""
        return max(tats, default=0)

    def consume(
        self, tats: tuple[int, ...], now: int, cost: int = 1, max_wait: int = 0
    ) -> tuple[tuple[int, ...] | None, Decision]:
        """Apply one request to every rate; the new `tat`s, or None when any rate denies.

        With `max_wait`, a request that every rate allows within it is charged to all of them
        at the instant the last one allows it (`Decision.wait`).
        """
        tats = tats or (0,) * len(self.rates)
        new_tats = []
        binding: Decision | None = None
        denial: Decision | None = None
        for rate, tat in zip(self.rates, tats, strict=True):
            new_tat, decision = consume(rate, tat, now, cost)
            if new_tat is None:
                if denial is None or decision.retry_after > denial.retry_after:
                    denial = decision
            else:
                new_tats.append(new_tat)
                if binding is None or decision.remaining < binding.remaining:
                    binding = decision
        if denial is not None:
            at = max(
                allowed_at(rate, tat, now, cost) for rate, tat in zip(self.rates, tats, strict=True)
            )
            if at - now > max_wait:
                return None, denial
            admitted, decision = self.consume(tats, int(at), cost)
            assert admitted is not None  # every rate allows it at `at`
            wait = int(at) - now
            return admitted, decision._replace(
                reset_after=decision.reset_after + wait / NS_PER_SECOND,
                wait=wait / NS_PER_SECOND,
            )
        assert binding is not None
        return tuple(new_tats), binding

    def settle(
        self, tats: tuple[int, ...], now: int, receipt: int, reserved: int, actual: int
    ) -> tuple[int, ...] | None:
        """`settle` on every rate; None when nothing changes."""
        tats = tats or (0,) * len(self.rates)
        settled = [
            settle(rate, tat, now, receipt, reserved, actual)
            for rate, tat in zip(self.rates, tats, strict=True)
        ]
        if all(new is None for new in settled):
            return None
        return tuple(old if new is None else new for old, new in zip(tats, settled, strict=True))

    def peek(self, tats: tuple[int, ...], now: int) -> Decision:
        """Every rate as a zero-cost request sees it: the one with the fewest units left."""
        views = [
            peek(rate, tat, now)
            for rate, tat in zip(self.rates, tats or (0,) * len(self.rates), strict=True)
        ]
        return min(views, key=lambda decision: (decision.remaining, -decision.reset_after))
