"""The Django middleware under Django's test clients and its WSGI and ASGI handlers.

Most behaviour is checked on four sites serving the same project (tests/django_project): the test
`Client`, the `AsyncClient`, `WSGIHandler` and `ASGIHandler` (both through httpx). Settings are
configured once for the module; tests change them with `override_settings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import django
import httpx
import pytest
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import AsyncClient, Client, override_settings

from ratesync_middleware.django import RateLimitMiddleware

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "django"

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute"},
        "search": {"rate_per_second": 0.01, "burst": 3},
    },
    "middleware": {"default": "api"},
}

SESSION = "django.contrib.sessions.middleware.SessionMiddleware"
AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
CSRF = "django.middleware.csrf.CsrfViewMiddleware"
RATESYNC = "ratesync_middleware.django.RateLimitMiddleware"
SHORT_CIRCUIT = "tests.django_project.middleware.ShortCircuit"

PROJECT: dict[str, Any] = {
    "ALLOWED_HOSTS": ["*"],
    "ROOT_URLCONF": "tests.django_project.urls",
    "MIDDLEWARE": [SESSION, AUTH, RATESYNC],
    "RATESYNC": CONFIG,
}


@pytest.fixture(scope="module", autouse=True)
def django_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Configure Django once for the process; this module's settings on top of it."""
    if not settings.configured:
        settings.configure(
            SECRET_KEY="tests-only",
            INSTALLED_APPS=[
                "django.contrib.contenttypes",
                "django.contrib.auth",
                "django.contrib.sessions",
                "rest_framework",
                "rest_framework.authtoken",
                "ratesync_middleware.django",
            ],
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
                }
            },
            TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
            PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
            USE_TZ=True,
            # Read when DRF is first imported (APIView binds its defaults then): tests/test_drf.py
            REST_FRAMEWORK={
                "DEFAULT_AUTHENTICATION_CLASSES": [
                    "rest_framework.authentication.TokenAuthentication",
                ],
                "DEFAULT_THROTTLE_CLASSES": ["ratesync_middleware.drf.RateSyncThrottle"],
            },
            **PROJECT,
        )
        django.setup()
    with override_settings(**PROJECT):
        yield


@pytest.fixture(scope="module")
def database(django_project: None) -> None:
    """The auth and session tables, for the tests that log users in."""
    call_command("migrate", verbosity=0, interactive=False)


def for_the_project(ratesync: dict[str, Any]) -> dict[str, Any]:
    """`ratesync` plus the limiters the project's views name (`@limit("login")`, ...) where it
    has none: the middleware checks every mark at start-up, as `manage.py check` does."""
    return {**ratesync, "limiters": {**CONFIG["limiters"], **ratesync.get("limiters", {})}}


def with_config(**changes: Any) -> dict[str, Any]:
    """CONFIG with some tables changed: `limiters={...}` merges, `routes=[...]` replaces."""
    merged = copy.deepcopy(CONFIG)
    for section, values in changes.items():
        if isinstance(values, dict):
            for name, value in values.items():
                merged.setdefault(section, {})[name] = value
        else:
            merged[section] = values
    return merged


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- four ways to serve the project --------------------------------------------------------


class Response(Protocol):
    """What Django's test responses and httpx responses have in common."""

    status_code: int
    headers: Any

    def json(self) -> Any: ...


def middleware_of(handler: Any) -> RateLimitMiddleware | None:
    """The RateLimitMiddleware instance in a handler's middleware chain (to close its stores)."""
    link = getattr(handler, "_middleware_chain", None)
    for _ in range(64):
        if link is None or isinstance(link, RateLimitMiddleware):
            return link
        link = next(
            (
                getattr(link, name)
                for name in ("__wrapped__", "get_response", "func", "awaitable")
                if hasattr(link, name)
            ),
            None,
        )
    return None


T = TypeVar("T")


class Site:
    """One way to serve the project; the handler is built at the first request, so that the
    settings of the test (override_settings) apply."""

    name = ""
    remote_addresses = True  # can a request come from another address than 127.0.0.1?

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run on this site's own event loop, which lives as long as the site (like a server's)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        remote_addr: str = "127.0.0.1",
    ) -> Response:
        raise NotImplementedError

    def get(self, path: str = "/", **options: Any) -> Response:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> Response:
        return self.request("POST", path, **options)

    def statuses(
        self, count: int, path: str = "/", method: str = "GET", **options: Any
    ) -> list[int]:
        return [self.request(method, path, **options).status_code for _ in range(count)]

    def middleware(self) -> RateLimitMiddleware | None:
        raise NotImplementedError

    def close(self) -> None:
        middleware = self.middleware()
        if middleware is not None:
            if middleware.async_mode:
                self.run(middleware.aclose())
            else:
                middleware.close()
        if self._loop is not None:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()


class ClientSite(Site):
    """django.test.Client: the handler of the test client, synchronous like WSGI."""

    name = "client"

    def __init__(self) -> None:
        super().__init__()
        self.client = Client()

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        remote_addr: str = "127.0.0.1",
    ) -> Response:
        return self.client.generic(method, path, headers=headers, REMOTE_ADDR=remote_addr)  # type: ignore[no-any-return]

    def middleware(self) -> RateLimitMiddleware | None:
        return middleware_of(self.client.handler)


class AsyncClientSite(Site):
    """django.test.AsyncClient: the asynchronous handler of the test client, like ASGI."""

    name = "async_client"
    remote_addresses = False  # its scope's client is always 127.0.0.1

    def __init__(self) -> None:
        super().__init__()
        self.client = AsyncClient()

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        remote_addr: str = "127.0.0.1",
    ) -> Response:
        assert remote_addr == "127.0.0.1", "AsyncClient requests come from 127.0.0.1"
        return self.run(self.client.generic(method, path, headers=headers))  # type: ignore[no-any-return]

    def middleware(self) -> RateLimitMiddleware | None:
        return middleware_of(self.client.handler)


