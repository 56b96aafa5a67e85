"""The ASGI adapter for Starlette and FastAPI: a pure ASGI middleware, no `BaseHTTPMiddleware`.

    app.add_middleware(RateLimitMiddleware, config="rate-sync.toml")

It translates a scope into `RequestFacts`, finds the endpoint the router will call (for `@limit` /
`@exempt`), and turns the `Decision` into headers, a 429 or a 503. The limiting itself lives in
`requests.py` and `headers.py`, which the Django and Flask adapters share.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Host, Match, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bucket import Decision
from .config import ConfigSource
from .headers import Header, RateLimitHeaders
from .limiter import AsyncRateLimiter, logger
from .requests import (
    BoundedCache,
    ClientAddress,
    Plan,
    RequestFacts,
    RequestLimiter,
    exempt,
    get_marks,
    limit,
)

__all__ = ["OnLimited", "RateLimitMiddleware", "ScopeFacts", "exempt", "limit"]

OnLimited = Callable[[Request, Decision], Response | Awaitable[Response]]
"""Builds the response for a refused request; `decision.degraded` tells a 503 from a 429."""

WS_POLICY_VIOLATION: Final = 1008  # a websocket refused for its rate limit
WS_TRY_AGAIN_LATER: Final = 1013  # a websocket refused because the store failed (fail_closed)
ROUTE_CACHE_SIZE: Final = 4096  # (type, method, path) -> plan entries kept
_MAX_DEPTH: Final = 16  # mounts and wrapping middleware followed when looking for routes
_STARLETTE_ROUTES: Final = (Route, WebSocketRoute, Mount, Host)


class ScopeFacts(RequestFacts):
    """An ASGI scope as `RequestFacts`: headers read from the scope, the user from `scope["user"]`."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope, path: str, client_address: ClientAddress) -> None:
        client = scope.get("client")
        self.scope = scope
        self.method = scope.get("method", "GET")
        self.path = path
        self.peer = client[0] if client else None
        self._client_address = client_address
        self._client_ip = None

    def header(self, name: str) -> str | None:
        wanted = name.encode("latin-1")
        values = [value for key, value in self.scope["headers"] if key == wanted]
        if not values:
            return None
        return (values[0] if len(values) == 1 else b", ".join(values)).decode("latin-1")

    def user_id(self) -> str | None:
        # Set by Starlette's AuthenticationMiddleware, which must run before this middleware.
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        for attribute in ("identity", "display_name"):
            try:
                value = getattr(user, attribute)
            except NotImplementedError:  # BaseUser leaves both abstract
                continue
            if value:
                return str(value)
        return None

    @property
    def request(self) -> HTTPConnection:
        """A Starlette `Request` (a `HTTPConnection` for a websocket)."""
        return Request(self.scope) if self.scope["type"] == "http" else HTTPConnection(self.scope)


def _route_path(scope: Scope) -> str:
    """The path the router matches: `scope["path"]` without `root_path` (as Starlette does)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if not rest or rest[0] == "/":
            return rest
    return path


def _routes_of(app: Any) -> list[BaseRoute] | None:
    """The routes of a Starlette/FastAPI app or router, looking through wrapping middleware."""
    for _ in range(_MAX_DEPTH):
        if app is None:
            return None
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
    return None


def _handler(endpoint: Any, scope: Scope) -> Any:
    """What carries the marks: the function, or for an `HTTPEndpoint` class the method handler."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    if inspect.isclass(endpoint) and scope["type"] == "http":
        method = scope["method"].lower()
        if method == "head" and not hasattr(endpoint, "head"):
            method = "get"
        handler = getattr(endpoint, method, None)
        if handler is not None and get_marks(handler) is not None:
            return handler
    return endpoint


def _candidates(routes: list[BaseRoute]) -> list[Any]:
    """The routes in the order the router tries them.

    FastAPI (0.16x) keeps an included `APIRouter` as one lazy route whose `matches` names no
    endpoint; its public `iter_route_contexts` lists the effective routes inside.
    """
    expand = getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)
    if expand is None or all(isinstance(route, _STARLETTE_ROUTES) for route in routes):
        return list(routes)
    return list(expand(routes))


