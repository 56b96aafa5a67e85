"""`@limit` and `@exempt`: marks written on endpoints of any framework, read by `plans.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

__all__ = ["MARKS_ATTRIBUTE", "Marks", "exempt", "get_marks", "limit"]

MARKS_ATTRIBUTE: Final = "_ratesync_marks"

_F = TypeVar("_F")

Cost = int | Callable[[Any], int]
"""What a request spends: a whole number, or a function of the framework's request."""


@dataclass(frozen=True, slots=True)
class Marks:
    """What `@limit` / `@exempt` wrote on an endpoint: (limiter, cost) pairs, or an exemption.

    A cost of None is the limiter's own (`cost` in its table, else 1)."""

    limits: tuple[tuple[str, Cost | None], ...] = ()
    exempt: bool = False


def get_marks(endpoint: object) -> Marks | None:
    """The marks on an endpoint (a function, method, class or blueprint), None when it has none."""
    marks = getattr(endpoint, MARKS_ATTRIBUTE, None)
    return marks if isinstance(marks, Marks) else None


def limit(*names: str, cost: Cost | None = None) -> Callable[[_F], _F]:
    """Limit an endpoint by the named limiters (all must allow), each request spending `cost`.

    `cost`: a whole number, or a function called with the framework's request (Starlette
    `Request`, Flask `request`, Django `HttpRequest`) returning one; default: the limiter's own
    `cost`, else 1.

    Only sets an attribute on the function, so it works on Starlette endpoints, FastAPI path
    operations (above or below the route decorator), Django views and Flask view functions.
    Stacked `@limit`s add up, read from top to bottom.
    """
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError("limit() needs one or more limiter names, e.g. @limit('login')")
    whole = isinstance(cost, int) and not isinstance(cost, bool) and cost >= 1
    if cost is not None and not callable(cost) and not whole:
        raise ValueError(
            f"cost must be a whole number >= 1 or a function of the request, got {cost!r}"
        )

    def decorate(endpoint: _F) -> _F:
        marks = get_marks(endpoint) or Marks()
        added = tuple((name, cost) for name in names)
        # Decorators apply bottom-up: prepend, so the names read top to bottom as written.
        setattr(endpoint, MARKS_ATTRIBUTE, Marks(added + marks.limits, marks.exempt))
        return endpoint

    return decorate


def exempt(endpoint: _F) -> _F:
    """Never limit this endpoint (it wins over `@limit`, route rules and the default)."""
    marks = get_marks(endpoint) or Marks()
    setattr(endpoint, MARKS_ATTRIBUTE, Marks(marks.limits, exempt=True))
    return endpoint
