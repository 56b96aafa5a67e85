"""The ASGI adapter for Starlette and FastAPI: a pure ASGI middleware, no `BaseHTTPMiddleware`.

    app.add_middleware(RateLimitMiddleware, config="rate-sync.toml")

It translates a scope into `RequestFacts`, finds the endpoint the router will call (for `@limit` /
`@exempt`), and sends the refusal `begin` gives or calls the app, then `finish`es. The limiting
itself lives in the core (`lifecycle.py`, `plans.py`), which every adapter shares.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from starlette.endpoints import HTTPEndpoint
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Host, Match, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .bucket import Decision
from .client_ip import ClientAddress
from .compat import expand_fastapi_routes, fastapi_dependencies
from .config import ConfigSource
from .errors import ConfigError
from .facts import RequestFacts
from .headers import Header, add_missing
from .lifecycle import Admission, RequestLimiter
from .limiter import AsyncRateLimiter, logger
from .marks import exempt, get_marks, limit
from .plans import EXEMPT, Plan, endpoint_objects, method_handler

__all__ = ["OnLimited", "RateLimitMiddleware", "ScopeFacts", "exempt", "limit"]

OnLimited = Callable[[Request, Decision], Response | Awaitable[Response]]
"""Builds the response for a refused request; `decision.degraded` tells a 503 from a 429."""

WS_POLICY_VIOLATION: Final = 1008  # a websocket refused for its rate limit
WS_TRY_AGAIN_LATER: Final = 1013  # a websocket refused because the store failed (fail_closed)
WS_INTERNAL_ERROR: Final = 1011  # no usable rate-limit configuration
WS_PRIVATE_OFFSET: Final = 3000  # 1008 -> 4008, 1013 -> 4013: for servers that refuse 1xxx codes
_MAX_DEPTH: Final = 16  # mounts and wrapping middleware followed when looking for routes
_STARLETTE_ROUTES: Final = (Route, WebSocketRoute, Mount, Host)


class ScopeFacts(RequestFacts):
    """An ASGI scope as `RequestFacts`: headers read from the scope, the user from `scope["user"]`."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope, path: str, client_address: ClientAddress) -> None:
        client = scope.get("client")
        RequestFacts.__init__(  # not super(): this runs on every request
            self, scope.get("method", "GET"), path, client[0] if client else None, client_address
        )
        self.scope = scope

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


Candidates = tuple[Any, ...]
"""The objects that may carry marks for one request, in precedence order (see plans.py)."""

NO_ENDPOINT: Final[Candidates] = ()


