"""Token leases for hot keys: one compare-and-set takes several tokens of a shared token bucket,
and this process admits from them locally (docs/engines/nats.md, "Leases").

GCRA gives each admitted unit a slot of one interval on the bucket's timeline (`tat` is the end
of the last slot taken): a unit admitted at `now` gets a slot that starts no earlier than `now`
and ends at most `burst` intervals after it. A lease is a run of consecutive slots taken at
once; a unit of it may be admitted only until its slot starts, so each admission from a lease
is one the bucket itself could have made at that moment, and the fleet admits at most
`burst + rate*t` over any interval, however many processes lease. A unit whose slot started
unused has expired: it is lost to everyone. A lease therefore starts `lead` ahead of now (the
slots in between are skipped once, while the bucket is nearly full) and lasts about
`LEASE_SECONDS`; it is sized from this process's recent demand.

Only token buckets (`Policy`) are leased. A sliding window counts each admission at the time
it is made, so units taken now and admitted later would be counted too early; several rates
would need one run of slots per rate. Both keep one compare-and-set per batch.

A settle of an admission made from a lease is written to the shared bucket, like any other
(store.py): a refund of a unit admitted at `now` is one the bucket could have made itself.
"""

from __future__ import annotations

import math
import random

from ...algorithms import Algorithm
from ...bucket import Decision, Policy

__all__ = ["LEASE_SECONDS", "Lease", "lease_for", "warm"]

LEASE_SECONDS = 0.05
"""How long a lease should last: a hot key costs each process about 1/LEASE_SECONDS writes/s."""

MIN_UNITS = 4  # a lease of fewer units is not worth it: the key stays on the plain path
BURST_SHARE = 8  # a lease holds at most 1/8 of the burst ...
LEFT_SHARE = 4  # ... and at most a quarter of what the bucket has left (so near the limit,
# where every token counts and processes race for each, there are no leases to strand)
HOT_WRITES = 16  # a key is hot after this many writes in a row that each saw enough demand ...
HOT_SECONDS = 0.05  # ... over at least this long (a short burst of requests takes no lease)
HOLD_SHARE = 16  # at the limit, a process waits for at most 1/16 of the burst to come back


def warm(asked: int, elapsed: float) -> bool:
    """Whether `asked` units over `elapsed` seconds would fill a lease (MIN_UNITS per lease)."""
    return asked * LEASE_SECONDS >= MIN_UNITS * elapsed


def lease_for(algorithm: Algorithm) -> Lease | None:
    """A fresh lease state for a key of `algorithm`, or None when it is never leased."""
    if isinstance(algorithm, Policy) and algorithm.burst >= MIN_UNITS * BURST_SHARE:
        return Lease(algorithm)
    return None