class WSGISite(Site):
    """Django's WSGIHandler, as gunicorn or runserver would call it (through httpx)."""

    name = "wsgi"

    def __init__(self) -> None:
        super().__init__()
        self.handler: WSGIHandler | None = None
        self.clients: dict[str, httpx.Client] = {}

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        remote_addr: str = "127.0.0.1",
    ) -> Response:
        if self.handler is None:
            self.handler = WSGIHandler()
        client = self.clients.get(remote_addr)
        if client is None:
            transport = httpx.WSGITransport(app=self.handler, remote_addr=remote_addr)
            client = self.clients[remote_addr] = httpx.Client(
                transport=transport, base_url="http://testserver"
            )
        return client.request(method, path, headers=headers)

    def middleware(self) -> RateLimitMiddleware | None:
        return middleware_of(self.handler)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        super().close()


class ASGISite(Site):
    """Django's ASGIHandler, as uvicorn would call it (through httpx), on one event loop."""

    name = "asgi"

    def __init__(self) -> None:
        super().__init__()
        self.handler: ASGIHandler | None = None
        self.clients: dict[str, httpx.AsyncClient] = {}

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        remote_addr: str = "127.0.0.1",
    ) -> Response:
        if self.handler is None:
            self.handler = ASGIHandler()
        client = self.clients.get(remote_addr)
        if client is None:
            transport = httpx.ASGITransport(app=self.handler, client=(remote_addr, 50000))
            client = self.clients[remote_addr] = httpx.AsyncClient(
                transport=transport, base_url="http://testserver"
            )
        return self.run(client.request(method, path, headers=headers))

    def middleware(self) -> RateLimitMiddleware | None:
        return middleware_of(self.handler)

    def close(self) -> None:
        for client in self.clients.values():
            self.run(client.aclose())
        super().close()


SITES: dict[str, Callable[[], Site]] = {
    "client": ClientSite,
    "async_client": AsyncClientSite,
    "wsgi": WSGISite,
    "asgi": ASGISite,
}


@pytest.fixture(params=list(SITES))
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    served = SITES[request.param]()
    yield served
    served.close()


@pytest.fixture(params=["client", "wsgi", "asgi"])
def addressed_site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """The sites that can send from any client address (AsyncClient always uses 127.0.0.1)."""
    served = SITES[request.param]()
    assert served.remote_addresses
    yield served
    served.close()


@pytest.fixture(params=["client", "asgi"])
def sync_and_async_site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """One synchronous and one asynchronous site, for what does not depend on the handler."""
    served = SITES[request.param]()
    yield served
    served.close()


# --- the basic contract --------------------------------------------------------------------


def test_burst_then_429_with_retry_after(site: Site) -> None:
    assert site.statuses(5) == [200] * 5
    refused = site.get("/")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json() == {
        "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Rate limit 'api' exceeded.",
        "violated-policies": ["api"],
    }
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'


def test_rate_limit_headers_on_allowed_responses(site: Site) -> None:
    first, second = site.get("/"), site.get("/")

    assert first.headers["RateLimit-Policy"] == '"api";q=5;w=500'
    assert first.headers["RateLimit"] == '"api";r=4;t=100'
    assert second.headers["RateLimit"] == '"api";r=3;t=200'


def test_async_views_are_limited_too(site: Site) -> None:
    assert site.statuses(6, "/async") == [200] * 5 + [429]


def test_limit_decorator_uses_its_own_limiter(site: Site) -> None:
    logged_in = site.post("/login")

    assert logged_in.headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert site.statuses(2, "/login", "POST") == [200, 429]
    assert site.statuses(2, "/api/v1/login", "POST") == [429, 429]  # same view, same bucket
    assert site.get("/").headers["RateLimit"] == '"api";r=4;t=100'  # the default is untouched


def test_exempt_view_is_never_limited_and_gets_no_headers(site: Site) -> None:
    assert site.statuses(20, "/health") == [200] * 20
    assert "RateLimit" not in site.get("/health").headers


def test_several_limiters_on_one_view_all_must_allow(site: Site) -> None:
    responses = [site.get("/busy") for _ in range(4)]

    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert responses[0].headers["RateLimit"] == '"search";r=2;t=100'  # the most restrictive
    assert responses[3].json()["violated-policies"] == ["search"]


def test_class_based_views(site: Site) -> None:
    def policy(path: str, method: str = "GET") -> str:
        return str(site.request(method, path).headers["RateLimit-Policy"]).split(";")[0]

    assert policy("/cbv/class") == '"search"'  # @limit on the class
    assert policy("/cbv/dispatch") == '"search"'  # method_decorator(..., name="dispatch")
    assert policy("/cbv/as-view") == '"search"'  # limit(...)(View.as_view()) in the URLconf
    assert policy("/cbv/account") == '"api"'
    assert policy("/cbv/account", "POST") == '"login"'  # method_decorator on post()
    assert site.statuses(10, "/cbv/status") == [200] * 10  # @exempt on the class


def test_head_is_limited_like_get(sync_and_async_site: Site) -> None:
    assert sync_and_async_site.statuses(4, "/cbv/class", "HEAD") == [200, 200, 200, 429]


# --- every request counted once --------------------------------------------------------------


def test_requests_that_reach_no_view_are_counted_once_by_the_default(site: Site) -> None:
    assert site.statuses(2, "/") == [200, 200]
    assert site.statuses(3, "/nowhere") == [404] * 3
    refused = site.get("/nowhere")

    assert refused.status_code == 429  # the sixth request: the 404s spent one unit each
    assert refused.headers["Retry-After"] == "100"
    assert site.get("/").status_code == 429


