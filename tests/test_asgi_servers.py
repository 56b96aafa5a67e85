"""The ASGI adapter under real servers (uvicorn, daphne): what their logs and clients see."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .servers import ROOT, asgi_server, asgi_server_command, free_port

CHAT = "tests.apps.asgi_servers_app:chat"
TYPOS = ["tests.apps.asgi_servers_app:typo", "tests.apps.asgi_servers_app:litestar_typo"]


async def chat_until_closed(url: str) -> tuple[list[str], int | None]:
    """Send five messages (the limit is three); the echoes received and the close code."""
    echoes: list[str] = []
    async with connect(url.replace("http://", "ws://") + "/ws/chat") as socket:
        try:
            for number in range(5):
                await socket.send(f"message {number}")
                echoes.append(str(await asyncio.wait_for(socket.recv(), 10)))
        except ConnectionClosed as closed:
            return echoes, closed.rcvd.code if closed.rcvd else None
    return echoes, None


@pytest.mark.parametrize(
    ("server", "close_code"),
    [("uvicorn", 1008), ("hypercorn", 1008), ("granian", 1008), ("daphne", 4008)],
)
def test_the_one_message_too_many_closes_the_socket_with_a_code_the_server_accepts(
    server: str, close_code: int, tmp_path: Path
) -> None:
    with asgi_server(server, CHAT, tmp_path / "server.log") as running:
        echoes, code = asyncio.run(chat_until_closed(running.url))
        log = running.read_log()

    assert echoes == ["message 0", "message 1", "message 2"]
    assert code == close_code
    assert "Traceback" not in log


def start_up(server: str, app: str) -> str:
    """Run `server` with `app` until it exits by itself (a failed start-up); its output."""
    finished = subprocess.run(
        asgi_server_command(server, app, free_port()),
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server == "hypercorn" or finished.returncode != 0  # hypercorn's master exits 0
    return finished.stdout + finished.stderr


@pytest.mark.parametrize("app", TYPOS, ids=["starlette", "litestar"])
def test_an_unknown_limiter_name_fails_uvicorn_start_up_in_one_line(app: str) -> None:
    log = start_up("uvicorn", app)

    assert "Traceback" not in log
    named = [line for line in log.splitlines() if "did you mean" in line]
    assert len(named) == 1, log
    assert "no limiter 'logn' (did you mean 'login'?)" in named[0]


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
@pytest.mark.parametrize("app", TYPOS, ids=["starlette", "litestar"])
def test_an_unknown_limiter_name_fails_the_start_up_under_other_servers(
    server: str, app: str
) -> None:
    # Both print the reason, then a traceback of their own making (the server's style).
    assert "no limiter 'logn' (did you mean 'login'?)" in start_up(server, app)
