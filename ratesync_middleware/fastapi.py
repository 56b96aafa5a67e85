"""FastAPI: a rate limit as a dependency, decided after the dependencies listed before it.

    from fastapi import Depends, FastAPI
    from ratesync_middleware import RateLimitMiddleware
    from ratesync_middleware.fastapi import RateLimit

    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, config="rate-sync.toml")  # optional, see below

    @app.get("/items", dependencies=[Depends(current_user), Depends(RateLimit("api"))])

A route, an `APIRouter(dependencies=...)` or the app (`FastAPI(dependencies=...)`) can carry it.
It runs where FastAPI runs dependencies: after those listed before it, so a `key` function can
read what an authentication dependency found (`request.state.user_id`).

The limiter is the app's `RateLimitMiddleware`'s when it has one (its configuration, its store
connection, opened at start-up and closed at shutdown, and its start-up check of the names);
else one limiter per app from the discovered configuration, opened on first use and closed by
the app's `on_shutdown` handlers (which FastAPI runs when the app has no `lifespan` of its own). A route with
a `RateLimit` dependency is left to it by the middleware (as a route with `@limit` is): the
`[middleware] default` and `[[routes]]` rules do not charge it again.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of `RateLimit.__call__`
# at run time, and before 0.115 it cannot resolve them as strings on a callable instance.
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from fastapi import HTTPException, Request, Response
from starlette.responses import Response as StarletteResponse

from .asgi import RateLimitMiddleware, ScopeFacts, _route_path
from .errors import RequestFunctionError
from .headers import Denial, header_name
from .identities import Identity
from .lifecycle import Admission, RequestLimiter
from .marks import MARKS_ATTRIBUTE, Cost, Marks
from .plans import Plan

__all__ = ["RateLimit", "RateLimitRefused"]

DependencyKey = str | int | Callable[[Request], "str | int | Awaitable[str | int | None] | None"]
"""The identity a dependency limits by: a value, or a function of the request (sync or async;
None means the client IP)."""

_STATE_ATTRIBUTE: Final = "ratesync_request_limiter"
_MAX_DEPTH: Final = 32  # wrapping middleware followed when looking for RateLimitMiddleware


class RateLimitRefused(HTTPException):
    """A `RateLimit` dependency refused the request: 429 (503 when a fail-closed store is
    down, 403 for a ban). Answered with the same problem document and headers as the
    middleware's refusals; an exception handler of the app for this class (or for status
    429) can answer it otherwise."""

    def __init__(self, denial: Denial) -> None:
        headers = {
            header_name(name): value.decode("latin-1")
            for name, value in denial.headers
            if name not in (b"content-type", b"content-length")
        }
        super().__init__(denial.status, denial.detail, headers)
        self.denial = denial


async def _answer_refusal(request: Request, exc: Exception) -> StarletteResponse:
    assert isinstance(exc, RateLimitRefused)
    denial = exc.denial
    response = StarletteResponse(denial.body, status_code=denial.status)
    response.raw_headers = list(denial.headers)
    return response


class _GivenKey(Identity):
    """The identity of a dependency's `key`: its value, or its function of the request."""

    __slots__ = ("_key",)

    def __init__(self, key: DependencyKey) -> None:  # no super(): no limiter table behind it
        self._key = key
        self.is_global = False
        self.sync = not callable(key)
        self._callables = []

    def load(self) -> None:
        pass

    def now(self, facts: Any) -> str | None:
        return str(self._key)

    async def __call__(self, facts: Any) -> str | None:
        key = self._key
        if not callable(key):
            return str(key)
        try:  # the user's code: reported without its text, answered by the fail rule
            value = key(facts.request)
            if inspect.isawaitable(value):
                value = await value
        except Exception as error:
            label = getattr(key, "__qualname__", repr(key))
            raise RequestFunctionError(
                f"key function {label!r} raised {type(error).__name__}"
            ) from error
        return facts.client_ip if value is None else str(value)


class _DependencyFacts(ScopeFacts):
    """The request as FastAPI hands it to the dependency (its `state` as set by the others)."""

    __slots__ = ("_request",)

    def __init__(self, request: Request, core: RequestLimiter) -> None:
        scope = request.scope
        ScopeFacts.__init__(self, scope, _route_path(scope), core.client_address)
        self._request = request

    @property
    def request(self) -> Request:
        return self._request


def _find_middleware(app: Any) -> RateLimitMiddleware | None:
    """The app's `RateLimitMiddleware`, in the middleware stack Starlette built for it."""
    layer = getattr(app, "middleware_stack", None)
    for _ in range(_MAX_DEPTH):
        if layer is None:
            return None
        if isinstance(layer, RateLimitMiddleware):
            return layer
        layer = getattr(layer, "app", None)
    return None