def test_a_response_from_a_later_middleware_is_counted_and_can_be_refused() -> None:
    # ShortCircuit is sync-only: under ASGI our middleware runs in its sync mode here.
    with override_settings(MIDDLEWARE=[RATESYNC, SHORT_CIRCUIT]):
        for served in (ClientSite(), ASGISite()):
            answered = [served.get("/short") for _ in range(6)]
            served.close()

            assert [r.status_code for r in answered] == [200] * 5 + [429]
            assert answered[0].headers["RateLimit"] == '"api";r=4;t=100'


def test_a_refusal_by_an_earlier_process_view_is_counted_by_its_view() -> None:
    # CSRF's process_view runs first and answers 403: our process_view never sees the
    # request, but the view is known, so its own limiter (login) counts it.
    with override_settings(MIDDLEWARE=[SESSION, CSRF, RATESYNC]):
        client = Client(enforce_csrf_checks=True)
        statuses = [client.post("/login").status_code for _ in range(3)]

    assert statuses == [403, 403, 429]


def test_route_rules_apply_to_requests_that_reach_no_view() -> None:
    config = with_config(routes=[{"path": "/gone/*", "exempt": True}])
    with override_settings(RATESYNC=config):
        client = Client()
        assert [client.get("/gone/x").status_code for _ in range(10)] == [404] * 10
        assert "RateLimit" not in client.get("/gone/x").headers


# --- route rules and precedence ------------------------------------------------------------


def test_precedence_decorator_over_route_rule_over_default(site: Site) -> None:
    config = with_config(
        routes=[
            {"path": "/login", "limiters": ["search"]},  # the decorator wins: still "login"
            {"path": "/health", "limiters": ["search"]},  # @exempt wins
            {"path": "/ruled/*", "limiters": ["search"]},
        ]
    )
    with override_settings(RATESYNC=config):
        assert site.post("/login").headers["RateLimit-Policy"].startswith('"login"')
        assert "RateLimit" not in site.get("/health").headers
        assert site.get("/ruled/a/b").headers["RateLimit-Policy"].startswith('"search"')
        assert site.get("/").headers["RateLimit-Policy"].startswith('"api"')


def test_route_rule_methods_and_exemption(sync_and_async_site: Site) -> None:
    config = with_config(
        routes=[
            {"path": "/", "methods": ["POST"], "limiters": ["search"]},
            {"path": "/free/*", "exempt": True},
        ]
    )
    with override_settings(RATESYNC=config):
        site = sync_and_async_site
        assert site.post("/").headers["RateLimit-Policy"].startswith('"search"')
        assert site.get("/").headers["RateLimit-Policy"].startswith('"api"')
        assert site.statuses(10, "/free/x") == [200] * 10


# --- costs and exemptions of the request (issue 14) ----------------------------------------


def test_a_cost_function_and_exempt_when_receive_the_httprequest(site: Site) -> None:
    from django.http import HttpRequest

    from tests import request_functions

    api = {
        "limit": 10,
        "window_seconds": 86400,
        "cost": "tests.request_functions:units",
        "exempt_when": "tests.request_functions:internal",
    }
    request_functions.SEEN.clear()
    with override_settings(RATESYNC=with_config(limiters={"api": api})):
        first = site.get("/", headers={"X-Units": "6"})
        assert first.status_code == 200
        assert first.headers["RateLimit"].startswith('"api";r=4;')  # 10 - 6
        assert site.statuses(3, headers={"X-Internal": "yes"}) == [200] * 3
        assert site.get("/", headers={"X-Units": "5"}).status_code == 429
    assert request_functions.SEEN
    assert all(issubclass(kind, HttpRequest) for kind in request_functions.SEEN)


def test_a_failing_cost_function_is_answered_by_the_fail_rule(site: Site) -> None:
    broken = {"rate_per_second": 0.01, "burst": 5, "cost": "tests.request_functions:broken"}
    with override_settings(RATESYNC=with_config(limiters={"api": broken})):
        assert site.statuses(3) == [200] * 3
    with override_settings(RATESYNC=with_config(limiters={"api": {**broken, "fail_closed": True}})):
        assert site.statuses(2) == [503] * 2


def test_a_raising_key_function_is_answered_by_the_fail_rule(site: Site) -> None:
    broken = {"rate_per_second": 0.01, "burst": 5, "key": "tests.request_functions:broken"}
    with override_settings(RATESYNC=with_config(limiters={"api": broken})):
        assert site.statuses(3) == [200] * 3
    with override_settings(RATESYNC=with_config(limiters={"api": {**broken, "fail_closed": True}})):
        assert site.statuses(2) == [503] * 2


def test_a_shadow_limiter_refuses_nothing_and_sends_no_headers(site: Site) -> None:
    shadow = {"rate_per_second": 0.01, "burst": 2, "mode": "shadow"}
    with override_settings(RATESYNC=with_config(limiters={"api": shadow})):
        responses = [site.get("/") for _ in range(4)]
    assert [response.status_code for response in responses] == [200] * 4
    assert not any("RateLimit" in response.headers for response in responses)


# --- settle_header and count_status (issue 14) ------------------------------------------------


