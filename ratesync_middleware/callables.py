"""The user's functions a limiter calls per request: `cost`, `exempt_when` and `tier`.

A `"pkg.mod:func"` in the configuration is imported once (at start-up, else on first use);
`@limit(..., cost=func)` gives the function itself. Either is called with the framework's own
request object (Starlette `Request`, Flask `request`, Django `HttpRequest`, a WSGI environ), in
the request's own thread, before any store call. Whatever it raises or returns wrongly becomes
a `RequestFunctionError`, answered by the limiter's fail rule: never a 500 with a traceback.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from .errors import ConfigError, RequestFunctionError

__all__ = ["Exemption", "RequestCost", "RequestTier", "import_callable"]

RequestFunction = Callable[[Any], Any]


def import_callable(spec: str, *, source: str, table: str, key: str) -> Callable[..., Any]:
    """Import `"pkg.mod:func"` (`func` may be dotted: `Class.method`); ConfigError if it fails."""
    module_name, _, qualname = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attribute in qualname.split("."):
            target = getattr(target, attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{source}: {table} {key}: cannot import {spec!r}: {exc}",
            source=source,
            table=table,
            key=key,
            kind="bad_value",
        ) from None
    if not callable(target):
        raise ConfigError(
            f"{source}: {table} {key}: {spec!r} is not callable",
            source=source,
            table=table,
            key=key,
            kind="bad_value",
        )
    function: Callable[..., Any] = target
    return function


class _RequestFunction:
    """A function of the request, given or named by `"pkg.mod:func"`, imported on first use."""

    __slots__ = ("_function", "_where", "label")

    kind = "function"

    def __init__(self, function: RequestFunction | str, *, source: str, table: str, key: str):
        self._where = (source, table, key)
        if isinstance(function, str):
            self.label = function
            self._function: RequestFunction | None = None
        else:
            self.label = getattr(function, "__qualname__", repr(function))
            self._function = self._checked(function)

    def load(self) -> RequestFunction:
        """Import the function now (start-up), so that a typo fails the deploy."""
        function = self._function
        if function is None:
            source, table, key = self._where
            function = self._function = self._checked(
                import_callable(self.label, source=source, table=table, key=key)
            )
        return function

    def _checked(self, function: RequestFunction) -> RequestFunction:
        if inspect.iscoroutinefunction(function):
            source, table, key = self._where
            raise ConfigError(
                f"{source}: {table} {key}: {self.label!r} is an async function; a {self.kind}"
                " is called in the request's thread before any store call: use a plain def",
                source=source,
                table=table,
                key=key,
                kind="bad_value",
            )
        return function

    def _raised(self, error: Exception) -> RequestFunctionError:
        return RequestFunctionError(f"{self.kind} {self.label!r} raised {type(error).__name__}")


class RequestCost(_RequestFunction):
    """`cost = "pkg.mod:func"` / `@limit(..., cost=func)`: the request's cost, a whole number >= 1."""

    __slots__ = ()

    kind = "cost function"

    def __call__(self, request: Any) -> int:
        try:  # one call per request: the user's function, then the checks
            value = (self._function or self.load())(request)
        except Exception as error:  # the user's code: contained, reported without its text
            raise self._raised(error) from error
        if type(value) is not int or value < 1:  # bool is not a cost
            raise RequestFunctionError(
                f"{self.kind} {self.label!r} returned {type(value).__name__} {_short(value)}"
                ", not a whole number >= 1"
            )
        return value


class Exemption(_RequestFunction):
    """`exempt_when = "pkg.mod:func"`: true (truthy) means this limiter does not apply."""

    __slots__ = ()

    kind = "exempt_when function"

    def __call__(self, request: Any) -> bool:
        try:
            return bool((self._function or self.load())(request))
        except Exception as error:  # the user's code: contained, reported without its text
            raise self._raised(error) from error


class RequestTier(_RequestFunction):
    """`tier = "pkg.mod:func"`: the request's tier name, or None for the limiter's own rate."""

    __slots__ = ()

    kind = "tier function"

    def __call__(self, request: Any) -> str | None:
        try:
            value = (self._function or self.load())(request)
        except Exception as error:  # the user's code: contained, reported without its text
            raise self._raised(error) from error
        if value is not None and type(value) is not str:
            raise RequestFunctionError(
                f"{self.kind} {self.label!r} returned {type(value).__name__} {_short(value)}"
                ", not a tier name (str) or None"
            )
        return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
