# mypy: disable-error-code="import-untyped"
"""Which objects of a Django view may carry `@limit` / `@exempt` marks, in precedence order.

Django's class-based views, Django REST framework's `APIView`, `@api_view` functions and
ViewSets (router actions, `@action`), and Django Ninja's operations. Duck-typed on what each
framework's URL view carries (`view_class`; `cls` and `actions`; a Ninja `PathView`), so
neither DRF nor Ninja is imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from django.urls import URLPattern, URLResolver

from ..marks import MARKS_ATTRIBUTE, Marks, get_marks
from ..plans import endpoint_objects, method_handler

__all__ = [
    "THROTTLE_ATTRIBUTE",
    "ScopeMark",
    "marked_endpoints",
    "throttle_candidates",
    "throttle_scope",
    "throttled_by_ratesync",
    "url_views",
    "view_candidates",
]

THROTTLE_ATTRIBUTE: Final = "ratesync_throttle"
"""True on `ratesync_middleware.drf.RateSyncThrottle`: the middleware leaves its views to it."""

_MAX_URLCONF_DEPTH: Final = 32
_NINJA_MODULE: Final = "ninja.operation"  # where Ninja's URL views are defined

ViewFunction = Callable[..., Any]


class ScopeMark:
    """A DRF view's `throttle_scope`, as a candidate carrying `@limit(scope)`."""

    __slots__ = (MARKS_ATTRIBUTE, "view_class")

    def __init__(self, scope: str, view_class: type) -> None:
        setattr(self, MARKS_ATTRIBUTE, Marks(((scope, None),)))
        self.view_class = view_class

    def __repr__(self) -> str:
        return f"{self.view_class.__module__}.{self.view_class.__qualname__}.throttle_scope"


def view_candidates(view: object | None, method: str) -> tuple[Any, ...]:
    """What may carry the marks of `view` for `method`, most specific first.

    - A function view carries them itself (decorators built with `functools.wraps` copy them).
    - A class-based view (Django's or DRF's `APIView`): the handler method of the request
      (`post`, marked with `@limit` or `method_decorator`), the `as_view()` function (marked in
      the URLconf, or given the marks of `dispatch`), the class. For an `@api_view` function,
      the function itself stands for the handler, so `@limit` goes above or below `@api_view`.
    - A DRF ViewSet under a router: the action the method maps to (`list`, an `@action`), the
      view function, the ViewSet class.
    - A Django Ninja path: the operation function of the method (`@limit` above or below
      `@api.get`).

    A view without a handler for the method answers 405 itself: none of its marks apply (rules
    and the default still do).
    """
    if view is None:
        return ()
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        handler = method_handler(view_class, method, getattr(view_class, "http_method_names", ()))
        if handler is None:
            return ()
        return (_api_view_function(handler) or handler, view, view_class)
    viewset = getattr(view, "cls", None)
    actions = getattr(view, "actions", None)
    if viewset is not None and isinstance(actions, Mapping):
        action = _viewset_action(viewset, actions, method)
        return () if action is None else (action, view, viewset)
    if getattr(view, "__module__", None) == _NINJA_MODULE:
        operation = _ninja_operation(view, method)
        return () if operation is None else (operation,)
    return (view,)


def throttled_by_ratesync(view: object | None) -> bool:
    """Whether `view` is a DRF view whose `throttle_classes` include `RateSyncThrottle`."""
    view_class = _view_class(view)
    throttles = getattr(view_class, "throttle_classes", None) or ()
    try:
        return any(getattr(throttle, THROTTLE_ATTRIBUTE, False) is True for throttle in throttles)
    except TypeError:  # not a list of classes: DRF reports it
        return False


def throttle_scope(view: object | None) -> ScopeMark | None:
    """The `throttle_scope` of a DRF view, as a candidate (None when it has none)."""
    view_class = _view_class(view)
    scope = getattr(view_class, "throttle_scope", None)
    if view_class is None or not isinstance(scope, str) or not scope:
        return None
    return ScopeMark(scope, view_class)


