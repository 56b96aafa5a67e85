"""The Flask extension: `RateLimit`, view and blueprint decorators, 429/503 as Flask exceptions.

    ratelimit = RateLimit(app, config="rate-sync.toml")    # or RateLimit() + init_app(app)

    @app.post("/login")
    @ratelimit.limit("login")
    def login(): ...

The check runs in `before_request`, where `request.endpoint` names the view Flask will call, so
view and blueprint marks apply; a refusal raises `RateLimitExceeded` (a `TooManyRequests`) or
`RateLimitUnavailable` (a `ServiceUnavailable`), and the app's own error handlers apply.
`after_request` adds the rate-limit headers and ends the request when its body is closed. The
limiting itself lives in the core (`lifecycle.py`, `plans.py`).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import Forbidden, HTTPException, ServiceUnavailable, TooManyRequests

from .bucket import Decision
from .client_ip import ClientAddress
from .compat import flask_error_handlers
from .config import ConfigSource
from .headers import Denial, add_missing, retry_after_seconds, text_headers
from .lifecycle import Admission
from .limiter import AsyncRateLimiter, logger
from .marks import Cost, Key, exempt, limit
from .plans import EXEMPT, Plan, method_handler
from .sync import SyncRequestLimiter
from .wsgi import EnvironFacts

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from flask import Request

__all__ = [
    "EXTENSION",
    "FlaskFacts",
    "RateLimit",
    "RateLimitBanned",
    "RateLimitExceeded",
    "RateLimitUnavailable",
    "exempt",
    "limit",
]

_F = TypeVar("_F")

EXTENSION: Final = "ratesync"
"""The key of the per-app state in `app.extensions`."""

_TEARDOWN: Final = "ratesync.teardown"  # app.extensions: the teardown hook is registered
ADMISSION_KEY: Final = "ratesync.admission"
"""Where a limited request's `Admission` is kept in the environ (`current_decision` reads it)."""
_ENDS_AT_CLOSE: Final = "ratesync.ends_at_close"  # after_request left `finish` to the body's close


# --- the exceptions --------------------------------------------------------------------------


class _Refusal:
    """What the 429 and the 503 share: the decision, and the response the adapters all send."""

    decision: Decision
    denial: Denial

    def __init__(self, decision: Decision, denial: Denial) -> None:
        retry_after = retry_after_seconds(decision.retry_after)
        super().__init__(denial.detail, retry_after=retry_after)  # type: ignore[call-arg]
        self.decision = decision
        self.denial = denial

    def get_body(
        self, environ: WSGIEnvironment | None = None, scope: dict[str, Any] | None = None
    ) -> str:
        return self.denial.body.decode()

    def get_headers(
        self, environ: WSGIEnvironment | None = None, scope: dict[str, Any] | None = None
    ) -> list[tuple[str, str]]:
        # werkzeug computes Content-Length from the body it is given.
        return text_headers(pair for pair in self.denial.headers if pair[0] != b"content-length")


class RateLimitExceeded(_Refusal, TooManyRequests):
    """429: a limiter of this request has no tokens left.

    Raised in `before_request`, so `@app.errorhandler(429)` or
    `@app.errorhandler(RateLimitExceeded)` can answer instead; `decision` says which limiter
    (`decision.policy`) and when to retry. Without a handler Flask sends the default response:
    `Retry-After`, the configured rate-limit headers and an RFC 9457 problem+json body.
    A handler's own response gets `Retry-After` and the rate-limit headers it did not set.
    """


class RateLimitUnavailable(_Refusal, ServiceUnavailable):
    """503: the store of a `fail_closed` limiter cannot be reached, so the request is refused.

    Handled like `RateLimitExceeded` (`@app.errorhandler(503)` or this class); `decision` is
    degraded and `Retry-After` is the store's back-off.
    """


