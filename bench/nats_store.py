"""NATS store benchmark: our NatsStore vs one raw KV update vs a naive get-then-CAS vs limits+Redis.

    .venv/bin/python bench/nats_store.py            # the documented run, ~4 minutes
    .venv/bin/python bench/nats_store.py --quick    # a smoke run, ~1 minute
    .venv/bin/python bench/nats_store.py --only slots --name nats_store_slots   # max_concurrent
    .venv/bin/python bench/nats_store.py --only fleet   # P processes x C tasks on one global key

Starts its own nats-server (JetStream, file storage, loopback, port chosen by the server) and its
own redis-server (Debian's /usr/bin/redis-server, no persistence, on a free port), runs every
workload with the variants interleaved (the NATS server's monitoring port counts the messages it
receives), prints the tables, writes bench/results/nats_store.json
(+ .md) and docs/img/nats_store-*.png, and stops both servers on exit, also on Ctrl-C.

Every workload runs in worker processes (multiprocessing, spawn) started once; the parent only
orchestrates, so 1 x 64 and 4 x 16 are measured the same way. Variants:
- ours:          `AsyncRateLimiter.hit` on a `NatsStore` (the package as users get it);
- raw KV update: `kv.update(key, value, last=rev)` with a value of our size (latency only);
- naive CAS:     get, GCRA with `ratesync_middleware.bucket.consume`, `update(last=revision)`,
                 retry on conflict until the same deadline as ours (0.25 s), then give up;
- limits fixed / limits moving: `limits` 5 (FixedWindowRateLimiter / MovingWindowRateLimiter)
                 with its async Redis storage `async+redis://` on redis-py.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _harness import Metric, Report, Variant, free_port, latency_summary  # noqa: E402

REDIS_BIN = os.environ.get("REDIS_SERVER_BIN", "/usr/bin/redis-server")
BUCKET = "rate_limits"
TIMEOUT = 0.25  # our store's default decision deadline; the naive store gives up after the same
# nats-py's defaults retry a lost server for minutes; the bench's own clients give up quickly
BOUNDED_CONNECT = {"connect_timeout": 2, "max_reconnect_attempts": 3, "reconnect_time_wait": 0.2}

# -- policies ----------------------------------------------------------------------------------
# (rate per second, burst). "unlimited" can never be exhausted within a run, so any refusal is
# a wrong refusal. "contended" is below every variant's throughput, so both answers occur.


@dataclass(frozen=True)
class PolicySpec:
    name: str
    rate: float  # per second
    burst: int
    limits_item: tuple[int, str]  # limits' equivalent: (amount, "second" | "hour")


POLICIES = {
    "unlimited": PolicySpec("unlimited", 1_000_000.0, 10_000_000, (10_000_000, "second")),
    "contended": PolicySpec("contended", 100.0, 50, (100, "second")),
    "flood": PolicySpec("flood", 0.01, 10, (10, "hour")),
    # issue 16's example: "our whole fleet may call the payment API 2,000 times a second"
    "payment": PolicySpec("payment", 2000.0, 2000, (2000, "second")),
}
FLEETS = ((8, 8),)  # processes x concurrent tasks of the fleet tables (issue 16's target)


# The algorithms table: rate-sync's login window and a two-rate limit, against the token bucket
# of the same traffic. Keys are spread (ALGORITHM_KEYS) so that no group is ever exhausted and a
# window's log stays as short as a login limit's.
ALGORITHM_LIMITERS: dict[str, dict[str, Any]] = {
    "token bucket": {"limit": "5/second"},
    "sliding window": {"algorithm": "sliding_window", "limit": 5, "window_seconds": 1},
    "two rates": {"limit": ["5/second", "100/minute"]},
}
ALGORITHM_KEYS = 1000

# The slots table: `max_concurrent` on one global group, high enough never to refuse, so that
# what is counted is the store writes an acquire and a release cost, and how they coalesce.
SLOTS_LIMIT = 1_000_000
SLOTS_HOLD_SECONDS = 0.001  # how long each request holds its slot (a very short request)
SLOTS_IDLE_SECONDS = 0.002  # a task's pause before its next request: its release is written
SLOTS_SHAPES = [(1, 1), (1, 16), (1, 64), (4, 16)]  # (processes, concurrent tasks in each)


def limiter_config(nats_url: str) -> dict[str, Any]:
    limiters: dict[str, Any] = {
        p.name: {"store": "nats", "rate_per_second": p.rate, "burst": p.burst, "key": "user"}
        for p in POLICIES.values()
    }
    for name, table in ALGORITHM_LIMITERS.items():
        limiters[name.replace(" ", "-")] = {"store": "nats", "key": "user", **table}
    limiters["slots"] = {"store": "nats", "key": "user", "max_concurrent": SLOTS_LIMIT}
    return {
        "stores": {
            "nats": {"engine": "nats", "url": nats_url, "bucket_name": BUCKET, "timeout": TIMEOUT}
        },
        "limiters": limiters,
    }


# -- servers ----------------------------------------------------------------------------------


class RedisServer:
    """Debian's redis-server on 127.0.0.1, no persistence, on a port picked free (no port 0)."""

    def __init__(self, binary: str = REDIS_BIN) -> None:
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix="ratesync-bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        import redis

        for _ in range(5):
            self.port = free_port()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                        return self
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            self.stop()  # the port was taken meanwhile, or it did not start: try another
        raise RuntimeError(f"redis-server ({self.binary}) did not start")

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.split()[2].removeprefix("v=") if out else "?"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), to charge server CPU to a workload."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def nats_server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1].removeprefix("v") if out else "?"