def _request_limiter(request: Request) -> RequestLimiter:
    """The limiter of the request's app: the middleware's, else one of its own (kept in the
    app's `state`)."""
    app = request.app
    core: RequestLimiter | None = getattr(app.state, _STATE_ATTRIBUTE, None)
    if core is None:
        middleware = _find_middleware(app)
        if middleware is not None and middleware._config_error is None:
            core = middleware.core
        else:
            core = RequestLimiter(None)  # discovery: $RATE_SYNC_CONFIG, ./rate-sync.toml, ...
            # Closed at shutdown where the app runs `on_shutdown` (FastAPI's own lifespan,
            # when the app gives none).
            shutdown = getattr(getattr(app, "router", None), "on_shutdown", None)
            if isinstance(shutdown, list):
                shutdown.append(core.aclose)
        setattr(app.state, _STATE_ATTRIBUTE, core)
    return core


def _install_refusal_handler(request: Request) -> None:
    """Have the app answer `RateLimitRefused` with the problem document (once per app).

    Starlette's `ExceptionMiddleware` hands its handler map to the route through the scope
    (`starlette.exception_handlers`, Starlette 0.28 to 1.10). Without it, FastAPI's own
    `HTTPException` handler answers: the same status and headers, a JSON `detail` body.
    """
    handlers = request.scope.get("starlette.exception_handlers")
    if isinstance(handlers, tuple) and isinstance(handlers[0], dict):
        handlers[0].setdefault(RateLimitRefused, _answer_refusal)


class RateLimit:
    """A FastAPI dependency that limits a route by the named limiters (all must allow).

    `key`: the identity to limit by, a value or a function of the `Request` (sync or async;
    None: the client IP); default: each limiter's own `key`. `cost`: what the request spends,
    a whole number or a function of the `Request`; default: the limiter's own `cost`.

    Allowed responses carry the rate-limit headers (through the `Response` FastAPI injects,
    so not on a `Response` object the endpoint returns itself); a refusal raises
    `RateLimitRefused`, answered as the middleware answers: 429 with `Retry-After` and a
    problem+json body.
    """

    def __init__(self, *limiters: str, key: DependencyKey | None = None, cost: Cost | None = None):
        if not limiters or not all(isinstance(name, str) and name for name in limiters):
            raise TypeError("RateLimit() needs one or more limiter names, e.g. RateLimit('api')")
        inline = [name for name in limiters if "/" in name]
        if inline:
            raise TypeError(
                f"RateLimit() takes limiter names, not rates ({inline[0]!r}): define the limiter"
                " in the configuration, or use @limit for an inline rate"
            )
        whole = isinstance(cost, int) and not isinstance(cost, bool) and cost >= 1
        if cost is not None and not callable(cost) and not whole:
            raise ValueError(
                f"cost must be a whole number >= 1 or a function of the request, got {cost!r}"
            )
        if key is not None and not callable(key) and not isinstance(key, (str, int)):
            raise TypeError(f"key must be a value or a function of the request, got {key!r}")
        self.limiters = limiters
        self.key = key
        self.cost = cost
        # The middleware checks these names at start-up and leaves the route to this dependency.
        setattr(self, MARKS_ATTRIBUTE, Marks(tuple((name, cost) for name in limiters)))
        self._plans: tuple[RequestLimiter, Plan] | None = None

    def __repr__(self) -> str:
        names = ", ".join(repr(name) for name in self.limiters)
        return f"RateLimit({names})"

    def _plan(self, core: RequestLimiter) -> Plan:
        compiled = self._plans
        if compiled is not None and compiled[0] is core:
            return compiled[1]
        plan = core.plans.marked_plan(getattr(self, MARKS_ATTRIBUTE), self)
        if self.key is not None:
            given = _GivenKey(self.key)
            plan = tuple(item._replace(identity=given) for item in plan)
        self._plans = (core, plan)
        return plan

    async def __call__(self, request: Request, response: Response) -> AsyncIterator[None]:
        core = _request_limiter(request)
        begun = core.begin(_DependencyFacts(request, core), self._plan(core))
        admission = begun if isinstance(begun, Admission) else await begun
        if not admission.allowed:
            _install_refusal_handler(request)
            raise RateLimitRefused(admission.denial())
        for name, value in admission.headers():
            response.headers[header_name(name)] = value.decode("latin-1")
        if not admission.settles:
            yield
            return
        status: int | None = None
        try:
            yield
            route = request.scope.get("route")
            status = response.status_code or getattr(route, "status_code", None) or 200
        except HTTPException as error:
            status = error.status_code
            raise
        except Exception:
            status = 500
            raise
        finally:
            admission.finish(status, response.raw_headers)
