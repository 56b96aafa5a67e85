"""The synchronous request path shared by the WSGI, Flask and Django adapters."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from typing import Any

import pytest

from ratesync_middleware.client_ip import ClientAddress
from ratesync_middleware.facts import RequestFacts
from ratesync_middleware.sync import SyncRequestLimiter, run_inline


class Facts(RequestFacts):
    def __init__(self, path: str, peer: str, headers: dict[str, str] | None = None) -> None:
        super().__init__("GET", path, peer, ClientAddress())
        self._headers = headers or {}

    def header(self, name: str) -> str | None:
        return self._headers.get(name)


def limits(store: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "limiters": {"api": {"rate_per_second": 0.01, "burst": 2}},
        "middleware": {"default": "api"},
    }
    if store is not None:
        config["stores"] = {"prod": store}
    return config


def spend(core: SyncRequestLimiter, peer: str = "203.0.113.7") -> list[bool]:
    decisions = [
        core.begin(Facts("/x", peer), core.plans.plan("GET", "/x")).decision for _ in range(3)
    ]
    return [d is not None and d.allowed for d in decisions]


def test_memory_plans_run_inline_without_the_loop_thread() -> None:
    core = SyncRequestLimiter(limits())
    assert spend(core) == [True, True, False]
    assert spend(core, peer="203.0.113.8") == [True, True, False]


class Suspend:
    def __await__(self) -> Any:
        yield


async def suspends() -> None:
    await Suspend()


def test_run_inline_refuses_a_coroutine_that_suspends() -> None:
    with pytest.raises(RuntimeError, match="suspended"):
        run_inline(suspends())


@pytest.mark.nats
def test_nats_plans_run_on_the_background_loop(nats_store: dict[str, Any]) -> None:
    core = SyncRequestLimiter(limits(nats_store))
    assert spend(core) == [True, True, False]
    core.close()


def _child(core: SyncRequestLimiter, results: Any) -> None:
    decision = core.begin(Facts("/x", "203.0.113.7"), core.plans.plan("GET", "/x")).decision
    results.put(decision is not None and decision.allowed and not decision.degraded)


@pytest.mark.nats
def test_a_forked_child_gets_its_own_connection(nats_store: dict[str, Any]) -> None:
    core = SyncRequestLimiter(limits(nats_store))
    first = core.begin(Facts("/x", "203.0.113.7"), core.plans.plan("GET", "/x")).decision
    assert first is not None
    assert first.allowed
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child, args=(core, results))
    child.start()
    child.join(30)
    assert results.get(timeout=5) is True
    last = core.begin(Facts("/x", "203.0.113.7"), core.plans.plan("GET", "/x")).decision
    assert last is not None
    assert not last.allowed  # parent and child shared the bucket of 2
    core.close()


@pytest.mark.nats
def test_a_parent_that_only_started_up_forks_with_its_stores_closed_and_no_thread(
    nats_store: dict[str, Any],
) -> None:
    """gunicorn --preload's master: it opens the stores at start-up, forks its workers and
    serves nothing. It must not stay in the fleet, nor fork with our loop thread alive. A
    process that decides keeps its store across a fork. (A fresh interpreter: other tests of
    this one may keep the loop thread busy.)"""
    script = f"""
import os, threading
from ratesync_middleware.sync import SyncRequestLimiter
from tests.test_sync import limits, spend

def fork_a_child_that_exits():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def threads():
    return sorted(thread.name for thread in threading.enumerate())

core = SyncRequestLimiter(limits({nats_store!r}))
core.startup()
assert core.core.limiter.opened_unused
assert threads() == ["MainThread", "ratesync-portal"], threads()
fork_a_child_that_exits()
assert not core.core.limiter.opened_unused  # closed
assert threads() == ["MainThread"], threads()
assert spend(core) == [True, True, False]  # opened again on first use
store = core.core.limiter.store("prod")
fork_a_child_that_exits()
assert core.core.limiter.store("prod") is store  # kept: this process serves
assert spend(core, peer="203.0.113.8") == [True, True, False]
core.close()
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_memory_only_start_and_close_start_no_thread() -> None:
    # In a fresh interpreter: other tests of this process may have started the loop thread.
    script = """
import threading
from ratesync_middleware.sync import SyncRequestLimiter
from tests.test_sync import limits, spend
core = SyncRequestLimiter(limits())
core.startup()
assert spend(core) == [True, True, False]
core.close()
print(sorted(t.name for t in threading.enumerate()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "['MainThread']"
