"""In-process overhead per request: bare app vs ours vs the peers, no HTTP server.

    .venv/bin/python bench/overhead.py              # the documented run, ~2.5 minutes
    .venv/bin/python bench/overhead.py --quick      # a smoke run (~15 s), into bench/results/partial/
    .venv/bin/python bench/overhead.py --profile asgi-allowed   # cProfile of ours, no tables

The apps are driven directly, in this process:

- ASGI (Starlette): `await app(scope, receive, send)` in a loop on one event loop, the lifespan
  started once per app (our middleware opens its stores at start-up). A fresh scope per request
  (a copy of one template plus an empty `state`), `receive` answers `http.request` once and then
  waits like a server whose client never disconnects.
- WSGI (Flask, Django): `app(environ, start_response)`, the body iterated and closed. A fresh
  environ per request (a copy of one template plus a new `wsgi.input`).
- Django under ASGI: `django.core.handlers.asgi.ASGIHandler`, the same way as Starlette.

Every request comes from the same client address (203.0.113.7), `GET /`, one route. Two
scenarios per framework: a limit that is never reached (ours: 10^6/s, burst 10^9; the peers:
10^9 per minute), and a bucket exhausted before the timing starts (ours: `limit = "1/day"`, the
peers: 1 per day), so that every timed request is refused (429). Every response's status is
checked: the *wrong statuses* column must be 0.

Variants (each with its documented setup, default options), plus a do-nothing middleware (or
Flask hooks) that shows what one more layer costs by itself:

- Starlette: the bare app; ours (`RateLimitMiddleware`, memory store, default `draft` headers);
  ours with `headers = "none"` (the peers send no rate-limit headers by default); slowapi's
  `SlowAPIMiddleware` (a `BaseHTTPMiddleware`) and its pure-ASGI `SlowAPIASGIMiddleware`, both
  with `app.state.limiter = Limiter(key_func=get_remote_address, default_limits=[...])` and the
  `RateLimitExceeded` handler.
- FastAPI: the bare app; a do-nothing dependency with `yield` (what FastAPI spends on such a
  dependency by itself); ours as the middleware (its default); ours as the `RateLimit`
  dependency on the route (the middleware present without a default, lending its limiter).
- Flask: the bare app; ours (`RateLimit(app, config=...)`); ours without headers; flask-limiter
  (`Limiter(get_remote_address, app=app, default_limits=[...], storage_uri="memory://")`).
- Django (`WSGIHandler`, settings configured once here, locmem cache): no middleware; ours
  (`ratesync_middleware.django.RateLimitMiddleware`); ours without headers; django-ratelimit
  (`RatelimitMiddleware` + `RATELIMIT_VIEW` answering 429, and the view decorated with
  `@ratelimit(key="ip", rate=...)`, as its documentation shows).
- Django under ASGI (`ASGIHandler`): an `async def` view, bare vs ours (django-ratelimit's
  decorator wraps only sync views); and a sync view (Django runs it in a thread), bare vs ours vs
  django-ratelimit (whose sync-only middleware Django adapts with `sync_to_async`).
- Django REST framework (`WSGIHandler`, `--only drf`): an `APIView` without a throttle; with
  `RateSyncThrottle` alone, then with the middleware too (which leaves the view to the
  throttle); and with DRF's own `AnonRateThrottle` (Django's locmem cache) as the peer.

Method: each variant is first calibrated (its request count is chosen so that one sample lasts
about `--seconds`), then the repetitions are interleaved and rotated by `_harness`. One sample is
the mean time per request over that many back-to-back requests, after a `gc.collect()`; the apps
are built and `gc.freeze()` is called before a table, so that the collector costs each variant
its own garbage rather than a scan of this process's heap (it holds three frameworks). The
*overhead* of a variant is its time per request minus the bare app's in the same repetition.
This machine has slow phases (the same pure-Python loop takes 1x or 2x as long for seconds at a
time), so the targets of issue 7 are judged on the median over repetitions of the
per-repetition ratio (our overhead / the peer's, measured within a second of each other); the
ratio of the median overheads and of the minimum times are printed beside it.

    --breakdown allowed|denied   each layer of our path (ASGI, Flask, Django) timed alone
    --profile asgi-allowed       cProfile of one variant, cumulative time per request
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import math
import pstats
import statistics
import sys
import time
import types
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _harness import IMG_DIR, RESULTS_DIR, Metric, Report, Table, Variant  # noqa: E402

CLIENT_IP = "203.0.113.7"
PACKAGES = [
    "starlette",
    "slowapi",
    "flask",
    "flask-limiter",
    "django",
    "django-ratelimit",
    "djangorestframework",
    "limits",
    "asgiref",
    "werkzeug",
]

# -- limits of each scenario ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str  # "allowed" / "denied"
    title: str
    ours: dict[str, Any]  # [limiters.api] of our configuration
    limits_string: str  # slowapi / flask-limiter (the `limits` syntax)
    django_rate: str  # django-ratelimit
    status: int  # the status every timed request must get


SCENARIOS = {
    "allowed": Scenario(
        "allowed",
        "limit never reached",
        {"rate_per_second": 1_000_000.0, "burst": 1_000_000_000},
        "1000000000/minute",
        "1000000000/m",
        200,
    ),
    "denied": Scenario(
        "denied",
        "every request denied (bucket exhausted first)",
        {"limit": "1/day"},
        "1/day",
        "1/d",
        429,
    ),
}


def ours_config(scenario: Scenario, headers: str = "draft") -> dict[str, Any]:
    """Our configuration as a dict shaped like the TOML: one memory-store limiter, the default."""
    return {
        "limiters": {"api": dict(scenario.ours)},
        "middleware": {"default": "api", "headers": headers},
    }


# -- drivers ----------------------------------------------------------------------------------


class Driver:
    """Runs `n` requests of one app back to back; counts the statuses that are not expected."""

    expected: int = 200

    def run(self, n: int) -> Any:  # -> (elapsed_ns, wrong) or a coroutine of it
        raise NotImplementedError

    def close(self) -> Any:
        return None


ASGI_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [
        (b"host", b"testserver"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
    ],
    "client": (CLIENT_IP, 50123),
    "server": ("testserver", 80),
}
HTTP_REQUEST: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}


class AsgiDriver(Driver):
    """An ASGI app on the report's event loop; its lifespan is started once (optional)."""

    def __init__(self, app: Any, expected: int, lifespan: bool = True) -> None:
        self.app = app
        self.expected = expected
        self.lifespan = lifespan
        self._lifespan_queue: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_task: asyncio.Task[Any] | None = None
        self._shutdown: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        if not self.lifespan:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started: asyncio.Future[Any] = loop.create_future()
        self._shutdown = shutdown = loop.create_future()

        async def receive() -> dict[str, Any]:
            return await queue.get()

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                started.set_result(None)
            elif kind == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message", "startup failed")))
            elif kind.startswith("lifespan.shutdown") and not shutdown.done():
                shutdown.set_result(None)

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan_queue = queue
        self._lifespan_task = asyncio.ensure_future(self.app(scope, receive, send))
        await queue.put({"type": "lifespan.startup"})
        await started

    async def close(self) -> None:
        if self._lifespan_task is None or self._lifespan_queue is None:
            return
        await self._lifespan_queue.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._shutdown), 5)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._lifespan_task, 5)

    async def run(self, n: int) -> tuple[int, int]:
        app = self.app
        template = ASGI_SCOPE
        expected = self.expected
        wrong = 0
        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        start = time.perf_counter_ns()
        for _ in range(n):
            scope = template.copy()
            scope["state"] = {}
            first = True

            async def receive() -> dict[str, Any]:
                nonlocal first
                if first:
                    first = False
                    return HTTP_REQUEST
                await asyncio.get_running_loop().create_future()  # no disconnect, ever
                raise AssertionError("unreachable")

            status = 0
            await app(scope, receive, send)
            if status != expected:
                wrong += 1
        return time.perf_counter_ns() - start, wrong


