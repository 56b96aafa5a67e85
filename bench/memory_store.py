"""Memory benchmark: bytes per cached key, and one million distinct keys through the memory store.

    .venv/bin/python bench/memory_store.py            # the documented run, ~2 minutes
    .venv/bin/python bench/memory_store.py --quick    # a smoke run

1. Bytes per key (tracemalloc): `MemoryStore` (one `tat` per key in an OrderedDict) and the NATS
   store's key cache (`NatsStore._cache`: key -> `(tat, revision)` state), each filled through
   its real `hit` path with realistic group keys (`api.<identity>`). The figure is what the
   structure holds: traced memory with N keys minus traced memory after the structure is
   cleared, divided by N, so connection buffers and other transient allocations do not count.
   The NATS variant talks to its own nats-server (started here, stopped on exit).
2. One million distinct keys through `MemoryStore.hit_now` with the default bound
   (`max_keys` = 100,000), each run in a fresh interpreter: time per decision, final size, and
   (once per variant, in a run with PYTHONMALLOC=malloc) the peak growth of the malloc heap. Two policies:
   keys that go idle within a millisecond (dropped as they age out) and keys that stay live for a
   minute (only the `max_keys` bound keeps the store small).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _harness import Metric, Report, Variant  # noqa: E402

from ratesync_middleware.bucket import Policy  # noqa: E402
from ratesync_middleware.keys import group_key  # noqa: E402
from ratesync_middleware.stores.memory import MemoryStore  # noqa: E402


def identity(i: int, salt: str = "") -> str:
    """An IPv4-looking client identity, distinct for every i < 2**32 (the usual `key = "ip"`)."""
    return f"{salt}10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


LIVE = Policy.per_period("api", 1, 60, 10)  # one per minute, burst 10: a key stays live 60 s
IDLE = Policy.per_second("api", 1000.0, 1)  # one per ms, burst 1: a key is full again after 1 ms


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


# -- bytes per key -----------------------------------------------------------------------------


def memory_bytes_per_key(n: int, rep: int) -> dict[str, float]:
    store = MemoryStore(max_keys=n + 1)
    tracemalloc.start()
    try:
        base = traced_bytes()
        for i in range(n):
            store.hit_now(group_key("api", identity(i, f"r{rep}-")), LIVE)
        full = traced_bytes()
        assert len(store) == n, len(store)
        store._states.clear()
        cleared = traced_bytes()
    finally:
        tracemalloc.stop()
    return {"bytes_per_key": (full - cleared) / n, "growth_per_key": (full - base) / n, "keys": n}


def identity_cache_bytes_per_key(n: int, rep: int) -> dict[str, float]:
    """The bounded LRU cache of `keys.encode_identity`, when the package has one."""
    from ratesync_middleware import keys

    encode = keys.encode_identity
    if not hasattr(encode, "cache_clear"):
        return {}
    encode.cache_clear()
    tracemalloc.start()
    try:
        for i in range(n):
            group_key("api", identity(i, f"r{rep}-"))
        full = traced_bytes()
        size = encode.cache_info().currsize
        encode.cache_clear()
        cleared = traced_bytes()
    finally:
        tracemalloc.stop()
    return {
        "bytes_per_key": (full - cleared) / max(1, size),
        "keys": size,
        "max_entries": encode.cache_info().maxsize or 0,
    }


async def _fill_nats(url: str, n: int, rep: int) -> dict[str, float]:
    from ratesync_middleware import AsyncRateLimiter

    config = {
        "stores": {"nats": {"engine": "nats", "url": url, "max_keys": max(n + 1, 100_000)}},
        "limiters": {"api": {"store": "nats", "rate_per_second": LIVE.rate, "burst": LIVE.burst}},
    }
    limiter = AsyncRateLimiter(config)
    store: Any = limiter.store("nats")
    await store.ready()
    position = [0]

    async def worker() -> None:
        while position[0] < n:
            i = position[0]
            position[0] += 1
            await limiter.hit("api", key=identity(i, f"r{rep}-"))

    tracemalloc.start()
    try:
        base = traced_bytes()
        await asyncio.gather(*(worker() for _ in range(64)))
        full = traced_bytes()
        assert len(store._cache) == n, len(store._cache)
        sample = next(iter(store._cache.values()))
        assert sample.revision is not None  # the cached state is the one a decision keeps
        store._cache.clear()
        cleared = traced_bytes()
    finally:
        tracemalloc.stop()
        await limiter.aclose()
    return {"bytes_per_key": (full - cleared) / n, "growth_per_key": (full - base) / n, "keys": n}


# -- one million keys --------------------------------------------------------------------------


def _heap_bytes_fn() -> Any:
    """Bytes in use from glibc malloc (mallinfo2: uordblks + hblkhd), or None off glibc.

    With PYTHONMALLOC=malloc every Python object comes from malloc, so this is the heap the
    objects occupy, independent of what the kernel does with resident pages (RSS here moves with
    the host's page reclaim, which made it useless as a peak measure on this machine)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def heap() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return heap


def million_child(n: int, policy_name: str, measure_memory: bool) -> dict[str, float]:
    """Runs in a fresh interpreter (see `million`)."""
    policy = {"idle": IDLE, "live": LIVE}[policy_name]
    heap = _heap_bytes_fn() if measure_memory else None
    store = MemoryStore()  # the default bound: max_keys = 100,000
    hit = store.hit_now
    gc.collect()
    heap0 = heap() if heap else 0
    peak = heap0
    start = time.perf_counter()
    largest = 0
    for i in range(n):
        hit(group_key("api", identity(i)), policy)
        if i & 0x1FFF == 0:
            largest = max(largest, len(store))
            if heap:
                peak = max(peak, heap())
    seconds = time.perf_counter() - start
    out: dict[str, float] = {"final_keys": len(store), "max_keys_seen": max(largest, len(store))}
    if heap:
        peak = max(peak, heap())
        out.update(
            {
                "peak_heap_growth_mib": (peak - heap0) / 2**20,
                "final_heap_growth_mib": (heap() - heap0) / 2**20,
            }
        )
    else:
        out.update(
            {
                "seconds": seconds,
                "us_per_decision": seconds / n * 1e6,
                "decisions_per_s": n / seconds,
            }
        )
    return out


def million(n: int, policy_name: str, measure_memory: bool) -> dict[str, float]:
    """Keys through the store in a fresh interpreter. Timing runs use Python's own allocator;
    memory runs use PYTHONMALLOC=malloc and sample the malloc heap every 8,192 decisions."""
    env = dict(os.environ)
    args = [sys.executable, __file__, "--child", policy_name, "--keys", str(n)]
    if measure_memory:
        env["PYTHONMALLOC"] = "malloc"
        args.append("--child-memory")
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True, env=env)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--keys", type=int, default=1_000_000, help="distinct keys through the memory store"
    )
    parser.add_argument("--cache-keys", type=int, default=20_000, help="keys for bytes-per-key")
    parser.add_argument("--name", default="memory_store")
    parser.add_argument("--child", choices=["idle", "live"], help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(million_child(args.keys, args.child, args.child_memory)))
        return 0
    if args.quick:
        args.reps, args.keys, args.cache_keys = 1, 200_000, 5_000

    from tests.natsserver import NatsServer

    report = Report(
        args.name,
        argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        packages=["ratesync-middleware", "nats-py"],
    )
    server = NatsServer()
    try:
        server.start()
        from nats_store import nats_server_version

        report.set_servers(
            {"nats-server": nats_server_version(server.binary) + " (for the NATS key cache)"}
        )
        print(report.header(), flush=True)
        loop = report.loop
        report.run(
            "bytes-per-key",
            title="Bytes per cached key (tracemalloc: held with N keys minus held after clear)",
            variants=[
                Variant("MemoryStore", lambda rep: memory_bytes_per_key(args.cache_keys, rep)),
                Variant(
                    "NatsStore key cache",
                    lambda rep: loop.run_until_complete(
                        _fill_nats(server.url, args.cache_keys, rep)
                    ),
                ),
                Variant(
                    "identity cache (keys.encode_identity)",
                    lambda rep: identity_cache_bytes_per_key(args.cache_keys, rep),
                    applies=hasattr(
                        __import__("ratesync_middleware.keys").keys.encode_identity, "cache_clear"
                    ),
                ),
            ],
            metrics=[Metric("bytes_per_key", "bytes/key", lower_is_better=True, digits=0)],
            baseline="MemoryStore",
            reps=args.reps,
            params={
                "keys": args.cache_keys,
                "key_example": group_key("api", identity(123456, "r0-")),
            },
            plot=["bytes_per_key"],
        )

        def million_variant(policy: str) -> Any:
            def run(rep: int) -> dict[str, float]:
                out = million(args.keys, policy, measure_memory=False)
                if rep == 0:  # memory is deterministic: measured once, in its own interpreter
                    memory = million(args.keys, policy, measure_memory=True)
                    out.update({k: v for k, v in memory.items() if "heap" in k})
                return out

            return run

        report.run(
            "million-keys",
            title=f"{args.keys:,} distinct keys through MemoryStore.hit_now (max_keys 100,000)",
            variants=[
                Variant("idle after 1 ms", million_variant("idle")),
                Variant("live for 60 s", million_variant("live")),
            ],
            metrics=[
                Metric("us_per_decision", "time/decision", "us", digits=2),
                Metric("decisions_per_s", "decisions/s", lower_is_better=False, ratio=False),
                Metric("seconds", "total", "s", ratio=False, digits=2),
                Metric("peak_heap_growth_mib", "peak heap growth", "MiB", ratio=False, digits=1),
                Metric("final_keys", "final size", ratio=False, agg="max"),
                Metric("max_keys_seen", "largest size seen", ratio=False, agg="max"),
            ],
            baseline="idle after 1 ms",
            reps=args.reps,
            params={
                "keys": args.keys,
                "max_keys": 100_000,
                "process": "a fresh interpreter per run",
            },
            plot=["us_per_decision", "peak_heap_growth_mib"],
        )
        report.tables[0].notes.append(
            "the stores' figures count the key string, the entry and the container, not the identity cache "
            "(`keys.encode_identity`'s LRU, when present), which is shown on its own row: every identity that is not "
            "plain `[A-Za-z0-9-]` (an IP address, say) is cached there as well, up to its bound"
        )
        report.tables[-1].notes.append(
            "each run is a fresh interpreter; time per decision includes formatting the key (an f-string and "
            "group_key per decision); peak heap growth is measured once per variant in a separate run with "
            "PYTHONMALLOC=malloc (glibc mallinfo2, sampled every 8,192 decisions), from the first decision on; it "
            "includes the identity cache of `keys.encode_identity` when the package has one"
        )
        report.save()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
