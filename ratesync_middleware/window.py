"""Exact sliding-window maths (rate-sync's `algorithm = "sliding_window"`): pure, clock passed in.

At most `limit` units are admitted in any window of `window_ns` nanoseconds, half-open: an
admission at `t0` counts at time `t` while `t - window_ns < t0 <= t`, so it leaves the window
at `t0 + window_ns`. The state is the log of the admissions still in the window, oldest first,
as `(admitted_at_ns, units)` pairs; a batch admitted at one instant is one pair. The log never
holds more than `limit` units, so its size is bounded by the limit (docs/engines/nats.md says
what that costs). A denial changes nothing; admissions only add to the log and time only
removes from it, so a stale copy of the log never proves a denial that the real one would not.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from .bucket import NS_PER_SECOND, Decision, _new_tuple

__all__ = ["EMPTY_LOG", "Log", "SlidingWindow"]

Log = tuple[tuple[int, int], ...]
"""Admissions still in the window: `(admitted_at_ns, units)`, oldest first."""

EMPTY_LOG: Log = ()


@dataclass(frozen=True, slots=True)
class SlidingWindow:
    """At most `limit` units in any `window_ns`; `Retry-After` is when enough units leave."""

    name: str
    limit: int
    window_ns: int

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.window_ns < 1:
            raise ValueError("window_ns must be >= 1")

    @property
    def burst(self) -> int:
        """The quota reported as `limit` in decisions and headers."""
        return self.limit

    empty: Log = EMPTY_LOG

    def idle_at(self, log: Log) -> int:
        """When the newest admission has left the window (the same as no state at all)."""
        return log[-1][0] + self.window_ns if log else 0

    def live(self, log: Log, now: int) -> Log:
        """The entries of `log` still inside the window at `now`."""
        cutoff = now - self.window_ns
        start = 0
        for admitted_at, _ in log:
            if admitted_at > cutoff:
                break
            start += 1
        return log[start:] if start else log

    def consume(
        self, log: Log, now: int, cost: int = 1, max_wait: int = 0
    ) -> tuple[Log | None, Decision]:
        """Apply one request of `cost` at `now`; the new log, or None when it is denied.

        With `max_wait`, a request that enough units leaving would allow within it is logged
        at that instant (a future entry, counted from now on) and told to `wait` until then.
        """
        live = self.live(log, now)
        used = sum(units for _, units in live)
        limit = self.limit
        if used + cost <= limit:
            admitted = _logged(live, now, cost)
            # Empty again once the newest admission has left.
            reset_after = (admitted[-1][0] + self.window_ns - now) / NS_PER_SECOND
            fields = (
                True,
                limit,
                limit - used - cost,
                0.0,
                reset_after,
                self.name,
                "",
                False,
                0.0,
                now,
            )
            return admitted, _new_tuple(Decision, fields)
        reset_after = (live[-1][0] + self.window_ns - now) / NS_PER_SECOND if live else 0.0
        if cost > limit:
            return None, Decision(
                False,
                limit,
                max(0, limit - used),  # an overdraw can take a log past its limit
                math.inf,
                reset_after,
                self.name,
                f"cost {cost} exceeds the limit {limit} of limiter {self.name!r}",
            )
        free_at = self.free_at(live, used + cost - limit)
        if free_at - now <= max_wait:
            admitted = _logged(live, free_at, cost)
            reset_after = (admitted[-1][0] + self.window_ns - now) / NS_PER_SECOND
            wait = (free_at - now) / NS_PER_SECOND
            return admitted, Decision(
                True, limit, 0, 0.0, reset_after, self.name, wait=wait, receipt=free_at
            )
        return None, Decision(
            False,
            limit,
            max(0, limit - used),
            (free_at - now) / NS_PER_SECOND,
            reset_after,
            self.name,
            f"rate limit {self.name!r} exceeded",
        )

    def settle(self, log: Log, now: int, receipt: int, reserved: int, actual: int) -> Log | None:
        """The log after an admission of `reserved` units, logged at `receipt`, is charged
        `actual` units instead; None when nothing changes.

        More than reserved overdraws: the extra units are logged now (later requests wait
        until they leave the window). Fewer removes the difference from the admission's own
        entry, if it is still in the window (units logged at one instant are alike); an entry
        that has left, or a log that was reset, has nothing of it left to give back.
        """
        live = self.live(log, now)
        if actual > reserved:
            return _logged(live, now, actual - reserved)
        index = bisect.bisect_left(live, (receipt, 0))
        if index == len(live) or live[index][0] != receipt or actual == reserved:
            return None
        units = live[index][1] - (reserved - actual)
        kept = ((receipt, units),) if units > 0 else ()
        return (*live[:index], *kept, *live[index + 1 :])

    def free_at(self, live: Log, units: int) -> int:
        """When the oldest entries of `live` holding at least `units` units have left."""
        freed = 0
        for admitted_at, count in live:
            freed += count
            if freed >= units:
                return admitted_at + self.window_ns
        raise ValueError("the log holds fewer units than asked for")  # pragma: no cover

    def peek(self, log: Log, now: int) -> Decision:
        """The window as a zero-cost request sees it, changing nothing."""
        live = self.live(log, now)
        used = sum(units for _, units in live)
        reset_after = (live[-1][0] + self.window_ns - now) / NS_PER_SECOND if live else 0.0
        return Decision(True, self.limit, max(0, self.limit - used), 0.0, reset_after, self.name)


def _logged(live: Log, at: int, cost: int) -> Log:
    """`live` with `cost` units admitted at `at`, kept oldest first (a batch at one instant is
    one entry). `at` is the newest unless an admission was reserved for later than it."""
    if not live or live[-1][0] < at:
        return (*live, (at, cost))
    if live[-1][0] == at:
        return (*live[:-1], (at, live[-1][1] + cost))
    index = bisect.bisect_left(live, (at, 0))
    if index < len(live) and live[index][0] == at:
        return (*live[:index], (at, live[index][1] + cost), *live[index + 1 :])
    return (*live[:index], (at, cost), *live[index:])