# -- clients (run inside the workers) ---------------------------------------------------------


class Ours:
    """The package as users call it: AsyncRateLimiter.hit on a NatsStore."""

    def __init__(self, urls: dict[str, str], job: dict[str, Any]) -> None:
        from ratesync_middleware import AsyncRateLimiter

        self.limiter = AsyncRateLimiter(limiter_config(urls["nats"]))
        self.store: Any = self.limiter.store("nats")
        self.lost: float = 0  # compare-and-sets rejected because another writer was first

    async def open(self, job: dict[str, Any]) -> None:
        """Connect, and observe the store from outside (private hooks of `stores/nats.py`; when
        one is renamed, its figures show as "-" and the bench still runs)."""
        import nats.js.errors

        await self.store.ready()
        self.failures: dict[str, int] = {}
        self.max_retries: float = 0  # most conflicts one compare-and-set went through
        self.batches: list[int] = []  # decisions per compare-and-set (coalescing)
        store = self.store
        original_write = getattr(store, "write_raw", None)
        original_failure = getattr(store, "_call_failure", None)
        original_commit = getattr(store, "_commit", None)
        if original_write is None:
            self.lost = math.nan
        else:

            async def counting_write(*args: Any) -> Any:
                try:
                    return await original_write(*args)
                except nats.js.errors.APIError as error:
                    if error.err_code in (10071, 10164):  # wrong last sequence: a lost race
                        self.lost += 1
                    raise

            store.write_raw = counting_write
        if original_failure is not None:

            def recording_failure(state: Any, error: BaseException, **options: Any) -> Any:
                what = f"{type(error).__module__}.{type(error).__name__}: {error}"[:120]
                self.failures[what] = self.failures.get(what, 0) + 1
                return original_failure(state, error, **options)

            store._call_failure = recording_failure
        if original_commit is None or original_write is None:
            self.max_retries = math.nan
        else:

            async def observed_commit(
                key: str, state: Any, batch: list[Any], **options: Any
            ) -> Any:
                lost = self.lost
                try:
                    return await original_commit(key, state, batch, **options)
                finally:
                    self.max_retries = max(self.max_retries, self.lost - lost)
                    self.batches.append(len(batch))

            store._commit = observed_commit

    async def decide(self, policy: str, key: str) -> tuple[bool, bool]:
        decision = await self.limiter.hit(policy, key=key)
        return decision.allowed, decision.degraded

    def requests(self) -> int:
        return int(self.store._nc.stats["out_msgs"])

    def conflicts(self) -> float:
        return self.lost

    async def close(self) -> None:
        await self.limiter.aclose()


class GaveUpError(Exception):
    pass


class Naive:
    """A straightforward KV limiter: get, GCRA, update(last=revision), retry on conflict."""

    def __init__(self, urls: dict[str, str], job: dict[str, Any]) -> None:
        self.url = urls["nats"]
        self.nc: Any = None
        self.kv: Any = None
        self.n_conflicts = 0
        self.max_retries = 0

    async def open(self, job: dict[str, Any]) -> None:
        import nats

        from ratesync_middleware.bucket import Policy

        self.nc = await nats.connect(self.url, **BOUNDED_CONNECT)
        self.kv = await self.nc.jetstream(timeout=1.0).key_value(BUCKET)
        self.policies = {
            name: Policy.per_second(name, p.rate, p.burst) for name, p in POLICIES.items()
        }

    async def hit(self, key: str, policy: Any) -> Any:
        import nats.js.errors

        from ratesync_middleware.bucket import consume
        from ratesync_middleware.stores.nats import decode_tat, encode_value

        deadline = time.monotonic() + TIMEOUT
        retries = 0
        while True:
            try:
                entry = await self.kv.get(key)
                tat, revision = decode_tat(entry.value), entry.revision
            except nats.js.errors.KeyNotFoundError:
                tat, revision = 0, 0
            new_tat, decision = consume(policy, tat, time.time_ns())
            if new_tat is None:
                return decision
            try:
                await self.kv.update(key, encode_value(new_tat, policy), last=revision)
                return decision
            except nats.js.errors.KeyWrongLastSequenceError:
                self.n_conflicts += 1
                retries += 1
                self.max_retries = max(self.max_retries, retries)
                if time.monotonic() >= deadline:
                    raise GaveUpError from None

    async def decide(self, policy: str, key: str) -> tuple[bool, bool]:
        try:
            decision = await self.hit(f"naive_{policy}.{key}", self.policies[policy])
        except GaveUpError:
            return True, True  # fail-open like ours by default; counted as degraded
        return decision.allowed, False

    def requests(self) -> int:
        return int(self.nc.stats["out_msgs"])

    def conflicts(self) -> int:
        return self.n_conflicts

    async def close(self) -> None:
        await self.nc.close()