def settling_config(store: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stories of tests/test_settle.py on this project's /signin and /complete views."""
    from tests.test_settle import LLM, LOGIN

    changes: dict[str, Any] = {
        "limiters": {"signin": dict(LOGIN), "llm": dict(LLM)},
        "routes": [
            {"path": "/signin*", "limiters": ["signin"]},
            {"path": "/complete*", "limiters": ["llm"]},
        ],
    }
    if store is not None:  # a generous deadline: the counts are exact, on a loaded machine too
        changes["stores"] = {"shared": {**store, "timeout": 2.0}}
        changes["limiters"] = {
            name: {**limiter, "store": "shared"}
            for name, limiter in {**CONFIG["limiters"], **changes["limiters"]}.items()
        }
    return with_config(**changes)


def poster(site: Site, suffix: str) -> Any:
    """`post(path, headers)` of tests/test_settle.py, on the sync or async views."""

    def post(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        path = {"/login": "/signin", "/complete": "/complete"}[path] + suffix
        response = site.post(path, headers=headers)
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}

    return post


@pytest.mark.parametrize("suffix", ["", "-async"])
def test_failed_logins_and_llm_tokens_are_charged_what_the_response_says(
    site: Site, suffix: str
) -> None:
    from tests.test_settle import llm_story, login_story

    with override_settings(RATESYNC=settling_config()):
        login_story(poster(site, suffix))
        llm_story(poster(site, suffix))


@pytest.mark.nats
def test_failed_logins_and_llm_tokens_on_nats(site: Site, nats_store: dict[str, Any]) -> None:
    from tests.test_settle import llm_story, login_story

    with override_settings(RATESYNC=settling_config(nats_store)):
        login_story(poster(site, ""))
        llm_story(poster(site, "-async"))


# --- keys ----------------------------------------------------------------------------------


def test_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key(
    addressed_site: Site,
) -> None:
    site = addressed_site
    with override_settings(RATESYNC=with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]})):
        spoofed = [
            site.get(
                "/", remote_addr="203.0.113.7", headers={"X-Forwarded-For": f"198.51.100.{n}"}
            ).status_code
            for n in range(6)
        ]
        assert spoofed == [200] * 5 + [429]
        assert site.get("/", remote_addr="203.0.113.8").status_code == 200


def test_forwarded_for_from_a_trusted_proxy_separates_clients(addressed_site: Site) -> None:
    site = addressed_site
    with override_settings(RATESYNC=with_config(middleware={"trusted_proxies": ["10.0.0.0/8"]})):
        via_proxy = {"remote_addr": "10.0.0.2"}
        first = site.statuses(6, headers={"X-Forwarded-For": "198.51.100.1"}, **via_proxy)
        second = site.statuses(1, headers={"X-Forwarded-For": "198.51.100.2"}, **via_proxy)

    assert first == [200] * 5 + [429]
    assert second == [200]


def test_header_path_and_function_keys(sync_and_async_site: Site) -> None:
    config = with_config(
        limiters={
            "api": {"rate_per_second": 0.01, "burst": 1, "key": "header:X-API-Key"},
            "search": {"rate_per_second": 0.01, "burst": 1, "key": "path"},
            "tenant": {
                "rate_per_second": 0.01,
                "burst": 1,
                "key": "tests.django_project.keys:tenant",
            },
        },
        routes=[
            {"path": "/ruled/*", "limiters": ["search"]},
            {"path": "/free/*", "limiters": ["tenant"]},
        ],
    )
    with override_settings(RATESYNC=config):
        site = sync_and_async_site
        assert site.statuses(2, headers={"X-API-Key": "k1"}) == [200, 429]
        assert site.statuses(1, headers={"X-API-Key": "k2"}) == [200]
        assert site.statuses(2, "/ruled/1") == [200, 429]
        assert site.statuses(1, "/ruled/2") == [200]
        assert site.statuses(2, "/free/x?tenant=acme") == [200, 429]
        assert site.statuses(1, "/free/x?tenant=umbrella") == [200]


def test_under_asgi_the_limiter_runs_on_the_servers_event_loop() -> None:
    from tests.django_project import keys

    witness = {
        "rate_per_second": 0.01,
        "burst": 5,
        "key": "tests.django_project.keys:thread_witness",
    }
    keys.seen_threads.clear()
    with override_settings(RATESYNC=with_config(limiters={"api": witness})):
        site = ASGISite()  # its event loop runs in this thread, as uvicorn's runs in its own
        try:
            assert site.get("/").status_code == 200  # a sync view: Django runs it in a thread
            assert site.get("/async").status_code == 200
            assert site.get("/nowhere").status_code == 404
        finally:
            site.close()

    loop_thread = threading.get_ident()
    assert keys.seen_threads == [loop_thread, loop_thread, loop_thread]


USER_KEYED = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 2, "key": "user"}})


@override_settings(RATESYNC=USER_KEYED)
def test_user_key_uses_the_logged_in_users_pk(database: None) -> None:
    from django.contrib.auth.models import User

    ada = User.objects.create_user("ada-sync")
    bob = User.objects.create_user("bob-sync")
    client = Client()
    client.force_login(ada)
    assert [client.get("/whoami").status_code for _ in range(3)] == [200, 200, 429]
    client.force_login(bob)
    assert [client.get("/whoami").status_code for _ in range(2)] == [200, 200]
    client.logout()
    assert [client.get("/whoami").status_code for _ in range(3)] == [200, 200, 429]  # by IP


@override_settings(RATESYNC=USER_KEYED)
async def test_user_key_under_asgi_reads_the_user_with_auser(database: None) -> None:
    from django.contrib.auth.models import User

    ada = await User.objects.acreate(username="ada-async")
    bob = await User.objects.acreate(username="bob-async")
    client = AsyncClient()
    await client.aforce_login(ada)
    assert [(await client.get("/whoami")).status_code for _ in range(3)] == [200, 200, 429]
    await client.aforce_login(bob)
    assert [(await client.get("/whoami")).status_code for _ in range(2)] == [200, 200]
    await client.alogout()
    assert [(await client.get("/whoami")).status_code for _ in range(3)] == [200, 200, 429]


