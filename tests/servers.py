"""Run app servers (uvicorn, gunicorn) in subprocesses for tests that cross process boundaries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def uvicorn_servers(
    app: str, count: int, env: Mapping[str, str], timeout: float = 30.0
) -> Iterator[list[str]]:
    """Start `count` uvicorn processes serving `app`; yield their base URLs; stop them."""
    ports = [free_port() for _ in range(count)]
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=environment,
            cwd=ROOT,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + timeout
        for port, process in zip(ports, processes, strict=True):
            wait_until_listening(port, process, deadline, "uvicorn")
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until_listening(
    port: int, process: subprocess.Popen[bytes], deadline: float, name: str
) -> None:
    """Until something accepts a TCP connection on `port` (a connect, not a request: a
    request would spend a token); RuntimeError if `process` exits first."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Gunicorn:
    """A running `gunicorn --preload -w N` (sync workers): its URL, its master and workers."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self.workers: set[str] = set()  # the pids (as the X-Worker header gives them)

    def read_log(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"


@contextmanager
def gunicorn_server(
    app: str, workers: int, env: Mapping[str, str], log: Path, timeout: float = 30.0
) -> Iterator[Gunicorn]:
    """`gunicorn --preload -w workers` serving `app` (which names the worker answering in an
    `X-Worker` header and exempts `/health`); yields once every worker has answered."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "gunicorn", "--preload", "-w", str(workers)),
        *("-b", f"127.0.0.1:{port}", "--graceful-timeout", "3", "--log-file", str(log)),
        *no_control_socket(),
        app,
    ]
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    # A session of its own, so that the master and its workers can be stopped as one group.
    process = subprocess.Popen(command, cwd=ROOT, env=environment, start_new_session=True)
    server = Gunicorn(f"http://127.0.0.1:{port}", process, log)
    try:
        server.workers = wait_for_workers(server, workers, timeout)
        yield server
    finally:
        stop(process)


def no_control_socket() -> list[str]:
    """Recent gunicorn opens a control socket in ~/.gunicorn, which parallel runs would share."""
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]

    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def wait_for_workers(server: Gunicorn, count: int, timeout: float) -> set[str]:
    """Until `count` different workers have answered the exempt /health (no token spent)."""
    deadline = time.monotonic() + timeout
    workers: set[str] = set()
    health = f"{server.url}/health"
    with httpx.Client(timeout=2.0) as client, ThreadPoolExecutor(2 * count) as pool:
        while len(workers) < count:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {server.process.returncode}:\n{server.read_log()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gunicorn workers not ready after {timeout}s:\n{server.read_log()}"
                )
            try:
                answers = list(pool.map(lambda _: client.get(health), range(2 * count)))
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            workers.update(a.headers["X-Worker"] for a in answers if a.status_code == 200)
    return workers


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()  # the master stops its workers
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class AsgiServer:
    """A running ASGI server process: its base URL and its log (stdout and stderr)."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def asgi_server_command(server: str, app: str, port: int) -> list[str]:
    """The command line that serves `app` ("module:attribute") with `server` on `port`."""
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    if server == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{port}", app]
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1", app),
        ]
    raise ValueError(f"unknown ASGI server {server!r}")


@contextmanager
def asgi_server(server: str, app: str, log: Path, timeout: float = 30.0) -> Iterator[AsgiServer]:
    """`server` (uvicorn, daphne, hypercorn, granian) serving `app` on loopback, until it
    listens; stopped after."""
    port = free_port()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            asgi_server_command(server, app, port),
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    running = AsgiServer(f"http://127.0.0.1:{port}", process, log)
    try:
        try:
            wait_until_listening(port, process, time.monotonic() + timeout, server)
        except RuntimeError as error:
            raise RuntimeError(f"{error}:\n{running.read_log()}") from None
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextmanager
def hypercorn_server(
    app: str, env: Mapping[str, str], log: Path, timeout: float = 30.0
) -> Iterator[str]:
    """`hypercorn app` on 127.0.0.1 (an app that exempts `/health`); yields its base URL once
    `/health` answers, and stops it with SIGTERM (a graceful shutdown: lifespan runs)."""
    port = free_port()
    command = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", app]
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `stop` may have to kill its process group
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"hypercorn exited with {process.returncode}")
                try:
                    if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            yield url
        finally:
            stop(process)
