"""The WSGI adapter: rate limiting for any WSGI application, and the pieces Flask shares.

    app.wsgi_app = RateLimitMiddleware(app.wsgi_app, config="rate-sync.toml")   # Flask
    application = RateLimitMiddleware(application, config="rate-sync.toml")     # anything else

A WSGI callable knows nothing of the endpoint the app will route to, so this middleware applies
the `[[routes]]` rules and the `[middleware] default` (decorators need `ratesync_middleware.flask`
or the Django adapter). Keys come from the environ: `REMOTE_ADDR`, `HTTP_*` headers, `PATH_INFO`.
Store calls go through `SyncRequestLimiter`, the one sync driver; the request ends (`finish`)
when the server closes the response body, so streamed bodies count until their last byte.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from .client_ip import ClientAddress
from .config import ConfigSource
from .facts import RequestFacts
from .headers import text_headers
from .lifecycle import Admission
from .limiter import AsyncRateLimiter
from .sync import SyncRequestLimiter

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "DECISION_KEY",
    "EnvironFacts",
    "RateLimitMiddleware",
    "environ_header",
    "environ_path",
]

DECISION_KEY: Final = "ratesync.decision"
"""Where the request's `Decision` is left in the environ (absent when the request is not limited)."""

# The two request headers CGI does not prefix with HTTP_.
_UNPREFIXED: Final = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


@functools.lru_cache(maxsize=256)
def _environ_key(name: str) -> str:
    """`x-api-key` -> `HTTP_X_API_KEY` (names come from the configuration: few and fixed)."""
    return _UNPREFIXED.get(name) or "HTTP_" + name.upper().replace("-", "_")


def environ_header(environ: WSGIEnvironment, name: str) -> str | None:
    """The request header `name` (lower case) from a WSGI environ, None when absent."""
    value: str | None = environ.get(_environ_key(name))
    return value


def environ_path(environ: WSGIEnvironment) -> str:
    """The path inside the app (`PATH_INFO`, without `SCRIPT_NAME`), decoded as werkzeug does."""
    path: str = environ.get("PATH_INFO") or ""
    if not path.isascii():  # PEP 3333 carries the raw bytes as latin-1
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    return "/" + path.lstrip("/")


class EnvironFacts(RequestFacts):
    """A WSGI environ as `RequestFacts`: the peer is `REMOTE_ADDR`, headers are `HTTP_*` keys.

    There is no authenticated user: `REMOTE_USER` is not trusted, because some servers
    (gunicorn) fill it from an unchecked `Authorization: Basic` header. A `user` key therefore
    means the client address here; a `"pkg.mod:func"` key can read `facts.request` (the environ).
    """

    __slots__ = ("environ",)

    def __init__(
        self, environ: WSGIEnvironment, method: str, path: str, client_address: ClientAddress
    ) -> None:
        RequestFacts.__init__(  # not super(): this runs on every request
            self, method, path, environ.get("REMOTE_ADDR") or None, client_address
        )
        self.environ = environ

    def header(self, name: str) -> str | None:
        return environ_header(self.environ, name)

    @property
    def request(self) -> WSGIEnvironment:
        """The WSGI environ."""
        return self.environ


def _status_line(status: int) -> str:
    return f"{status} {HTTPStatus(status).phrase}"


def status_code(status_line: str) -> int | None:
    """`"200 OK"` -> 200; None for a line that does not start with a code."""
    try:
        return int(status_line[:3])
    except ValueError:
        return None


class _Finishing:
    """The app's response body; the request ends when the server closes it (PEP 3333).

    Iterated as it is, so streaming bodies stream; `close()` closes the app's body, then
    finishes the admission with the status and headers the app started the response with.
    """

    __slots__ = ("_admission", "_body", "headers", "status")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._body: Iterable[bytes] = ()
        self.status: int | None = None
        self.headers: list[tuple[str, str]] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._admission.finish(self.status, self.headers)


class RateLimitMiddleware:
    """Rate limiting for a WSGI application, configured by a `rate-sync.toml`.

    `config` is a path, a dict shaped like the TOML, a `Config`, an `AsyncRateLimiter`, or None
    to discover `$RATE_SYNC_CONFIG`, `./rate-sync.toml` or `./config/rate-sync.toml`.

    A refused request is answered here, without calling the app: 429 (503 when a `fail_closed`
    store is down) with `Retry-After` and a problem+json body. Allowed responses get the
    rate-limit headers of the `[middleware] headers` mode. The decision is left in
    `environ["ratesync.decision"]` for the app to read.
    """

    def __init__(
        self, app: WSGIApplication, config: ConfigSource | AsyncRateLimiter = None
    ) -> None:
        self.app = app
        self.limiter = SyncRequestLimiter(config)
        self.config = self.limiter.config
        self._status_lines = {status: _status_line(status) for status in (429, 503)}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method: str = environ.get("REQUEST_METHOD") or "GET"
        path = environ_path(environ)
        limiter = self.limiter
        plan = limiter.plans.rules_plan(method, path)
        if not plan:
            return self.app(environ, start_response)
        facts = EnvironFacts(environ, method, path, limiter.client_address)
        admission = limiter.begin(facts, plan)
        environ[DECISION_KEY] = admission.decision
        if not admission.allowed:
            return self._refuse(method, admission, start_response)
        added = text_headers(admission.headers())
        # Only an admission with work at the end pays for a body wrapper (PEP 3333's close()).
        response = _Finishing(admission) if admission.settles else None

        def start_with_headers(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
        ) -> Callable[[bytes], object]:
            if response is not None:
                response.status, response.headers = status_code(status), headers
            return start_response(status, [*headers, *added], exc_info)

        if response is None:
            return self.app(environ, start_with_headers)

        try:
            response._body = self.app(environ, start_with_headers)
        except BaseException:
            admission.finish(response.status or 500, response.headers)
            raise
        return response

    def _refuse(
        self, method: str, admission: Admission, start_response: StartResponse
    ) -> Iterable[bytes]:
        denial = admission.denial()
        status = self._status_lines.get(denial.status) or _status_line(denial.status)
        start_response(status, text_headers(denial.headers))
        return [] if method == "HEAD" else [denial.body]

    def close(self) -> None:
        """Close the stores of this process (they reopen on next use)."""
        self.limiter.close()