def test_user_key_without_auth_middleware_falls_back_to_the_ip() -> None:
    with override_settings(MIDDLEWARE=[RATESYNC], RATESYNC=USER_KEYED):
        for served in (ClientSite(), AsyncClientSite()):
            assert served.statuses(3, "/whoami") == [200, 200, 429]
            served.close()


# --- responses -----------------------------------------------------------------------------


def test_custom_refusal_view_gets_retry_after_and_headers(site: Site) -> None:
    with override_settings(RATESYNC={**CONFIG, "view": "tests.django_project.views.too_many"}):
        refused = [site.get("/") for _ in range(6)][-1]
        refused_404 = site.get("/nowhere")  # refused after the fact, by the same view

    assert refused.status_code == 429
    assert refused.json() == {"error": "slow down", "path": "/", "limiter": "api"}
    assert refused.headers["Retry-After"] == "100"
    assert refused.headers["RateLimit"] == '"api";r=0;t=100'
    assert refused_404.status_code == 429
    assert refused_404.json()["path"] == "/nowhere"


def test_async_refusal_view(sync_and_async_site: Site) -> None:
    with override_settings(
        RATESYNC={**CONFIG, "view": "tests.django_project.views.too_many_async"}
    ):
        refused = [sync_and_async_site.post("/login") for _ in range(3)][-1]

    assert refused.status_code == 429
    assert refused.content == b"slow down (login)"  # type: ignore[attr-defined]
    assert refused.headers["Retry-After"] == "30"


def test_refusal_view_keeps_its_own_retry_after(sync_and_async_site: Site) -> None:
    view = "tests.django_project.views.too_many_come_back_tomorrow"
    with override_settings(RATESYNC={**CONFIG, "view": view}):
        refused = [sync_and_async_site.get("/") for _ in range(6)][-1]

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "86400"


def test_refusal_view_may_return_a_template_response(sync_and_async_site: Site) -> None:
    view = "tests.django_project.views.too_many_template"
    with override_settings(RATESYNC={**CONFIG, "view": view}):
        refused = [sync_and_async_site.get("/") for _ in range(6)][-1]
        refused_404 = sync_and_async_site.get("/nowhere")

    for response in (refused, refused_404):
        assert response.status_code == 429
        assert response.content == b"wait 100 s for api"  # type: ignore[attr-defined]
        assert response.headers["Retry-After"] == "100"


@pytest.mark.parametrize("mode", ["draft", "legacy", "none"])
def test_header_modes(mode: str) -> None:
    with override_settings(RATESYNC=with_config(middleware={"headers": mode})):
        client = Client()
        allowed = [client.get("/") for _ in range(5)][-1]
        refused = client.get("/")

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    names = {
        "draft": {"ratelimit", "ratelimit-policy"},
        "legacy": {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"},
        "none": set(),
    }[mode]
    for response in (allowed, refused):
        assert {name.lower() for name in response.headers if "ratelimit" in name.lower()} == names


def dead_nats(fail_closed: bool) -> dict[str, Any]:
    return for_the_project(
        {
            "stores": {
                "main": {
                    "engine": "nats",
                    "url": f"nats://127.0.0.1:{closed_port()}",
                    "connect_timeout": 0.2,
                    "timeout": 0.1,
                }
            },
            "limiters": {"api": {"rate_per_second": 1.0, "burst": 5, "fail_closed": fail_closed}},
            "middleware": {"default": "api"},
        }
    )


def test_fail_closed_answers_503_when_nats_is_unreachable(site: Site) -> None:
    with override_settings(RATESYNC=dead_nats(fail_closed=True)):
        started = time.monotonic()
        refused = [site.get("/") for _ in range(3)]
        elapsed = time.monotonic() - started

    assert [r.status_code for r in refused] == [503] * 3
    assert refused[0].headers["Retry-After"] == "1"  # the store's back-off
    assert refused[0].headers["Content-Type"] == "application/problem+json"
    assert refused[0].json()["title"] == "Service Unavailable"
    assert elapsed < 2.0  # one bounded connect attempt, then the back-off answers at once


def test_fail_open_lets_requests_through_without_headers(sync_and_async_site: Site) -> None:
    with override_settings(RATESYNC=dead_nats(fail_closed=False)):
        responses = [sync_and_async_site.get("/") for _ in range(3)]

    assert [r.status_code for r in responses] == [200] * 3
    assert "RateLimit" not in responses[0].headers


def test_refusals_stay_out_of_the_django_request_log(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="django.request")

    statuses = [site.get("/nowhere").status_code, *site.statuses(5)]
    statuses.append(site.get("/nowhere").status_code)
    with override_settings(RATESYNC={**CONFIG, "view": "tests.django_project.views.too_many"}):
        statuses += site.statuses(6)
    with override_settings(RATESYNC=dead_nats(fail_closed=True)):
        statuses += site.statuses(1)

    assert statuses == [404, 200, 200, 200, 200, 429, 429] + [200] * 5 + [429, 503]
    logged = [r.getMessage() for r in caplog.records if r.name == "django.request"]
    assert logged == ["Not Found: /nowhere"]  # Django's own 404, not the refusals


def test_refusal_view_sees_a_degraded_decision() -> None:
    view = "tests.django_project.views.unavailable_or_too_many"
    with override_settings(RATESYNC={**dead_nats(fail_closed=True), "view": view}):
        response = Client().get("/")

    assert response.status_code == 503
    assert response.content == b"cannot tell"
    assert response.headers["Retry-After"] == "1"


# --- settings ------------------------------------------------------------------------------


def test_a_changed_setting_applies_to_running_middleware(site: Site) -> None:
    assert site.get("/").headers["RateLimit-Policy"] == '"api";q=5;w=500'  # middleware built
    tighter = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 1}})
    with override_settings(RATESYNC=tighter):
        assert site.statuses(2) == [200, 429]
    assert site.get("/").headers["RateLimit-Policy"] == '"api";q=5;w=500'  # and back


