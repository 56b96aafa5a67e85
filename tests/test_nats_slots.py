"""`max_concurrent` on a real nats-server: the bound across processes, leases, the heartbeat.

- Two processes (multiprocessing spawn), 16 tasks each, every task holding a slot ~50 ms: the
  number in flight, counted through a shared counter, never exceeds N and reaches N.
- A SIGKILLed holder's slots come back after its lease, without anyone's help.
- A live holder keeps its slots past the lease with a heartbeat that writes once per lease/3.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ratesync_middleware import AsyncRateLimiter, RateLimitMiddleware
from ratesync_middleware.stores.nats import NatsStore
from tests.test_concurrency import Gate, call

LIMIT = 4
TASKS = 16
HOLD_SECONDS = 0.05


def slots_config(store: dict[str, Any], limit: int = LIMIT, lease: float = 30.0) -> dict[str, Any]:
    return {
        "stores": {"n": {**store, "timeout": 2.0}},
        "limiters": {
            "upload": {
                "store": "n",
                "key": "global",
                "max_concurrent": limit,
                "lease_seconds": lease,
            }
        },
        "middleware": {"default": "upload"},
    }


# --- two processes, many tasks -------------------------------------------------------------------


def hold_many(config: dict[str, Any], seconds: float, shared: dict[str, Any]) -> None:
    """A process of TASKS tasks, each taking a slot, holding it HOLD_SECONDS, giving it back."""
    asyncio.run(_hold_many(config, seconds, shared))


async def _hold_many(config: dict[str, Any], seconds: float, shared: dict[str, Any]) -> None:
    limiter = AsyncRateLimiter(config)
    await limiter.store("n").ready()  # type: ignore[attr-defined]
    shared["ready"].release()
    shared["go"].wait()
    lock, in_flight, peak = shared["lock"], shared["in_flight"], shared["peak"]
    end = time.monotonic() + seconds

    async def task() -> None:
        while time.monotonic() < end:
            decision, slot = await limiter.take_slot("upload")
            if decision.degraded:
                with lock:
                    shared["degraded"].value += 1
            if slot is None:
                await asyncio.sleep(0.002)
                continue
            with lock:
                in_flight.value += 1
                peak.value = max(peak.value, in_flight.value)
                shared["admitted"].value += 1
            await asyncio.sleep(HOLD_SECONDS)
            with lock:
                in_flight.value -= 1
            slot.release()

    await asyncio.gather(*(task() for _ in range(TASKS)))
    await asyncio.sleep(0.2)  # the last releases are written
    await limiter.aclose()


def test_max_concurrent_is_never_exceeded_across_two_processes_and_is_reached(
    nats_store: dict[str, Any],
) -> None:
    context = multiprocessing.get_context("spawn")
    shared = {
        "lock": context.Lock(),
        "in_flight": context.Value("i", 0, lock=False),
        "peak": context.Value("i", 0, lock=False),
        "admitted": context.Value("i", 0, lock=False),
        "degraded": context.Value("i", 0, lock=False),
        "ready": context.Semaphore(0),
        "go": context.Event(),
    }
    config = slots_config(nats_store)
    processes = [context.Process(target=hold_many, args=(config, 3.0, shared)) for _ in range(2)]
    for process in processes:
        process.start()
    for _ in processes:
        assert shared["ready"].acquire(timeout=30)
    shared["go"].set()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    peak, admitted = shared["peak"].value, shared["admitted"].value
    print(f"peak in flight {peak} of {LIMIT}, {admitted} admitted in 3 s")
    assert shared["degraded"].value == 0
    assert peak == LIMIT  # never more, and reached under load
    # Each slot turns over at most every HOLD_SECONDS: far fewer would mean slots leak.
    assert admitted >= LIMIT * 3.0 / HOLD_SECONDS / 4
    assert shared["in_flight"].value == 0


# --- a holder that dies --------------------------------------------------------------------------


def hold_and_wait(config: dict[str, Any], held: Any) -> None:
    asyncio.run(_hold_and_wait(config, held))


async def _hold_and_wait(config: dict[str, Any], held: Any) -> None:
    limiter = AsyncRateLimiter(config)
    slots = [await limiter.take_slot("upload") for _ in range(LIMIT)]
    assert all(slot is not None for _, slot in slots)
    held.set()
    await asyncio.sleep(3600)  # until SIGKILL


async def test_a_killed_holders_slots_come_back_after_its_lease(
    nats_store: dict[str, Any],
) -> None:
    lease = 2.0
    config = slots_config(nats_store, lease=lease)
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    holder = context.Process(target=hold_and_wait, args=(config, held))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 30)
        await asyncio.sleep(lease)  # the holder outlives its first lease: its heartbeat works
        async with AsyncRateLimiter(config) as limiter:
            decision, slot = await limiter.take_slot("upload")
            assert slot is None
            assert not decision.allowed
            assert not decision.degraded
            assert pytest.approx(decision.retry_after) == 1.0
            os.kill(holder.pid or 0, signal.SIGKILL)
            killed = time.monotonic()
            while slot is None:
                assert time.monotonic() - killed < lease + 3, "slots of a dead holder not back"
                await asyncio.sleep(0.05)
                decision, slot = await limiter.take_slot("upload")
            recovered = time.monotonic() - killed
            print(f"slots back {recovered:.2f} s after SIGKILL (lease_seconds = {lease})")
            assert recovered >= lease / 3  # the lease, not a lucky read, gave them back
            slot.release()
    finally:
        holder.kill()
        holder.join(10)


async def test_a_live_holders_heartbeat_keeps_its_slots_at_a_cost_that_traffic_does_not_set(
    nats_store: dict[str, Any],
) -> None:
    lease = 0.6
    config = slots_config(nats_store, limit=1, lease=lease)
    async with AsyncRateLimiter(config) as holder, AsyncRateLimiter(config) as other:
        _, slot = await holder.take_slot("upload")
        assert slot is not None
        store = holder.store("n")
        assert isinstance(store, NatsStore)
        subject = store.subject("upload.=slots")
        _, first = await store.read_raw(subject, 1.0)
        seconds = 5 * lease
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # the other process is refused all along
            decision, refused = await other.take_slot("upload")
            assert refused is None
            assert not decision.allowed
            await asyncio.sleep(0.05)
        _, last = await store.read_raw(subject, 1.0)
        renewals = last - first
        print(f"{renewals} renewals in {seconds:.1f} s with lease_seconds = {lease}")
        assert 1 <= renewals <= seconds / (lease / 3) + 2
        slot.release()
        await asyncio.sleep(0.2)
        _, slot = await other.take_slot("upload")
        assert slot is not None
        slot.release()


# --- through an app ------------------------------------------------------------------------------


async def test_asgi_over_nats_refuses_beyond_max_concurrent_and_releases(
    nats_store: dict[str, Any],
) -> None:
    gate = Gate()
    app = Starlette(
        routes=[Route("/held", gate.endpoint), Route("/", lambda r: PlainTextResponse("hi"))],
        middleware=[Middleware(RateLimitMiddleware, config=slots_config(nats_store, limit=1))],
    )
    held = asyncio.create_task(call(app, "/held"))
    await asyncio.wait_for(gate.entered.wait(), 5)
    status, _ = await call(app, "/")
    assert status == 429
    gate.opened.set()
    assert (await held)[0] == 200
    await asyncio.sleep(0.1)  # the release is written in the background
    assert await call(app, "/") == (200, b"hi")
