"""The ways a limiter counts, behind one interface that every store relies on.

- `bucket.Policy`: a GCRA token bucket, one rate (`rate_per_second`, `limit = "N/period"`);
  the state is its `tat`.
- `bucket.Rates`: several token buckets on one group (`limit = ["10/second", "1000/day"]`),
  charged all or none; the state is one `tat` per rate.
- `window.SlidingWindow`: rate-sync's exact sliding window (`algorithm = "sliding_window"`);
  the state is the log of admissions still in the window.

States are immutable values (an int or tuples), so a store can cache and compare them. For all
three, requests only add to a state and time only takes away, so a stale state under-estimates
the real one and a denial it proves is a real denial (the stores' free denials rely on it).

`consume(state, now, cost, max_wait)`: a request that the algorithm would allow within
`max_wait` ns (rate-sync's `timeout`) is admitted for that future instant in the same new state
(the store writes it in the same compare-and-set) and its `Decision.wait` says how long the
caller sleeps first; one that would wait longer is denied at once, spending nothing.

`settle(state, now, receipt, reserved, actual)`: an admission charged `actual` units instead of
the `reserved` ones it took (`settle_header`, `count_status`, `Permit.settle`). A refund is the
one change besides a reset that lowers a state, so it must reach the stores' caches (they take
it as a write, see `Settlement`); it never gives back more than was reserved, nor what time
has given back already, so the bound of each algorithm holds counting what was charged.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from .bucket import Decision, Policy, Rates
from .window import SlidingWindow

__all__ = ["Algorithm", "AlgorithmLike", "Policy", "Rates", "Settlement", "SlidingWindow"]

Algorithm = Policy | Rates | SlidingWindow
"""What `LimiterConfig.policy` holds."""


class AlgorithmLike(Protocol):
    """The interface the three share (stores are written against it)."""

    @property
    def name(self) -> str: ...
    @property
    def burst(self) -> int: ...
    @property
    def window_ns(self) -> int: ...
    @property
    def empty(self) -> Any: ...

    def consume(
        self, state: Any, now: int, cost: int = 1, max_wait: int = 0
    ) -> tuple[Any, Decision]: ...
    def peek(self, state: Any, now: int) -> Decision: ...
    def settle(
        self, state: Any, now: int, receipt: Any, reserved: int, actual: int
    ) -> Any | None: ...
    def idle_at(self, state: Any) -> int: ...


class Settlement(NamedTuple):
    """A settle waiting to be written, shaped like a request (`consume`) so that a store queues,
    coalesces and retries it with the key's decisions, in arrival order."""

    policy: Algorithm
    receipt: Any  # the admission's `Decision.receipt`
    reserved: int
    actual: int

    def consume(
        self, state: Any, now: int, cost: int = 0, max_wait: int = 0
    ) -> tuple[Any | None, Decision]:
        """The settled state (None: unchanged), and the bucket as it then is."""
        algorithm: AlgorithmLike = self.policy
        settled = algorithm.settle(state, now, self.receipt, self.reserved, self.actual)
        return settled, algorithm.peek(state if settled is None else settled, now)