def test_disabled_passes_everything_through(sync_and_async_site: Site) -> None:
    with override_settings(RATESYNC={**CONFIG, "enabled": False}):
        assert sync_and_async_site.statuses(10) == [200] * 10
        assert "RateLimit" not in sync_and_async_site.get("/").headers


TOML = """
[limiters.api]
rate_per_second = 0.01
burst = 2

[limiters.login]
limit = "2/minute"

[limiters.search]
limit = "3/minute"

[middleware]
default = "api"
"""


def test_config_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "rate-sync.toml"
    path.write_text(TOML)
    for config in (path, str(path)):
        with override_settings(RATESYNC={"config": config}):
            client = Client()
            assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]


def test_without_ratesync_the_config_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rate-sync.toml").write_text(TOML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    with override_settings():
        del settings.RATESYNC
        client = Client()
        assert [client.get("/").status_code for _ in range(3)] == [200, 200, 429]


def test_nothing_to_discover_limits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    with override_settings(
        RATESYNC={"view": "tests.django_project.views.too_many"},
        ROOT_URLCONF="tests.django_project.plain_urls",  # no view names a limiter
    ):
        client = Client()
        assert [client.get("/").status_code for _ in range(20)] == [200] * 20
        assert "RateLimit" not in client.get("/").headers


@pytest.mark.parametrize(
    ("ratesync", "message"),
    [
        ({"config": "/nonexistent/rate-sync.toml"}, "no such file"),
        (with_config(limiters={"api": {"rate_per_second": "10"}}), "rate_per_second"),
        ({**CONFIG, "view": "tests.django_project.views.nope"}, "cannot import"),
        ({"confg": "rate-sync.toml"}, "did you mean 'config'"),
    ],
)
def test_a_bad_setting_fails_when_the_middleware_loads(ratesync: Any, message: str) -> None:
    with override_settings(RATESYNC=ratesync), pytest.raises(ImproperlyConfigured, match=message):
        WSGIHandler()


# --- system checks -------------------------------------------------------------------------


def ratesync_check_ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        messages = checks.run_checks(tags=["ratesync"])
    return [message.id for message in messages if message.id.startswith("ratesync.")]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("ratesync", "check_id"),
    [
        (["not", "a", "dict"], "ratesync.E001"),
        ({"confg": "rate-sync.toml"}, "ratesync.E001"),
        ({"config": "a.toml", "limiters": {}}, "ratesync.E001"),
        ({"enabled": "yes"}, "ratesync.E001"),
        ({"config": "/nonexistent/rate-sync.toml"}, "ratesync.E002"),
        ({"config": "{tmp}/broken.toml"}, "ratesync.E003"),
        (with_config(limiters={"api": {"rate_per_second": 1.0, "brust": 5}}), "ratesync.E004"),
        (with_config(limiters={"api": {"rate_per_second": "10"}}), "ratesync.E005"),
        (
            {"stores": {"main": {"engine": "nats", "auto_create": "false", "url": "nats://x"}}},
            "ratesync.E005",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": 1.0, "store": "redis"}}),
            "ratesync.E006",
        ),
        (with_config(middleware={"default": "apii"}), "ratesync.E006"),
        ({"stores": {"main": {"engine": "nats"}}}, "ratesync.E007"),
        ({"stores": {"main": {"url": "${RATESYNC_TEST_UNSET_VARIABLE}"}}}, "ratesync.E008"),
        (with_config(limiters={"api": {"burst": 5}}), "ratesync.E009"),
        ({**CONFIG, "view": "tests.django_project.views.nope"}, "ratesync.E010"),
        ({**CONFIG, "view": "tests.django_project.urls.urlpatterns"}, "ratesync.E010"),
        (
            with_config(limiters={"api": {"rate_per_second": 1.0, "key": "tests.nowhere:key"}}),
            "ratesync.E011",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": 1.0, "max_retries": 3}}),
            "ratesync.W002",
        ),
    ],
)
def test_checks_report_a_bad_configuration(ratesync: Any, check_id: str, tmp_path: Path) -> None:
    write(tmp_path / "broken.toml", "[limiters.api\nrate = ")
    if isinstance(ratesync, dict) and isinstance(ratesync.get("config"), str):
        ratesync = {**ratesync, "config": ratesync["config"].format(tmp=tmp_path)}

    ids = ratesync_check_ids(RATESYNC=ratesync)

    assert check_id in ids


def test_check_messages_name_the_problem_and_give_a_hint() -> None:
    with override_settings(RATESYNC={"stores": {"main": {"engine": "nats"}}}):
        [error] = [m for m in checks.run_checks(tags=["ratesync"]) if m.id == "ratesync.E007"]

    assert isinstance(error, checks.Error)
    assert "[stores.main] url" in error.msg
    assert "nats://localhost:4222" in error.hint


def test_a_good_configuration_passes_the_checks() -> None:
    assert ratesync_check_ids() == []


def test_a_disabled_configuration_is_not_checked() -> None:
    assert ratesync_check_ids(RATESYNC={"config": "/nonexistent.toml", "enabled": False}) == []


def test_checks_warn_about_a_missing_middleware_and_a_user_key_without_auth() -> None:
    assert ratesync_check_ids(MIDDLEWARE=[SESSION, AUTH]) == ["ratesync.W001"]
    assert ratesync_check_ids(MIDDLEWARE=[RATESYNC], RATESYNC=USER_KEYED) == ["ratesync.W003"]
    assert ratesync_check_ids(RATESYNC=USER_KEYED) == []  # AuthenticationMiddleware is there


