"""`@limit` and `@exempt`: marks written on endpoints of any framework, read by `plans.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeVar

__all__ = ["MARKS_ATTRIBUTE", "InlineRate", "Key", "Marks", "exempt", "get_marks", "limit"]

MARKS_ATTRIBUTE: Final = "_ratesync_marks"

_F = TypeVar("_F")

Cost = int | Callable[[Any], int]
"""What a request spends: a whole number, or a function of the framework's request."""

Key = str | tuple[str, ...] | list[str]
"""An inline limiter's identity, as a TOML `key` is written: "ip", "header:X-User", [...]."""


class InlineRate(NamedTuple):
    """`@limit("5/minute", key=...)`: an unnamed limiter of the endpoint it decorates, on the
    default store. Checked (and named, from `endpoint`) when the plan is resolved: plans.py."""

    endpoint: str  # "module.qualname" of the decorated endpoint
    rates: tuple[str, ...]  # as written: "5/minute", ...
    key: Key | None  # None: "ip"


@dataclass(frozen=True, slots=True)
class Marks:
    """What `@limit` / `@exempt` wrote on an endpoint: (limiter, cost) pairs, or an exemption.

    A limiter is a name, or the `InlineRate` of an inline `@limit("5/minute")`. A cost of None
    is the limiter's own (`cost` in its table, else 1)."""

    limits: tuple[tuple[str | InlineRate, Cost | None], ...] = ()
    exempt: bool = False


def get_marks(endpoint: object) -> Marks | None:
    """The marks on an endpoint (a function, method, class or blueprint), None when it has none."""
    marks = getattr(endpoint, MARKS_ATTRIBUTE, None)
    return marks if isinstance(marks, Marks) else None


def limit(*names: str, cost: Cost | None = None, key: Key | None = None) -> Callable[[_F], _F]:
    """Limit an endpoint by the named limiters (all must allow), each request spending `cost`.

    A name containing "/" is an inline rate (`@limit("5/minute")`): the rates of one `@limit`
    make one unnamed limiter of this endpoint on the default store, keyed by `key` (the syntax
    of a TOML `key`; default "ip"), named in headers after the endpoint (`module-qualname`).
    A malformed rate or key is a `ConfigError` at start-up (or `manage.py check`).

    `cost`: a whole number, or a function called with the framework's request (Starlette
    `Request`, Flask `request`, Django `HttpRequest`) returning one; default: the limiter's own
    `cost`, else 1.

    Only sets an attribute on the function, so it works on Starlette endpoints, FastAPI path
    operations (above or below the route decorator), Django views and Flask view functions.
    Stacked `@limit`s add up, read from top to bottom.
    """
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError(
            "limit() needs one or more limiter names or rates, e.g. @limit('login') or"
            " @limit('5/minute')"
        )
    rates = tuple(name for name in names if "/" in name)
    if key is not None and not rates:
        raise TypeError("limit(key=...) goes with an inline rate, e.g. @limit('5/minute', key=...)")
    whole = isinstance(cost, int) and not isinstance(cost, bool) and cost >= 1
    if cost is not None and not callable(cost) and not whole:
        raise ValueError(
            f"cost must be a whole number >= 1 or a function of the request, got {cost!r}"
        )

    def decorate(endpoint: _F) -> _F:
        marks = get_marks(endpoint) or Marks()
        added: tuple[tuple[str | InlineRate, Cost | None], ...] = tuple(
            (name, cost) for name in names if "/" not in name
        )
        if rates:
            hashable = tuple(key) if isinstance(key, list) else key  # marks are dict keys
            added += ((InlineRate(_label(endpoint), rates, hashable), cost),)
        # Decorators apply bottom-up: prepend, so the names read top to bottom as written.
        setattr(endpoint, MARKS_ATTRIBUTE, Marks(added + marks.limits, marks.exempt))
        return endpoint

    return decorate


def _label(endpoint: object) -> str:
    """`module.qualname` of what `@limit` decorates (a Django `as_view()` function: its view
    class; a Flask blueprint: its import name and name)."""
    target = getattr(endpoint, "view_class", endpoint)
    module = getattr(target, "import_name", None) or getattr(target, "__module__", None) or ""
    name = (
        getattr(target, "__qualname__", None)
        or getattr(target, "name", None)
        or type(target).__qualname__
    )
    return f"{module}.{name}" if module else str(name)


def exempt(endpoint: _F) -> _F:
    """Never limit this endpoint (it wins over `@limit`, route rules and the default)."""
    marks = get_marks(endpoint) or Marks()
    setattr(endpoint, MARKS_ATTRIBUTE, Marks(marks.limits, exempt=True))
    return endpoint
