"""The one sync driver: the async core, driven from synchronous code (WSGI, Flask, Django, scripts).

`RateLimiter` and every sync adapter use `SyncRequestLimiter`. A plan whose stores decide at
once (memory) is decided inline, without a coroutine; anything else runs on the process's one
background loop (`_portal`) under one outer deadline. After `fork()` the child builds its own
core (fresh connections), so gunicorn `--preload` works, and a parent that opened its stores at
start-up but decided nothing (that master) closes them, and stops the loop thread, as it forks:
the fleet is the workers, and they are forked from a process with no thread of ours. When the
loop itself does not answer, the answer is the plan's strictest rule: any `fail_closed` limiter
refuses.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Coroutine, Iterable
from typing import Any, Final, TypeVar

from . import _portal
from .bucket import Decision
from .client_ip import ClientAddress
from .config import Config, ConfigSource
from .errors import StoreError
from .facts import RequestFacts
from .lifecycle import Admission, Plan, RequestLimiter
from .limiter import AsyncRateLimiter
from .plans import PlanResolver

__all__ = ["SyncRequestLimiter", "outer_deadline", "run_inline"]

T = TypeVar("T")

_OUTER_DEADLINE_MARGIN: Final = 1.0  # seconds beyond the stores' own deadlines before giving up
_CLOSE_BEFORE_FORK_SECONDS: Final = 2.0  # a fork waits this long at most for the close

logger = logging.getLogger("ratesync_middleware")

_forks = 0
"""How many times this process is a `fork()` child: a counter read per request is cheaper than
`os.getpid()`, a system call."""


def _forked() -> None:
    global _forks
    _forks += 1


_opened_at_startup: weakref.WeakSet[SyncRequestLimiter] = weakref.WeakSet()


def _before_fork() -> None:
    for limiter in list(_opened_at_startup):
        limiter.close_if_unused()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork()
    os.register_at_fork(before=_before_fork, after_in_child=_forked)


_remote: weakref.WeakSet[SyncRequestLimiter] = weakref.WeakSet()
"""Limiters with stores on the background loop: closed at interpreter exit (`_close_at_exit`)."""


def _close_at_exit() -> None:
    """A WSGI process ends (a gunicorn worker told to stop, a script's last line) without
    closing its limiter: close the open stores, so that settles and slot releases on their way
    are written (the loop's thread is a daemon that would stop with them unwritten)."""
    for limiter in list(_remote):
        limiter.close_if_open()


atexit.register(_close_at_exit)


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("ratesync: a coroutine expected to complete at once suspended")


def outer_deadline(config: Config) -> float:
    """How long a sync caller waits for the loop thread: the stores enforce their own deadlines,
    this one only guards against a wedged loop (connect, then a decision's retries)."""
    stores = config.stores.values()
    return _OUTER_DEADLINE_MARGIN + max(
        (store.connect_timeout + 4 * store.timeout for store in stores), default=0.0
    )


class SyncRequestLimiter:
    """`RequestLimiter` for synchronous callers, fork-safe, with one outer deadline.

    core = SyncRequestLimiter("rate-sync.toml")
    admission = core.begin(facts, core.plans.plan(method, path, view))  # blocks, bounded
    """

    def __init__(self, config: ConfigSource | AsyncRateLimiter = None) -> None:
        self._forks = _forks
        self._core = RequestLimiter(config)
        self.config = self._core.config
        self.deadline = outer_deadline(self.config)
        self._remote = bool(self._core.remote_stores)
        if self._remote:
            _remote.add(self)

    @property
    def core(self) -> RequestLimiter:
        """This process's `RequestLimiter`, rebuilt in a forked child (connections are per process)."""
        if self._forks != _forks:
            self._forks = _forks
            self._core = RequestLimiter(self._core.limiter.fresh())
        return self._core

    @property
    def client_address(self) -> ClientAddress:
        """See `RequestLimiter.client_address`."""
        return self._core.client_address

    def run(self, coro: Coroutine[Any, Any, T], wait: float = 0.0) -> T:
        """Run a call of the core: inline when only memory stores are configured and nothing
        may wait, else on the background loop within the outer deadline grown by `wait`, the
        seconds the call may wait for a token or a slot (`StoreUnavailableError` after it)."""
        if not self._remote and not wait:
            return run_inline(coro)
        return _portal.run(coro, self.deadline + wait)

    # -- plans and decisions ----------------------------------------------------------------

    @property
    def plans(self) -> PlanResolver:
        """The plan resolver (`RequestLimiter.plans`): configuration only, so fork-safe as it is."""
        return self._core.plans

    def begin(self, facts: RequestFacts, plan: Plan) -> Admission:
        """See `RequestLimiter.begin`; blocks at most the outer deadline."""
        core = self.core
        admission = core.begin(facts, plan)
        if isinstance(admission, Admission):
            return admission
        try:  # a wait for a token or a slot blocks this thread, as long as the plan allows
            return _portal.run(admission, self.deadline + core.wait(plan))
        except StoreError as error:  # the loop thread itself did not answer in time
            return core.degraded(plan, error)

    def hit(
        self, limiter: str, key: str | None = None, cost: int = 1, tier: str | None = None
    ) -> Decision:
        """See `AsyncRateLimiter.hit`; blocks at most the outer deadline."""
        core = self.core.limiter
        if core.decides_now(limiter):
            return core.hit_now(limiter, key, cost, tier=tier)
        try:
            return _portal.run(core.hit(limiter, key, cost, tier=tier), self.deadline)
        except StoreError as error:  # the loop thread itself did not answer in time
            return core.degraded(core.limiter(limiter), error)

    # -- start-up and shutdown --------------------------------------------------------------

    def startup(self, endpoints: Iterable[object] = ()) -> None:
        """See `RequestLimiter.startup` (imports key functions, checks marks, opens stores).

        With memory stores only, no background thread is started (a thread alive in a gunicorn
        `--preload` master at `fork()` is a hazard).
        """
        core = self.core
        core.prepare(endpoints)
        self._remote = bool(core.remote_stores)  # an inline @limit may be on a NATS store
        if self._remote:
            _remote.add(self)
        if self._remote:
            _portal.run(core.open_stores(), self.deadline + 5.0)
            _opened_at_startup.add(self)

    def close_if_unused(self) -> None:
        """Before `fork()`: stores opened at start-up by a process that decided nothing since
        (gunicorn `--preload`'s master) are closed, so that it does not stay in the fleet
        (`ratesync fleet`, fail_mode local's share) beside the workers; each worker opens its
        own, and this process would reopen them on first use. A fork in a process that serves
        requests changes nothing."""
        core = self._core
        if self._forks != _forks or not core.limiter.opened_unused:
            return
        try:
            _portal.run(core.aclose(), _CLOSE_BEFORE_FORK_SECONDS)
        except Exception as error:  # the fork goes on; this process's connection stays idle
            logger.warning("ratesync: closing the stores before fork() failed: %s", error)
            return
        _portal.stop_if_idle(_CLOSE_BEFORE_FORK_SECONDS)  # no thread of ours to copy, if idle

    def close_if_open(self) -> None:
        """`close()` if this process opened a store (at exit: never start a loop to close)."""
        if self._forks == _forks and self._core.limiter.opened:
            try:
                self.close()
            except Exception as error:  # the process ends anyway
                logger.warning("ratesync: closing the stores at exit failed: %s", error)

    def close(self) -> None:
        """Close the stores of this process."""
        core = self.core
        if self._remote or core.remote_stores:  # or an inline @limit's, found since
            _portal.run(core.aclose(), 10.0)
        else:
            run_inline(core.aclose())
