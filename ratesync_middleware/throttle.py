"""Log lines that a flood cannot multiply: one per subject per interval, counting the rest."""

from __future__ import annotations

import math
import time

__all__ = ["LogThrottle"]


class LogThrottle:
    """Says when a subject (a failing store, a slow function) may be logged again.

    more = throttle.due("store:prod", "failures")
    if more is not None:
        logger.warning("store 'prod' failed: ...%s", more)
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def due(self, subject: str, what: str) -> str | None:
        """None while `subject` was logged less than an interval ago (counted), else what to
        append to its line: how many of `what` went unlogged since the last one."""
        now = time.monotonic()
        if now - self._last.get(subject, -math.inf) < self.interval:
            self._left_out[subject] = self._left_out.get(subject, 0) + 1
            return None
        self._last[subject] = now
        left_out = self._left_out.pop(subject, 0)
        return f" ({left_out} more {what} since the last report)" if left_out else ""