def _container(route: Any) -> bool:
    """A `Mount` or `Host` (also as FastAPI's effective route of an included router)."""
    return isinstance(getattr(route, "original_route", route), (Mount, Host))


@dataclass
class _RouteTable:
    source: list[BaseRoute]  # held, so that its id stays unique while cached
    size: int  # len(source) when built: routes added later rebuild the table
    candidates: list[Any]
    scan_length: int  # leading candidates that can lead to a marked endpoint


class _RouteFinder:
    """Finds the endpoint a Starlette/FastAPI router will call, the way the router does.

    Only candidates up to the last one with marks inside are matched: later ones cannot change
    the plan, so an app without `@limit`/`@exempt` pays nothing.
    """

    def __init__(self) -> None:
        self._tables: dict[int, _RouteTable] = {}
        self.host_dependent = False  # a `Host` route makes the endpoint depend on a header

    def _table(self, routes: list[BaseRoute]) -> _RouteTable:
        table = self._tables.get(id(routes))
        if table is not None and table.source is routes and table.size == len(routes):
            return table
        candidates = _candidates(routes)
        scan_length = 0
        for index, candidate in enumerate(candidates):
            if isinstance(getattr(candidate, "original_route", candidate), Host):
                self.host_dependent = True
            if any(get_marks(endpoint) is not None for endpoint in self._below(candidate, 0)):
                scan_length = index + 1
        table = self._tables[id(routes)] = _RouteTable(routes, len(routes), candidates, scan_length)
        return table

    def find(self, routes: list[BaseRoute], scope: Scope, depth: int = 0) -> Any:
        """The endpoint for `scope` among `routes`; None when unmatched or unmarked anyway."""
        table = self._table(routes)
        stop = table.scan_length
        partial: tuple[Any, Scope] | None = None
        for index, route in enumerate(table.candidates):
            if index >= stop and partial is None:
                return None
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return self._enter(route, {**scope, **child_scope}, depth)
            if match is Match.PARTIAL and partial is None:
                partial = (route, child_scope)
        if partial is not None:  # the router answers 405 with this route
            return self._enter(partial[0], {**scope, **partial[1]}, depth)
        return None

    def _enter(self, route: Any, scope: Scope, depth: int) -> Any:
        if _container(route):
            inner = route.app
            if get_marks(inner) is not None:  # exempt(StaticFiles(...)) marks a whole mount
                return inner
            routes = _routes_of(inner)
            if routes is None or depth >= _MAX_DEPTH:
                return inner
            return self.find(routes, scope, depth + 1)
        return _handler(getattr(route, "endpoint", None), scope)

    def endpoints(self, routes: list[BaseRoute] | None) -> Iterator[Any]:
        """Every endpoint (and `HTTPEndpoint` method) under `routes`, for start-up checks."""
        for candidate in _candidates(routes or []):
            yield from self._below(candidate, 0)

    def _below(self, route: Any, depth: int) -> Iterator[Any]:
        if _container(route):
            yield route.app
            if depth < _MAX_DEPTH:
                for candidate in _candidates(_routes_of(route.app) or []):
                    yield from self._below(candidate, depth + 1)
            return
        endpoint = getattr(route, "endpoint", None)
        while isinstance(endpoint, functools.partial):
            endpoint = endpoint.func
        yield endpoint
        if inspect.isclass(endpoint):
            yield from (getattr(endpoint, name, None) for name in dir(endpoint))