class RateLimitBanned(_Refusal, Forbidden):
    """403: an operator banned this client (`ratesync ban`); `Retry-After` when the ban ends."""

    def __init__(self, decision: Decision, denial: Denial) -> None:
        Forbidden.__init__(
            self, denial.detail
        )  # takes no retry_after: the denial's headers have it
        self.decision = decision
        self.denial = denial


_REFUSALS: dict[int, type[RateLimitExceeded | RateLimitUnavailable | RateLimitBanned]] = {
    503: RateLimitUnavailable,
    403: RateLimitBanned,
}


# --- requests --------------------------------------------------------------------------------


class FlaskFacts(EnvironFacts):
    """A Flask request as `RequestFacts`: headers from the environ, the user from flask_login."""

    __slots__ = ("_flask_request",)

    def __init__(self, flask_request: Request, path: str, client_address: ClientAddress) -> None:
        EnvironFacts.__init__(  # not super(): this runs on every request
            self, flask_request.environ, flask_request.method, path, client_address
        )
        self._flask_request = flask_request

    def user_id(self) -> str | None:
        """`flask_login.current_user.get_id()` when it is authenticated, else None.

        flask_login is optional: an app that uses it has imported it, so `sys.modules` tells.
        """
        flask_login = sys.modules.get("flask_login")
        if flask_login is None:
            return None
        try:
            user = flask_login.current_user
            if user is None or not user.is_authenticated:
                return None
            user_id = user.get_id()
        except Exception:  # no LoginManager on this app, or its user loader failed
            logger.debug("ratesync: no flask_login user for this request", exc_info=True)
            return None
        return None if user_id is None else str(user_id)

    @property
    def request(self) -> Request:  # type: ignore[override]
        """The Flask `request` object (`facts.environ` is its WSGI environ)."""
        return self._flask_request


def _is_static(endpoint: str) -> bool:
    return endpoint == "static" or endpoint.endswith(".static")