class Lease:
    """What this process holds of one key's bucket, and how hot the key is here.

    `runs` are `[next_start, end]` pairs of wall-clock ns, oldest first: the units left are the
    slots from `next_start` to `end`, one interval each, and each may be admitted until its slot
    starts.
    """

    __slots__ = (
        "at_limit",
        "demand",
        "hot_since",
        "left",
        "low_water",
        "observed_at",
        "policy",
        "refill_at",
        "reserve",
        "runs",
        "streak",
        "waiting",
    )

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.runs: list[list[int]] = []
        self.left = 0  # units in `runs` (those not yet expired at the last look)
        self.refill_at = 0  # wall ns: renew from then on (the last run's slots are starting)
        self.low_water = 0  # renew when fewer units than this are left
        self.demand = 0.0  # units per second asked of this key here, a moving average
        self.observed_at = 0.0  # monotonic time of the last `observe`
        self.streak = 0
        self.hot_since = 0.0
        # At the limit, wait for this many more units than asked before racing for them.
        ceiling = min(math.ceil(policy.rate * LEASE_SECONDS), policy.burst // HOLD_SHARE)
        self.reserve = max(0, ceiling - 1)
        self.waiting = self.reserve  # this round's, drawn at every write (`observe`)
        self.at_limit = False  # the last write found too little left in the bucket to lease

    @property
    def holding(self) -> bool:
        """Whether decisions that the lease cannot serve wait for `reserve` (`hold_back`)."""
        return self.at_limit and self.streak >= HOT_WRITES

    def take(self, now: int, cost: int) -> bool:
        """Admit `cost` units at `now` from the lease, skipping the units that expired."""
        interval = self.policy.interval_ns
        runs = self.runs
        while runs:
            run = runs[0]
            start, end = run
            if start < now:  # these slots have started: their units expired unused
                skipped = -(-(now - start) // interval)
                start += skipped * interval
                self.left -= skipped
            if start + cost * interval <= end:
                run[0] = start + cost * interval
                self.left -= cost
                return True
            self.left -= max(0, (end - start) // interval)
            runs.pop(0)
        self.left = 0
        return False

    def hold_back(self, tat: int, now: int, cost: int) -> Decision | None:
        """A denial while fewer than `cost + reserve` units are back in the bucket, for a hot
        key at the limit (its last write found no room for a lease). Every process holds
        back alike, or the one that does not would win every race (fairness).

        Each unit comes back every interval; racing for each one as it does costs every process
        of the fleet a lost compare-and-set and a read per unit. Every process waiting for
        about LEASE_SECONDS of them (at most 1/16 of the burst) lets one write take them for
        its waiting requests; what it leaves stays in the bucket for whoever writes next.
        """
        policy, waited = self.policy, cost + self.waiting
        start = tat if tat > now else now
        if start + waited * policy.interval_ns - policy.window_ns <= now or waited > policy.burst:
            return None  # they are back (checked first: the denial is built only when needed)
        return policy.consume(tat, now, waited)[1]

    def wants_refill(self, now: int) -> bool:
        """Whether to renew now, so that the next lease lands before this one runs out."""
        return self.left < self.low_water or now >= self.refill_at

    def observe(self, asked: int, monotonic_now: float) -> bool:
        """Account for the `asked` units since the last write; whether the key is hot."""
        # Processes that wait alike would race alike, and the one that learns the state first
        # (it wrote last) would win every time: each round waits a random 1/2 to all of it.
        self.waiting = random.randint(self.reserve // 2, self.reserve)
        elapsed = monotonic_now - self.observed_at
        self.observed_at = monotonic_now
        sample = asked / elapsed if elapsed > 0 else 0.0
        self.demand = sample if self.streak == 0 else (self.demand + sample) / 2
        if not warm(asked, elapsed):
            self.streak = 0
            return False
        if self.streak == 0:
            self.hot_since = monotonic_now
        self.streak += 1
        return self.streak >= HOT_WRITES and monotonic_now - self.hot_since >= HOT_SECONDS

    def slots(self, tat: int, now: int, round_trip: float) -> tuple[int, int] | None:
        """The run of slots to lease after `tat` at `now`, or None when none is worth it.

        Enough for the demand until the next renewal lands, no more than the shares of the
        burst and of what is left allow; it starts `lead` ahead, so that it is not expiring
        while its write travels.
        """
        policy = self.policy
        interval, window = policy.interval_ns, policy.window_ns
        lead = min(int((LEASE_SECONDS + 2 * round_trip) * 1e9), window // LEFT_SHARE)
        left_in_bucket = (now + window - max(tat, now)) // interval
        self.at_limit = left_in_bucket // LEFT_SHARE < MIN_UNITS
        wanted = math.ceil(self.demand * (LEASE_SECONDS + 3 * round_trip)) - self.left
        start = max(tat, now + lead)
        fits = (now + window - start) // interval
        units = min(wanted, policy.burst // BURST_SHARE, left_in_bucket // LEFT_SHARE, fits)
        if units < MIN_UNITS:
            return None
        return start, start + units * interval

    def add(self, start: int, end: int, round_trip: float) -> None:
        """The run `start..end` was written: its units are this process's to admit."""
        runs = self.runs
        if runs and runs[-1][1] == start:
            runs[-1][1] = end  # right after the last run: one run
        else:
            runs.append([start, end])
        self.left += (end - start) // self.policy.interval_ns
        margin = int(3 * round_trip * 1e9)
        self.refill_at = end - self.policy.interval_ns - margin
        self.low_water = max(1, math.ceil(self.demand * 3 * round_trip))

    def unused(self, now: int) -> tuple[int, int] | None:
        """The slots of the last run not yet started at `now` (what a return gives back)."""
        if not self.runs:
            return None
        start, end = self.runs[-1]
        if start < now:
            interval = self.policy.interval_ns
            start += -(-(now - start) // interval) * interval
        return (start, end) if start < end else None

    def drop(self) -> None:
        self.runs.clear()
        self.left = 0
