"""The Flask extension: `RateLimit`, view and blueprint decorators, 429/503 as Flask exceptions.

    ratelimit = RateLimit(app, config="rate-sync.toml")    # or RateLimit() + init_app(app)

    @app.post("/login")
    @ratelimit.limit("login")
    def login(): ...

The check runs in `before_request`, where `request.endpoint` names the view Flask will call, so
view and blueprint marks apply; a refusal raises `RateLimitExceeded` (a `TooManyRequests`) or
`RateLimitUnavailable` (a `ServiceUnavailable`), and the app's own error handlers apply.
`after_request` adds the rate-limit headers and settles what the status and headers say
(`count_status`, `settle_header`); a streamed body settles, and slots are given back, when the
server closes it. The limiting itself lives in the core (`lifecycle.py`, `plans.py`); the
Quart twin (`ratesync_middleware.quart`) shares everything here but the driving of the core.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import Forbidden, HTTPException, ServiceUnavailable, TooManyRequests

from .bucket import Decision
from .client_ip import ClientAddress
from .compat import flask_error_handlers
from .config import ConfigSource
from .errors import ConfigError
from .headers import Denial, add_missing, retry_after_seconds, text_headers
from .lifecycle import Admission, RequestLimiter
from .limiter import AsyncRateLimiter, logger
from .marks import Cost, Key, exempt, get_marks, limit
from .plans import EXEMPT, Plan, endpoint_objects, method_handler
from .sync import SyncRequestLimiter
from .wsgi import EnvironFacts

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from flask import Request
    from werkzeug.sansio.response import Response as SansioResponse

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
_App = TypeVar("_App")  # Flask, or Quart

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
    """What one app needs per request, built once at `init_app`: in `app.extensions["ratesync"]`.

    The plans, the candidate endpoints, the refusals and the headers, which Flask and Quart
    share; a subclass drives the core (Flask: `SyncRequestLimiter`; Quart: awaited on its loop).
    `request` is Flask's or Quart's request object: both have `endpoint`, `blueprints`, `path`.
    """

    def __init__(
        self, app: Any, limiter: SyncRequestLimiter | RequestLimiter, exempt_static: bool
    ) -> None:
        self.app = app
        self.config = limiter.config
        self.plans = plans = limiter.plans
        # Configuration only, so safe across fork(); bound once: they run on every request.
        self._cached_plan = plans.cached_plan
        self._find = self._candidates
        self._client_address = limiter.client_address
        self.exempt_static = exempt_static
        self._started = False
        self._handled: dict[type[Exception], bool] = {}  # refusal class -> the app handles it

    # -- start-up -------------------------------------------------------------------------------

    def endpoints(self) -> Iterator[object]:
        """Every view, `View` class and blueprint of the app: what may carry marks."""
        app = self.app
        for view in app.view_functions.values():
            yield view
            view_class = getattr(view, "view_class", None)
            if view_class is not None:
                yield view_class
        yield from app.blueprints.values()

    def check_marks(self, endpoints: Iterable[object]) -> None:
        """`ConfigError` (one line, with "did you mean") for a mark naming no limiter here."""
        for endpoint in endpoints:
            marks = get_marks(endpoint)
            if marks is not None:
                self.plans.marked_plan(marks, endpoint)

    def served_endpoints(self, strict: bool) -> list[object]:
        """The endpoints to check at start-up. Not `strict` (the first request starts it): an
        endpoint whose marks name no limiter is logged and left out, so that its own route
        answers 500 with that error and every other route is served."""
        endpoints = list(self.endpoints())
        if strict:
            return endpoints
        served = []
        for endpoint in endpoints:
            try:
                self.check_marks(endpoint_objects(endpoint))
            except ConfigError as error:
                logger.error("%s", error)
                continue
            served.append(endpoint)
        return served

    # -- plans ----------------------------------------------------------------------------------

    def plan(self, request: Any, method: str) -> Plan:
        """The limiters of this request (plans.py): view > blueprint > route rules > default."""
        path = request.path
        return self._cached_plan(
            (request.endpoint, method, path), method, path, self._find, request, method
        )

    def _candidates(self, request: Any, method: str) -> Iterator[object]:
        """What may carry marks, in Flask's order: the `View` class's method handler, the view
        function, the class, the static exemption, the blueprints (innermost first). None for
        a request no view handles (404, 405: the routing already told)."""
        endpoint = request.endpoint
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
        for name in request.blueprints:
            yield blueprints.get(name)

    # -- responses ------------------------------------------------------------------------------

    def refuse(self, admission: Admission) -> Response:
        """The refusal of `admission`: raised when a handler of the app's would catch it, else
        its response, returned from `before_request`."""
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

    def respond(self, admission: Admission, response: SansioResponse) -> bool:
        """Add the rate-limit headers to `response` and, unless its body is streamed, settle
        what its status and headers say now: before the server or a test client sees it.
        Whether the admission has work left for the end of the body (`finish`)."""
        if not admission.allowed:
            # Refused: the default response has these already; an error handler's may not.
            add_missing(response.headers, admission.refusal_headers())
            return False
        extra = admission.headers()
        if extra:
            response.headers.extend(text_headers(extra))
        if not admission.settles:
            return False
        if not self.streamed(response):
            admission.settle(response.status_code, response.headers)
        return True  # slots, and a streamed body's settlement, wait for the body's end

    def streamed(self, response: SansioResponse) -> bool:
        """Whether the body is sent as it is made (no length known before it ends)."""
        return bool(getattr(response, "is_streamed", True))


class _FlaskState(_AppState):
    """A Flask app's state: the core driven through `SyncRequestLimiter` (one loop thread)."""

    def __init__(
        self, app: Flask, config: ConfigSource | AsyncRateLimiter, exempt_static: bool
    ) -> None:
        self.limiter = SyncRequestLimiter(config)
        _AppState.__init__(self, app, self.limiter, exempt_static)
        self._start_lock = threading.Lock()

    def startup(self, strict: bool = True) -> None:
        """Check every view's and blueprint's marks, import key functions, open the stores."""
        with self._start_lock:
            if not self._started:
                self.limiter.startup(self.served_endpoints(strict))
                self._started = True

    # -- the hooks ------------------------------------------------------------------------------

    def before_request(self) -> Response | None:
        if not self._started:
            self.startup(strict=False)
        flask_request: Request = cast(Any, request)._get_current_object()  # one proxy lookup
        method = flask_request.method
        plan = self.plan(flask_request, method)
        if not plan:
            return None
        facts = FlaskFacts(flask_request, flask_request.path, self._client_address)
        admission = flask_request.environ[ADMISSION_KEY] = self.limiter.begin(facts, plan)
        return None if admission.allowed else self.refuse(admission)

    def after_request(self, response: Response) -> Response:
        environ = request.environ
        admission: Admission | None = environ.get(ADMISSION_KEY)
        if admission is not None and self.respond(admission, response):
            # The server closes the body after its last byte (a test client, when asked to).
            finish = functools.partial(admission.finish, response.status_code, response.headers)
            response.call_on_close(finish)
            environ[_ENDS_AT_CLOSE] = True  # not at teardown, which comes first
        return response

    def teardown_request(self, error: BaseException | None) -> None:
        """The view raised and no response was made (`PROPAGATE_EXCEPTIONS`): end it here."""
        environ = request.environ
        admission: Admission | None = environ.get(ADMISSION_KEY)
        if admission is not None and not environ.get(_ENDS_AT_CLOSE):
            admission.finish(500 if error is not None else None)

    def close(self) -> None:
        self.limiter.close()