def throttle_candidates(view: object | None, method: str) -> tuple[Any, ...]:
    """The candidates of a view limited by `RateSyncThrottle`: its marks, then its
    `throttle_scope` (a 405 has neither: rules and the default decide)."""
    candidates = view_candidates(view, method)
    scope = throttle_scope(view) if candidates else None
    return candidates if scope is None else (*candidates, scope)


# --- every marked object of the URLconf, for the checks and start-up ----------------------


def url_views(patterns: Iterable[Any], depth: int = 0) -> Iterator[ViewFunction]:
    """The view of every URL pattern, through nested `include()`s."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            if depth >= _MAX_URLCONF_DEPTH:
                continue
            try:
                inner = pattern.url_patterns
            except Exception:  # Django's own URL checks report a broken include()
                continue
            yield from url_views(inner, depth + 1)
        elif isinstance(pattern, URLPattern):
            yield pattern.callback


def marked_endpoints(patterns: Iterable[Any]) -> Iterator[tuple[object, Marks]]:
    """Each object reachable from the URLconf that carries marks (a `throttle_scope` of a
    view limited by `RateSyncThrottle` counts as one), once."""
    seen: set[tuple[str, int]] = set()
    for view in url_views(patterns):
        for endpoint in _markable(view):
            marks = get_marks(endpoint)
            # A ScopeMark is made anew for each view: its class is what stays the same.
            if isinstance(endpoint, ScopeMark):
                key = ("scope", id(endpoint.view_class))
            else:
                key = ("object", id(endpoint))
            if marks is None or key in seen:
                continue
            seen.add(key)
            yield endpoint, marks


def _markable(view: ViewFunction) -> Iterator[Any]:
    yield view
    view_class = _view_class(view)
    if view_class is not None:
        for candidate in endpoint_objects(view_class):
            yield candidate
            function = _api_view_function(candidate)
            if function is not None:
                yield function
        if throttled_by_ratesync(view):
            scope = throttle_scope(view)
            if scope is not None:
                yield scope
    elif getattr(view, "__module__", None) == _NINJA_MODULE:
        for operation in getattr(_ninja_path_view(view), "operations", None) or ():
            yield getattr(operation, "view_func", None)


# --- the frameworks' shapes ------------------------------------------------------------------


def _view_class(view: object | None) -> type | None:
    """The class of a Django or DRF class-based view (`view_class`, or a ViewSet's `cls`)."""
    found = getattr(view, "view_class", None) or getattr(view, "cls", None)
    return found if isinstance(found, type) else None


def _api_view_function(handler: object) -> ViewFunction | None:
    """The user's function behind an `@api_view` handler (DRF calls it from a closure)."""
    code = getattr(handler, "__code__", None)
    closure = getattr(handler, "__closure__", None)
    if (
        code is None
        or not closure
        or getattr(handler, "__module__", None) != "rest_framework.decorators"
    ):
        return None
    with contextlib.suppress(ValueError, IndexError):
        function = closure[code.co_freevars.index("func")].cell_contents
        if callable(function):
            return function  # type: ignore[no-any-return]
    return None


def _viewset_action(viewset: type, actions: Mapping[Any, Any], method: str) -> object | None:
    """The ViewSet method a router maps `method` to (HEAD: as GET), None for a 405."""
    name = method.lower()
    allowed = getattr(viewset, "http_method_names", None)
    if allowed is not None and name not in allowed:
        return None
    action = actions.get(name)
    if action is None and name == "head":
        action = actions.get("get")
    return getattr(viewset, action, None) if isinstance(action, str) else None


def _ninja_path_view(view: object) -> Any:
    """The Ninja `PathView` behind a URL view: a bound method's `__self__` (older Ninja), or
    the `PathView` its wrapper closes over (newer)."""
    owner = getattr(view, "__self__", None)
    if hasattr(owner, "operations"):
        return owner
    for cell in getattr(view, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            if hasattr(cell.cell_contents, "operations"):
                return cell.cell_contents
    return None


def _ninja_operation(view: object, method: str) -> ViewFunction | None:
    """The operation function Ninja runs for `method` (None: Ninja answers 405)."""
    for operation in getattr(_ninja_path_view(view), "operations", None) or ():
        if method in getattr(operation, "methods", ()):
            function: ViewFunction | None = getattr(operation, "view_func", None)
            return function
    return None