WSGI_ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "testserver",
    "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": CLIENT_IP,
    "REMOTE_PORT": "50123",
    "HTTP_HOST": "testserver",
    "HTTP_USER_AGENT": "bench/1.0",
    "HTTP_ACCEPT": "*/*",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


class WsgiDriver(Driver):
    def __init__(self, app: Any, expected: int, before: Callable[[], None] | None = None) -> None:
        self.app = app
        self.expected = expected
        self.before = before  # e.g. point Django's ROOT_URLCONF at this variant's views

    def run(self, n: int) -> tuple[int, int]:
        if self.before is not None:
            self.before()
        app = self.app
        template = WSGI_ENVIRON
        expected = str(self.expected)
        wrong = 0
        status = ""

        def start_response(s: str, headers: list[Any], exc_info: Any = None) -> Any:
            nonlocal status
            status = s
            return None

        start = time.perf_counter_ns()
        for _ in range(n):
            environ = template.copy()
            environ["wsgi.input"] = io.BytesIO(b"")
            body = app(environ, start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            if status[:3] != expected:
                wrong += 1
        return time.perf_counter_ns() - start, wrong


class HookedAsgiDriver(AsgiDriver):
    """An ASGI driver that runs `before()` ahead of each batch (Django's ROOT_URLCONF)."""

    def __init__(self, app: Any, expected: int, before: Callable[[], None]) -> None:
        super().__init__(app, expected, lifespan=False)
        self.before = before

    async def run(self, n: int) -> tuple[int, int]:
        self.before()
        return await super().run(n)


# -- the apps ---------------------------------------------------------------------------------


def starlette_apps(scenario: Scenario) -> dict[str, Driver]:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ratesync_middleware.asgi import RateLimitMiddleware

    async def homepage(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def bare() -> Starlette:
        return Starlette(routes=[Route("/", homepage)])

    class NoopMiddleware:
        """A pure ASGI middleware that does nothing: the price of one more layer."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

    def noop() -> Starlette:
        return Starlette(routes=[Route("/", homepage)], middleware=[Middleware(NoopMiddleware)])

    def ours(headers: str) -> Starlette:
        return Starlette(
            routes=[Route("/", homepage)],
            middleware=[
                Middleware(RateLimitMiddleware, config=ours_config(scenario, headers=headers))
            ],
        )

    def slowapi(middleware: type) -> Starlette:
        # As slowapi's documentation shows it.
        limiter = Limiter(key_func=get_remote_address, default_limits=[scenario.limits_string])
        app = Starlette(routes=[Route("/", homepage)])
        app.state.limiter = limiter
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
        app.add_middleware(middleware)
        return app

    status = scenario.status
    return {
        "bare": AsgiDriver(bare(), 200),
        "no-op middleware": AsgiDriver(noop(), 200),
        "ours": AsgiDriver(ours("draft"), status),
        "ours, no headers": AsgiDriver(ours("none"), status),
        "slowapi": AsgiDriver(slowapi(SlowAPIMiddleware), status),
        "slowapi ASGI": AsgiDriver(slowapi(SlowAPIASGIMiddleware), status),
    }


def fastapi_apps(scenario: Scenario) -> dict[str, Driver]:
    """FastAPI: the middleware (its default) vs the `RateLimit` dependency on the route (the
    middleware there only lends its limiter: no default)."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import PlainTextResponse

    from ratesync_middleware.asgi import RateLimitMiddleware
    from ratesync_middleware.fastapi import RateLimit

    def app(config: dict[str, Any] | None, dependencies: list[Any]) -> FastAPI:
        built = FastAPI()
        if config is not None:
            built.add_middleware(RateLimitMiddleware, config=config)

        @built.get("/", response_class=PlainTextResponse, dependencies=dependencies)
        async def index() -> str:
            return "ok"

        return built

    async def noop_dependency() -> AsyncIterator[None]:
        yield  # what FastAPI itself spends on a dependency with work after the endpoint

    without_default = {**ours_config(scenario), "middleware": {}}
    status = scenario.status
    return {
        "bare": AsgiDriver(app(None, []), 200),
        "no-op dependency": AsgiDriver(app(None, [Depends(noop_dependency)]), 200),
        "ours": AsgiDriver(app(ours_config(scenario), []), status),
        "ours, dependency": AsgiDriver(app(without_default, [Depends(RateLimit("api"))]), status),
    }


def flask_apps(scenario: Scenario) -> dict[str, Driver]:
    from flask import Flask
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    from ratesync_middleware.flask import RateLimit

    def app(name: str) -> Flask:
        flask_app = Flask(name)

        @flask_app.get("/")
        def index() -> str:
            return "ok"

        return flask_app

    bare = app("bare")
    noop = app("noop")

    @noop.before_request
    def before() -> None:
        return None

    @noop.after_request
    def after(response: Any) -> Any:
        return response

    ours = app("ours")
    RateLimit(ours, config=ours_config(scenario))
    ours_nh = app("ours_nh")
    RateLimit(ours_nh, config=ours_config(scenario, headers="none"))
    peer = app("peer")
    Limiter(
        get_remote_address,
        app=peer,
        default_limits=[scenario.limits_string],
        storage_uri="memory://",
    )
    status = scenario.status
    return {
        "bare": WsgiDriver(bare, 200),
        "no-op hooks": WsgiDriver(noop, 200),
        "ours": WsgiDriver(ours, status),
        "ours, no headers": WsgiDriver(ours_nh, status),
        "flask-limiter": WsgiDriver(peer, status),
    }


# Django: settings once, one synthetic module holding every view and urlconf.

DJANGO_MODULE = "bench_overhead_django"


def _django_setup() -> types.ModuleType:
    module = sys.modules.get(DJANGO_MODULE)
    if module is not None:
        return module
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-overhead",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=f"{DJANGO_MODULE}_urls_plain_sync",
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        RATELIMIT_VIEW=f"{DJANGO_MODULE}.ratelimited",
        SILENCED_SYSTEM_CHECKS=["django_ratelimit.E003", "django_ratelimit.W001"],
        # DRF (the drf table): read when rest_framework.views is first imported. No auth app.
        REST_FRAMEWORK={
            "DEFAULT_AUTHENTICATION_CLASSES": [],
            "DEFAULT_PERMISSION_CLASSES": [],
            "DEFAULT_THROTTLE_CLASSES": [],
            "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
            "UNAUTHENTICATED_USER": None,
        },
    )
    django.setup()
    from django.http import HttpResponse
    from django.urls import path
    from django_ratelimit.decorators import ratelimit

    module = types.ModuleType(DJANGO_MODULE)

    def ratelimited(request: Any, exception: Exception) -> HttpResponse:
        # django-ratelimit's documented RATELIMIT_VIEW: a 429 instead of its default 403.
        return HttpResponse("Too many requests", status=429)

    def index(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    async def aindex(request: Any) -> HttpResponse:
        return HttpResponse("ok")

    class NoopMiddleware:
        """A middleware with `__call__` and `process_view` that do nothing (as ours has both)."""

        def __init__(self, get_response: Any) -> None:
            self.get_response = get_response

        def __call__(self, request: Any) -> Any:
            return self.get_response(request)

        def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
            return None

    module.ratelimited = ratelimited  # type: ignore[attr-defined]
    module.NoopMiddleware = NoopMiddleware  # type: ignore[attr-defined]
    sys.modules[DJANGO_MODULE] = module

    def urlconf(suffix: str, view: Any) -> None:
        urls = types.ModuleType(f"{DJANGO_MODULE}_urls_{suffix}")
        urls.urlpatterns = [path("", view)]  # type: ignore[attr-defined]
        sys.modules[urls.__name__] = urls

    urlconf("plain_sync", index)
    urlconf("plain_async", aindex)
    for scenario in SCENARIOS.values():
        # The group is the view's dotted name by default: distinct per scenario.
        def limited(request: Any) -> HttpResponse:
            return HttpResponse("ok")

        limited.__name__ = limited.__qualname__ = f"limited_{scenario.name}"
        urlconf(
            f"ratelimit_{scenario.name}", ratelimit(key="ip", rate=scenario.django_rate)(limited)
        )
    return module


def _use_urlconf(suffix: str) -> Callable[[], None]:
    def before() -> None:
        from django.conf import settings

        settings.ROOT_URLCONF = f"{DJANGO_MODULE}_urls_{suffix}"

    return before


def _django_handler(kind: str, middleware: list[str], ratesync: dict[str, Any] | None) -> Any:
    """A WSGIHandler / ASGIHandler built with these settings (middleware reads them at init)."""
    from django.conf import settings

    settings.MIDDLEWARE = middleware
    if ratesync is None:
        with contextlib.suppress(AttributeError):
            del settings.RATESYNC
    else:
        settings.RATESYNC = ratesync
    if kind == "wsgi":
        from django.core.handlers.wsgi import WSGIHandler

        return WSGIHandler()
    from django.core.handlers.asgi import ASGIHandler

    return ASGIHandler()


OURS_DJANGO = "ratesync_middleware.django.RateLimitMiddleware"
PEER_DJANGO = "django_ratelimit.middleware.RatelimitMiddleware"


def django_wsgi_apps(scenario: Scenario) -> dict[str, Driver]:
    _django_setup()
    status = scenario.status
    plain = _use_urlconf("plain_sync")
    return {
        "bare": WsgiDriver(_django_handler("wsgi", [], None), 200, plain),
        "no-op middleware": WsgiDriver(
            _django_handler("wsgi", [f"{DJANGO_MODULE}.NoopMiddleware"], None), 200, plain
        ),
        "ours": WsgiDriver(
            _django_handler("wsgi", [OURS_DJANGO], ours_config(scenario)), status, plain
        ),
        "ours, no headers": WsgiDriver(
            _django_handler("wsgi", [OURS_DJANGO], ours_config(scenario, "none")), status, plain
        ),
        "django-ratelimit": WsgiDriver(
            _django_handler("wsgi", [PEER_DJANGO], None),
            status,
            _use_urlconf(f"ratelimit_{scenario.name}"),
        ),
    }


def django_asgi_async_apps(scenario: Scenario) -> dict[str, Driver]:
    _django_setup()
    plain = _use_urlconf("plain_async")
    return {
        "bare": HookedAsgiDriver(_django_handler("asgi", [], None), 200, plain),
        "ours": HookedAsgiDriver(
            _django_handler("asgi", [OURS_DJANGO], ours_config(scenario)), scenario.status, plain
        ),
    }


def django_asgi_sync_apps(scenario: Scenario) -> dict[str, Driver]:
    _django_setup()
    plain = _use_urlconf("plain_sync")
    return {
        "bare": HookedAsgiDriver(_django_handler("asgi", [], None), 200, plain),
        "ours": HookedAsgiDriver(
            _django_handler("asgi", [OURS_DJANGO], ours_config(scenario)), scenario.status, plain
        ),
        "django-ratelimit": HookedAsgiDriver(
            _django_handler("asgi", [PEER_DJANGO], None),
            scenario.status,
            _use_urlconf(f"ratelimit_{scenario.name}"),
        ),
    }


def drf_apps(scenario: Scenario) -> dict[str, Driver]:
    """A DRF `APIView` under WSGIHandler: without a throttle, with `RateSyncThrottle` (alone,
    then with the middleware, which leaves the view to the throttle), and with DRF's own
    `AnonRateThrottle` (Django's locmem cache), each answering `GET /` from one address."""
    _django_setup()
    from django.conf import settings
    from django.core.signals import setting_changed
    from django.urls import path
    from rest_framework.response import Response
    from rest_framework.throttling import AnonRateThrottle
    from rest_framework.views import APIView

    from ratesync_middleware.drf import RateSyncThrottle

    class PeerThrottle(AnonRateThrottle):
        rate = scenario.django_rate

    def api_view(throttles: list[Any]) -> Any:
        class Index(APIView):
            throttle_classes = throttles

            def get(self, request: Any) -> Response:
                return Response("ok")

        return Index.as_view()

    variants = {
        "bare": [],
        "ours": [RateSyncThrottle],
        "ours, with the middleware": [RateSyncThrottle],
        "DRF AnonRateThrottle": [PeerThrottle],
    }
    for number, throttles in enumerate(variants.values()):
        urls = types.ModuleType(f"{DJANGO_MODULE}_urls_drf_{scenario.name}_{number}")
        urls.urlpatterns = [path("", api_view(throttles))]  # type: ignore[attr-defined]
        sys.modules[urls.__name__] = urls
    ratesync = ours_config(scenario)
    settings.RATESYNC = ratesync
    # A new configuration for the throttle's own limiter, as override_settings would signal.
    setting_changed.send(sender=type(settings), setting="RATESYNC", value=ratesync, enter=True)
    drivers: dict[str, Driver] = {}
    for number, name in enumerate(variants):
        middleware = [OURS_DJANGO] if name == "ours, with the middleware" else []
        expected = 200 if name == "bare" else scenario.status
        drivers[name] = WsgiDriver(
            _django_handler("wsgi", middleware, ratesync),
            expected,
            _use_urlconf(f"drf_{scenario.name}_{number}"),
        )
    return drivers


@dataclass
class Framework:
    id: str
    title: str
    build: Callable[[Scenario], dict[str, Driver]]
    peer: str | None  # the variant the target compares ours with
    target: float | None  # ours' overhead <= target x the peer's
    notes: list[str] = field(default_factory=list)


FRAMEWORKS = [
    Framework(
        "asgi",
        "Starlette (ASGI)",
        starlette_apps,
        "slowapi ASGI",
        1 / 5,
    ),
    Framework("fastapi", "FastAPI: middleware vs dependency", fastapi_apps, None, None),
    Framework("flask", "Flask (WSGI)", flask_apps, "flask-limiter", 1 / 3),
    Framework("django", "Django (WSGIHandler)", django_wsgi_apps, "django-ratelimit", 1 / 3),
    Framework(
        "django-asgi-sync",
        "Django (ASGIHandler), sync view",
        django_asgi_sync_apps,
        "django-ratelimit",
        None,  # the issue sets no target here: shown for information
    ),
    Framework("drf", "Django REST framework (WSGIHandler)", drf_apps, "DRF AnonRateThrottle", None),
    Framework(
        "django-asgi-async",
        "Django (ASGIHandler), async view",
        django_asgi_async_apps,
        None,
        None,
    ),
]


# -- running ----------------------------------------------------------------------------------


def _call(report: Report, result: Any) -> Any:
    if asyncio.iscoroutine(result):
        return report.loop.run_until_complete(result)
    return result


def make_variant(report: Report, name: str, driver: Driver, seconds: float) -> Variant:
    """A harness variant: calibrated on its warm-up call (rep -1), then `n` requests per rep."""
    state: dict[str, int] = {}

    def timed(n: int) -> tuple[int, int, int]:
        gc.collect()
        cpu = time.process_time_ns()
        elapsed, wrong = _call(report, driver.run(n))
        return elapsed, wrong, time.process_time_ns() - cpu

    def fn(rep: int) -> dict[str, float]:
        if rep < 0 or "n" not in state:
            timed(20)  # first requests: start-up, caches, the exhausting request
            n, elapsed = 10, 0
            while True:
                elapsed, _, _ = timed(n)
                if elapsed >= 0.02e9 or n >= 1_000_000:
                    break
                n *= 3
            state["n"] = max(10, round(n * seconds * 1e9 / elapsed))
            if rep < 0:
                return {}
        n = state["n"]
        elapsed, wrong, cpu = timed(n)
        # cpu_us: process CPU time (all threads) per request, kept in the JSON
        return {
            "us": elapsed / n / 1000.0,
            "cpu_us": cpu / n / 1000.0,
            "wrong": wrong,
            "requests": n,
        }

    return Variant(name, fn)


def add_overhead(table: Table, bare: str = "bare") -> None:
    """Per repetition: a variant's time per request minus the bare app's in the same repetition."""
    base = table.samples.get(bare, [])
    for rows in table.samples.values():
        for rep, row in enumerate(rows):
            if rep < len(base) and "us" in row:
                row["overhead_us"] = row["us"] - base[rep]["us"]


METRICS = [
    Metric("us", "time/request", "us"),
    Metric("us", "time/request", "us", agg="min", ratio=False),
    Metric("overhead_us", "overhead over bare", "us", ratio=False),
    Metric("wrong", "wrong statuses", agg="max", ratio=False),
]


def run_framework(
    report: Report, framework: Framework, scenario: Scenario, reps: int, seconds: float
) -> Table:
    drivers = framework.build(scenario)
    for driver in drivers.values():
        if isinstance(driver, AsgiDriver):
            report.loop.run_until_complete(driver.start())
    # Everything built so far (the apps, the frameworks, this process's modules) is moved out of
    # the collector's sight: the cyclic GC then costs each variant what its own requests leave
    # behind, not a scan of this multi-framework process's heap (a real server has one framework).
    gc.collect()
    gc.freeze()
    variants = [make_variant(report, name, d, seconds) for name, d in drivers.items()]
    table_id = f"{framework.id}-{scenario.name}"
    title = f"{framework.title}: time per request, {scenario.title}"
    # The table is printed by the harness with time/request only; the overhead (paired per
    # repetition) is added afterwards, then the full table is printed and plotted.
    table = report.run(
        table_id,
        title=title,
        variants=variants,
        metrics=[METRICS[0], METRICS[3]],
        baseline="bare",
        reps=reps,
        params={
            "scenario": scenario.name,
            "seconds_per_sample": seconds,
            "client": CLIENT_IP,
        },
        warmup=True,
        verbose=True,
    )
    table.params["requests_per_sample"] = {
        name: rows[0].get("requests") for name, rows in table.samples.items() if rows
    }
    add_overhead(table)
    targets = {}
    if framework.target is not None and framework.peer in table.samples:
        peer = table.medians(framework.peer)["overhead_us"]
        targets["overhead_us"] = (
            peer * framework.target,
            f"target: {framework.target:.2f} x {framework.peer}",
        )
    # Plotted: the median time per request and the overhead (the "min of reps" column shares the
    # key "us", so it is added to the table only after the plot).
    table.metrics = [METRICS[0], METRICS[2]]
    table.plots.append(report.plot(table, ["us", "overhead_us"], targets))
    table.metrics = list(METRICS)
    print("  with the overhead over the bare app, paired by repetition:")
    print(table.text(), flush=True)
    for driver in drivers.values():
        _call(report, driver.close())
    gc.unfreeze()
    return table


# -- targets ----------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    from _harness import percentile

    return percentile(values, q)


def _per_rep_ratios(table: Table, variant: str, peer: str) -> list[float]:
    """Per repetition, `variant`'s overhead over `peer`'s, both paired with the same bare sample:
    measured within a second of each other, so the machine's slow phases cancel out."""
    if variant not in table.samples or peer not in table.samples:
        return []
    return [
        o["overhead_us"] / p["overhead_us"]
        for o, p in zip(table.samples[variant], table.samples[peer], strict=False)
        if p.get("overhead_us", 0) > 0 and "overhead_us" in o
    ]


def target_rows(report: Report) -> list[dict[str, Any]]:
    """One row per framework and scenario with a peer: our overhead against the peer's.

    The verdict uses the median over repetitions of the per-repetition ratio (see
    `_per_rep_ratios`); the ratio of the median overheads and of the minimum times are shown
    beside it.
    """
    rows = []
    by_id = {t.id: t for t in report.tables}
    for framework in FRAMEWORKS:
        if framework.peer is None:
            continue
        for scenario in SCENARIOS.values():
            table = by_id.get(f"{framework.id}-{scenario.name}")
            if table is None or framework.peer not in table.samples or "ours" not in table.samples:
                continue
            medians = {name: table.medians(name) for name in table.samples}
            peer = medians[framework.peer]["overhead_us"]
            bare_min = table.spread("bare", "us")[0]
            peer_min = table.spread(framework.peer, "us")[0] - bare_min
            ours_min = table.spread("ours", "us")[0] - bare_min
            per_rep = _per_rep_ratios(table, "ours", framework.peer)
            no_headers = _per_rep_ratios(table, "ours, no headers", framework.peer)
            main = statistics.median(per_rep) if per_rep else math.nan
            rows.append(
                {
                    "framework": framework.title,
                    "scenario": scenario.name,
                    "peer": framework.peer,
                    "bare_us": medians["bare"]["us"],
                    "ours_overhead_us": medians["ours"]["overhead_us"],
                    "peer_overhead_us": peer,
                    "ratio_per_rep_median": main,
                    "ratio_per_rep_p10_p90": [_quantile(per_rep, 10), _quantile(per_rep, 90)]
                    if per_rep
                    else None,
                    "ratio_of_median_overheads": medians["ours"]["overhead_us"] / peer
                    if peer > 0
                    else math.nan,
                    "ratio_of_minimums": ours_min / peer_min if peer_min > 0 else math.nan,
                    "ratio_no_headers_per_rep_median": statistics.median(no_headers)
                    if no_headers
                    else math.nan,
                    "target": framework.target,
                    "met": None if framework.target is None else main <= framework.target,
                }
            )
    return rows


def _target_text(target: float | None) -> str:
    if target is None:
        return "none (info)"
    return {1 / 5: "<= 0.20", 1 / 3: "<= 0.333"}.get(target, f"<= {target:.3f}")


def targets_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = [
        [
            "framework",
            "scenario",
            "bare (us)",
            "ours: overhead (us)",
            "peer",
            "peer: overhead (us)",
            "ours / peer: median of per-rep ratios",
            "p10-p90 of per-rep ratios",
            "ratio of median overheads",
            "ratio of minimums",
            "ours without headers / peer",
            "target",
            "verdict",
        ]
    ]

    def f(value: float | None, digits: int = 2) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    for row in rows:
        lo_hi = row["ratio_per_rep_p10_p90"]
        out.append(
            [
                row["framework"],
                row["scenario"],
                f(row["bare_us"], 1),
                f(row["ours_overhead_us"], 1),
                row["peer"],
                f(row["peer_overhead_us"], 1),
                f"**{f(row['ratio_per_rep_median'], 3)}**",
                "-" if lo_hi is None else f"{f(lo_hi[0])}-{f(lo_hi[1])}",
                f(row["ratio_of_median_overheads"]),
                f(row["ratio_of_minimums"]),
                f(row["ratio_no_headers_per_rep_median"]),
                _target_text(row["target"]),
                "-" if row["met"] is None else ("**met**" if row["met"] else "**missed**"),
            ]
        )
    return out


def plot_targets(report: Report, rows: list[dict[str, Any]], img_dir: Path) -> str | None:
    """One box per framework and scenario: the per-repetition ratios, with the target."""
    rows = [row for row in rows if row["target"] is not None]
    by_id = {t.id: t for t in report.tables}
    data, labels, targets = [], [], []
    for framework in FRAMEWORKS:
        for row in rows:
            if row["framework"] != framework.title:
                continue
            table = by_id[f"{framework.id}-{row['scenario']}"]
            data.append(_per_rep_ratios(table, "ours", framework.peer or ""))
            labels.append(f"{framework.title}\n{row['scenario']}\nvs {framework.peer}")
            targets.append(row["target"])
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(data)), 4.4))
    ax.boxplot(data, whis=(10, 90), showfliers=False)
    for index, (values, target) in enumerate(zip(data, targets, strict=True), start=1):
        ax.hlines(target, index - 0.4, index + 0.4, colors="#c44e52", linestyles="--")
        median = statistics.median(values)
        ax.annotate(
            f"{median:.3f}",
            (index + 0.1, median),
            fontsize=8,
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
        )
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("our overhead / the peer's overhead")
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(
        "Targets of issue 7: our overhead over the peer's, per repetition"
        " (box: quartiles, whiskers p10-p90);\nred dashes: the target (0.20 ASGI, 0.33 Flask and"
        " Django); lower is better",
        fontsize=9,
    )
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "overhead-targets.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report.extra["targets_plot"] = str(path)
    return f"img/{path.name}" if img_dir == IMG_DIR else str(path)