class Limits:
    """limits 5 on Redis through its async storage (redis-py), fixed or moving window."""

    def __init__(self, urls: dict[str, str], job: dict[str, Any]) -> None:
        self.url = "async+" + urls["redis"]
        self.strategy_name = job["variant"].split()[-1]  # "fixed" | "moving"

    async def open(self, job: dict[str, Any]) -> None:
        import redis.asyncio
        from limits import RateLimitItemPerHour, RateLimitItemPerSecond
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
        from limits.storage import storage_from_string

        self.storage: Any = storage_from_string(self.url, implementation="redispy")
        strategy = {"fixed": FixedWindowRateLimiter, "moving": MovingWindowRateLimiter}[
            self.strategy_name
        ]
        self.limiter = strategy(self.storage)
        per = {"second": RateLimitItemPerSecond, "hour": RateLimitItemPerHour}
        self.items = {name: per[p.limits_item[1]](p.limits_item[0]) for name, p in POLICIES.items()}
        self.meter = redis.asyncio.Redis.from_url(self.url.removeprefix("async+"))
        # open the pool's connections and load the scripts before the clock starts
        await asyncio.gather(*(self.storage.check() for _ in range(job.get("concurrency", 1))))
        await self.limiter.hit(self.items["unlimited"], "warmup", job["variant"])
        self.commands_at_open = await self._commands()

    async def _commands(self) -> int:
        """Round trips so far: limits sends each operation as one EVALSHA (EVAL when not cached);
        the commands a script runs inside Redis are not round trips and are not counted."""
        stats = await self.meter.info("commandstats")
        return sum(
            int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
        )

    async def decide(self, policy: str, key: str) -> tuple[bool, bool]:
        return await self.limiter.hit(self.items[policy], policy, key), False

    async def requests_async(self) -> int:
        return await self._commands()

    def conflicts(self) -> float:
        return math.nan  # no compare-and-set: a Lua script runs atomically in Redis

    async def close(self) -> None:
        await self.storage.bridge.storage.aclose()
        await self.meter.aclose()


class RawKV:
    """One KV update round trip, the floor for any compare-and-set store (latency only)."""

    def __init__(self, urls: dict[str, str], job: dict[str, Any]) -> None:
        self.url = urls["nats"]

    async def open(self, job: dict[str, Any]) -> None:
        import nats

        from ratesync_middleware.bucket import Policy
        from ratesync_middleware.stores.nats import encode_value

        self.nc = await nats.connect(self.url, **BOUNDED_CONNECT)
        self.kv = await self.nc.jetstream(timeout=1.0).key_value(BUCKET)
        policy = Policy.per_second("unlimited", 1_000_000.0, 10_000_000)
        self.value = encode_value(time.time_ns(), policy)  # our value, so the same size
        self.revisions: dict[str, int] = {}

    async def decide(self, policy: str, key: str) -> tuple[bool, bool]:
        key = f"raw_{policy}.{key}"
        self.revisions[key] = await self.kv.update(key, self.value, last=self.revisions.get(key, 0))
        return True, False

    def requests(self) -> int:
        return int(self.nc.stats["out_msgs"])

    def conflicts(self) -> int:
        return 0

    async def close(self) -> None:
        await self.nc.close()


CLIENTS = {
    "ours": Ours,
    "raw KV update": RawKV,
    "naive CAS": Naive,
    "limits fixed": Limits,
    "limits moving": Limits,
}


async def _requests(client: Any) -> int:
    if hasattr(client, "requests_async"):
        return int(await client.requests_async())
    return int(client.requests())


# -- jobs (inside a worker) -------------------------------------------------------------------


