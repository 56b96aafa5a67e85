"""The NATS store on an operator's worst day (issue 18): hung servers, black holes, slow links.

Real nats-server processes only; a stalled or slow link is `tests/tcpproxy.py` on loopback. Every
server this file SIGSTOPs is SIGCONTed and stopped in `finally`. The claims are in
docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import pytest

from ratesync_middleware import AsyncRateLimiter, Decision, RateLimiter
from ratesync_middleware.stores.nats import BucketTtlTooShortError, NatsStore
from tests.conftest import start_server
from tests.natsserver import NatsServer
from tests.tcpproxy import TcpProxy, tcp_proxy

pytestmark = [pytest.mark.nats]


def limits(url: str, bucket: str, **store: Any) -> dict[str, Any]:
    return {
        "stores": {"prod": {"engine": "nats", "url": url, "bucket_name": bucket, **store}},
        "limiters": {
            "api": {"store": "prod", "rate_per_second": 1000.0, "burst": 1000},
            "slow": {"store": "prod", "rate_per_second": 0.001, "burst": 3},
        },
    }


def nats_store_of(limiter: AsyncRateLimiter) -> NatsStore:
    store = limiter.store("prod")
    assert isinstance(store, NatsStore)
    return store


@contextmanager
def stopped(server: NatsServer) -> Iterator[None]:
    """The server SIGSTOPped (hung: its sockets stay open, nothing is read or answered)."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.1)  # every thread of the server has stopped
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server of this test's own: it will be hung, and must not hang the session's server."""
    server = start_server()
    try:
        yield server
    finally:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGCONT)
        server.cleanup()


async def timed(limiter: AsyncRateLimiter, name: str, key: str) -> tuple[float, Decision]:
    started = time.monotonic()
    decision = await limiter.hit(name, key=key)
    return time.monotonic() - started, decision


async def load(
    limiter: AsyncRateLimiter, workers: int, seconds: float, key: Callable[[int], str]
) -> tuple[list[tuple[float, float, Decision]], int]:
    """`workers` concurrent decision loops for `seconds`: (start offset, latency, decision) each.

    Returns the answers and how many decisions were still unanswered 2 s after the end.
    """
    begun = time.monotonic()
    answers: list[tuple[float, float, Decision]] = []

    async def worker(index: int) -> None:
        for n in range(100_000):
            started = time.monotonic()
            if started - begun >= seconds:
                return
            decision = await limiter.hit("api", key=key(index * 7 + n))
            answers.append((started - begun, time.monotonic() - started, decision))
            await asyncio.sleep(0)  # a real request does some work between decisions

    tasks = [asyncio.ensure_future(worker(i)) for i in range(workers)]
    _, pending = await asyncio.wait(tasks, timeout=seconds + 2.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return answers, len(pending)


# -- fault 1: a hung server under load ----------------------------------------------------------


def long_key(n: int) -> str:
    # Long identities (hashed to 64 hex digits in the key) make each request as large as a real
    # app's with user ids: the outgoing buffer fills as it would under a heavier load.
    return f"user-{n % 2000:04d}-" + "x" * 120


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "seconds"),
    # A black hole fills the kernel's buffers (~4 MiB) and then nats-py's 2 MiB pending
    # buffer within ~7 s at this load: past that, a publish used to wait for the link.
    [("sigstop", 4.0), ("black-hole", 9.0)],
)
async def test_a_hung_server_under_load_answers_every_decision_within_a_second(
    own_server: NatsServer, bucket_name: str, fault: str, seconds: float
) -> None:
    with tcp_proxy(own_server.port) as proxy:
        url = proxy.url if fault == "black-hole" else own_server.url
        async with AsyncRateLimiter(limits(url, bucket_name)) as limiter:
            await asyncio.gather(*(limiter.hit("api", key=long_key(n)) for n in range(200)))
            hang: Any = stopped(own_server) if fault == "sigstop" else black_holed(proxy)
            with hang:
                answers, unanswered = await load(limiter, 1000, seconds, long_key)
            assert unanswered == 0, f"{unanswered} decisions hung"
            latencies = [latency for _, latency, _ in answers]
            late = [latency for started, latency, _ in answers if started >= 1.0]
            quick = sum(latency < 0.05 for latency in late) / max(1, len(late))
            print(
                f"{fault}: {len(answers)} answers, max {max(latencies):.3f}s, "
                f"{quick:.1%} of {len(late)} after 1 s under 50 ms"
            )
            assert max(latencies) < 1.0
            assert len(late) >= 1000
            assert quick >= 0.8
            assert all(d.allowed and d.degraded for _, _, d in answers if d.degraded)
            # The server answers again: limiting resumes without a restart.
            deadline = time.monotonic() + 15
            decision = await limiter.hit("api", key="after")
            while decision.degraded and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                decision = await limiter.hit("api", key="after")
            assert not decision.degraded, "limiting did not resume"


@contextmanager
def black_holed(proxy: TcpProxy) -> Iterator[None]:
    proxy.pause()
    try:
        yield
    finally:
        proxy.resume()


async def test_a_connection_that_does_not_drain_is_dropped_within_seconds(
    own_server: NatsServer, bucket_name: str
) -> None:
    async with AsyncRateLimiter(limits(own_server.url, bucket_name)) as limiter:
        assert not (await limiter.hit("api", key="k")).degraded
        store = nats_store_of(limiter)
        first = store._nc
        with stopped(own_server):
            started = time.monotonic()
            while store._nc is first and time.monotonic() - started < 6.0:
                await limiter.hit("api", key="k")
                await asyncio.sleep(0.05)
            assert store._nc is not first, "the hung connection was never given up"
            assert time.monotonic() - started < 5.0
        deadline = time.monotonic() + 15
        decision = await limiter.hit("api", key="k")
        while decision.degraded and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            decision = await limiter.hit("api", key="k")
        assert not decision.degraded, "limiting did not resume on a new connection"


# -- fault 2: the back-off holds while TCP is up; the deadline is per decision ------------------


async def test_back_off_answers_at_once_while_the_socket_is_still_up(
    own_server: NatsServer, bucket_name: str
) -> None:
    async with AsyncRateLimiter(limits(own_server.url, bucket_name, backoff=2.0)) as limiter:
        assert not (await limiter.hit("api", key="a")).degraded
        with stopped(own_server):
            first, failed = await timed(limiter, "api", "a")
            assert failed.degraded
            assert first < 0.6
            for key in ("a", "b", "never-seen"):  # cached, idle and unknown keys alike
                elapsed, decision = await timed(limiter, "api", key)
                assert decision.degraded
                assert elapsed < 0.05, f"{key}: waited {elapsed:.3f}s during the back-off"


async def test_a_cpu_starved_process_reads_its_late_reply_and_keeps_deciding(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # The event loop is blocked (threads holding the GIL, a busy handler) while a decision's
    # reply arrives: when it runs again, the deadline timer and the unread reply are both due.
    # NATS did answer: the decision takes the reply, and no back-off opens.
    async with AsyncRateLimiter(limits(nats_server.url, bucket_name, backoff=5.0)) as limiter:
        assert not (await limiter.hit("api", key="k")).degraded
        decision = asyncio.ensure_future(limiter.hit("api", key="k"))
        for _ in range(5):
            await asyncio.sleep(0)  # the request is written to the socket
        time.sleep(0.4)  # noqa: ASYNC251 (the point: a loop that cannot run for 0.4 s)
        starved = await decision
        assert not starved.degraded, starved.reason
        after = await limiter.hit("api", key="k")
        assert not after.degraded, after.reason


async def test_one_late_answer_ends_the_back_off_it_opened(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # The link holds everything for 0.4 s (past the 0.25 s deadline), then delivers it: the
    # decision in flight is answered by its fail rule, but its late reply proves NATS answers,
    # so the next decisions are NATS's again, not the fail rule's for the whole back-off.
    with tcp_proxy(nats_server.port) as proxy:
        async with AsyncRateLimiter(limits(proxy.url, bucket_name, backoff=5.0)) as limiter:
            assert not (await limiter.hit("api", key="k")).degraded
            proxy.pause()
            missed = asyncio.ensure_future(limiter.hit("api", key="k"))
            await asyncio.sleep(0.4)
            proxy.resume()
            assert (await missed).degraded
            deadline = time.monotonic() + 1.0
            decision = await limiter.hit("api", key="k")
            while decision.degraded and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                decision = await limiter.hit("api", key="k")
            assert not decision.degraded, "the back-off outlived the late answer"


@pytest.mark.parametrize("outage", ["sigstop", "killed-and-restarted"])
async def test_the_store_says_when_it_answers_again(
    own_server: NatsServer, bucket_name: str, caplog: pytest.LogCaptureFixture, outage: str
) -> None:
    async with AsyncRateLimiter(limits(own_server.url, bucket_name, backoff=0.2)) as limiter:
        assert not (await limiter.hit("api", key="k")).degraded
        with caplog.at_level(logging.INFO, "ratesync_middleware"):
            if outage == "sigstop":
                with stopped(own_server):
                    for _ in range(3):
                        assert (await limiter.hit("api", key="k")).degraded
            else:
                own_server.kill()
                for _ in range(3):
                    assert (await limiter.hit("api", key="k")).degraded
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(own_server.start)  # same port, same store directory
            deadline = time.monotonic() + 15
            while (await limiter.hit("api", key="k")).degraded:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    again = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(again) == 1
    assert again[0].levelno == logging.INFO
    message = again[0].getMessage()
    assert message.startswith("store 'prod' answers again after ")
    count = int(message.split("; ")[1].split()[0])
    assert count >= 3
    assert message.endswith("decisions used the fail rule meanwhile")


async def test_a_round_trip_average_beyond_the_deadline_does_not_stop_every_decision(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # A burst of slow round trips (a loaded machine, 6,000 writes at once) can push the moving
    # average of round trips past the deadline. Decisions with time left are still sent, and
    # the average comes back down with them.
    async with AsyncRateLimiter(limits(nats_server.url, bucket_name)) as limiter:
        assert not (await limiter.hit("api", key="warm")).degraded
        store = nats_store_of(limiter)
        store._round_trip = 10.0  # as after a burst: far beyond the 0.25 s deadline
        decision = await limiter.hit("api", key="next")
        assert not decision.degraded, decision.reason
        for n in range(40):
            await limiter.hit("api", key=f"k{n}")
        assert store._round_trip < 1.0


async def test_a_decision_queued_behind_a_write_keeps_its_own_deadline(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # A round trip of 0.4 s under a deadline of 0.5 s: the first write lands in time, and a
    # decision queued right behind it has 0.1 s left for its own write, not another 0.5 s.
    with tcp_proxy(nats_server.port) as proxy:
        async with AsyncRateLimiter(limits(proxy.url, bucket_name, timeout=0.5)) as limiter:
            assert not (await limiter.hit("api", key="k")).degraded
            proxy.delay = 0.2
            first = asyncio.ensure_future(timed(limiter, "api", "k"))
            await asyncio.sleep(0.02)
            queued_latency, queued = await timed(limiter, "api", "k")
            first_latency, first_decision = await first
            print(f"first {first_latency:.3f}s, queued {queued_latency:.3f}s")
            assert not first_decision.degraded
            assert queued_latency < 0.5 + 0.15
            assert queued.degraded


@pytest.mark.slow
# The fault this guards against answered none by NATS, every decision waiting out its deadline.
# The shares are floors a loaded 2-core machine still clears: at 0.25 s, 50-70% on a quiet
# machine, but a CPU-starved one (the proxy's thread adds its own delay) can open a back-off, and
# its fail-open answers are instant, so the tasks then loop thousands of times: 0.1% of 36,000
# answers (41 by NATS) was seen with three busy loops on the two cores. So at 0.25 s only a
# count is asked of NATS; at 0.5 s nearly all fit.
@pytest.mark.parametrize(("timeout", "answered_by_nats"), [(0.25, 0.0), (0.5, 0.8)])
async def test_a_slow_link_keeps_every_answer_within_the_deadline(
    nats_server: NatsServer, bucket_name: str, timeout: float, answered_by_nats: float
) -> None:
    # 60 ms each way: a 120 ms round trip. A decision on an idle key takes one round trip; one
    # queued behind a write to its key takes up to two, which the default 0.25 s deadline does
    # not always fit: those are answered fail-open by their deadline, and the others by NATS
    # (a miss while NATS answers other calls opens no back-off). With 0.5 s, nearly all fit.
    with tcp_proxy(nats_server.port) as proxy:
        config = limits(proxy.url, bucket_name, timeout=timeout)
        async with AsyncRateLimiter(config) as limiter:
            assert not (await limiter.hit("api", key="warm")).degraded
            proxy.delay = 0.06
            answers, unanswered = await load(limiter, 200, 2.0, lambda n: f"k{n % 20}")
    assert unanswered == 0
    latencies = sorted(latency for _, latency, _ in answers)
    by_nats = sum(not d.degraded for _, _, d in answers)
    real = by_nats / len(answers)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(
        f"timeout {timeout}: {len(answers)} answers, p99 {p99:.3f}s, "
        f"max {latencies[-1]:.3f}s, {real:.1%} answered by NATS"
    )
    assert latencies[-1] < timeout + 0.15
    assert by_nats >= 10
    assert real >= answered_by_nats
    assert all(d.allowed for _, _, d in answers)


# -- fault 6: one open attempt per back-off -------------------------------------------------------


async def test_one_open_attempt_per_back_off_while_the_bucket_is_gone(
    own_server: NatsServer, bucket_name: str
) -> None:
    config = limits(own_server.url, bucket_name, auto_create=False, backoff=0.5)
    nc = await nats.connect(own_server.url)
    try:
        await nc.jetstream().create_key_value(bucket=bucket_name, history=1, ttl=86400)
        async with AsyncRateLimiter(config) as limiter:
            assert not (await limiter.hit("api", key="k")).degraded
            await nc.jetstream().delete_key_value(bucket_name)
            store = nats_store_of(limiter)
            opened = 0
            original_open = store._open

            async def counting_open(*args: Any, **kwargs: Any) -> Any:
                nonlocal opened
                opened += 1
                return await original_open(*args, **kwargs)

            store._open = counting_open  # type: ignore[method-assign]
            started = time.monotonic()
            latencies: list[float] = []

            async def worker(index: int) -> None:
                while time.monotonic() - started < 2.0:
                    elapsed, decision = await timed(limiter, "api", f"k{index}")
                    latencies.append(elapsed)
                    assert decision.degraded
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(50))), 10)
            elapsed = time.monotonic() - started
            print(f"{opened} open attempts in {elapsed:.2f}s, max wait {max(latencies):.3f}s")
            assert opened <= elapsed / 0.5 + 1, f"{opened} open attempts in {elapsed:.2f}s"
            assert max(latencies) < 0.25 + 0.25, f"a decision waited {max(latencies):.3f}s"
    finally:
        await nc.close()


async def test_a_burst_larger_than_the_outgoing_buffer_never_blocks_a_decision(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # 12,000 writes at once on a black-holed link are more than nats-py's 2 MiB pending buffer
    # and the kernel's socket buffers: a publish that forces a flush would wait for the link.
    with tcp_proxy(nats_server.port) as proxy:
        async with AsyncRateLimiter(limits(proxy.url, bucket_name)) as limiter:
            assert not (await limiter.hit("api", key="warm")).degraded
            with black_holed(proxy):
                started = time.monotonic()
                burst = [timed(limiter, "api", long_key(n) + str(n)) for n in range(12_000)]
                done, pending = await asyncio.wait(
                    [asyncio.ensure_future(decision) for decision in burst], timeout=3.0
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                elapsed = time.monotonic() - started
            assert not pending, f"{len(pending)} of 12000 decisions hung ({elapsed:.1f}s)"
            # Each answers by its deadline (0.25 s) plus the time 12,000 tasks take to run on
            # one loop; a loaded CI machine has made that 1.09 s. The fault was 24 s and more.
            assert max(task.result()[0] for task in done) < 2.0


# -- fault 3: the bucket's max age covers the longest window --------------------------------------


WEEKLY = {"limit": 5, "window_seconds": 7 * 86400}  # 5 per week: a week to refill


async def test_an_auto_created_bucket_keeps_keys_for_the_longest_window(
    nats_url: str, bucket_name: str
) -> None:
    config = limits(nats_url, bucket_name)
    config["limiters"]["weekly"] = {"store": "prod", **WEEKLY}
    async with AsyncRateLimiter(config) as limiter:
        assert not (await limiter.hit("weekly", key="k")).degraded
    nc = await nats.connect(nats_url)
    try:
        status = await (await nc.jetstream().key_value(bucket_name)).status()
    finally:
        await nc.close()
    assert status.ttl is not None
    assert status.ttl >= 7 * 86400  # a key idle for a day is not a full bucket a week early


async def test_an_existing_bucket_that_forgets_keys_early_is_refused(
    nats_url: str, bucket_name: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().create_key_value(bucket=bucket_name, history=1, ttl=86400)
    finally:
        await nc.close()
    config = limits(nats_url, bucket_name, auto_create=False)
    config["limiters"]["weekly"] = {"store": "prod", **WEEKLY}
    async with AsyncRateLimiter(config) as limiter:
        with pytest.raises(BucketTtlTooShortError) as raised:
            await nats_store_of(limiter).ready()
        message = str(raised.value)
        assert message.startswith("Bucket TTL too short")
        assert bucket_name in message
        assert "24h" in message  # the bucket's max age
        assert "604800s" in message  # and the window it must cover
        assert f"nats kv add {bucket_name} --history=1 --ttl=168h" in message
        decisions = [await limiter.hit("weekly", key="k") for _ in range(7)]
        assert all(d.degraded for d in decisions)  # never a silent full bucket every day


# -- fault 4: a bucket deleted and created again out of band --------------------------------------


async def test_a_re_created_bucket_drops_the_cached_revisions(
    nats_url: str, bucket_name: str
) -> None:
    # A's cached revision of key k is 2 (two writes of cost 1). The bucket is re-created and B
    # spends 8 in two writes: the new stream's revision of k is 2 as well, holding 8 spent. A's
    # compare-and-set with revision 2 would succeed and overwrite 8 spent with A's 3.
    config = limits(nats_url, bucket_name)
    config["limiters"]["burst10"] = {"store": "prod", "rate_per_second": 0.01, "burst": 10}
    async with AsyncRateLimiter(config) as a:
        admitted = [(await a.hit("burst10", key="k")).allowed for _ in range(2)]
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.delete_key_value(bucket_name)
            await js.create_key_value(bucket=bucket_name, history=1, ttl=86400, direct=True)
        finally:
            await nc.close()
        async with AsyncRateLimiter(config) as b:
            assert (await b.hit("burst10", key="k", cost=4)).allowed
            assert (await b.hit("burst10", key="k", cost=4)).allowed
        await asyncio.sleep(2.6)  # the store checks the stream's creation time every 2 s
        admitted_after = [await a.hit("burst10", key="k") for _ in range(8)]
    assert not any(d.degraded for d in admitted_after)
    # The new bucket holds 8 spent of 10: two more, not eight.
    assert sum(d.allowed for d in admitted_after) == 2, admitted + admitted_after


# -- fault 5: a foreign value is logged, never silently a full bucket -----------------------------


@pytest.mark.parametrize(
    ("stored", "remaining"),
    [
        # A writer with a fractional cost left 5 spent as a float: read as 5 spent (rounded up).
        (
            lambda now: json.dumps(
                {"v": 1, "tat_ns": float(now + 5 * 10**8), "interval_ns": 10**8, "burst": 10}
            ),
            4,
        ),
        (lambda now: "not json at all", 9),  # unreadable: a full bucket, but said so
    ],
    ids=["float-tat", "garbage"],
)
async def test_a_foreign_value_is_logged_and_never_silently_a_full_bucket(
    nats_url: str,
    bucket_name: str,
    caplog: pytest.LogCaptureFixture,
    stored: Callable[[int], str],
    remaining: int,
) -> None:
    config = limits(nats_url, bucket_name)
    config["limiters"]["ten"] = {"store": "prod", "rate_per_second": 10.0, "burst": 10}
    async with AsyncRateLimiter(config) as limiter:
        assert not (await limiter.hit("ten", key="warm")).degraded  # creates the bucket
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bucket_name)
            await kv.put("ten.victim", stored(time.time_ns()).encode())
        finally:
            await nc.close()
        with caplog.at_level(logging.WARNING, logger="ratesync_middleware.nats"):
            decision = await limiter.hit("ten", key="victim")
    assert not decision.degraded
    assert decision.remaining == remaining
    warnings = [r.getMessage() for r in caplog.records if r.name == "ratesync_middleware.nats"]
    assert any("'ten.victim'" in text and "cannot read" in text for text in warnings), warnings


# -- fault 8: a write the bucket refuses says why --------------------------------------------------


async def test_a_refused_write_logs_the_servers_reason(
    nats_url: str, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().create_key_value(
            bucket=bucket_name, history=1, ttl=86400, max_value_size=16, direct=True
        )
    finally:
        await nc.close()
    async with AsyncRateLimiter(limits(nats_url, bucket_name, auto_create=False)) as limiter:
        with caplog.at_level(logging.WARNING):
            decision = await limiter.hit("api", key="k")
    assert decision.degraded
    logged = " ".join(r.getMessage() for r in caplog.records)
    print(logged)
    assert "message size exceeds maximum allowed" in logged  # the server's description
    assert "error 10054" in logged  # and its error code


async def test_a_burst_on_a_healthy_link_keeps_its_connection(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # The same burst with the server answering: the outgoing buffer may pass its limit for a
    # moment (requests refused unsent), but the PING is answered and the connection stays.
    async with AsyncRateLimiter(limits(nats_server.url, bucket_name)) as limiter:
        assert not (await limiter.hit("api", key="warm")).degraded
        store = nats_store_of(limiter)
        connection = store._nc
        burst = await asyncio.wait_for(
            asyncio.gather(*(timed(limiter, "api", long_key(n) + str(n)) for n in range(6_000))),
            10.0,
        )
        real = sum(not decision.degraded for _, decision in burst)
        print(f"{real} of 6000 answered by NATS, max {max(t for t, _ in burst):.3f}s")
        await asyncio.sleep(1.5)  # a probe, if any, has had its PONG
        assert store._nc is connection
        # Decisions that missed their deadline in the burst may have opened the back-off (1 s
        # from the last of them): the store answers again once it ends, on the same connection.
        deadline = time.monotonic() + 3.0
        after = await limiter.hit("api", key="after")
        while after.degraded and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await limiter.hit("api", key="after")
        assert not after.degraded, after.reason
        assert store._nc is connection


@pytest.mark.slow
async def test_a_server_that_hangs_at_start_up_holds_only_the_first_attempt(
    nats_server: NatsServer, bucket_name: str
) -> None:
    # Connecting into a black hole takes the whole connect_timeout. The first attempt holds its
    # callers (start-up); every later one runs in the background, one per back-off, and holds a
    # decision until its deadline at most.
    with tcp_proxy(nats_server.port) as proxy:
        proxy.pause()
        config = limits(proxy.url, bucket_name, connect_timeout=1.0, backoff=0.3)
        async with AsyncRateLimiter(config) as limiter:
            first, decision = await timed(limiter, "api", "k")
            assert decision.degraded
            assert first < 1.0 + 0.5
            latencies = []
            started = time.monotonic()
            while time.monotonic() - started < 2.5:
                elapsed, decision = await timed(limiter, "api", "k")
                assert decision.degraded
                latencies.append(elapsed)
                await asyncio.sleep(0.02)
            print(f"first {first:.3f}s, then max {max(latencies):.3f}s of {len(latencies)}")
            assert max(latencies) < 0.25 + 0.15
            proxy.resume()
            deadline = time.monotonic() + 10
            while (await limiter.hit("api", key="k")).degraded:
                assert time.monotonic() < deadline, "limiting did not start once the link came up"
                await asyncio.sleep(0.1)


def test_the_sync_facade_answers_at_once_while_the_server_hangs(
    own_server: NatsServer, bucket_name: str
) -> None:
    # RateLimiter (WSGI, Django, Flask) waits for its loop thread with an outer deadline of its
    # own; with the store's back-off holding, a hung server costs one deadline per back-off.
    with RateLimiter(limits(own_server.url, bucket_name)) as limiter:
        assert not limiter.hit("api", key="k").degraded
        with stopped(own_server):
            latencies = []
            for n in range(60):
                started = time.monotonic()
                decision = limiter.hit("api", key=f"k{n % 5}")
                latencies.append(time.monotonic() - started)
                assert decision.degraded
                time.sleep(0.02)
        quick = sum(latency < 0.05 for latency in latencies) / len(latencies)
        print(f"max {max(latencies):.3f}s, {quick:.0%} under 50 ms")
        assert max(latencies) < 1.0
        assert quick >= 0.8
