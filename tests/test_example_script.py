"""`scripts/example` as the README promises it: on a fresh checkout it installs and serves; the
second start installs nothing, prints nothing from pip or setuptools, and is up in seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def fresh_clone(target: Path) -> Path:
    """A clone of this repository's committed tree, as a new user gets it."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def start_example(repo: Path, port: int, log: Path, timeout: float) -> tuple[float, list[int]]:
    """Start scripts/example, wait for its first answer, make a few requests, stop it.

    Returns the seconds until the first answer and the statuses of the requests.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RATESYNC_ENGINE", "NATS_URL")}
    env |= {"PORT": str(port), "PYTHON": sys.executable}
    url = f"http://127.0.0.1:{port}/"
    started = time.monotonic()
    with log.open("w") as output:
        # The script ends in `exec uvicorn`, so this pid is the server's.
        process = subprocess.Popen(
            [str(repo / "scripts" / "example")], stdout=output, stderr=subprocess.STDOUT, env=env
        )
        try:
            while (first := status_of(url)) is None:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() - started < timeout, log.read_text()
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            statuses = [first] + [status_of(url) or 0 for _ in range(6)]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    return elapsed, statuses


def test_example_starts_on_a_fresh_clone_and_quietly_the_second_time(tmp_path: Path) -> None:
    repo = fresh_clone(tmp_path / "repo")
    port = free_port()

    _, statuses = start_example(repo, port, tmp_path / "first.log", timeout=600)
    first = (tmp_path / "first.log").read_text()
    assert statuses[:5] == [200] * 5, first
    assert 429 in statuses  # the example's `api` limiter: a burst of 5
    assert "project.license" not in first
    assert "Deprecat" not in first

    elapsed, statuses = start_example(repo, port, tmp_path / "second.log", timeout=30)
    second = (tmp_path / "second.log").read_text()
    assert statuses[0] == 200
    lines = second.splitlines()
    assert lines
    assert all(line.startswith("INFO:") for line in lines), second  # uvicorn only: no pip
    assert elapsed < 5.0, f"second start took {elapsed:.1f}s"
