"""The Quart extension: the Flask extension's twin, awaiting the core on Quart's own loop.

    ratelimit = RateLimit(app, config="rate-sync.toml")    # or RateLimit() + init_app(app)

    @app.post("/login")
    @ratelimit.limit("login")
    async def login(): ...

Everything but the driving of the core is shared with `ratesync_middleware.flask`: the options,
the marks and their check, the plans, the refusals (the same exception classes), the headers.
Here the decision is awaited in `before_request` on the app's event loop (no thread), the
stores open in `before_serving` and close in `after_serving`, and a request ends when Quart has
sent the last byte of its response: slots are given back then, and a streamed body settles.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, cast

from quart import Quart, current_app, has_request_context, request, websocket
from quart.wrappers.response import DataBody
from werkzeug.wrappers import Response as WerkzeugResponse

from .asgi import ScopeFacts
from .client_ip import ClientAddress
from .config import ConfigSource
from .flask import (
    ADMISSION_KEY,
    EXTENSION,
    RateLimitBanned,
    RateLimitExceeded,
    RateLimitExtension,
    RateLimitUnavailable,
    _AppState,
)
from .lifecycle import Admission, RequestLimiter
from .limiter import AsyncRateLimiter, logger
from .marks import exempt, limit

if TYPE_CHECKING:
    from quart import Request, Websocket
    from quart.typing import ResponseReturnValue
    from starlette.types import Receive, Scope, Send
    from werkzeug.sansio.response import Response as SansioResponse

__all__ = [
    "EXTENSION",
    "QuartFacts",
    "RateLimit",
    "RateLimitBanned",
    "RateLimitExceeded",
    "RateLimitUnavailable",
    "exempt",
    "limit",
]

_RESPONDED: Final = "ratesync.responded"  # scope: (status, headers) left for the end of the body
_ENDS_REQUESTS: Final = "ratesync.ends_requests"  # app.extensions: asgi_app is wrapped


class QuartFacts(ScopeFacts):
    """A Quart request as `RequestFacts`: headers and peer from its ASGI scope."""

    __slots__ = ("_quart_request",)

    def __init__(self, quart_request: Request | Websocket, client_address: ClientAddress) -> None:
        ScopeFacts.__init__(  # not super(): this runs on every request
            self, cast(Any, quart_request.scope), quart_request.path, client_address
        )
        self._quart_request = quart_request

    @property
    def request(self) -> Request | Websocket:  # type: ignore[override]
        """The Quart `request` (or `websocket`) object (`facts.scope` is its ASGI scope)."""
        return self._quart_request


class _QuartState(_AppState):
    """A Quart app's state: the core awaited on the app's loop."""

    def __init__(
        self, app: Quart, config: ConfigSource | AsyncRateLimiter, exempt_static: bool
    ) -> None:
        self.core = RequestLimiter(config)
        _AppState.__init__(self, app, self.core, exempt_static)
        self._start_lock = asyncio.Lock()
        self.replaced: _QuartState | None = None  # the state a second `init_app` replaced
        if any(rule.messages for rule in self.config.routes):
            logger.warning(
                "%s: [[routes]] messages: the Quart extension checks a websocket when it"
                " opens; it does not limit the messages it receives",
                self.config.source,
            )

    async def startup(self, strict: bool = True) -> None:
        """Check every view's and blueprint's marks, import key functions, open the stores."""
        async with self._start_lock:
            if not self._started:
                await self.core.startup(self.served_endpoints(strict))
                self._started = True

    # -- the hooks ------------------------------------------------------------------------------

    async def before_request(self) -> ResponseReturnValue | None:
        quart_request: Request = cast(Any, request)._get_current_object()  # one proxy lookup
        return await self.check(quart_request, quart_request.method)

    async def before_websocket(self) -> ResponseReturnValue | None:
        """A websocket is checked at its opening handshake, a GET; a refusal is answered with
        the HTTP refusal where the server can send one (ASGI's `websocket.http.response`),
        else Quart closes the socket before accepting it."""
        return await self.check(cast(Any, websocket)._get_current_object(), "GET")

    async def check(self, connection: Request | Websocket, method: str) -> WerkzeugResponse | None:
        """Decide a request or a websocket: None to go on, else the refusal (or it raises)."""
        if not self._started:
            await self.startup(strict=False)
        plan = self.plan(connection, method)
        if not plan:
            return None
        admission = self.core.begin(QuartFacts(connection, self._client_address), plan)
        if not isinstance(admission, Admission):  # a store that must be awaited
            admission = await admission
        cast(Any, connection.scope)[ADMISSION_KEY] = admission
        return None if admission.allowed else self.refuse(admission)

    async def after_request(self, response: SansioResponse) -> SansioResponse:
        scope: dict[str, Any] = cast(Any, request.scope)
        admission: Admission | None = scope.get(ADMISSION_KEY)
        if admission is not None and self.respond(admission, response):
            scope[_RESPONDED] = (response.status_code, response.headers)
        return response

    def streamed(self, response: SansioResponse) -> bool:
        if isinstance(response, WerkzeugResponse):  # what an HTTPException answers with
            return response.is_streamed
        return not isinstance(getattr(response, "response", None), DataBody)

    async def aclose(self) -> None:
        await self.core.aclose()
        replaced, self.replaced = self.replaced, None
        if replaced is not None:
            await replaced.aclose()


class _EndOfResponse:
    """Quart's `asgi_app`, wrapped: a request ends when its response has been sent, or has
    failed, or the client has left; only a configuration with work at the end installs it."""

    def __init__(self, asgi_app: Any) -> None:
        self.asgi_app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.asgi_app(scope, receive, send)
        finally:
            admission: Admission | None = scope.get(ADMISSION_KEY)
            if admission is not None:
                admission.finish(*scope.get(_RESPONDED, (None,)))


class RateLimit(RateLimitExtension[Quart, _QuartState]):
    """Rate limiting for Quart apps, configured by a `rate-sync.toml`.

        ratelimit = RateLimit(app, config="rate-sync.toml")
        # or RateLimit() at module level, then ratelimit.init_app(app) in the app factory

    The options are those of the Flask extension (`config` / `RATESYNC_CONFIG`, `enabled` /
    `RATESYNC_ENABLED`, `exempt_static` / `RATESYNC_EXEMPT_STATIC`), and so are the decorators,
    the refusals (`RateLimitExceeded`, a werkzeug `TooManyRequests`) and the headers. The
    stores open when the app starts serving and close when it stops. A Flask app is refused
    (`TypeError`): `ratesync_middleware.flask.RateLimit` is its twin.
    """

    app_class = Quart
    other = "ratesync_middleware.flask"
    state_class = _QuartState

    def register(self, app: Quart, state: _QuartState, previous: _QuartState | None) -> None:
        if state.core.settles and not app.extensions.get(_ENDS_REQUESTS):
            # Only a configuration with work at the end (slots, settling) pays for the wrapper.
            app.extensions[_ENDS_REQUESTS] = True
            app.asgi_app = cast(Any, _EndOfResponse(app.asgi_app))  # type: ignore[method-assign]
        if previous is not None:
            state.replaced = previous  # its stores close with the app's
            return  # the hooks below read app.extensions, so they now use the new state

        # Coroutines, all of them: Quart runs a plain function in a thread.
        async def check_rate_limit() -> ResponseReturnValue | None:
            refused: ResponseReturnValue | None = await app.extensions[EXTENSION].before_request()
            return refused

        async def add_rate_limit_headers(response: Any) -> Any:
            return await app.extensions[EXTENSION].after_request(response)

        async def open_stores() -> None:
            await app.extensions[EXTENSION].startup()

        async def close_stores() -> None:
            await app.extensions[EXTENSION].aclose()

        async def check_websocket() -> ResponseReturnValue | None:
            refused: ResponseReturnValue | None = await app.extensions[EXTENSION].before_websocket()
            return refused

        app.before_request(check_rate_limit)
        app.after_request(add_rate_limit_headers)
        app.before_websocket(check_websocket)
        app.before_serving(open_stores)
        app.after_serving(close_stores)

    def current_admission(self) -> Admission | None:
        connection = request if has_request_context() else websocket
        admission: Admission | None = cast(Any, connection.scope).get(ADMISSION_KEY)
        return admission

    def current_app(self) -> Any:
        return current_app

    async def startup(self, app: Quart | None = None) -> None:
        """Check the marks of every view and blueprint and open the stores now.

        Quart does this when it starts serving (`before_serving`); a test client used
        without `app.test_app()` does it at the first request. Raises `ConfigError`; a store
        that cannot be reached is only logged.
        """
        state = self.state(app)
        if state is not None:
            await state.startup()

    async def aclose(self, app: Quart | None = None) -> None:
        """Close the app's stores (they reopen on next use); Quart does it after serving."""
        state = self.state(app)
        if state is not None:
            await state.aclose()