def test_checks_find_an_unknown_limiter_in_a_views_limit() -> None:
    with override_settings(ROOT_URLCONF="tests.django_project.typo_urls"):
        errors = {m.obj: m for m in checks.run_checks(tags=["urls"]) if m.id == "ratesync.E012"}

    assert sorted(errors) == [
        "tests.django_project.typo_urls.TypoOnPost.post",
        "tests.django_project.typo_urls.typo",
    ]
    typo = errors["tests.django_project.typo_urls.typo"]
    assert "no limiter 'logn' (did you mean 'login'?) (defined: api, login, search)" in typo.msg


def test_an_unknown_limiter_in_a_views_limit_fails_start_up() -> None:
    typo = r"@limit on typo: no limiter 'logn' \(did you mean 'login'\?\)"
    with override_settings(ROOT_URLCONF="tests.django_project.typo_urls"):
        with pytest.raises(ImproperlyConfigured, match=typo):
            WSGIHandler()  # as gunicorn loads the project
        with pytest.raises(ImproperlyConfigured, match=typo):
            ASGIHandler()


def test_manage_py_check_fails_on_a_broken_configuration() -> None:
    with (
        override_settings(RATESYNC={"config": "/nonexistent/rate-sync.toml"}),
        pytest.raises(SystemCheckError, match=r"ratesync\.E002"),
    ):
        call_command("check")


# --- the example project, under real servers -----------------------------------------------


def example_env(**variables: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **variables}
    for name in ("RATESYNC_ENGINE", "NATS_URL", "RATESYNC_BUCKET", "RATE_SYNC_CONFIG"):
        if name not in variables:
            env.pop(name, None)
    return env


