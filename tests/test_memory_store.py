"""The embedded memory store: correct under coroutines and threads, bounded in memory."""

from __future__ import annotations

import asyncio
import threading

from ratesync_middleware.bucket import NS_PER_SECOND, Policy
from ratesync_middleware.stores.memory import MemoryStore

POLICY = Policy.per_second("api", 1.0, 10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000 * NS_PER_SECOND

    def __call__(self) -> int:
        return self.now


async def test_concurrent_coroutines_admit_exactly_the_burst() -> None:
    store = MemoryStore(clock=FakeClock())
    decisions = await asyncio.gather(*(store.hit("k", POLICY) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10


def test_threads_admit_exactly_the_burst() -> None:
    store = MemoryStore(clock=FakeClock())
    policy = Policy.per_second("api", 1.0, 1000)
    allowed: list[int] = []

    def spend() -> None:
        allowed.append(sum(store.hit_now("k", policy).allowed for _ in range(500)))

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 1000


def test_idle_buckets_are_dropped() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(1000):
        store.hit_now(f"k{i}", POLICY)
    assert len(store) == 1000
    clock.now += 2 * NS_PER_SECOND  # every bucket refilled: they are all equivalent to no entry
    for i in range(1000):
        store.hit_now(f"fresh{i}", POLICY)
    assert len(store) <= 1001


def test_a_million_distinct_keys_stay_bounded() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=10_000, clock=clock)
    policy = Policy.per_second("api", 0.001, 5)  # refills slowly: nothing goes idle
    for i in range(1_000_000):
        store.hit_now(f"client-{i}", policy)
    assert len(store) == 10_000


async def test_peek_and_reset() -> None:
    store = MemoryStore(clock=FakeClock())
    await store.hit("k", POLICY, cost=4)
    assert (await store.peek("k", POLICY)).remaining == 6
    await store.reset("k")
    assert (await store.peek("k", POLICY)).remaining == 10