class _AppState:
    """What one app needs per request, built once at `init_app`: in `app.extensions["ratesync"]`."""

    def __init__(
        self, app: Flask, config: ConfigSource | AsyncRateLimiter, exempt_static: bool
    ) -> None:
        self.app = app
        self.limiter = SyncRequestLimiter(config)
        self.config = self.limiter.config
        # Configuration only, so safe across fork(); bound once: they run on every request.
        self._cached_plan = self.limiter.plans.cached_plan
        self._find = self._candidates
        self._client_address = self.limiter.client_address
        self.exempt_static = exempt_static
        self._started = False
        self._start_lock = threading.Lock()
        self._handled: dict[type[Exception], bool] = {}  # refusal class -> the app handles it

    # -- start-up -------------------------------------------------------------------------------

    def startup(self) -> None:
        """Check every view's and blueprint's marks, import key functions, open the stores."""
        with self._start_lock:
            if not self._started:
                self.limiter.startup(self._endpoints())
                self._started = True

    def _endpoints(self) -> Iterator[object]:
        app = self.app
        for view in app.view_functions.values():
            yield view
            view_class = getattr(view, "view_class", None)
            if view_class is not None:
                yield view_class
        yield from app.blueprints.values()

    # -- plans ----------------------------------------------------------------------------------

    def plan(self, flask_request: Request, method: str) -> Plan:
        """The limiters of this request (plans.py): view > blueprint > route rules > default."""
        path = flask_request.path
        return self._cached_plan(
            (flask_request.endpoint, method, path), method, path, self._find, flask_request, method
        )

    def _candidates(self, flask_request: Request, method: str) -> Iterator[object]:
        """What may carry marks, in Flask's order: the `View` class's method handler, the view
        function, the class, the static exemption, the blueprints (innermost first). None for
        a request no view handles (404, 405: Flask's routing already told)."""
        endpoint = flask_request.endpoint
        if endpoint is None:
            return
        view = self.app.view_functions.get(endpoint)
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            yield method_handler(view_class, method)
        yield view
        yield view_class
        if self.exempt_static and _is_static(endpoint):
            yield EXEMPT
        blueprints = self.app.blueprints
        for name in flask_request.blueprints:
            yield blueprints.get(name)

    # -- the hooks ------------------------------------------------------------------------------

    def before_request(self) -> Response | None:
        if not self._started:
            self.startup()
        flask_request: Request = cast(Any, request)._get_current_object()  # one proxy lookup
        method = flask_request.method
        plan = self.plan(flask_request, method)
        if not plan:
            return None
        facts = FlaskFacts(flask_request, flask_request.path, self._client_address)
        admission = flask_request.environ[ADMISSION_KEY] = self.limiter.begin(facts, plan)
        if admission.allowed:
            return None
        denial = admission.denial()
        refusal = _REFUSALS.get(denial.status, RateLimitExceeded)(
            cast(Decision, admission.decision), denial
        )
        if self.app_handles(refusal):
            raise refusal
        # Nothing of the app's would answer it: Flask would send `refusal` as it is, but by
        # running it as a WSGI app (werkzeug's force_type), at twice the cost of the check.
        return cast(Response, refusal.get_response())

    def app_handles(self, refusal: HTTPException) -> bool:
        """Whether an error handler of the app or of a blueprint would catch `refusal`.

        Asked at the first refusal of each kind: by then no handler can be added any more
        (Flask refuses set-up methods once the app has handled a request).
        """
        handled = self._handled.get(type(refusal))
        if handled is None:
            classes = type(refusal).__mro__
            handled = self._handled[type(refusal)] = any(
                cls in (by_code.get(code) or {})
                for by_code in flask_error_handlers(self.app)
                for code in (refusal.code, None)
                for cls in classes
            )
        return handled

    def after_request(self, response: Response) -> Response:
        admission: Admission | None = request.environ.get(ADMISSION_KEY)
        if admission is None:
            return response
        if admission.allowed:
            extra = admission.headers()
            if extra:
                response.headers.extend(text_headers(extra))
            if admission.settles:  # it ends when the server closes the body (a streamed one too)
                finish = functools.partial(admission.finish, response.status_code, response.headers)
                response.call_on_close(finish)
                request.environ[_ENDS_AT_CLOSE] = True  # not at teardown, which comes first
            return response
        # Refused: the default response has these already; an error handler's may not.
        add_missing(response.headers, admission.refusal_headers())
        return response

    def teardown_request(self, error: BaseException | None) -> None:
        """The view raised and no response was made (`PROPAGATE_EXCEPTIONS`): end it here."""
        environ = request.environ
        admission: Admission | None = environ.get(ADMISSION_KEY)
        if admission is not None and not environ.get(_ENDS_AT_CLOSE):
            admission.finish(500 if error is not None else None)

    def close(self) -> None:
        self.limiter.close()


# --- the extension ---------------------------------------------------------------------------