def _endpoint_candidates(endpoint: Any, scope: Scope) -> Candidates:
    """What may carry the marks of a matched endpoint: the function, or for an `HTTPEndpoint`
    class the method handler of the request, then the class. A class without that handler
    answers 405 itself: its marks do not apply (`[[routes]]` and the default still do)."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    if inspect.isclass(endpoint) and issubclass(endpoint, HTTPEndpoint) and scope["type"] == "http":
        handler = method_handler(endpoint, scope["method"])
        return NO_ENDPOINT if handler is None else (handler, endpoint)
    return (endpoint,)


def _route_candidates(routes: list[BaseRoute]) -> list[Any]:
    """The routes in the order the router tries them (FastAPI's included routers expanded)."""
    expand = expand_fastapi_routes()
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

    Only routes up to the last one with marks inside are matched: later ones cannot change
    the plan, so an app without `@limit`/`@exempt` pays nothing.
    """

    def __init__(self) -> None:
        self._tables: dict[int, _RouteTable] = {}
        self.host_dependent = False  # a `Host` route makes the endpoint depend on a header

    def _table(self, routes: list[BaseRoute]) -> _RouteTable:
        table = self._tables.get(id(routes))
        if table is not None and table.source is routes and table.size == len(routes):
            return table
        candidates = _route_candidates(routes)
        scan_length = 0
        for index, candidate in enumerate(candidates):
            if isinstance(getattr(candidate, "original_route", candidate), Host):
                self.host_dependent = True
            if any(get_marks(endpoint) is not None for endpoint in self._below(candidate, 0)):
                scan_length = index + 1
        table = self._tables[id(routes)] = _RouteTable(routes, len(routes), candidates, scan_length)
        return table

    def find(self, routes: list[BaseRoute], scope: Scope, depth: int = 0) -> Candidates:
        """The candidates of the endpoint that will handle `scope`; none for a 404 or a 405."""
        table = self._table(routes)
        for route in table.candidates[: table.scan_length]:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return self._enter(route, {**scope, **child_scope}, depth)
            # Match.PARTIAL: the path matches, the method does not. The router answers 405
            # unless a later route matches fully: this endpoint's marks do not apply.
        return NO_ENDPOINT

    def _enter(self, route: Any, scope: Scope, depth: int) -> Candidates:
        if _container(route):
            inner = route.app
            if get_marks(inner) is not None:  # exempt(StaticFiles(...)) marks a whole mount
                return (inner,)
            routes = _routes_of(inner)
            if routes is None or depth >= _MAX_DEPTH:
                return (inner,)
            return self.find(routes, scope, depth + 1)
        candidates = _endpoint_candidates(getattr(route, "endpoint", None), scope)
        if any(get_marks(call) is not None for call in fastapi_dependencies(route)):
            # A `RateLimit` dependency limits the route: the middleware's rules and default
            # leave it alone (the endpoint's own marks still come first).
            return (*candidates, EXEMPT)
        return candidates

    def endpoints(self, routes: list[BaseRoute] | None) -> Iterator[Any]:
        """Every endpoint under `routes` (classes with their methods), for start-up checks."""
        for candidate in _route_candidates(routes or []):
            yield from self._below(candidate, 0)

    def _below(self, route: Any, depth: int) -> Iterator[Any]:
        if _container(route):
            yield route.app
            if depth < _MAX_DEPTH:
                for candidate in _route_candidates(_routes_of(route.app) or []):
                    yield from self._below(candidate, depth + 1)
            return
        endpoint = getattr(route, "endpoint", None)
        while isinstance(endpoint, functools.partial):
            endpoint = endpoint.func
        yield from endpoint_objects(endpoint)
        yield from fastapi_dependencies(route)  # a `RateLimit` dependency's names are checked


def _websocket_close(decision: Decision | None) -> Message:
    """The close of a refused WebSocket: 1013 when a fail-closed store is down, else 1008."""
    degraded = decision is not None and decision.degraded
    return {
        "type": "websocket.close",
        "code": WS_TRY_AGAIN_LATER if degraded else WS_POLICY_VIOLATION,
        "reason": "rate limit unavailable" if degraded else "rate limit exceeded",
    }


class _WebSocketCloser:
    """Closes an accepted WebSocket for its rate limit with a code the server takes.

    RFC 6455 reserves 1008 and 1013 for this, and uvicorn, hypercorn and granian send them;
    daphne (autobahn) raises on any code from an application but 1000 and 3000-4999. There
    the same codes in the private range are sent, 4008 and 4013: the first refusal finds it
    out, every later one uses them at once.
    """

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0

    async def close(self, send: Send, decision: Decision | None) -> Message:
        """Send the close for `decision`; the message sent."""
        close = _websocket_close(decision)
        if self.offset:
            close["code"] += self.offset
            await send(close)
            return close
        try:
            await send(close)
        except Exception:  # the server refuses the code (it raises before anything is sent)
            close["code"] += WS_PRIVATE_OFFSET
            await send(close)  # anything else wrong with the socket raises again, here
            self.offset = WS_PRIVATE_OFFSET
        return close


def startup_failed(error: ConfigError) -> Message:
    """The `lifespan.startup.failed` of a configuration that cannot be used: one line, which
    uvicorn logs as the reason it exits (no traceback: the error says it all; hypercorn and
    granian print it, then a traceback of their own)."""
    text = " ".join(str(error).split())
    return {"type": "lifespan.startup.failed", "message": f"ratesync: {text}"}


class RateLimitMiddleware:
    """Rate limiting for Starlette and FastAPI apps, configured by a `rate-sync.toml`.

    `config` is a path, a dict shaped like the TOML, a `Config`, an `AsyncRateLimiter`, or None
    to discover `$RATE_SYNC_CONFIG`, `./rate-sync.toml` or `./config/rate-sync.toml`.
    `on_limited(request, decision)` (sync or async) builds the response of a refused request;
    the middleware adds `Retry-After` and the rate-limit headers unless it set them.

    HTTP requests are checked before the app sees them; every response gets the rate-limit
    headers of the `[middleware] headers` mode. A websocket is checked at connect: a refused
    one is closed before it is accepted (code 1008, or 1013 when a fail-closed store is down),
    which the server answers with HTTP 403; with a rule's `messages`, each message it receives
    is checked too, and the one too many closes it. Lifespan passes through; at start-up the
    configuration is checked against the app's routes and the stores are opened; at shutdown
    they are closed. A configuration that cannot be used fails the start-up
    (`lifespan.startup.failed` with the error, so the server exits); without lifespan, every
    request gets a plain 500 and the error is logged once.
    """

    _facts: type[ScopeFacts] = ScopeFacts  # how a scope is read (Litestar's users differ)

    def __init__(
        self,
        app: ASGIApp,
        config: ConfigSource | AsyncRateLimiter | RequestLimiter = None,
        *,
        on_limited: OnLimited | None = None,
    ) -> None:
        self.app = app
        self.on_limited = on_limited
        self._routes = _RouteFinder()
        self._closer = _WebSocketCloser()
        self._error_logged = False
        try:
            self.core = config if isinstance(config, RequestLimiter) else RequestLimiter(config)
        except ConfigError as error:
            # Raised here, it would escape Starlette's lazy middleware stack before the
            # lifespan starts: uvicorn would take the app for one without lifespan and answer
            # every request 500 with a traceback. Reported at start-up instead.
            self._config_error: ConfigError | None = error
            return
        self._config_error = None
        self.config = self.core.config
        self._plans = self.core.plans
        # Bound once: these run on every request.
        self._known_plan = self._plans.known_plan
        self._cached_plan = self._plans.cached_plan
        self._find = self._candidates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._config_error is not None:
            await self._misconfigured(scope, receive, send, self._config_error)
            return
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
        admission = core.begin(self._facts(scope, path, core.client_address), plan)
        if not isinstance(admission, Admission):  # a store that must be awaited
            admission = await admission
        if not admission.allowed:
            await self._refuse(scope, receive, send, admission)
            return
        extra = admission.headers()
        if admission.settles:
            await self._settled(scope, receive, send, admission, extra)
            return
        if not extra:  # nothing to add, nothing to do at the end
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _settled(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission, extra: list[Header]
    ) -> None:
        """Call the app for an admission with work at `finish`, given the final status and
        the response's headers."""
        status: int | None = None
        headers: list[tuple[bytes, bytes]] | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], message.get("headers")
                if extra:
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except BaseException:  # an error or a client gone: the request still ends here
            admission.finish(status or 500, headers)
            raise
        admission.finish(status, headers)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission
    ) -> None:
        if self.on_limited is None:
            denial = admission.denial()
            await send(
                {"type": "http.response.start", "status": denial.status, "headers": denial.headers}
            )
            await send({"type": "http.response.body", "body": denial.body})
            return
        assert admission.decision is not None
        result = self.on_limited(Request(scope, receive), admission.decision)
        response = await result if inspect.isawaitable(result) else result
        add_missing(response.headers, admission.refusal_headers())
        await response(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        plan = self._plan(scope, "GET", path)  # the opening handshake is a GET
        messages = self._plans.messages_plan(path)
        if not plan and not messages:
            await self.app(scope, receive, send)
            return
        core = self.core
        facts = self._facts(scope, path, core.client_address)
        admission: Admission | None = None
        if plan:
            begun = core.begin(facts, plan)
            admission = begun if isinstance(begun, Admission) else await begun
            if not admission.allowed:
                await send(_websocket_close(admission.decision))
                return
        if messages:
            receive, send = self._limit_messages(facts, messages, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            if admission is not None:
                admission.finish()

    def _limit_messages(
        self, facts: ScopeFacts, plan: Plan, receive: Receive, send: Send
    ) -> tuple[Receive, Send]:
        """`receive` and `send` for an app whose received messages each spend from `plan`
        (`[[routes]] messages`). A refused message closes the socket (1008, or 1013 for a
        fail-closed store down; 4008 and 4013 under servers that refuse those, see
        `_WebSocketCloser`); the app is told the client left, and what it sends after that
        goes nowhere."""
        core = self.core
        closer = self._closer
        closed = False

        async def limited_receive() -> Message:
            nonlocal closed
            message = await receive()
            if closed or message["type"] != "websocket.receive":
                return message
            begun = core.begin(facts, plan)
            admission = begun if isinstance(begun, Admission) else await begun
            admission.finish()  # a message holds nothing once it is decided
            if admission.allowed:
                return message
            closed = True
            close = await closer.close(send, admission.decision)
            return {"type": "websocket.disconnect", "code": close["code"]}

        async def guarded_send(message: Message) -> None:
            if not closed:
                await send(message)

        return limited_receive, guarded_send

    # -- route plans ----------------------------------------------------------------------------

    def _plan(self, scope: Scope, method: str, path: str) -> Plan:
        key = (scope["type"], method, path)
        plan = self._known_plan(key)  # nothing is kept when the Host header decides
        if plan is not None:
            return plan
        routes = self._routes
        if routes.host_dependent:
            return self._plans.plan(method, path, *self._candidates(scope))
        plan = self._cached_plan(key, method, path, self._find, scope)
        if routes.host_dependent:  # found out just now: the Host header decides
            self._plans.forget(key)
        return plan

    def _app_routes(self, scope: Scope) -> list[BaseRoute] | None:
        # scope["app"] is the Starlette/FastAPI app (set before its middleware runs); without
        # one (a bare Router wrapped by hand) look through the wrapped app.
        return _routes_of(scope.get("app")) or _routes_of(self.app)

    def _candidates(self, scope: Scope) -> Candidates:
        """The candidates of the endpoint the router will call for `scope` (none if unmatched).

        Starlette sets `scope["endpoint"]` only while routing, after this middleware has run,
        so the routes are matched here the same way; the plan is cached.
        """
        routes = self._app_routes(scope)
        if not routes:
            return NO_ENDPOINT
        try:
            return self._routes.find(routes, scope)
        except Exception:  # an odd route must not break the request; the router will judge it
            logger.debug("ratesync: no endpoint found for %r", scope.get("path"), exc_info=True)
            return NO_ENDPOINT

    def _endpoints(self, scope: Scope) -> list[Any]:
        try:
            return list(self._routes.endpoints(self._app_routes(scope)))
        except Exception:  # an odd route tree only loses the start-up check of its marks
            logger.warning("ratesync: could not list the app's endpoints", exc_info=True)
            return []

    # -- lifespan -------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure: ConfigError | None = None  # what made the start-up fail, once it has
        reported = False

        async def send_wrapper(message: Message) -> None:
            nonlocal failure, reported
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                # A ConfigError raised here fails the app's start-up: its lifespan unwinds
                # and reports "lifespan.startup.failed", and the server stops.
                try:
                    await self.core.startup(self._endpoints(scope))
                except ConfigError as error:
                    failure = error
                    raise
            elif kind == "lifespan.startup.failed" and failure is not None:
                # The app's report is the traceback of our error: the error says it all.
                message = startup_failed(failure)
                reported = True
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.core.aclose()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ConfigError as error:
            if error is failure and not reported:  # an app that does not report its failures
                await send(startup_failed(error))
            raise  # as Starlette does: a test client raises it; a server has the report

    async def _misconfigured(
        self, scope: Scope, receive: Receive, send: Send, error: ConfigError
    ) -> None:
        """No usable configuration: fail the start-up, or answer 500 without a traceback."""
        kind = scope["type"]
        if kind == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send(startup_failed(error))
                raise error  # as Starlette's router does: the server has the report and exits
            return
        if not self._error_logged:
            self._error_logged = True
            logger.error("ratesync: the rate-limit configuration cannot be used: %s", error)
        if kind == "http":
            await PlainTextResponse(
                "Internal Server Error: rate limiting is misconfigured", status_code=500
            )(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": WS_INTERNAL_ERROR})
