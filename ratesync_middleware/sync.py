"""The request-to-decision path for synchronous adapters (WSGI, Flask, Django under WSGI).

The same `RequestLimiter` as the ASGI adapter, driven without an event loop of the caller's:
a plan whose stores are all in-process (memory) and whose keys need no awaiting is checked by
`check_now`, without a coroutine (see `RequestLimiter.immediate`); anything else runs on the
process's background loop (`_portal`). After `fork()` the child builds its own `RequestLimiter`
(fresh connections).
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from . import _portal
from .bucket import Decision
from .config import ConfigSource
from .errors import StoreError
from .limiter import AsyncRateLimiter
from .requests import Plan, RequestFacts, RequestLimiter

T = TypeVar("T")

_OUTER_DEADLINE_MARGIN = 1.0  # seconds beyond the stores' own deadlines before giving up


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("ratesync: a coroutine expected to complete at once suspended")


class SyncRequestLimiter:
    """`RequestLimiter` for synchronous callers: `plan(...)` as there, `check(facts, plan)` blocking.

    core = SyncRequestLimiter("rate-sync.toml")
    decision = core.check(facts, core.plan(method, path, view))
    """

    def __init__(self, config: ConfigSource | AsyncRateLimiter = None) -> None:
        self._source = config
        self._pid = os.getpid()
        self.core = RequestLimiter(config)
        self.config = self.core.config
        stores = self.config.stores.values()
        self._deadline = _OUTER_DEADLINE_MARGIN + max(
            (store.connect_timeout + 4 * store.timeout for store in stores), default=0.0
        )

    @property
    def current(self) -> RequestLimiter:
        """This process's `RequestLimiter`, rebuilt in a forked child."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            source = self._source
            if isinstance(source, AsyncRateLimiter):  # its connections belong to the parent
                source = AsyncRateLimiter(source.config, on_decision=source.on_decision)
            self.core = RequestLimiter(source)
        return self.core

    def plan(self, method: str, path: str, endpoint: object = None) -> Plan:
        """See `RequestLimiter.plan`."""
        return self.current.plan(method, path, endpoint)

    def check(self, facts: RequestFacts, plan: Plan) -> Decision | None:
        """See `RequestLimiter.check`; blocks at most the stores' deadlines."""
        core = self.current
        if not plan:
            return None
        if core.immediate(plan):
            return core.check_now(facts, plan)
        try:
            return _portal.run(core.check(facts, plan), self._deadline)
        except StoreError as error:  # the loop thread itself did not answer in time
            limiter = core.limiter.limiter(plan[0].name)
            return core.limiter.degraded(limiter, error)

    def startup(self, endpoints: Iterable[object] = ()) -> None:
        """See `RequestLimiter.startup` (imports key functions, checks marks, opens stores).

        With memory stores only, no background thread is started (a thread alive in a gunicorn
        `--preload` master at `fork()` is a hazard).
        """
        core = self.current
        core.prepare(endpoints)
        if core.remote_stores:
            _portal.run(core.open_stores(), self._deadline + 5.0)

    def close(self) -> None:
        """Close the stores of this process."""
        core = self.current
        if core.remote_stores:
            _portal.run(core.aclose(), 10.0)
        else:
            run_inline(core.aclose())
