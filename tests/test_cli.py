"""`ratesync` against real servers: the guide's checks, and reading the shared buckets."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DiscardPolicy, KeyValueConfig

import ratesync_middleware
from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.cli import main
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats


def write_config(tmp_path: Path, url: str, bucket: str, **store: object) -> Path:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in store.items())
    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{url}"
bucket_name = "{bucket}"
{extra}
[limiters.api_external]
store = "prod"
limit = "100/minute"
key = "global"
"""
    )
    return path


def ratesync(*args: str | Path) -> tuple[int, str]:
    out = io.StringIO()
    status = main([str(arg) for arg in args], out=out)
    return status, out.getvalue()


def console(
    *args: str | Path, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the installed `ratesync` console script as an operator would, outside any project."""
    environ = {k: v for k, v in os.environ.items() if k != "RATE_SYNC_CONFIG"} | env
    return subprocess.run(
        [str(Path(sys.executable).with_name("ratesync")), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=environ,
    )


def test_check_a_healthy_server(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 0, output
    for step in ("server reachable", "authentication accepted", "JetStream enabled"):
        assert f"ok    {step}" in output
    assert f"{bucket_name} created (auto_create = true)" in output
    assert "ok    bucket settings" in output
    assert "history 1, TTL 24h, replicas 1; idle keys " in output
    # Which expiry applies: per-message TTL on nats-server 2.11+, the bucket's TTL before.
    assert (
        "idle keys expire when full again (per-message TTL)" in output
        or "idle keys are kept 24h (the bucket's TTL: nats-server 2." in output
    )
    assert "ok    bucket limits            no size limits" in output

    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 0
    assert "ok    bucket present" in output


def test_check_as_a_console_script(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, nats_url, bucket_name)
    command = [
        sys.executable,
        "-m",
        "ratesync_middleware.cli",
        "check",
        "--json",
        "--config",
        str(config),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = json.loads(result.stdout)
    assert [s["name"] for s in steps][:3] == [
        "server reachable",
        "authentication accepted",
        "JetStream enabled",
    ]
    assert all(s["ok"] for s in steps)


def test_check_without_jetstream(server_without_jetstream: NatsServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server_without_jetstream.url, "rate_limits")
    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "FAIL  JetStream enabled" in output
    assert "JetStream not enabled" in output
    assert "-js" in output


def test_check_with_a_wrong_token(token_server: NatsServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, token_server.url, "rate_limits", token="not-the-token")
    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "ok    server reachable" in output
    assert "FAIL  authentication accepted" in output
    assert "Authentication violation" in output
    assert "not-the-token" not in output


def test_check_a_closed_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, "nats://127.0.0.1:1", "rate_limits", connect_timeout=0.3)
    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "FAIL  server reachable" in output
    assert "Connection refused" in output


def test_check_a_bucket_with_other_settings(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    async def create() -> None:
        nc = await nats.connect(nats_url)
        await nc.jetstream().create_key_value(
            KeyValueConfig(bucket=bucket_name, history=3, ttl=3600)
        )
        await nc.close()

    asyncio.run(create())
    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 1
    assert "FAIL  bucket settings" in output
    assert "history is 3" in output
    assert "TTL is 1h" in output
    assert f"nats kv add {bucket_name} --history=1 --ttl=24h" in output


def test_check_a_user_who_may_not_create_the_bucket(
    users_server: NatsServer, bucket_name: str, tmp_path: Path
) -> None:
    url = f"nats://limited:l1mited-pw@127.0.0.1:{users_server.port}"
    status, output = ratesync(
        "check", "--config", write_config(tmp_path, url, bucket_name, timeout=0.5)
    )
    assert status == 1
    assert "FAIL  bucket creatable" in output
    assert "Insufficient permissions" in output
    assert "l1mited-pw" not in output

    config = write_config(tmp_path, url, bucket_name, auto_create=False)
    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "Bucket not found" in output

    admin = f"nats://admin:adm1n-pw@127.0.0.1:{users_server.port}"
    assert ratesync("check", "--config", write_config(tmp_path, admin, bucket_name))[0] == 0
    status, output = ratesync("check", "--config", config)
    assert status == 0, output
    assert "ok    bucket present" in output


def test_check_without_a_nats_store_is_a_configuration_error(tmp_path: Path) -> None:
    """Exit 2, naming the file and the engines found: an operator who ran `check` must not
    believe NATS was checked."""
    path = tmp_path / "rate-sync.toml"
    path.write_text('[stores.dev]\nengine = "memory"\n[stores.cache]\nengine = "memory"\n')
    result = console("check", "--config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"ratesync: {path}: nothing to check: no NATS store")
    assert "stores found: dev (memory), cache (memory)" in result.stderr
    assert console("check", "--store", "dev", "--config", path).returncode == 2
    status = console("status", "--config", path)
    assert status.returncode == 2
    assert "no NATS store (stores found: dev (memory), cache (memory))" in status.stderr
    assert "NATS stores: none" not in status.stderr


def test_options_go_before_or_after_the_command(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, nats_url, bucket_name)
    status, output = ratesync("--config", config, "check")
    assert status == 0, output
    assert f"{bucket_name} created" in output  # the file given before the command was read
    before = ratesync("--config", config, "check")
    assert before == ratesync("check", "--config", config)
    assert before[0] == 0
    assert f"ok    bucket present           {bucket_name}" in before[1]

    # Every shared option, on every command, in either place (and mixed).
    assert (
        json.loads(ratesync("--json", "--store", "prod", "--config", config, "status")[1])["bucket"]
        == bucket_name
    )
    assert json.loads(ratesync("--config", config, "status", "--json")[1])["keys"] == 0
    # A group never written: said so, exit 1 (nothing to show, nothing to reset).
    assert ratesync("--config", config, "--store", "prod", "reset", "api_external")[0] == 1
    status, output = ratesync("--config", config, "--json", "get", "api_external")
    assert status == 1
    assert json.loads(output)["written"] is False
    assert ratesync("--store", "nope", "get", "api_external", "--config", config)[0] == 2


def test_a_missing_or_broken_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    for args in (("--config", missing, "check"), ("check", "--config", missing)):
        result = console(*args)
        assert result.returncode == 2, result
        assert result.stderr == f"ratesync: {missing}: no such file\n"
        assert result.stdout == ""

    broken = tmp_path / "rate-sync.toml"
    broken.write_text('[stores.prod]\nengine = "nats"\nauto_create = "false"\n')
    for command in ("check", "status", "watch"):
        result = console("--config", broken, command)
        assert result.returncode == 2
        assert result.stderr.startswith(f"ratesync: {broken}")
        assert "auto_create" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_without_any_configuration(tmp_path: Path) -> None:
    result = console("check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr
    assert message.startswith("ratesync: no configuration found")
    for place in ("--config", "$RATE_SYNC_CONFIG", "./rate-sync.toml", "./config/rate-sync.toml"):
        assert place in message
    assert str(tmp_path) in message
    assert "Traceback" not in message

    # $RATE_SYNC_CONFIG naming a file that is not there is a configuration error too.
    result = console("check", cwd=tmp_path, RATE_SYNC_CONFIG=str(tmp_path / "gone.toml"))
    assert result.returncode == 2
    assert "$RATE_SYNC_CONFIG is" in result.stderr

    # Discovery finds ./config/rate-sync.toml; a memory-only file has nothing to check.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "rate-sync.toml").write_text('[stores.dev]\nengine = "memory"\n')
    result = console("check", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config/rate-sync.toml: nothing to check: no NATS store" in result.stderr


def test_version_is_the_package_version() -> None:
    result = console("--version")
    assert result.returncode == 0
    assert result.stdout == f"ratesync {ratesync_middleware.__version__}\n"
    assert ratesync_middleware.__version__ == importlib.metadata.version("ratesync-middleware")


async def _bucket(url: str, bucket: str, **limits: Any) -> None:
    """Make the bucket as an operator might (`nats kv add`), then apply `nats stream edit` limits."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv_limits = {k: limits.pop(k) for k in ("max_value_size", "max_bytes") if k in limits}
    await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=86400, **kv_limits))
    if limits:
        info = await js.stream_info(f"KV_{bucket}")
        await js.update_stream(dataclasses.replace(info.config, **limits))
    await nc.close()


