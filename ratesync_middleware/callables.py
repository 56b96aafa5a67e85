"""The user's functions a limiter calls per request: `cost`, `exempt_when`, `tier` (and `key`).

A `"pkg.mod:func"` in the configuration is imported once (at start-up, else on first use);
`@limit(..., cost=func)` gives the function itself. Either is called with the framework's own
request object (Starlette `Request`, Flask `request`, Django `HttpRequest`, a WSGI environ), in
the request's own thread, before any store call. Whatever it raises or returns wrongly becomes
a `RequestFunctionError`, answered by the limiter's fail rule: never a 500 with a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from .errors import ConfigError, RequestFunctionError
from .throttle import LogThrottle

__all__ = [
    "SLOW_FUNCTION_SECONDS",
    "Exemption",
    "RequestCost",
    "RequestTier",
    "call_timed",
    "import_callable",
    "on_slow_function",
]

RequestFunction = Callable[[Any], Any]

SLOW_FUNCTION_SECONDS: Final = 0.1  # a request function slower than this is logged
_SLOW_WARNING_INTERVAL: Final = 10.0  # seconds between two warnings about one function

logger = logging.getLogger("ratesync_middleware")

_slow_throttle = LogThrottle(_SLOW_WARNING_INTERVAL)  # one warning per function per interval
_slow_listeners: list[weakref.WeakMethod[Callable[[str, float], None]]] = []


def on_slow_function(listener: Callable[[str, float], None]) -> None:
    """Call the bound method `listener(label, seconds)` for every request function call slower
    than `SLOW_FUNCTION_SECONDS`, while its object lives (the metrics count them)."""
    _slow_listeners.append(weakref.WeakMethod(listener))


def call_timed(label: str, function: RequestFunction, argument: Any) -> Any:
    """`function(argument)`, timed: a call slower than `SLOW_FUNCTION_SECONDS` holds up the
    request (and, under ASGI, every request of the event loop), so it is logged (throttled,
    per function) and counted."""
    started = time.perf_counter()
    try:
        return function(argument)
    finally:
        took = time.perf_counter() - started
        if took >= SLOW_FUNCTION_SECONDS:
            _slow(label, took)


def _slow(label: str, took: float) -> None:
    for reference in list(_slow_listeners):
        listener = reference()
        if listener is None:
            _slow_listeners.remove(reference)
            continue
        try:
            listener(label, took)
        except Exception:  # a metrics backend's problem must not fail a request
            logger.exception("a slow-function listener failed")
    more = _slow_throttle.due(label, "slow calls")
    if more is None:
        return
    logger.warning(
        "request function %r took %.2fs (over %gs)%s: it runs on every request's path (under "
        "ASGI, on the event loop that serves every request); move blocking work to a thread",
        label,
        took,
        SLOW_FUNCTION_SECONDS,
        more,
    )


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
            value = call_timed(self.label, self._function or self.load(), request)
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
            return bool(call_timed(self.label, self._function or self.load(), request))
        except Exception as error:  # the user's code: contained, reported without its text
            raise self._raised(error) from error


class RequestTier(_RequestFunction):
    """`tier = "pkg.mod:func"`: the request's tier name, or None for the limiter's own rate."""

    __slots__ = ()

    kind = "tier function"

    def __call__(self, request: Any) -> str | None:
        try:
            value = call_timed(self.label, self._function or self.load(), request)
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
