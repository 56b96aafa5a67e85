"""The store interface: where bucket state lives and how one request is applied to it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..algorithms import Algorithm
from ..bucket import Decision
from ..slots import Slots

Clock = Callable[[], int]
"""Wall-clock time in integer nanoseconds since the epoch; shared buckets need one clock for all hosts."""

wall_clock: Clock = time.time_ns


class Store(Protocol):
    """Holds one `tat` per group key and applies requests to it atomically."""

    async def hit(
        self, key: str, policy: Algorithm, cost: int = 1, max_wait_ns: int = 0
    ) -> Decision:
        """Apply a request of `cost` to the bucket at `key`; raise `StoreError` when no answer.

        A request the algorithm allows within `max_wait_ns` is admitted for then, in the same
        write; the store does not sleep: the decision's `wait` is the caller's."""
        ...

    def settle(self, key: str, policy: Algorithm, receipt: int, reserved: int, actual: int) -> None:
        """Charge an admission of `reserved` units at `key` (its `Decision.receipt`) `actual`
        units instead: more overdraws, fewer refunds (algorithms.py). Never blocks, never
        raises, callable from any thread: a store that must write does it in the background,
        with the key's other decisions, and logs a failure (the charge stays as it was)."""
        ...

    async def peek(self, key: str, policy: Algorithm) -> Decision:
        """The bucket's state now, changing nothing."""
        ...

    async def reset(self, key: str) -> None:
        """Forget the bucket at `key` (it becomes full); for a slots key, free every slot
        (their holders' later releases give back nothing)."""
        ...

    async def acquire_slot(self, key: str, slots: Slots, timeout: float = 0.0) -> Decision:
        """Take one of the `slots.limit` slots of the group at `key`, or refuse (none taken);
        raise `StoreError` when no answer. With `timeout`, wait up to so many seconds for a
        slot to be given back (woken by the release, never by polling). An allowed decision's
        `receipt` is the slot's ticket, for `release_slot`."""
        ...

    def release_slot(self, key: str, slots: Slots, ticket: int) -> None:
        """Give back one slot taken by `acquire_slot` (`ticket`: its decision's `receipt`);
        nothing when a reset freed it since. Never blocks, never raises, callable from any
        thread: a store that must write does it in the background (and retries)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store may be used again afterwards (it reconnects)."""
        ...


@runtime_checkable
class DecidesNow(Protocol):
    """A capability: a store that can decide without awaiting (no I/O), like the memory store.

    The core asks for it (`isinstance(store, DecidesNow)`, once per limiter) and then calls
    `hit_now` without a coroutine; no adapter ever names a store class.
    """

    def hit_now(self, key: str, policy: Algorithm, cost: int = 1, max_wait_ns: int = 0) -> Decision:
        """`Store.hit`, answered at once."""
        ...

    def acquire_slot_now(self, key: str, slots: Slots) -> Decision:
        """`Store.acquire_slot`, answered at once."""
        ...