def _text(rows: list[list[str]]) -> str:
    rows = [[c.replace("**", "") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j < 2 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|---|---|" + "---:|" * (len(rows[0]) - 2)]
    out.extend("| " + " | ".join(r) + " |" for r in rows[1:])
    return "\n".join(out)


# -- profile mode -----------------------------------------------------------------------------


def profile(spec: str, requests: int, top: int, grep: str | None = None) -> None:
    """cProfile `requests` requests of one variant (default: ours); cumulative time per request."""
    framework_id, _, variant = spec.partition("@")
    variant = variant or "ours"
    fw_id, _, scenario_name = framework_id.rpartition("-")
    frameworks = {f.id: f for f in FRAMEWORKS}
    if fw_id not in frameworks or scenario_name not in SCENARIOS:
        raise SystemExit(
            f"--profile wants <framework>-<scenario>[@variant], e.g. asgi-allowed or"
            f" flask-denied@bare; frameworks: {', '.join(frameworks)}"
        )
    framework, scenario = frameworks[fw_id], SCENARIOS[scenario_name]
    drivers = framework.build(scenario)
    driver = drivers[variant]
    loop = asyncio.new_event_loop()

    def call(result: Any) -> Any:
        return loop.run_until_complete(result) if asyncio.iscoroutine(result) else result

    if isinstance(driver, AsgiDriver):
        loop.run_until_complete(driver.start())
    call(driver.run(500))  # warm up (and exhaust the bucket)
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    elapsed, wrong = call(driver.run(requests))
    profiler.disable()
    print(
        f"# {framework.title}, {scenario.title}, variant {variant!r}: {requests} requests under"
        f" cProfile, {elapsed / requests / 1000:.1f} us/request (profiled), wrong statuses {wrong}"
    )
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((cumtime, tottime, ncalls, filename, line, name))
    rows.sort(reverse=True)
    print(f"{'cum us/req':>10} {'own us/req':>10} {'calls/req':>9}  function")
    shown = 0
    for cumtime, tottime, ncalls, filename, line, name in rows:
        if grep and grep not in f"{filename}:{name}":
            continue
        short = filename
        for marker in ("site-packages/", "/work/main/"):
            if marker in short:
                short = short.split(marker, 1)[1]
        print(
            f"{cumtime / requests * 1e6:10.2f} {tottime / requests * 1e6:10.2f}"
            f" {ncalls / requests:9.2f}  {short}:{line}({name})"
        )
        shown += 1
        if shown >= top:
            break
    call(driver.close())
    loop.close()


# -- breakdown mode: our layers timed one by one, no profiler ---------------------------------


def _interleaved(
    components: list[tuple[str, Callable[[], Any]]], rounds: int = 25, batch_s: float = 0.004
) -> list[list[str]]:
    """Every component timed in batches, the components interleaved round after round (this
    machine has slow phases of a second or more); min and median microseconds per call."""
    calibrated: list[tuple[str, Callable[[], Any] | None, int, str]] = []
    for label, fn in components:
        try:
            fn()  # fails here rather than in the loop
            number = 1
            while True:
                start = time.perf_counter_ns()
                for _ in range(number):
                    fn()
                elapsed = time.perf_counter_ns() - start
                if elapsed >= 1e6 or number >= 1_000_000:
                    break
                number *= 4
            calibrated.append((label, fn, max(1, round(number * batch_s * 1e9 / elapsed)), ""))
        except Exception as error:  # the package changes under this bench: say so, keep going
            calibrated.append((label, None, 0, f"n/a ({type(error).__name__}: {error})"[:90]))
    samples: dict[str, list[float]] = {label: [] for label, *_ in calibrated}
    for _ in range(rounds):
        gc.collect()
        for label, fn, number, _error in calibrated:
            if fn is None:
                continue
            start = time.perf_counter_ns()
            for _ in range(number):
                fn()
            samples[label].append((time.perf_counter_ns() - start) / number / 1000.0)
    rows = [["component (one call)", "min us", "median us"]]
    for label, fn, _number, error in calibrated:
        values = samples[label]
        if fn is None or not values:
            rows.append([label, error, ""])
        else:
            rows.append([label, f"{min(values):.2f}", f"{statistics.median(values):.2f}"])
    return rows


def breakdown(scenario_name: str) -> None:
    """Per-call cost of each layer of our request path (ASGI, Flask, Django), min/median of 7."""
    from ratesync_middleware.bucket import Decision, consume
    from ratesync_middleware.keys import group_key
    from ratesync_middleware.sync import run_inline

    scenario = SCENARIOS[scenario_name]
    comps: list[tuple[str, Callable[[], Any]]] = []

    def _component(label: str, build: Callable[[], Callable[[], Any]]) -> None:
        comps.append((label, build()))

    # ASGI: our middleware around a minimal ASGI app (no Starlette), run without an event loop.
    from ratesync_middleware.asgi import RateLimitMiddleware, ScopeFacts

    start_msg = {"type": "http.response.start", "status": 200, "headers": []}
    body_msg = {"type": "http.response.body", "body": b"ok"}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send(start_msg)
        await send(body_msg)

    async def receive() -> dict[str, Any]:
        return HTTP_REQUEST

    async def send(message: dict[str, Any]) -> None:
        return None

    mw = RateLimitMiddleware(inner, config=ours_config(scenario))
    mw_nh = RateLimitMiddleware(inner, config=ours_config(scenario, "none"))
    run_inline(mw.core.startup())
    run_inline(mw_nh.core.startup())

    def call(app: Any) -> Callable[[], Any]:
        def fn() -> None:
            scope = ASGI_SCOPE.copy()
            scope["state"] = {}
            run_inline(app(scope, receive, send))

        return fn

    run_inline(mw(ASGI_SCOPE.copy(), receive, send))  # the exhausting request when denied
    core = mw.core
    plan = mw._plan(ASGI_SCOPE, "GET", "/")
    limiter = core.limiter
    config = limiter.limiter("api")
    store = limiter.store(config.store)
    key = group_key("api", CLIENT_IP)
    decision = run_inline(
        core.abegin(ScopeFacts(ASGI_SCOPE, "/", core.client_address), plan)
    ).decision
    assert decision is not None
    now = time.time_ns()
    tat = now + (0 if scenario.name == "allowed" else 10**15)

    _component("ASGI: minimal app alone", lambda: call(inner))
    _component("ASGI: ours (draft headers) around it", lambda: call(mw))
    _component("ASGI: ours (headers none) around it", lambda: call(mw_nh))
    _component(
        "  RateLimitMiddleware._plan (cached)",
        lambda: lambda: mw._plan(ASGI_SCOPE, "GET", "/"),
    )
    _component(
        "  ScopeFacts(...) + client_ip",
        lambda: lambda: ScopeFacts(ASGI_SCOPE, "/", core.client_address).client_ip,
    )
    _component(
        "  RequestLimiter.begin (whole decision)",
        lambda: lambda: core.begin(ScopeFacts(ASGI_SCOPE, "/", core.client_address), plan),
    )
    _component(
        "    AsyncRateLimiter.hit", lambda: lambda: run_inline(limiter.hit("api", CLIENT_IP))
    )
    _component("      AsyncRateLimiter.resolve", lambda: lambda: limiter.resolve("api", CLIENT_IP))
    _component("        group_key (identity LRU)", lambda: lambda: group_key("api", CLIENT_IP))
    _component(
        "      MemoryStore.hit (coroutine)",
        lambda: lambda: run_inline(store.hit(key, config.policy)),
    )
    _component("      MemoryStore.hit_now", lambda: lambda: store.hit_now(key, config.policy))
    _component("        bucket.consume", lambda: lambda: consume(config.policy, tat, now))
    _component(
        "          Decision(...) (frozen dataclass)",
        lambda: lambda: Decision(True, 1, 1, 0.0, 1.0, "api"),
    )
    _component("  RateLimitHeaders.headers", lambda: lambda: core.responses.headers(decision))
    if not decision.allowed:
        _component("  RateLimitHeaders.denial", lambda: lambda: core.responses.denial(decision))

    # Flask: our hooks inside a pushed request context.
    from flask import Flask

    from ratesync_middleware.flask import EXTENSION, RateLimit

    app = Flask("breakdown")

    @app.get("/")
    def index() -> str:
        return "ok"

    RateLimit(app, config=ours_config(scenario))
    environ = WSGI_ENVIRON.copy()
    environ["wsgi.input"] = io.BytesIO(b"")
    client = app.test_client()
    for _ in range(2):
        client.get("/", environ_base={"REMOTE_ADDR": CLIENT_IP})  # start-up, exhaust
    state = app.extensions[EXTENSION]
    context = app.request_context(environ)
    context.push()
    try:
        context.match_request()
        response = app.make_response("ok")

        def before() -> Callable[[], Any]:
            def fn() -> None:
                with contextlib.suppress(Exception):  # the 429 being raised is the work
                    state.before_request()

            return fn

        _component("Flask: _FlaskState.before_request", before)
        if decision.allowed:
            _component(
                "Flask: _FlaskState.after_request",
                lambda: lambda: state.after_request(response),
            )
            from ratesync_middleware.headers import text_headers

            extra = state.limiter.core.responses.headers(decision)
            _component(
                "  response.headers.extend(text_headers(...))",
                lambda: lambda: app.response_class("ok").headers.extend(text_headers(extra)),
            )
            _component("  (a new Response alone)", lambda: lambda: app.response_class("ok"))
        else:
            from ratesync_middleware.flask import RateLimitExceeded

            denial = state.limiter.core.responses.denial(decision)

            def handled() -> Callable[[], Any]:
                def fn() -> None:
                    try:
                        state.before_request()
                    except Exception as error:
                        app.finalize_request(app.handle_user_exception(error))

                return fn

            _component(
                "  RateLimitExceeded(decision, denial)",
                lambda: lambda: RateLimitExceeded(decision, denial),
            )
            _component("  before_request + Flask's handling of the 429", handled)

            def as_response() -> Callable[[], Any]:
                def fn() -> None:
                    try:
                        state.before_request()
                    except Exception as error:
                        app.finalize_request(error.get_response())  # type: ignore[attr-defined]

                return fn

            # What the same refusal costs when Flask gets a Response rather than an exception
            # (Flask's make_response runs an HTTPException as a WSGI app: Response.force_type).
            _component("  the same, the 429 handed to Flask as a Response", as_response)
    except BaseException:
        context.pop()
        raise

    # Django: the middleware's hooks on a WSGIRequest.
    _django_setup()
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIRequest
    from django.http import HttpResponse

    import ratesync_middleware.django.middleware as dj

    settings.RATESYNC = ours_config(scenario)
    module = sys.modules[DJANGO_MODULE]
    view = sys.modules[f"{DJANGO_MODULE}_urls_plain_sync"].urlpatterns[0].callback
    mw_dj = dj.RateLimitMiddleware(lambda request: HttpResponse("ok"))
    del module

    def request() -> Any:
        env = WSGI_ENVIRON.copy()
        env["wsgi.input"] = io.BytesIO(b"")
        return WSGIRequest(env)

    mw_dj._process_view_sync(request(), view, (), {})
    _component("Django: WSGIRequest(environ) alone", lambda: request)
    _component(
        "Django: WSGIRequest + _process_view_sync",
        lambda: lambda: mw_dj._process_view_sync(request(), view, (), {}),
    )
    limits = mw_dj._current()
    req = request()
    _component("  _Limits.plan", lambda: lambda: limits.plan(req, view))
    dplan = limits.plan(req, view)
    _component("  _Limits.begin", lambda: lambda: limits.begin(req, dplan))
    admission = limits.begin(req, dplan)
    if decision.allowed:
        _component(
            "Django: HttpResponse + _Limits.respond",
            lambda: lambda: limits.respond(HttpResponse("ok"), admission),
        )
        _component("  (an HttpResponse alone)", lambda: lambda: HttpResponse("ok"))
    else:
        _component("  _Limits.denial (the 429)", lambda: lambda: limits.denial(admission))

    try:
        rows = _interleaved(comps)  # the Flask request context stays pushed meanwhile
    finally:
        context.pop()
    print(
        f"# breakdown, {scenario.title}: each layer of our path timed alone, the components"
        " interleaved (25 rounds)"
    )
    print(_text(rows))


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 reps of 0.02 s: a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 51)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per sample (default 0.05)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated framework ids: " + ", ".join(f.id for f in FRAMEWORKS),
    )
    parser.add_argument(
        "--profile",
        metavar="FRAMEWORK-SCENARIO[@VARIANT]",
        help="cProfile one variant (default ours) instead of the tables, e.g. asgi-allowed",
    )
    parser.add_argument("--profile-requests", type=int, default=20_000)
    parser.add_argument(
        "--breakdown",
        choices=sorted(SCENARIOS),
        help="time each layer of our path alone (ASGI, Flask, Django) instead of the tables",
    )
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--grep", default=None, help="profile: show only functions whose file:name contains this"
    )
    args = parser.parse_args(argv)

    warnings.simplefilter("ignore", DeprecationWarning)

    if args.breakdown:
        breakdown(args.breakdown)
        return 0
    if args.profile:
        profile(args.profile, args.profile_requests, args.top, args.grep)
        return 0

    reps = args.reps or (5 if args.quick else 51)
    seconds = args.seconds or (0.02 if args.quick else 0.05)
    only = set(args.only.split(",")) if args.only else None
    partial = bool(args.quick or args.only or args.reps or args.seconds)
    # Only the documented run writes bench/results/overhead.* and docs/img/overhead-*.png.
    out_dir = RESULTS_DIR / "partial" if partial else RESULTS_DIR
    report = Report(
        "overhead",
        argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        packages=PACKAGES,
        results_dir=out_dir,
        img_dir=out_dir if partial else IMG_DIR,
    )
    print(report.header(), flush=True)
    started = time.perf_counter()
    for framework in FRAMEWORKS:
        if only is not None and framework.id not in only:
            continue
        for scenario in SCENARIOS.values():
            print(f"\n# {framework.title}, {scenario.title}", flush=True)
            run_framework(report, framework, scenario, reps, seconds)

    rows = target_rows(report)
    table = targets_table(rows)
    print("\n== Targets of issue 7 (our overhead / the peer's, paired per repetition) ==")
    print(_text(table))
    report.extra["targets"] = rows
    report.extra["elapsed_s"] = round(time.perf_counter() - started, 1)
    figure = plot_targets(report, rows, out_dir if partial else IMG_DIR)
    path = report.save()
    md = out_dir / "overhead.md"
    md.write_text(
        md.read_text()
        + "\n#### Targets of issue 7 (our overhead / the peer's, paired per repetition)\n\n"
        + _markdown(table)
        + "\n\n"
        + (f"![Targets of issue 7]({figure})\n" if figure else "")
    )
    print(f"total {time.perf_counter() - started:.0f} s; {path.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