class RateLimit:
    """Rate limiting for Flask apps, configured by a `rate-sync.toml`.

        ratelimit = RateLimit(app, config="rate-sync.toml")
        # or, with an app factory:
        ratelimit = RateLimit()
        def create_app():
            app = Flask(__name__)
            app.config["RATESYNC_CONFIG"] = "/etc/myapp/rate-sync.toml"
            ratelimit.init_app(app)
            return app

    Each option is the constructor's argument, else `app.config["RATESYNC_<OPTION>"]`, else
    the default:

    - `config` / `RATESYNC_CONFIG`: a path, a dict shaped like the TOML, a `Config` or an
      `AsyncRateLimiter`; default: discovery (`$RATE_SYNC_CONFIG`, `./rate-sync.toml`,
      `./config/rate-sync.toml`).
    - `enabled` / `RATESYNC_ENABLED`: False registers nothing (for tests); default True.
    - `exempt_static` / `RATESYNC_EXEMPT_STATIC`: never limit the `static` endpoints of the app
      and its blueprints, as flask-limiter does; default True.

    One instance can serve several apps, each with its own configuration: the state of an app
    lives in `app.extensions["ratesync"]`, never on this object.
    """

    def __init__(
        self,
        app: Flask | None = None,
        config: ConfigSource | AsyncRateLimiter = None,
        *,
        enabled: bool | None = None,
        exempt_static: bool | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.enabled = enabled
        self.exempt_static = exempt_static
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the options, load the configuration, register the hooks (once per app).

        Calling it again on the same app replaces that app's configuration.
        """
        options = app.config
        enabled = _option(self.enabled, options, "RATESYNC_ENABLED", True)
        if not enabled:
            return
        config = self.config if self.config is not None else options.get("RATESYNC_CONFIG")
        exempt_static = _option(self.exempt_static, options, "RATESYNC_EXEMPT_STATIC", True)
        state = _AppState(app, config, exempt_static)
        previous = app.extensions.get(EXTENSION)
        app.extensions[EXTENSION] = state
        if state.limiter.core.settles and not app.extensions.get(_TEARDOWN):
            # Only a configuration with work at the end (slots) pays for a teardown hook.
            app.extensions[_TEARDOWN] = True

            def end_request(error: BaseException | None) -> None:
                app.extensions[EXTENSION].teardown_request(error)

            app.teardown_request(end_request)
        if isinstance(previous, _AppState):
            previous.close()
            return  # the hooks below read app.extensions, so they now use the new state

        def check_rate_limit() -> Response | None:
            refused: Response | None = app.extensions[EXTENSION].before_request()
            return refused

        def add_rate_limit_headers(response: Response) -> Response:
            result: Response = app.extensions[EXTENSION].after_request(response)
            return result

        app.before_request(check_rate_limit)
        app.after_request(add_rate_limit_headers)

    # -- decorators -----------------------------------------------------------------------------

    def limit(
        self, *names: str, cost: Cost | None = None, key: Key | None = None
    ) -> Callable[[_F], _F]:
        """Limit a view (function, `View` class or one of its methods) or every view of a blueprint.

            @app.post("/login")
            @ratelimit.limit("login")
            def login(): ...

            ratelimit.limit("api")(api_blueprint)

        All named limiters must allow; each request spends `cost` (a whole number, or a
        function of the Flask `request`; default: the limiter's own `cost`, else 1). Marks on a view win over its
        blueprint's, which win over `[[routes]]` rules and the `[middleware] default`. A rate
        (`ratelimit.limit("5/minute", key="header:X-User")`) is an inline limiter of the view.
        """
        return limit(*names, cost=cost, key=key)

    def exempt(self, target: _F) -> _F:
        """Never limit a view, or every view of a blueprint (`ratelimit.exempt(blueprint)`)."""
        return exempt(target)

    # -- for the app ----------------------------------------------------------------------------

    @property
    def current_decision(self) -> Decision | None:
        """The `Decision` for the current request, None when it is not limited."""
        admission: Admission | None = request.environ.get(ADMISSION_KEY)
        return None if admission is None else admission.decision

    def startup(self, app: Flask | None = None) -> None:
        """Check the marks of every view and blueprint and open the stores now.

        Otherwise this happens on the app's first request. Call it once the views are
        registered (end of `create_app`) to fail at deploy time on `@ratelimit.limit("typo")`.
        Raises `ConfigError`; a store that cannot be reached is only logged.
        """
        state = self._state(app)
        if state is not None:
            state.startup()

    def close(self, app: Flask | None = None) -> None:
        """Close the app's stores in this process (they reopen on next use)."""
        state = self._state(app)
        if state is not None:
            state.close()

    def _state(self, app: Flask | None) -> _AppState | None:
        target = app or self.app or current_app
        state = target.extensions.get(EXTENSION)
        return state if isinstance(state, _AppState) else None


def _option(argument: bool | None, options: dict[str, Any], name: str, default: bool) -> bool:
    if argument is not None:
        return argument
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise TypeError(f"app.config[{name!r}] must be True or False, not {value!r}")
    return value
