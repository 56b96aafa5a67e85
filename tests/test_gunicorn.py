"""gunicorn with --preload and two forked workers shares one NATS limit, checked over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[1]
BURST = 5
REQUESTS = 40  # well above the burst
CONFIG = """
[stores.shared]
engine = "nats"
url = "${NATS_URL}"
bucket_name = "${RATESYNC_BUCKET}"

[limiters.api]
store = "shared"
limit = "5/hour"        # a burst of 5 that does not refill during the test: the count is exact

[middleware]
default = "api"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def gunicorn(nats_url: str, bucket_name: str, tmp_path: Path) -> Iterator[str]:
    """`gunicorn --preload -w 2` serving tests/apps/flask_app.py; yields its base URL."""
    config = tmp_path / "rate-sync.toml"
    config.write_text(CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RATE_SYNC_CONFIG": str(config),
        "NATS_URL": nats_url,
        "RATESYNC_BUCKET": bucket_name,
    }
    log = tmp_path / "gunicorn.log"
    command = [
        *(sys.executable, "-m", "gunicorn", "--preload", "-w", "2"),
        *("-b", f"127.0.0.1:{port}", "--graceful-timeout", "3", "--log-file", str(log)),
        *no_control_socket(),
        "tests.apps.flask_app:app",
    ]
    # A session of its own, so that the master and its workers can be stopped as one group.
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_both_workers(url, process, log)
        yield url
    finally:
        stop(process)


def no_control_socket() -> list[str]:
    """Recent gunicorn opens a control socket in ~/.gunicorn, which parallel runs would share."""
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]

    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def wait_for_both_workers(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0
) -> None:
    """Until two different workers have answered the exempt /health (no token spent)."""
    deadline = time.monotonic() + timeout
    workers: set[str] = set()
    with httpx.Client(timeout=2.0) as client, ThreadPoolExecutor(4) as pool:
        while len(workers) < 2:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}:\n{read(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn workers not ready after {timeout}s:\n{read(log)}")
            try:
                answers = list(pool.map(lambda _: client.get(f"{url}/health"), range(4)))
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            workers.update(a.headers["X-Worker"] for a in answers if a.status_code == 200)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # the master stops its workers
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def read(log: Path) -> str:
    return log.read_text() if log.exists() else "(no log)"


def test_forked_workers_share_one_exact_limit(gunicorn: str) -> None:
    with httpx.Client(timeout=10.0) as client, ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda _: client.get(f"{gunicorn}/"), range(REQUESTS)))
        elapsed = time.monotonic() - started

    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == BURST, statuses
    assert statuses.count(429) == REQUESTS - BURST, statuses
    refused = [answer for answer in answers if answer.status_code == 429]
    assert all(answer.headers["Retry-After"] for answer in refused)
    assert all(answer.headers["RateLimit-Policy"] == '"api";q=5;w=3600' for answer in answers)
    assert len({answer.headers["X-Worker"] for answer in answers}) == 2  # both workers decided
    assert elapsed < 20.0
