"""One background event loop per process, for synchronous callers of the async stores.

nats-py is asyncio-only and a connection belongs to the loop that opened it, so sync code (Flask,
WSGI, Django under WSGI) sends every store call to this one long-lived loop instead of starting a
loop per call. After `fork()` the child starts its own loop thread on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import StoreUnavailableError

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = 0


def _start() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    threading.Thread(target=serve, name="ratesync-portal", daemon=True).start()
    ready.wait()
    return loop


def get_loop() -> asyncio.AbstractEventLoop:
    """The running background loop of this process, started on first use."""
    global _loop, _pid
    loop = _loop
    if loop is not None and _pid == os.getpid():
        return loop
    with _lock:
        if _loop is None or _pid != os.getpid():
            _loop, _pid = _start(), os.getpid()
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run `coro` on the background loop and wait for it at most `timeout` seconds."""
    loop = get_loop()
    if _running_loop() is loop:
        coro.close()
        raise RuntimeError("ratesync: a synchronous limiter was called from its own event loop")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise StoreUnavailableError(f"no answer within {timeout:.2f}s from the store") from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