_State = TypeVar("_State", bound=_AppState)


# --- the extension ---------------------------------------------------------------------------


class RateLimitExtension(Generic[_App, _State]):
    """What the Flask and Quart extensions share: options, marks and their check, the state.

    A subclass says which app class it serves (`app_class`), builds the app's state and
    registers its hooks (`register`).
    """

    app_class: type[Any]
    other: str  # the module a user who passed the other framework's app needs
    state_class: Callable[[Any, ConfigSource | AsyncRateLimiter, bool], _State]

    def __init__(
        self,
        app: _App | None = None,
        config: ConfigSource | AsyncRateLimiter = None,
        *,
        enabled: bool | None = None,
        exempt_static: bool | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.enabled = enabled
        self.exempt_static = exempt_static
        self._marked: list[object] = []  # what `self.limit` decorated, checked at `init_app`
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()  # where `init_app` ran
        if app is not None:
            self.init_app(app)

    def init_app(self, app: _App) -> None:
        """Read the options, load the configuration, check the marks, register the hooks
        (once per app). `ConfigError` for a mark that names no limiter.

        Calling it again on the same app replaces that app's configuration.
        """
        if not isinstance(app, self.app_class):
            raise TypeError(
                f"{type(self).__module__}.RateLimit needs a {self.app_class.__name__} app, not"
                f" {type(app).__module__}.{type(app).__qualname__}: use {self.other}.RateLimit"
            )
        options = cast(Any, app).config
        enabled = _option(self.enabled, options, "RATESYNC_ENABLED", True)
        if not enabled:
            return
        config = self.config if self.config is not None else options.get("RATESYNC_CONFIG")
        exempt_static = _option(self.exempt_static, options, "RATESYNC_EXEMPT_STATIC", True)
        state = self.state_class(app, config, exempt_static)
        # Fail here rather than at the first request: the views this extension marked (maybe
        # on blueprints not registered yet), and those the app has now.
        state.check_marks(self._marked)
        state.check_marks(
            obj for endpoint in state.endpoints() for obj in endpoint_objects(endpoint)
        )
        self._apps.add(app)
        extensions = cast(Any, app).extensions
        previous = extensions.get(EXTENSION)
        extensions[EXTENSION] = state
        self.register(app, state, previous if isinstance(previous, _AppState) else None)  # type: ignore[arg-type]

    def register(self, app: _App, state: _State, previous: _State | None) -> None:
        """Register the app's hooks (`previous`: the state `init_app` replaces, hooks set)."""
        raise NotImplementedError

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
        function of the `request`; default: the limiter's own `cost`, else 1). Marks on a view
        win over its blueprint's, which win over `[[routes]]` rules and the `[middleware]
        default`. A rate (`ratelimit.limit("5/minute", key="header:X-User")`) is an inline
        limiter of the view. A name no limiter has is a `ConfigError` here, once `init_app`
        has run, else at `init_app`.
        """
        mark = limit(*names, cost=cost, key=key)

        def decorate(target: _F) -> _F:
            marked = mark(target)
            for app in list(self._apps):
                state = cast(Any, app).extensions.get(EXTENSION)
                if isinstance(state, _AppState):
                    state.check_marks((marked,))
            self._marked.append(marked)
            return marked

        return decorate

    def exempt(self, target: _F) -> _F:
        """Never limit a view, or every view of a blueprint (`ratelimit.exempt(blueprint)`)."""
        return exempt(target)

    # -- for the app ----------------------------------------------------------------------------

    @property
    def current_decision(self) -> Decision | None:
        """The `Decision` for the current request, None when it is not limited."""
        admission = self.current_admission()
        return None if admission is None else admission.decision

    def current_admission(self) -> Admission | None:
        """The current request's `Admission`, None when it is not limited."""
        raise NotImplementedError

    def current_app(self) -> Any:
        raise NotImplementedError

    def state(self, app: _App | None) -> _State | None:
        """The state `init_app` left on `app` (default: this extension's app, else the
        current app), None when it is not enabled there."""
        target: Any = app or self.app or self.current_app()
        state = target.extensions.get(EXTENSION)
        return state if isinstance(state, _AppState) else None  # type: ignore[return-value]


class RateLimit(RateLimitExtension[Flask, _FlaskState]):
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
    lives in `app.extensions["ratesync"]`, never on this object. A Quart app is refused
    (`TypeError`): `ratesync_middleware.quart.RateLimit` is its twin.
    """

    app_class = Flask
    other = "ratesync_middleware.quart"
    state_class = _FlaskState

    def register(self, app: Flask, state: _FlaskState, previous: _FlaskState | None) -> None:
        if state.limiter.core.settles and not app.extensions.get(_TEARDOWN):
            # Only a configuration with work at the end (slots) pays for a teardown hook.
            app.extensions[_TEARDOWN] = True

            def end_request(error: BaseException | None) -> None:
                app.extensions[EXTENSION].teardown_request(error)

            app.teardown_request(end_request)
        if previous is not None:
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

    def current_admission(self) -> Admission | None:
        admission: Admission | None = request.environ.get(ADMISSION_KEY)
        return admission

    def current_app(self) -> Any:
        return current_app

    def startup(self, app: Flask | None = None) -> None:
        """Check the marks of every view and blueprint and open the stores now.

        Otherwise this happens on the app's first request. Call it once the views are
        registered (end of `create_app`) to fail at deploy time on a bare `@limit("typo")`
        (`ratelimit.limit` checks its names when it runs, or at `init_app`).
        Raises `ConfigError`; a store that cannot be reached is only logged.
        """
        state = self.state(app)
        if state is not None:
            state.startup()

    def close(self, app: Flask | None = None) -> None:
        """Close the app's stores in this process (they reopen on next use)."""
        state = self.state(app)
        if state is not None:
            state.close()


def _option(argument: bool | None, options: dict[str, Any], name: str, default: bool) -> bool:
    if argument is not None:
        return argument
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise TypeError(f"app.config[{name!r}] must be True or False, not {value!r}")
    return value
