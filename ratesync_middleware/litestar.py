"""Litestar: a plugin, so that an app has one limiter (one NATS connection) for all its routes.

    from litestar import Litestar, get
    from ratesync_middleware import exempt, limit
    from ratesync_middleware.litestar import RateLimitPlugin

    @get("/login")
    @limit("login")
    async def login() -> str: ...

    app = Litestar(route_handlers=[login], plugins=[RateLimitPlugin(config="rate-sync.toml")])

Litestar builds an app middleware once per route handler; added by hand, a rate-limit middleware
would be as many limiters, each with its own store connection, and nobody would open or close
them. The plugin keeps one limiter, hands every handler's middleware a share of it, opens it
with the app's lifespan (after checking the marks of every handler) and closes it at shutdown.

Requests are answered as the ASGI middleware answers them (the same code does it): the same
refusals and headers, WebSockets checked at connect and, with `[[routes]] messages`, per message.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Final

from litestar import Litestar
from litestar._asgi.asgi_router import ASGIRouter
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol
from starlette.types import ASGIApp, Scope

from .asgi import Candidates, RateLimitMiddleware, ScopeFacts, startup_failed
from .config import ConfigSource
from .errors import ConfigError
from .lifecycle import RequestLimiter
from .limiter import AsyncRateLimiter
from .plans import Plan

try:  # told of each route as it is registered (to report start-up errors in one line)
    from litestar.plugins.base import ReceiveRoutePlugin
except ImportError:  # pragma: no cover - a Litestar without it: its own traceback reports them

    class ReceiveRoutePlugin:  # type: ignore[no-redef]
        """A stand-in: this Litestar tells plugins nothing of its routes."""


__all__ = ["RateLimitPlugin"]


def handler_candidates(handler: Any) -> Candidates:
    """What may carry the marks of a Litestar route handler, nearest first: the decorated
    function (`handler.fn`), the handler (a mark above `@get`), its controller.

    `handler.fn` (a controller's method bound to the controller) and `handler.ownership_layers`
    (the app, its routers, the handler) are the route handler's public attributes in Litestar 2.
    """
    if handler is None:
        return ()
    function = getattr(handler, "fn", None)
    controller = getattr(function, "__self__", None)  # a controller's method is bound to it
    layers = list(getattr(handler, "ownership_layers", ()) or ())
    owners = [layer for layer in reversed(layers[:-1]) if not isinstance(layer, Litestar)]
    return (function, handler, *([controller] if controller is not None else []), *owners)


def _route_handlers(app: Litestar) -> Iterator[Any]:
    for route in app.routes:
        handlers = getattr(route, "route_handlers", None)
        if handlers is None:
            handler = getattr(route, "route_handler", None)
            handlers = [] if handler is None else [handler]
        yield from handlers


_USER_ATTRIBUTES: Final = ("id", "identity", "username", "email")


class LitestarScopeFacts(ScopeFacts):
    """A Litestar scope: `scope["user"]` is whatever the app's authentication put there (any
    object, no `is_authenticated`): its id, identity, username or email, or itself when it is a
    str or an int; else None (the client address)."""

    __slots__ = ()

    def user_id(self) -> str | None:
        user = self.scope.get("user")
        if user is None or isinstance(user, bool):
            return None
        if isinstance(user, (str, int)):
            return str(user) or None
        for attribute in _USER_ATTRIBUTES:
            value = getattr(user, attribute, None)
            if value is not None and value != "":
                return str(value)
        return None


class _HandlerMiddleware(RateLimitMiddleware):
    """The ASGI middleware of one route handler, on the plugin's shared limiter: the route
    handler Litestar picked (`scope["route_handler"]`) is the endpoint whose marks count."""

    _facts = LitestarScopeFacts

    def __init__(self, app: ASGIApp, core: RequestLimiter | ConfigError) -> None:
        if isinstance(core, ConfigError):  # every request answers 500; start-up fails
            self.app, self.on_limited = app, None
            self._config_error, self._error_logged = core, False
            return
        super().__init__(app, core)
        self._handler_candidates: dict[int, tuple[Any, Candidates]] = {}

    def _plan(self, scope: Scope, method: str, path: str) -> Plan:
        handler = scope.get("route_handler")
        known = self._handler_candidates.get(id(handler))
        if known is None or known[0] is not handler:
            known = self._handler_candidates[id(handler)] = (handler, handler_candidates(handler))
        return self._plans.plan(method, path, *known[1])


class RateLimitPlugin(InitPluginProtocol, ReceiveRoutePlugin):
    """Rate limiting for a Litestar app, configured by a `rate-sync.toml`.

    `config` is a path, a dict shaped like the TOML, a `Config`, an `AsyncRateLimiter`, or None
    to discover `$RATE_SYNC_CONFIG`, `./rate-sync.toml` or `./config/rate-sync.toml`.
    `@limit` / `@exempt` from `ratesync_middleware` work on route handlers (above or below
    `@get`) and on controllers (a `Router` takes no marks: a `[[routes]]` rule of its path). A name no limiter has, or a configuration that
    cannot be used, fails the app's start-up with one line saying why.
    """

    def __init__(self, config: ConfigSource | AsyncRateLimiter = None) -> None:
        self._config_error: ConfigError | None = None
        self._failure: ConfigError | None = None  # what made the start-up fail, once it has
        try:
            self.core: RequestLimiter | None = RequestLimiter(config)
        except ConfigError as error:
            self.core = None
            self._config_error = error

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        shared: RequestLimiter | ConfigError = self.core or self._error()

        # After the middleware listed before it (authentication sets the user it may key by).
        def middleware(app: Any) -> Any:  # Litestar's ASGI types are Starlette's, spelt apart
            return _HandlerMiddleware(app, shared)

        app_config.middleware.append(middleware)
        app_config.lifespan.append(self._lifespan)
        return app_config

    def _error(self) -> ConfigError:
        assert self._config_error is not None
        return self._config_error

    @asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        if self.core is None:
            self._failure = self._error()
            raise self._failure
        endpoints = (candidate for h in _route_handlers(app) for candidate in handler_candidates(h))
        try:
            await self.core.startup(endpoints)
        except ConfigError as error:
            self._failure = error
            raise
        try:
            yield
        finally:
            await self.core.aclose()

    def receive_route(self, route: Any) -> None:
        """Litestar reports a failed start-up with the traceback as its message: ours is one
        line (as the ASGI middleware's), given to the server in its place.

        The app's `asgi_router` (Litestar's `ASGIRouter`, whose `lifespan(receive, send)`
        reports start-up failures; checked on Litestar 2.12 to 2.25) becomes an instance of a
        subclass whose `lifespan` rewrites that report. Where that cannot be done, Litestar's
        own report (the traceback) stays, and the start-up fails all the same.
        """
        handlers = getattr(route, "route_handlers", None) or [getattr(route, "route_handler", None)]
        layers = getattr(handlers[0], "ownership_layers", None) or [None]
        router = getattr(layers[0], "asgi_router", None)
        if type(router) is not ASGIRouter:  # not Litestar's, or already rewritten
            return
        plugin = self

        class OneLineStartupFailure(ASGIRouter):
            __slots__ = ()

            async def lifespan(self, receive: Any, send: Any) -> None:
                async def send_one_line(message: Any) -> None:
                    failure = plugin._failure
                    if message["type"] == "lifespan.startup.failed" and failure is not None:
                        message = startup_failed(failure)
                    await send(message)

                await super().lifespan(receive, send_one_line)

        with contextlib.suppress(TypeError):  # another layout: Litestar's report stays
            router.__class__ = OneLineStartupFailure