def test_example_manage_py_check_reports_a_broken_configuration() -> None:
    good = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=EXAMPLE,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    broken = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=EXAMPLE,
        env=example_env(RATESYNC_ENGINE="redis"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert good.returncode == 0, good.stderr
    assert broken.returncode == 1
    assert "ratesync.E005" in broken.stderr
    assert "[stores.main] engine" in broken.stderr


def free_port() -> int:
    return closed_port()


def wait_until_serving(port: int, process: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.communicate()[0]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


@contextlib.contextmanager
def serve_example(command: list[str], port: int, **variables: str) -> Iterator[httpx.Client]:
    """Run the example project's server in a subprocess; a client for it; stop it."""
    process = subprocess.Popen(
        command,
        cwd=EXAMPLE,
        env=example_env(**variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(port, process)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def check_example(client: httpx.Client) -> None:
    statuses = [client.get("/").status_code for _ in range(6)]
    refused = client.get("/items/1")

    assert statuses == [200] * 5 + [429]
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert [client.post("/login").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [client.get("/health").status_code for _ in range(10)] == [200] * 10
    assert client.get("/search").headers["RateLimit-Policy"].startswith('"search"')


def test_example_under_runserver() -> None:
    port = free_port()
    command = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    with serve_example(command, port) as client:
        check_example(client)


@pytest.mark.nats
def test_example_under_uvicorn_on_nats(nats_url: str, bucket_name: str) -> None:
    port = free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", "mysite.asgi:application"),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
    ]
    variables = {"RATESYNC_ENGINE": "nats", "NATS_URL": nats_url, "RATESYNC_BUCKET": bucket_name}
    with serve_example(command, port, **variables) as client:
        check_example(client)


# --- on a real NATS server -----------------------------------------------------------------


def nats_config(store: dict[str, Any]) -> dict[str, Any]:
    return for_the_project(
        {
            "stores": {"main": store},
            "limiters": {"api": {"rate_per_second": 0.01, "burst": 5}},
            "middleware": {"default": "api"},
        }
    )


@pytest.mark.nats
def test_burst_then_429_on_nats(site: Site, nats_store: dict[str, Any]) -> None:
    with override_settings(RATESYNC=nats_config(nats_store)):
        assert site.statuses(5) == [200] * 5
        refused = site.get("/")
        assert site.statuses(3, "/login", "POST") == [200, 200, 429]

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "100"
    assert refused.json()["violated-policies"] == ["api"]


@pytest.mark.nats
def test_wsgi_and_asgi_workers_share_the_nats_buckets(nats_store: dict[str, Any]) -> None:
    with override_settings(RATESYNC=nats_config(nats_store)):
        wsgi, asgi = WSGISite(), ASGISite()
        try:
            assert wsgi.statuses(3) == [200] * 3
            assert asgi.statuses(3) == [200, 200, 429]
            assert wsgi.get("/").status_code == 429
        finally:
            wsgi.close()
            asgi.close()


def test_on_decision_hook_sees_every_decision(site: Site) -> None:
    events: list[Any] = []
    with override_settings(RATESYNC={**CONFIG, "on_decision": events.append}):
        statuses = site.statuses(6)
    assert statuses == [200] * 5 + [429]
    assert [event.decision.allowed for event in events] == [True] * 5 + [False]
    assert {event.limiter for event in events} == {"api"}


# --- the request lifecycle -------------------------------------------------------------------


def test_a_wrong_method_spends_nothing_of_a_class_views_limiters(site: Site) -> None:
    """`limit("login")(PostOnly.as_view())`: GETs are Django's 405, limited by the default only."""
    assert site.statuses(3, "/cbv/post-only") == [405] * 3
    assert str(site.get("/cbv/post-only").headers["RateLimit-Policy"]).startswith('"api"')
    assert site.statuses(3, "/cbv/post-only", "POST") == [200, 200, 429]  # login: 2/minute


@pytest.fixture(params=["wsgi", "asgi"])
def served_site(request: pytest.FixtureRequest) -> Iterator[Site]:
    """Django's real handlers, which turn a failing view into a 500 response."""
    served = SITES[request.param]()
    yield served
    served.close()


# A slot to give back: every admitted request has work at its end.
SLOTTED = with_config(limiters={"api": {"rate_per_second": 0.01, "burst": 5, "max_concurrent": 99}})


@override_settings(RATESYNC=SLOTTED)
def test_each_admitted_request_is_finished_once_with_its_status(
    served_site: Site, finished: list[int | None]
) -> None:
    assert served_site.get("/").status_code == 200
    assert served_site.get("/nowhere").status_code == 404
    assert served_site.get("/broken").status_code == 500
    assert finished == [200, 404, 500]


@override_settings(RATESYNC=SLOTTED)
def test_a_streamed_response_is_finished_after_its_last_chunk(
    served_site: Site, finished: list[int | None]
) -> None:
    response = served_site.get("/streamed")
    assert response.status_code == 200
    assert finished == [200]


@override_settings(RATESYNC=SLOTTED)
def test_a_refused_request_needs_no_finish(site: Site, finished: list[int | None]) -> None:
    assert site.statuses(6) == [200] * 5 + [429]
    assert finished == [200] * 5


# --- max_concurrent ------------------------------------------------------------------------------

ONE_AT_A_TIME: dict[str, Any] = for_the_project(
    {
        "limiters": {"api": {"max_concurrent": 1, "key": "global"}},
        "middleware": {"default": "api"},
    }
)


def test_a_slot_is_released_after_a_streamed_response_and_an_exception(served_site: Site) -> None:
    """max_concurrent = 1: a slot that leaked would refuse every later request."""
    with override_settings(RATESYNC=ONE_AT_A_TIME):
        served_site.close()
        assert served_site.get("/streamed").status_code == 200
        assert served_site.get("/broken").status_code == 500
        assert served_site.statuses(3) == [200] * 3


# --- timeout: a request waits for its token instead of a 429 -----------------------------------


def waiting_config(timeout: float, **limiter: Any) -> dict[str, Any]:
    rate = limiter or {"rate_per_second": 5.0, "burst": 1}  # a token every 200 ms
    return for_the_project(
        {"limiters": {"api": {**rate, "timeout": timeout}}, "middleware": {"default": "api"}}
    )


@pytest.mark.parametrize(
    ("config", "statuses"),
    [
        pytest.param(waiting_config(5.0), [200, 200, 200], id="waits-for-each-token"),
        pytest.param(waiting_config(0.0), [200, 429, 429], id="no-timeout-refuses"),
        pytest.param(waiting_config(5.0, limit="1/minute"), [200, 429], id="too-short-refuses"),
    ],
)
def test_timeout_makes_a_request_wait_for_its_token(
    site: Site, config: dict[str, Any], statuses: list[int]
) -> None:
    with override_settings(RATESYNC=config):
        assert site.statuses(len(statuses)) == statuses


# --- max_concurrent on NATS: the request beyond N in flight, and slots given back ---------------

IN_FLIGHT = 2


def slots_on_nats(store: dict[str, Any]) -> dict[str, Any]:
    return for_the_project(
        {
            "stores": {"main": {**store, "timeout": 2.0}},
            "limiters": {"api": {"max_concurrent": IN_FLIGHT, "key": "global"}},
            "middleware": {"default": "api"},
        }
    )


@pytest.mark.nats
def test_django_sync_on_nats_refuses_beyond_max_concurrent_and_gives_slots_back(
    nats_store: dict[str, Any],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from werkzeug.test import Client as WerkzeugClient

    from tests.django_project.views import gate

    with override_settings(RATESYNC=slots_on_nats(nats_store)):
        handler = WSGIHandler()

        def status(path: str) -> int:
            with WerkzeugClient(handler).get(path) as response:
                return response.status_code

        def hold_all_then_one_more() -> None:
            gate.reset()
            with ThreadPoolExecutor(IN_FLIGHT) as pool:  # a threaded WSGI server's workers
                held = [pool.submit(status, "/held") for _ in range(IN_FLIGHT)]
                for _ in range(IN_FLIGHT):
                    assert gate.entered.acquire(timeout=30)
                assert status("/") == 429  # the N+1-th in flight
                gate.opened.set()
                assert [future.result(30) for future in held] == [200] * IN_FLIGHT

        try:
            hold_all_then_one_more()
            assert status("/streamed") == 200
            assert status("/broken") == 500
            hold_all_then_one_more()  # a slot kept by either would leave room for one only
        finally:
            gate.opened.set()
            middleware = middleware_of(handler)
            if middleware is not None:
                middleware.close()


@pytest.mark.nats
async def test_django_async_on_nats_refuses_beyond_max_concurrent_and_gives_slots_back(
    nats_store: dict[str, Any],
) -> None:
    from tests.django_project.views import gate

    with override_settings(RATESYNC=slots_on_nats(nats_store)):
        handler = ASGIHandler()
        transport = httpx.ASGITransport(app=handler, client=("203.0.113.7", 50000))
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

        async def status(path: str) -> int:
            return (await client.get(path)).status_code

        async def hold_all_then_one_more() -> None:
            gate.reset()
            held = [asyncio.create_task(status("/held-async")) for _ in range(IN_FLIGHT)]
            for _ in range(IN_FLIGHT):
                assert await asyncio.to_thread(gate.entered.acquire, True, 30)
            assert await status("/") == 429  # the N+1-th in flight
            gate.opened.set()
            assert await asyncio.gather(*held) == [200] * IN_FLIGHT

        try:
            await hold_all_then_one_more()
            assert await status("/streamed") == 200
            assert await status("/broken") == 500
            await hold_all_then_one_more()  # a slot kept by either would leave room for one only
        finally:
            gate.opened.set()
            await client.aclose()
            middleware = middleware_of(handler)
            if middleware is not None:
                await middleware.aclose()
