"""`ratesync` against real servers: the guide's checks, and reading the shared buckets."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import nats
import pytest
from nats.js.api import KeyValueConfig

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


def test_check_a_healthy_server(nats_url: str, bucket_name: str, tmp_path: Path) -> None:
    status, output = ratesync("check", "--config", write_config(tmp_path, nats_url, bucket_name))
    assert status == 0, output
    for step in ("server reachable", "authentication accepted", "JetStream enabled"):
        assert f"ok    {step}" in output
    assert f"{bucket_name} created (auto_create = true)" in output
    assert "ok    bucket settings" in output
    assert "history 1, TTL 24h, replicas 1" in output

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


def test_memory_stores_need_nothing(tmp_path: Path) -> None:
    path = tmp_path / "rate-sync.toml"
    path.write_text('[stores.dev]\nengine = "memory"\n')
    status, output = ratesync("check", "--config", path)
    assert status == 0
    assert "nothing to set up" in output


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
    assert update["available"] == 99
