"""What a response settles: `settle_header` and `count_status`, read once the response is known.

A limiter with either reserves its cost when the request is admitted; `Admission.finish` then
charges what the response says instead: the integer in the `settle_header` response header (an
LLM answer's tokens), or nothing at all unless the status is one of `count_status` (count only
failed logins). Both: a listed status is charged the header's integer. A response that never
started (`status` None: the app failed or the client left first) is not one of `count_status`
(nothing is charged: its outcome is unknown, and a client learns nothing from it) and has no
header (the reservation stays charged).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .bucket import Decision
from .config import MAX_COUNT, LimiterConfig

__all__ = ["Reservation", "ResponseHeaders", "SettleRule"]

ResponseHeaders = Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]
"""A response's headers as the adapter has them: (name, value) pairs, text or bytes."""

_MAX_DIGITS = len(str(MAX_COUNT))


class SettleRule(NamedTuple):
    """A limiter's `settle_header` (lower case) and `count_status`."""

    header: str | None
    count_status: frozenset[int] | None

    @classmethod
    def of(cls, config: LimiterConfig) -> SettleRule | None:
        """The rule of a limiter, None for one that charges what it reserves (most)."""
        if config.settle_header is None and config.count_status is None:
            return None
        header = config.settle_header.lower() if config.settle_header is not None else None
        statuses = frozenset(config.count_status) if config.count_status is not None else None
        return cls(header, statuses)

    def charge(
        self, reserved: int, status: int | None, headers: ResponseHeaders | None
    ) -> int | str:
        """What the request costs in the end; a string says why the reservation stays (a
        header missing or malformed: for the log)."""
        if self.count_status is not None and status not in self.count_status:
            return 0
        if self.header is None or status is None:
            return reserved
        value = self.header_value(headers or ())
        if value is None:
            return f"the response has no {self.header} header"
        text = value.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS):
            return f"the response's {self.header} header is not a whole number"  # (not shown)
        return min(int(text), MAX_COUNT)

    def header_value(self, headers: ResponseHeaders) -> str | None:
        """The first value of the rule's header, case-insensitively."""
        wanted = self.header
        assert wanted is not None
        for name, value in headers:
            if isinstance(name, bytes):
                if name.lower() == wanted.encode():
                    return value.decode("latin-1") if isinstance(value, bytes) else value
            elif name.lower() == wanted:
                return value if isinstance(value, str) else value.decode("latin-1")
        return None


class Reservation(NamedTuple):
    """What an admitted request reserved of one settling limiter, settled at `finish`."""

    limiter: str
    key: str | None
    cost: int
    rule: SettleRule
    decision: Decision
    tier: str | None = None
