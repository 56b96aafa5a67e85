"""The framework internals we rely on, in one place, each with the versions it was checked against.

Nothing here imports a framework: each function takes the framework's own object. When a
framework changes one of these, the fallback keeps requests working and only the benefit named
in the docstring is lost.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "expand_fastapi_routes",
    "fastapi_dependencies",
    "flask_error_handlers",
    "mark_django_response_logged",
    "on_django_response_close",
]


def mark_django_response_logged(response: Any) -> None:
    """Keep Django's `django.request` logger from logging (or mailing ADMINS) one of our refusals.

    Django sets `response._has_been_logged` on a response it has logged and skips it afterwards
    (`django.utils.log.log_response`). Checked on Django 4.2 to 5.2. If it were renamed, Django
    would simply log our 429s and 503s again.
    """
    response._has_been_logged = True


def flask_error_handlers(app: Any) -> Iterable[dict[Any, Any]]:
    """The error-handler maps of a Flask app and its blueprints: `{code or None: {class: handler}}`.

    Flask keeps them in `app.error_handler_spec[blueprint][code]`, public since Flask 0.7 and
    unchanged in shape up to 3.1. Without it we would always raise the refusal (slower, same
    result).
    """
    spec = getattr(app, "error_handler_spec", None)
    return spec.values() if isinstance(spec, dict) else ()


def expand_fastapi_routes() -> Callable[[list[Any]], Iterable[Any]] | None:
    """FastAPI's `iter_route_contexts`, listing the effective routes of included routers.

    FastAPI 0.16x keeps an included `APIRouter` as one lazy route whose `matches` names no
    endpoint; `fastapi.routing.iter_route_contexts` (checked on 0.165) lists the routes inside.
    Older FastAPI copies the routes into the app, so there is nothing to expand: None.
    """
    return getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)


def fastapi_dependencies(route: Any) -> Iterable[Any]:
    """The dependencies FastAPI calls for a route (the app's, its routers' and its own, and
    theirs in turn): each `Dependant.call` under `route.dependant`.

    `APIRoute.dependant` and `Dependant.dependencies` / `.call` are FastAPI's model of a
    route's dependencies, unchanged in shape from 0.110 to 0.165. Without them a `RateLimit`
    dependency still limits, but the middleware would also apply its default to the route.
    """
    dependant = getattr(route, "dependant", None)
    pending = list(getattr(dependant, "dependencies", None) or ())
    seen = 0
    while pending and seen < 1000:  # a dependency graph, not a tree: bounded all the same
        dependency = pending.pop(0)
        seen += 1
        call = getattr(dependency, "call", None)
        if call is not None:
            yield call
        pending.extend(getattr(dependency, "dependencies", None) or ())


def on_django_response_close(response: Any, callback: Callable[..., object], *args: Any) -> None:
    """Call `callback(*args)` when Django closes `response`: once it is sent, streamed or not.

    Django runs `response._resource_closers` from `HttpResponseBase.close()`, which its WSGI
    handler (through the server), its ASGI handler and its test client all call after the last
    byte. Checked on Django 4.2 to 5.2. Without the list, the callback runs at once (a
    streamed response then counts as ended when it starts).
    """
    closers = getattr(response, "_resource_closers", None)
    if isinstance(closers, list):
        closers.append(functools.partial(callback, *args))
    else:
        callback(*args)