class RateLimitMiddleware:
    """Rate limiting for Starlette and FastAPI apps, configured by a `rate-sync.toml`.

    `config` is a path, a dict shaped like the TOML, a `Config`, an `AsyncRateLimiter`, or None
    to discover `$RATE_SYNC_CONFIG`, `./rate-sync.toml` or `./config/rate-sync.toml`.
    `on_limited(request, decision)` (sync or async) builds the response of a refused request;
    the middleware adds `Retry-After` and the rate-limit headers unless it set them.

    HTTP requests are checked before the app sees them; every response gets the rate-limit
    headers of the `[middleware] headers` mode. A websocket is checked once, at connect: a
    refused one is closed before it is accepted (code 1008, or 1013 when a fail-closed store is
    down), which the server answers with HTTP 403. Lifespan passes through; at start-up the
    configuration is checked against the app's routes (a `ConfigError` fails the start-up) and
    the stores are opened; at shutdown they are closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ConfigSource | AsyncRateLimiter = None,
        *,
        on_limited: OnLimited | None = None,
    ) -> None:
        self.app = app
        self.core = RequestLimiter(config)
        self.config = self.core.config
        self.on_limited = on_limited
        self.responses = RateLimitHeaders.for_config(self.config)
        self._plans: BoundedCache[tuple[str, str, str], Plan] = BoundedCache(ROUTE_CACHE_SIZE)
        self._routes = _RouteFinder()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- http and websocket ---------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        plan = self._plan(scope, scope["method"], path)
        if not plan:
            await self.app(scope, receive, send)
            return
        core = self.core
        facts = ScopeFacts(scope, path, core.client_address)
        if core.immediate(plan):  # memory stores: no coroutine to await
            decision = core.check_now(facts, plan)
        else:
            decision = await core.check(facts, plan)
        if decision is not None and not decision.allowed:
            await self._refuse(scope, receive, send, decision)
            return
        extra = self.responses.headers(decision)
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, decision: Decision) -> None:
        if self.on_limited is None:
            denial = self.responses.denial(decision)
            await send(
                {"type": "http.response.start", "status": denial.status, "headers": denial.headers}
            )
            await send({"type": "http.response.body", "body": denial.body})
            return
        result = self.on_limited(Request(scope, receive), decision)
        response = await result if inspect.isawaitable(result) else result
        extra: list[Header] = [
            *self.responses.retry_after(decision),
            *self.responses.headers(decision),
        ]
        for name, value in extra:
            if name.decode("latin-1") not in response.headers:
                response.raw_headers.append((name, value))
        await response(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        plan = self._plan(scope, "GET", path)  # the opening handshake is a GET
        if plan:
            facts = ScopeFacts(scope, path, self.core.client_address)
            decision = await self.core.check(facts, plan)
            if decision is not None and not decision.allowed:
                code = WS_TRY_AGAIN_LATER if decision.degraded else WS_POLICY_VIOLATION
                reason = "rate limit unavailable" if decision.degraded else "rate limit exceeded"
                await send({"type": "websocket.close", "code": code, "reason": reason})
                return
        await self.app(scope, receive, send)

    # -- route plans ----------------------------------------------------------------------------

    def _plan(self, scope: Scope, method: str, path: str) -> Plan:
        key = (scope["type"], method, path)
        plan = self._plans.get(key)
        if plan is None:
            plan = self.core.plan(method, path, self._endpoint(scope))
            if not self._routes.host_dependent:
                self._plans.put(key, plan)
        return plan

    def _app_routes(self, scope: Scope) -> list[BaseRoute] | None:
        # scope["app"] is the Starlette/FastAPI app (set before its middleware runs); without
        # one (a bare Router wrapped by hand) look through the wrapped app.
        return _routes_of(scope.get("app")) or _routes_of(self.app)

    def _endpoint(self, scope: Scope) -> Any:
        """The endpoint the router will call for `scope`, None when no route matches.

        Starlette sets `scope["endpoint"]` only while routing, after this middleware has run,
        so the routes are matched here the same way; the result is cached with the plan.
        """
        routes = self._app_routes(scope)
        if not routes:
            return None
        try:
            return self._routes.find(routes, scope)
        except Exception:  # an odd route must not break the request; the router will judge it
            logger.debug("ratesync: no endpoint found for %r", scope.get("path"), exc_info=True)
            return None

    def _endpoints(self, scope: Scope) -> list[Any]:
        try:
            return list(self._routes.endpoints(self._app_routes(scope)))
        except Exception:  # an odd route tree only loses the start-up check of its marks
            logger.warning("ratesync: could not list the app's endpoints", exc_info=True)
            return []

    # -- lifespan -------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                # A ConfigError raised here fails the app's start-up: its lifespan reports
                # "lifespan.startup.failed" and the server stops.
                await self.core.startup(self._endpoints(scope))
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.core.aclose()
            await send(message)

        await self.app(scope, receive, send_wrapper)
