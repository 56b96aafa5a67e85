"""One background event loop per process, for synchronous callers of the async stores.

nats-py is asyncio-only and a connection belongs to the loop that opened it, so sync code (Flask,
WSGI, Django under WSGI) sends every store call to this one long-lived loop instead of starting a
loop per call. After `fork()` the child starts its own loop thread on first use; before one, an
idle loop is stopped (`stop_if_idle`), so that the child is not copied from a process whose
thread of ours was somewhere in the middle of its work.
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
_thread: threading.Thread | None = None
_pid = 0
_SETTLE_ROUNDS = 20  # x 10 ms: how long tasks being cancelled (a closed connection's) may take


def _start() -> asyncio.AbstractEventLoop:
    global _thread
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    _thread = threading.Thread(target=serve, name="ratesync-portal", daemon=True)
    _thread.start()
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


def stop_if_idle(timeout: float) -> bool:
    """Stop this process's loop and its thread if no task runs on it any more (the next call
    starts them again). False while anything runs there (nothing changed), or when the thread
    did not end within `timeout` (it ends by itself; calls already go to a new loop)."""
    global _loop, _thread
    with _lock:
        loop, thread = _loop, _thread
        if loop is None or thread is None or _pid != os.getpid():
            return True
        try:
            busy = asyncio.run_coroutine_threadsafe(_busy(), loop).result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        if busy:
            return False
        _loop = _thread = None  # from now on, a call starts a new one
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            return False
        loop.close()
        return True


async def _busy() -> bool:
    """Whether a task other than this one is still on the loop, once cancelled ones are done."""
    for _ in range(_SETTLE_ROUNDS):
        if not asyncio.all_tasks() - {asyncio.current_task()}:
            return False
        await asyncio.sleep(0.01)
    return True


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run `coro` on the background loop and wait for it at most `timeout` seconds."""
    loop = get_loop()
    if _running_loop() is loop:
        coro.close()
        raise RuntimeError("ratesync: a synchronous limiter was called from its own event loop")
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # closed by `stop_if_idle` meanwhile (another thread forks): a new one
        future = asyncio.run_coroutine_threadsafe(coro, get_loop())
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