async def job_latency(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    key, policy = job["key"], job["policy"]
    spread = job.get("keys", 1)  # > 1: decisions go round-robin over that many keys
    for n in range(job["warmup"]):
        await client.decide(policy, f"{key}-{n % spread}" if spread > 1 else key)
    requests0 = await _requests(client)
    samples = []
    refused = degraded = 0
    for n in range(job["n"]):
        group = f"{key}-{n % spread}" if spread > 1 else key
        t = time.perf_counter_ns()
        allowed, was_degraded = await client.decide(policy, group)
        samples.append(time.perf_counter_ns() - t)
        refused += not allowed
        degraded += was_degraded
    requests = await _requests(client) - requests0
    return {
        **latency_summary(samples),
        "requests_per_decision": requests / job["n"],
        "refused": refused,
        "degraded": degraded,
    }


async def job_load(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` tasks deciding until a shared wall-clock end, on one key or a key space."""
    policy, concurrency = job["policy"], job["concurrency"]
    keys = (
        [job["key"]]
        if job.get("keys", 1) == 1
        else [f"{job['key']}-{i}" for i in range(job["keys"])]
    )
    n_keys = len(keys)
    await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
    end = job["start_at"] + job["duration"]
    requests0 = await _requests(client)
    conflicts0 = client.conflicts()
    counts = {"answered": 0, "allowed": 0, "refused": 0, "degraded": 0}
    latencies: list[int] = []
    position = [job.get("offset", 0)]
    cpu0 = time.process_time()
    t0 = time.time_ns()

    async def worker() -> None:
        while time.time() < end:
            i = position[0]
            position[0] = i + 1
            t = time.perf_counter_ns()
            allowed, degraded = await client.decide(policy, keys[i % n_keys])
            latencies.append(time.perf_counter_ns() - t)
            if degraded:
                counts["degraded"] += 1
            else:
                counts["answered"] += 1
                counts["allowed" if allowed else "refused"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    t1 = time.time_ns()
    cpu = time.process_time() - cpu0
    if isinstance(client, Limits):
        await asyncio.sleep(0.05)  # let the other workers' last commands land before reading
    requests = await _requests(client) - requests0
    failures = getattr(client, "failures", {})
    batches = getattr(client, "batches", None)
    extra = {
        "max_retries": getattr(client, "max_retries", math.nan),
        "mean_batch": sum(batches) / len(batches) if batches else math.nan,
    }
    return {
        **counts,
        "t0": t0,
        "t1": t1,
        "cpu": cpu,
        "requests": requests,
        "failures": dict(failures),
        **extra,
        "conflicts": client.conflicts() - conflicts0,
        **latency_summary(latencies),
    }


async def job_flood(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Exhaust a bucket, then decide as fast as one task can for `duration`."""
    key, policy = job["key"], "flood"
    for _ in range(POLICIES["flood"].burst + 5):
        await client.decide(policy, key)
    requests0 = await _requests(client)
    counts = {"denials": 0, "allowed": 0, "degraded": 0}
    t0 = time.perf_counter()
    cpu0 = time.thread_time()  # what other processes take from this one does not count
    end = t0 + job["duration"]
    while time.perf_counter() < end:
        for _ in range(100):
            allowed, degraded = await client.decide(policy, key)
            counts["degraded" if degraded else "allowed" if allowed else "denials"] += 1
    cpu = time.thread_time() - cpu0
    elapsed = time.perf_counter() - t0
    requests = await _requests(client) - requests0
    total = sum(counts.values())
    return {**counts, "seconds": elapsed, "cpu": cpu, "decisions": total, "requests": requests}


async def job_slots(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` tasks, each taking a slot of one group, holding it SLOTS_HOLD_SECONDS,
    giving it back and pausing SLOTS_IDLE_SECONDS, until a shared end: the store writes
    (compare-and-sets sent, lost ones included) and round trips per request, the heartbeat's
    and the last releases' included. Without the pause a release and the next acquire of the
    same process cancel out before the flusher runs, and nothing is written at all."""
    store, limiter = client.store, client.limiter
    writes = 0
    write_raw = store.write_raw

    async def counting_write(*args: Any) -> Any:
        nonlocal writes
        writes += 1
        return await write_raw(*args)

    store.write_raw = counting_write
    await limiter.take_slot("slots", job["key"])  # connected, the group read once: not counted
    await asyncio.sleep(0.3)
    counts = {"acquired": 0, "refused": 0, "degraded": 0}
    await asyncio.sleep(max(0.0, job["start_at"] - time.time()))
    writes, requests0 = 0, await _requests(client)
    end = job["start_at"] + job["duration"]

    async def worker() -> None:
        while time.time() < end:
            decision, slot = await limiter.take_slot("slots", job["key"])
            if slot is None:
                counts["degraded" if decision.degraded else "refused"] += 1
                continue
            counts["acquired"] += 1
            await asyncio.sleep(SLOTS_HOLD_SECONDS)
            slot.release()
            await asyncio.sleep(SLOTS_IDLE_SECONDS)

    await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
    await asyncio.sleep(0.5)  # the last releases are written
    return {**counts, "writes": writes, "round_trips": await _requests(client) - requests0}


async def run_job(urls: dict[str, str], job: dict[str, Any]) -> dict[str, Any]:
    client = CLIENTS[job["variant"]](urls, job)
    await client.open(job)
    try:
        jobs = {"latency": job_latency, "load": job_load, "flood": job_flood, "slots": job_slots}
        return await jobs[job["op"]](client, job)
    finally:
        await client.close()


def worker_main(conn: Any, urls: dict[str, str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    loop = asyncio.new_event_loop()
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            try:
                limit = job.get("duration", 0) + 60.0  # no job may hang a worker for good
                conn.send(
                    ("ok", loop.run_until_complete(asyncio.wait_for(run_job(urls, job), limit)))
                )
            except Exception as error:  # reported to the parent, which fails the run
                conn.send(("error", f"{type(error).__name__}: {error}"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        loop.close()


class Pool:
    """Worker processes started once (spawn); a job is sent to the first `n` of them."""

    def __init__(self, size: int, urls: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.workers = []
        for _ in range(size):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=worker_main, args=(child, urls), daemon=True)
            process.start()
            self.workers.append((process, parent))

    def run(self, jobs: list[dict[str, Any]], timeout: float = 60.0) -> list[dict[str, Any]]:
        for (_, conn), job in zip(self.workers, jobs, strict=False):
            conn.send(job)
        results = []
        for _, conn in self.workers[: len(jobs)]:
            if not conn.poll(timeout):
                raise RuntimeError("a bench worker did not answer in time")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"bench worker failed: {value}")
            results.append(value)
        return results

    def close(self) -> None:
        """Ask the workers to stop; terminate those still busy after 2 s (e.g. on Ctrl-C)."""
        for _, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        deadline = time.monotonic() + 2.0
        for process, _ in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
        for process, _ in self.workers:
            if process.is_alive():
                process.terminate()
                process.join(3)
        self.workers = []


# -- the workloads (in the parent) ------------------------------------------------------------


def bound(variant: str, policy: PolicySpec, t0: int, t1: int) -> int:
    """The most a correct limiter may admit between t0 and t1 (ns) on a bucket full at t0."""
    elapsed = (t1 - t0) / 1e9
    if variant.startswith("limits"):
        amount, unit = policy.limits_item
        period = {"second": 1.0, "hour": 3600.0}[unit]
        return amount * (math.floor(elapsed / period) + 1)  # windows of `period` touched
    interval_ns = max(1, math.ceil(1e9 / policy.rate))
    return policy.burst + (t1 - t0) // interval_ns


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        pool: Pool,
        report: Report,
        server_pids: dict[str, int] | None = None,
        monitor_url: str = "",
    ) -> None:
        self.server_pids = server_pids or {}
        self.monitor_url = monitor_url
        self.args = args
        self.pool = pool
        self.report = report
        self.run_id = f"{os.getpid()}-{int(time.time())}"  # fresh keys for every run

    def nats_received(self) -> float:
        """Messages the NATS server has received from clients so far (`/varz` `in_msgs`)."""
        if not self.monitor_url:
            return math.nan
        import json
        import urllib.request

        with urllib.request.urlopen(self.monitor_url + "/varz", timeout=5) as answer:
            return float(json.load(answer)["in_msgs"])

    def key(self, *parts: object) -> str:
        return "-".join(str(p) for p in (self.run_id, *parts))

    # sequential latency
    def latency_variant(self, name: str) -> Variant:
        def run(rep: int) -> dict[str, Any]:
            job = {
                "op": "latency",
                "variant": name,
                "policy": "unlimited",
                "key": self.key("lat", name.replace(" ", "_"), rep),
                "n": self.args.latency_n,
                "warmup": 50,
            }
            return self.pool.run([job])[0]

        return Variant(name, run)

    def algorithm_variant(self, name: str) -> Variant:
        def run(rep: int) -> dict[str, Any]:
            job = {
                "op": "latency",
                "variant": "ours",
                "policy": name.replace(" ", "-"),
                "key": self.key("alg", name.replace(" ", "_"), rep),
                "n": self.args.latency_n,
                "warmup": ALGORITHM_KEYS,  # every key written once: the cached path is measured
                "keys": ALGORITHM_KEYS,
            }
            return self.pool.run([job])[0]

        return Variant(name, run)

    # hot key / many keys
    def load_variant(
        self, name: str, policy: str, processes: int, concurrency: int, keys: int = 1
    ) -> Variant:
        spec = POLICIES[policy]

        def run(rep: int) -> dict[str, Any]:
            key = self.key(
                "load", name.replace(" ", "_"), policy, processes, concurrency, keys, rep
            )
            start_at = time.time() + 0.4 + 0.15 * processes  # after every worker has connected
            jobs = [
                {
                    "op": "load",
                    "variant": name,
                    "policy": policy,
                    "key": key,
                    "keys": keys,
                    "concurrency": concurrency,
                    "start_at": start_at,
                    "duration": self.args.duration,
                    "offset": w * (keys // max(1, processes)),
                }
                for w in range(processes)
            ]
            server = "redis" if name.startswith("limits") else "nats"
            pid = self.server_pids.get(server)
            server_cpu0 = process_cpu_seconds(pid) if pid else math.nan
            received0 = self.nats_received() if server == "nats" else math.nan
            results = self.pool.run(jobs)
            server_cpu = (process_cpu_seconds(pid) if pid else math.nan) - server_cpu0
            # every message the NATS server got meanwhile, the workers' connecting included
            received = (self.nats_received() if server == "nats" else math.nan) - received0
            t0 = min(r["t0"] for r in results)
            t1 = max(r["t1"] for r in results)
            seconds = (t1 - t0) / 1e9
            total = {
                k: sum(r[k] for r in results)
                for k in ("answered", "allowed", "refused", "degraded", "conflicts")
            }
            if name.startswith("limits"):
                requests = max(
                    r["requests"] for r in results
                )  # each worker read the server's total
            else:
                requests = sum(r["requests"] for r in results)
            admitted = total["allowed"]  # answered by the store; degraded answers are counted apart
            limit = bound(name, spec, t0, t1) if keys == 1 else None
            out = {
                "decisions_per_s": total["answered"] / seconds,
                "answered": total["answered"],
                "admitted": admitted,
                "refused": total["refused"],
                "degraded": total["degraded"],
                "conflicts_per_decision": total["conflicts"]
                / max(1, total["answered"] + total["degraded"]),
                "requests_per_decision": requests / max(1, total["answered"] + total["degraded"]),
                "server_msgs_per_decision": received
                / max(1, total["answered"] + total["degraded"]),
                "p50_us": sorted(r["p50_us"] for r in results)[len(results) // 2],
                "p99_us": max(r["p99_us"] for r in results),
                "seconds": seconds,
                "max_retries": max(r["max_retries"] for r in results),
                "mean_batch": sorted(r["mean_batch"] for r in results)[len(results) // 2],
                # CPU per decision: the 2 cores are shared by the clients and the server
                "client_cpu_us": sum(r["cpu"] for r in results)
                / max(1, total["answered"] + total["degraded"])
                * 1e6,
                "server_cpu_us": server_cpu / max(1, total["answered"] + total["degraded"]) * 1e6,
                "cpu_busy": (sum(r["cpu"] for r in results) + server_cpu) / seconds,  # cores in use
            }
            failures: dict[str, int] = {}
            for r in results:
                for what, n in r["failures"].items():
                    failures[what] = failures.get(what, 0) + n
            out["errors"] = total["degraded"] + sum(failures.values())
            if failures:
                out["failures"] = failures  # kept in the JSON samples
                print(f"    store failures: {failures}", flush=True)
            if limit is not None:
                # over-admission by the store's own answers; degraded answers are reported apart
                # (fail-open by default: in production they would be admissions too)
                out["bound"] = limit
                out["over_admitted"] = max(0, total["allowed"] - limit)
                out["under_bound"] = max(0, limit - total["allowed"])
            if spec.name == "unlimited":
                out["wrong_refusals"] = total["refused"]  # the bucket never runs out
            return out

        return Variant(name, run)

    def flood_variant(self, name: str) -> Variant:
        def run(rep: int) -> dict[str, Any]:
            job = {
                "op": "flood",
                "variant": name,
                "key": self.key("flood", name.replace(" ", "_"), rep),
                "duration": self.args.flood_duration,
            }
            r = self.pool.run([job])[0]
            return {
                "denials_per_s": r["denials"] / r["seconds"],
                "cpu_per_denial_us": r["cpu"] / max(1, r["decisions"]) * 1e6,
                "requests_per_denial": r["requests"] / max(1, r["decisions"]),
                "allowed": r["allowed"],
                "degraded": r["degraded"],
                "denials": r["denials"],
            }

        return Variant(name, run)

    def slots_variant(self, processes: int, concurrency: int) -> Variant:
        def run(rep: int) -> dict[str, Any]:
            start_at = time.time() + 0.8 + 0.15 * processes  # after every worker has connected
            job = {
                "op": "slots",
                "variant": "ours",
                "key": self.key("slots", processes, concurrency, rep),
                "concurrency": concurrency,
                "start_at": start_at,
                "duration": self.args.duration,
            }
            results = self.pool.run([job] * processes)
            total = {k: sum(r[k] for r in results) for k in results[0]}
            acquired = max(1, total["acquired"])
            return {
                "requests_per_s": total["acquired"] / self.args.duration,
                "writes_per_request": total["writes"] / acquired,
                "round_trips_per_request": total["round_trips"] / acquired,
                "refused": total["refused"],
                "degraded": total["degraded"],
            }

        name = "sequential (1 x 1)" if concurrency == 1 else f"{processes} x {concurrency}"
        return Variant(name, run)

    def run_all(self) -> None:
        a, report = self.args, self.report
        nats_variants = ["ours", "naive CAS"]
        peers = ["limits fixed", "limits moving"]
        only = set(a.only.split(",")) if a.only else None

        def wanted(table: str) -> bool:
            return only is None or table in only

        lat_metrics = [
            Metric("p50_us", "p50", "us"),
            Metric("p99_us", "p99", "us"),
            Metric("requests_per_decision", "store round trips/decision", ratio=False, digits=2),
        ]
        if wanted("latency"):
            report.run(
                "latency",
                title="Sequential decision latency (one task, one key, bucket never exhausted)",
                variants=[
                    self.latency_variant(v) for v in ["raw KV update", *nats_variants, *peers]
                ],
                metrics=lat_metrics,
                baseline="raw KV update",
                reps=a.reps_latency,
                params={"decisions_per_rep": a.latency_n, "warmup": 50},
                plot=["p50_us", "p99_us"],
            )

        if wanted("algorithms"):
            report.run(
                "algorithms",
                title=(
                    "Sequential decision latency by algorithm (one task, "
                    f"{ALGORITHM_KEYS} keys round-robin, never exhausted)"
                ),
                variants=[self.algorithm_variant(name) for name in ALGORITHM_LIMITERS],
                metrics=[
                    *lat_metrics,
                    Metric("refused", "refused", ratio=False, agg="max"),
                ],
                baseline="token bucket",
                reps=a.reps_latency,
                params={
                    "decisions_per_rep": a.latency_n,
                    "limiters": ALGORITHM_LIMITERS,
                    "keys": ALGORITHM_KEYS,
                },
                plot=["p50_us"],
            )

        load_metrics = [
            Metric("decisions_per_s", "decisions/s", lower_is_better=False),
            Metric("p99_us", "p99 latency", "us", ratio=False),
            Metric("admitted", "admitted", ratio=False),
            Metric("bound", "bound", ratio=False),
            Metric("over_admitted", "over-admitted", ratio=False, agg="max"),
            Metric("wrong_refusals", "wrong refusals", ratio=False, agg="max"),
            Metric("degraded", "degraded/gave up", ratio=False, agg="max"),
            Metric("under_bound", "under bound", ratio=False, agg="max"),
            Metric("conflicts_per_decision", "conflicts/decision", ratio=False, digits=2),
            Metric("max_retries", "most conflicts in one write", ratio=False, agg="max"),
            Metric("mean_batch", "decisions per write", ratio=False, digits=1),
            Metric("requests_per_decision", "store round trips/decision", ratio=False, digits=2),
            Metric("client_cpu_us", "client CPU/decision", "us", ratio=False),
            Metric("server_cpu_us", "server CPU/decision", "us", ratio=False),
            # below ~1.9 of the 2 cores, something outside the bench was using the machine
            Metric("cpu_busy", "cores used by bench", ratio=False, digits=2),
        ]
        for policy in ("unlimited", "contended"):
            for processes, concurrency in ((1, 64), (4, 16)):
                table_id = f"hotkey-{processes}x{concurrency}-{policy}"
                if not wanted(table_id) and not wanted("hotkey"):
                    continue
                spec = POLICIES[policy]
                what = (
                    "bucket never exhausted: any refusal is wrong"
                    if policy == "unlimited"
                    else f"{spec.rate:g}/s, burst {spec.burst} (limits: {spec.limits_item[0]} per {spec.limits_item[1]})"
                )
                skip = (
                    {"admitted", "bound", "over_admitted", "under_bound"}
                    if policy == "unlimited"
                    else {"wrong_refusals"}
                )
                metrics = [m for m in load_metrics if m.key not in skip]
                report.run(
                    table_id,
                    title=f"Hot key, {processes} process(es) x {concurrency} concurrent, {what}",
                    variants=[
                        self.load_variant(v, policy, processes, concurrency)
                        for v in [*nats_variants, *peers]
                    ],
                    metrics=metrics,
                    baseline="limits fixed",
                    reps=a.reps,
                    params={"duration_s": a.duration, "rate_per_s": spec.rate, "burst": spec.burst},
                    plot=["decisions_per_s"],
                    targets={"decisions_per_s": (10_000, "issue 7 target (4 x 16): 10,000/s")}
                    if processes == 4 and policy == "unlimited"
                    else None,
                )
        if wanted("keys"):
            report.run(
                "keys-10000",
                title="10,000 distinct keys, 1 process x 64 concurrent, bucket never exhausted",
                variants=[
                    self.load_variant(v, "unlimited", 1, 64, keys=10_000)
                    for v in [*nats_variants, *peers]
                ],
                metrics=[
                    m
                    for m in load_metrics
                    if m.key
                    in {
                        "decisions_per_s",
                        "p99_us",
                        "wrong_refusals",
                        "degraded",
                        "conflicts_per_decision",
                        "requests_per_decision",
                        "client_cpu_us",
                        "server_cpu_us",
                        "cpu_busy",
                    }
                ],
                baseline="limits fixed",
                reps=a.reps,
                params={"duration_s": a.duration, "keys": 10_000},
                plot=["decisions_per_s"],
            )
        if wanted("slots"):
            report.run(
                "slots",
                title=(
                    "max_concurrent: store writes per request (one global group, processes x "
                    f"concurrent tasks, each holding its slot {SLOTS_HOLD_SECONDS * 1000:g} ms, "
                    f"then idle {SLOTS_IDLE_SECONDS * 1000:g} ms)"
                ),
                variants=[self.slots_variant(p, c) for p, c in SLOTS_SHAPES],
                metrics=[
                    Metric("requests_per_s", "requests/s", lower_is_better=False, ratio=False),
                    Metric("writes_per_request", "writes/request", ratio=False, digits=3),
                    Metric("round_trips_per_request", "round trips/request", ratio=False, digits=3),
                    Metric("refused", "refused", ratio=False, agg="max"),
                    Metric("degraded", "degraded", ratio=False, agg="max"),
                ],
                reps=a.reps,
                params={
                    "duration_s": a.duration,
                    "max_concurrent": SLOTS_LIMIT,
                    "hold_s": SLOTS_HOLD_SECONDS,
                    "idle_s": SLOTS_IDLE_SECONDS,
                },
            )
        if wanted("flood"):
            report.run(
                "flood",
                title="Denial flood: bucket exhausted (burst 10), then one task deciding as fast as it can",
                variants=[self.flood_variant(v) for v in [*nats_variants, *peers]],
                metrics=[
                    Metric("denials_per_s", "denials/s", lower_is_better=False),
                    # wall-clock rates move with the other processes of a shared machine;
                    # this thread's CPU time per denial does not
                    Metric("cpu_per_denial_us", "client CPU/denial", "us", ratio=False),
                    Metric(
                        "requests_per_denial", "store round trips/denial", ratio=False, digits=3
                    ),
                    Metric("allowed", "allowed during flood", ratio=False, agg="max"),
                    Metric("degraded", "degraded", ratio=False, agg="max"),
                ],
                baseline="limits fixed",
                reps=a.reps,
                params={"duration_s": a.flood_duration},
                plot=["denials_per_s"],
                targets={"denials_per_s": (50_000, "issue 7 target: 50,000/s")},
            )
        if wanted("fleet"):
            self.run_fleet(load_metrics)

    def run_fleet(self, load_metrics: list[Metric]) -> None:
        """Issue 16: a whole fleet on one global key, ours against limits+Redis."""
        a = self.args
        messages = Metric(
            "server_msgs_per_decision", "NATS msgs received/decision", ratio=False, digits=3
        )
        errors = Metric("errors", "errors", ratio=False, agg="max")
        for processes, concurrency in FLEETS:
            for policy in ("unlimited", "payment"):
                spec = POLICIES[policy]
                if policy == "unlimited":
                    what = "bucket never exhausted: any refusal is wrong"
                    keep = {"decisions_per_s", "p99_us", "wrong_refusals"}
                else:
                    what = f"{spec.rate:g}/s, burst {spec.burst}: the fleet hits the limit"
                    keep = {"decisions_per_s", "p99_us", "admitted", "bound", "over_admitted"}
                    keep |= {"under_bound"}
                keep |= {"conflicts_per_decision", "client_cpu_us", "server_cpu_us", "cpu_busy"}
                metrics = [m for m in load_metrics if m.key in keep]
                self.report.run(
                    f"fleet-{processes}x{concurrency}-{policy}",
                    title=f"Fleet: {processes} processes x {concurrency} concurrent on one global key, {what}",
                    variants=[
                        self.load_variant(v, policy, processes, concurrency)
                        for v in ["ours", "limits fixed", "limits moving"]
                    ],
                    metrics=[*metrics[:3], errors, messages, *metrics[3:]],
                    baseline="limits fixed",
                    reps=a.reps,
                    params={"duration_s": a.duration, "rate_per_s": spec.rate, "burst": spec.burst},
                    plot=["decisions_per_s", "server_msgs_per_decision"],
                    targets={"server_msgs_per_decision": (0.05, "issue 16 target: 0.05")},
                )


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run (fewer reps, shorter)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the load workloads")
    parser.add_argument("--reps-latency", type=int, default=5)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per load run")
    parser.add_argument("--flood-duration", type=float, default=1.0)
    parser.add_argument("--latency-n", type=int, default=2000, help="decisions per latency run")
    parser.add_argument(
        "--only",
        default="",
        help="comma list: latency, algorithms, hotkey, hotkey-4x16-unlimited, keys, flood, "
        "slots, fleet",
    )
    parser.add_argument(
        "--name", default="nats_store", help="results/<name>.json, docs/img/<name>-*.png"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.reps_latency, args.duration, args.flood_duration, args.latency_n = (
            1,
            2,
            0.7,
            0.5,
            500,
        )

    from tests.natsserver import NatsServer

    cleanups: list[Any] = []

    def cleanup() -> None:
        while cleanups:
            with_suppress(cleanups.pop())

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C must reach us even when started from a shell that ignores SIGINT for background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report = Report(
        args.name,
        argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        packages=["ratesync-middleware", "nats-py", "limits", "redis", "matplotlib"],
    )
    try:
        monitor_port = free_port()
        nats_server = NatsServer("-m", str(monitor_port))
        cleanups.append(nats_server.cleanup)
        nats_server.start()
        redis_server = RedisServer()
        cleanups.append(redis_server.cleanup)
        redis_server.start()
        urls = {"nats": nats_server.url, "redis": redis_server.url}
        report.set_servers(
            {
                "nats-server": nats_server_version(nats_server.binary)
                + " (JetStream, file storage)",
                "redis-server": redis_server.version() + " (no persistence)",
            }
        )
        print(report.header(), flush=True)
        asyncio.run(_create_bucket(urls["nats"]))
        pool = Pool(max(4, *(processes for processes, _ in FLEETS)), urls)
        cleanups.append(pool.close)
        server_pids = {"nats": nats_server.process.pid, "redis": redis_server.process.pid}
        Bench(args, pool, report, server_pids, f"http://127.0.0.1:{monitor_port}").run_all()
        report.save()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        cleanup()


def with_suppress(fn: Any) -> None:
    try:
        fn()
    except Exception as error:  # cleaning up: report, go on with the rest
        print(f"cleanup: {type(error).__name__}: {error}", file=sys.stderr)


async def _create_bucket(url: str) -> None:
    """Let our store create the bucket as users get it (history 1, TTL 24h, file storage)."""
    from ratesync_middleware import AsyncRateLimiter

    limiter = AsyncRateLimiter(limiter_config(url))
    try:
        info = await limiter.store("nats").open_bucket(await limiter.store("nats").ready())
        print(
            f"# bucket {BUCKET}: storage={info.config.storage}, history={info.config.max_msgs_per_subject}, "
            f"ttl={info.config.max_age}s, direct={info.config.allow_direct}",
            flush=True,
        )
    finally:
        await limiter.aclose()


if __name__ == "__main__":
    sys.exit(main())
