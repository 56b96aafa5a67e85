"""Key churn: what a million one-shot identities (a scan, a botnet rotating addresses) cost the
nats-server, with and without per-message TTL.

    .venv/bin/python bench/key_churn.py                  # 1,000,000 keys per variant, ~3 minutes
    .venv/bin/python bench/key_churn.py --keys 50000     # a quick run

Each variant gets a nats-server of its own (JetStream, file storage, loopback) and one process
deciding `AsyncRateLimiter.hit` for `--keys` distinct identities, each seen once, `--concurrency`
decisions in flight. The limiter (`rate_per_second = 1`, `burst = 5`) refills a key within a
second, as a login or API limit does for an identity that made one request. Variants:

- bucket TTL: a bucket made without per-message TTL (an older nats-server, or a bucket an
  operator created so): every key stays for the bucket's max age (24 h);
- per-message TTL: the bucket as the package creates it on nats-server 2.11+: each write says
  how long its key matters (here 1 s), and the server removes it then.

Reported per variant: decisions per second, the server's resident memory (VmRSS) before the run,
at its end and `--settle` seconds later, and the bucket's messages and bytes at the end and after
the wait. Writes bench/results/key_churn.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _harness import machine_info  # noqa: E402

BUCKET = "rate_limits"
MIB = 1024 * 1024


def server_rss(pid: int) -> int:
    """The resident memory of a process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def bucket_state(url: str) -> tuple[int, int]:
    """The bucket's stream: (messages, bytes)."""
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(f"KV_{BUCKET}")
        return int(info.state.messages), int(info.state.bytes)
    finally:
        await nc.close()


async def make_bucket_without_ttl(url: str) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(
                name=f"KV_{BUCKET}",
                subjects=[f"$KV.{BUCKET}.>"],
                max_msgs_per_subject=1,
                max_age=24 * 3600,
                allow_direct=True,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_msg_ttl=False,
            )
        )
    finally:
        await nc.close()


async def churn(url: str, keys: int, concurrency: int) -> tuple[float, int]:
    """Decide once for each of `keys` identities; (seconds, decisions not answered by NATS)."""
    from ratesync_middleware import AsyncRateLimiter

    config = {
        "stores": {"prod": {"engine": "nats", "url": url, "bucket_name": BUCKET, "timeout": 2.0}},
        "limiters": {"login": {"store": "prod", "rate_per_second": 1.0, "burst": 5}},
    }
    degraded = 0
    async with AsyncRateLimiter(config) as limiter:
        await limiter.hit("login", key="warm-up")
        next_key = iter(range(keys))

        async def worker() -> None:
            nonlocal degraded
            for n in next_key:
                decision = await limiter.hit("login", key=f"198.51.{n >> 16}.{n & 0xFFFF}")
                degraded += decision.degraded

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, degraded


def run_variant(name: str, keys: int, concurrency: int, settle: float) -> dict[str, Any]:
    from tests.natsserver import NatsServer

    with NatsServer() as server:
        assert server.process is not None
        pid = server.process.pid
        if name == "bucket TTL":
            asyncio.run(make_bucket_without_ttl(server.url))
        rss_before = server_rss(pid)
        seconds, degraded = asyncio.run(churn(server.url, keys, concurrency))
        rss_end = server_rss(pid)
        messages_end, bytes_end = asyncio.run(bucket_state(server.url))
        time.sleep(settle)
        rss_after = server_rss(pid)
        messages_after, bytes_after = asyncio.run(bucket_state(server.url))
    return {
        "variant": name,
        "keys": keys,
        "decisions_per_second": keys / seconds,
        "degraded": degraded,
        "rss_before_mib": rss_before / MIB,
        "rss_end_mib": rss_end / MIB,
        "rss_after_mib": rss_after / MIB,
        "messages_end": messages_end,
        "bytes_end_mib": bytes_end / MIB,
        "messages_after": messages_after,
        "bytes_after_mib": bytes_after / MIB,
    }


def markdown(rows: list[dict[str, Any]], settle: float) -> str:
    lines = [
        f"| variant | decisions/s | server RSS before / end / +{settle:g}s (MiB) "
        f"| bucket keys end / +{settle:g}s | bucket MiB end / +{settle:g}s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['decisions_per_second']:,.0f} "
            f"| {row['rss_before_mib']:.0f} / {row['rss_end_mib']:.0f} / "
            f"{row['rss_after_mib']:.0f} "
            f"| {row['messages_end']:,} / {row['messages_after']:,} "
            f"| {row['bytes_end_mib']:.1f} / {row['bytes_after_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after")
    parser.add_argument("--name", default="key_churn", help="results file name")
    args = parser.parse_args(argv)
    rows = []
    for variant in ("bucket TTL", "per-message TTL"):
        row = run_variant(variant, args.keys, args.concurrency, args.settle)
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = markdown(rows, args.settle)
    print(table)
    results = BENCH_DIR / "results"
    results.mkdir(exist_ok=True)
    command = "bench/key_churn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command.strip(), "machine": machine_info(), "rows": rows}
    (results / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(f"`{command.strip()}`\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