async def _hits(config: Path, keys: int) -> list[bool]:
    """Which of `keys` new groups the store recorded (False: the decision was degraded)."""
    async with AsyncRateLimiter(str(config)) as limiter:
        return [
            (await limiter.hit("per_ip", key=f"203.0.113.{n}")).degraded is False
            for n in range(keys)
        ]


def write_per_ip_config(tmp_path: Path, url: str, bucket: str) -> Path:
    config = write_config(tmp_path, url, bucket, timeout=0.5)
    config.write_text(
        config.read_text()
        + '\n[limiters.per_ip]\nstore = "prod"\nlimit = "100/minute"\nkey = "ip"\n'
    )
    return config


def test_check_flags_a_max_value_size_that_rejects_our_writes(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    asyncio.run(_bucket(nats_url, bucket_name, max_value_size=100))
    config = write_per_ip_config(tmp_path, nats_url, bucket_name)
    assert asyncio.run(_hits(config, 1)) == [False]  # the server refuses the write

    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "FAIL  bucket limits" in output
    assert "max value size is 100 B, a write needs up to 384 B" in output
    assert f"fix: `nats stream edit KV_{bucket_name} --max-msg-size=-1`" in output

    asyncio.run(_bucket_edit(nats_url, bucket_name, max_msg_size=-1))  # the remedy, applied
    status, output = ratesync("check", "--config", config)
    assert status == 0, output
    assert "ok    bucket limits            no size limits" in output
    assert asyncio.run(_hits(config, 1)) == [True]


async def _bucket_edit(url: str, bucket: str, **limits: Any) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(f"KV_{bucket}")
    await js.update_stream(dataclasses.replace(info.config, **limits))
    await nc.close()


def test_check_warns_about_a_bucket_that_holds_few_keys(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    asyncio.run(_bucket(nats_url, bucket_name, max_bytes=1 << 20, max_msgs=5000))
    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 0, output  # a warning: enough or not depends on the traffic
    assert "WARN  bucket limits" in output
    assert "max bytes is 1 MiB, room for about 2,048 keys (fewer than 10,000)" in output
    assert "max msgs is 5,000, room for about 5,000 keys" in output
    assert "once full, writes of new keys are refused" in output
    assert f"`nats stream edit KV_{bucket_name} --max-bytes=-1 --max-msgs=-1`" in output
    steps = json.loads(ratesync("check", "--json", "--config", tmp_path / "rate-sync.toml")[1])
    limits = next(step for step in steps if step["name"] == "bucket limits")
    assert limits["ok"] is True
    assert limits["warning"] is True


def test_check_fails_a_full_bucket(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    asyncio.run(_bucket(nats_url, bucket_name, max_bytes=4096))
    config = write_per_ip_config(tmp_path, nats_url, bucket_name)
    recorded = asyncio.run(_hits(config, 40))
    assert recorded[0] is True
    assert recorded[-1] is False  # new keys are refused once it is full

    status, output = ratesync("check", "--config", config)
    assert status == 1
    assert "FAIL  bucket limits" in output
    assert "max bytes is 4 KiB and 9" in output  # 9x% used
    assert "used: writes of new keys are refused" in output
    assert f"`nats stream edit KV_{bucket_name} --max-bytes=-1`" in output


def test_status_get_reset(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, nats_url, bucket_name)

    async def spend() -> None:
        async with AsyncRateLimiter(str(config)) as limiter:
            for _ in range(3):
                await limiter.hit("api_external")

    asyncio.run(spend())
    status, output = ratesync("get", "api_external", "--config", config)
    assert status == 0
    assert "available    97 of 100" in output or "available    98 of 100" in output
    assert "revision" in output
    assert "full in (s)" in output

    status, output = ratesync("get", "api_external", "--json", "--config", config)
    state = json.loads(output)
    assert state["burst"] == 100
    assert state["available"] in (97, 98)
    assert state["revision"] >= 1

    status, output = ratesync("status", "--json", "--config", config)
    assert json.loads(output)["keys"] == 1
    assert json.loads(output)["history"] == 1

    assert ratesync("reset", "api_external", "--config", config) == (0, "api_external: reset\n")
    state = json.loads(ratesync("get", "api_external", "--json", "--config", config)[1])
    assert state["exists"] is False


def test_watch_shows_decoded_updates(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, nats_url, bucket_name)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ratesync_middleware.cli",
            "watch",
            "--json",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()

    async def spend() -> None:
        async with AsyncRateLimiter(str(config)) as limiter:
            await asyncio.sleep(1.5)  # let the watcher subscribe
            await limiter.hit("api_external")

    try:
        asyncio.run(spend())
        for _ in range(50):
            if lines:
                break
            threading.Event().wait(0.1)
    finally:
        process.terminate()
        process.wait(10)
        reader.join(5)
    update = json.loads(lines[0])
    assert update["group"] == "api_external"
    assert update["name"] == "api_external"  # a global limiter's group: its name alone
    assert update["available"] == 99


def test_check_shows_limits_that_leave_room(
    nats_url: str, bucket_name: str, tmp_path: Path
) -> None:
    asyncio.run(_bucket(nats_url, bucket_name, max_value_size=1024, max_bytes=64 << 20))
    config = write_config(tmp_path, nats_url, bucket_name)
    status, output = ratesync("check", "--config", config)
    assert status == 0, output
    line = "ok    bucket limits            max value size 1 KiB, max bytes 64 MiB (~131,072 keys)"
    assert line in output

    # A stream edited to discard old messages drops the oldest keys when full: over-admission.
    asyncio.run(_bucket_edit(nats_url, bucket_name, discard=DiscardPolicy.OLD, max_bytes=1 << 20))
    status, output = ratesync("check", "--config", config)
    assert status == 0
    assert "WARN  bucket limits" in output
    assert "once full, the oldest keys are dropped" in output
