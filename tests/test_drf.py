"""Django REST framework: `RateSyncThrottle`, and the middleware's marks on DRF views.

The API is tests/drf_project, served by DRF's `APIClient` (the Django test client's handler,
so the middleware runs) with token authentication; tests/test_django.py configures Django
(its settings name `RateSyncThrottle` in DEFAULT_THROTTLE_CLASSES, read when DRF is imported).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from tests.doc_examples import write_example
from tests.test_django import (
    AUTH,
    RATESYNC,
    SESSION,
    ASGISite,
    ClientSite,
    Site,
    database,  # noqa: F401  (the auth and token tables)
    dead_nats,
    django_project,  # noqa: F401  (the module's autouse settings)
)

CONFIG: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 0.01, "burst": 5},
        "login": {"limit": "2/minute", "key": "user"},
        "search": {"rate_per_second": 0.01, "burst": 3},
    },
    "middleware": {"default": "api"},
}
API: dict[str, Any] = {
    "ROOT_URLCONF": "tests.drf_project.urls",
    "MIDDLEWARE": [SESSION, AUTH, RATESYNC],
    "RATESYNC": CONFIG,
}


@pytest.fixture(autouse=True)
def drf_api(django_project: None) -> Iterator[None]:  # noqa: F811
    with override_settings(**API):
        yield


@pytest.fixture(scope="module")
def tokens(database: None) -> dict[str, str]:  # noqa: F811
    """An API token for each of two users, alice and bob."""
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    found = {}
    for name in ("alice", "bob"):
        user, _ = User.objects.get_or_create(username=name)
        found[name] = Token.objects.get_or_create(user=user)[0].key
    return found


@pytest.fixture
def client() -> Any:
    """DRF's test client; one per test, so one middleware (and one set of buckets)."""
    from rest_framework.test import APIClient

    return APIClient()


def as_user(client: Any, token: str | None) -> Any:
    client.credentials(**({"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}))
    return client


def statuses(client: Any, count: int, method: str, path: str) -> list[int]:
    return [getattr(client, method)(path).status_code for _ in range(count)]


# --- RateSyncThrottle --------------------------------------------------------------------------


def test_throttle_scope_limits_each_token_authenticated_user_apart(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, tokens["alice"])
    allowed = [client.post("/login") for _ in range(2)]
    refused = client.post("/login")
    as_user(client, tokens["bob"])  # the same address: only the token tells them apart

    assert [r.status_code for r in allowed] == [200, 200]
    assert allowed[0].json() == {"user": "alice"}
    assert allowed[0].headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert allowed[0].headers["RateLimit"] == '"login";r=1;t=30'
    assert refused.status_code == 429
    assert refused.json() == {"detail": "Request was throttled. Expected available in 30 seconds."}
    assert refused.headers["Retry-After"] == "30"
    assert refused.headers["RateLimit"] == '"login";r=0;t=30'
    assert client.post("/login").status_code == 200


def test_a_request_is_charged_once_when_the_middleware_and_the_throttle_both_apply(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, tokens["alice"])
    answers = [client.get("/whoami") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert [a.headers["RateLimit"] for a in answers[:2]] == ['"api";r=4;t=100', '"api";r=3;t=200']


def test_throttles_picked_in_get_throttles_report_the_middlewares_decision(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, tokens["alice"])
    answers = [client.get("/picks-its-throttles") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]  # charged once, by address
    assert answers[0].headers["RateLimit"] == '"api";r=4;t=100'
    assert answers[5].json()["violated-policies"] == ["api"]  # the middleware's refusal


def test_requests_drf_refuses_before_its_throttles_are_counted_by_the_middleware(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, "not-a-token")  # DRF answers 401 before any throttle runs
    answers = [client.post("/login") for _ in range(3)]

    assert [a.status_code for a in answers] == [401, 401, 429]
    assert answers[2].headers["RateLimit"] == '"login";r=0;t=30'  # keyed by address: no user


def test_marks_on_an_apiview_method_win_over_its_throttle_scope(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, tokens["alice"])

    assert statuses(client, 4, "get", "/profile") == [200, 200, 200, 429]
    exempt = [client.put("/profile") for _ in range(4)]
    assert [a.status_code for a in exempt] == [200] * 4
    assert "RateLimit" not in exempt[0].headers


def test_marks_on_a_throttled_api_view_function_and_viewset_action(
    client: Any, tokens: dict[str, str]
) -> None:
    as_user(client, tokens["alice"])

    assert statuses(client, 4, "get", "/search") == [200, 200, 200, 429]
    assert statuses(client, 3, "post", "/sessions/login/") == [200, 200, 429]
    as_user(client, tokens["bob"])
    assert client.post("/sessions/login/").status_code == 200


@pytest.mark.parametrize(
    "middleware", [[SESSION, AUTH, RATESYNC], [SESSION, AUTH]], ids=["middleware", "alone"]
)
def test_count_status_refunds_what_the_throttle_admitted(
    client: Any, tokens: dict[str, str], middleware: list[str]
) -> None:
    counted = {**CONFIG["limiters"]["login"], "count_status": [400]}  # failed logins only
    ratesync = {**CONFIG, "limiters": {**CONFIG["limiters"], "login": counted}}
    as_user(client, tokens["alice"])
    with override_settings(MIDDLEWARE=middleware, RATESYNC=ratesync):
        assert statuses(client, 5, "post", "/login") == [200] * 5


def test_the_throttle_without_the_middleware(client: Any, tokens: dict[str, str]) -> None:
    as_user(client, tokens["alice"])
    with override_settings(MIDDLEWARE=[SESSION, AUTH]):
        allowed = client.post("/login")
        answers = statuses(client, 2, "post", "/login")
        as_user(client, tokens["bob"])
        other = client.post("/login")
        unthrottled = statuses(client, 5, "get", "/search-by-middleware")

    assert allowed.headers["RateLimit"] == '"login";r=1;t=30'
    assert answers == [200, 429]
    assert other.status_code == 200
    assert unthrottled == [200] * 5  # without the middleware, its marks have no one to apply them


def test_a_view_called_without_url_resolution(tokens: dict[str, str]) -> None:
    """DRF's APIRequestFactory calls a view directly: the throttle reads the view instance."""
    from django.contrib.auth.models import User
    from rest_framework.test import APIRequestFactory, force_authenticate

    from tests.drf_project.views import Login, Sessions

    factory = APIRequestFactory()
    login, session_login = Login.as_view(), Sessions.as_view({"post": "login"})

    def post(view: Any, path: str, name: str) -> int:
        request = factory.post(path)
        force_authenticate(request, user=User.objects.get(username=name))
        return int(view(request).status_code)

    with override_settings(MIDDLEWARE=[SESSION, AUTH]):
        assert [post(login, "/login", "alice") for _ in range(3)] == [200, 200, 429]
        assert [post(session_login, "/sessions/login/", "bob") for _ in range(3)] == [
            200,
            200,
            429,
        ]


def test_a_fail_closed_store_that_cannot_decide_answers_503(client: Any) -> None:
    with override_settings(RATESYNC=dead_nats(fail_closed=True)):
        answer = client.get("/whoami")

    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert "detail" in answer.json()


def test_disabled_ratesync_throttles_nothing(client: Any, tokens: dict[str, str]) -> None:
    as_user(client, tokens["alice"])
    for middleware in ([SESSION, AUTH, RATESYNC], [SESSION, AUTH]):
        with override_settings(MIDDLEWARE=middleware, RATESYNC={**CONFIG, "enabled": False}):
            assert statuses(client, 4, "post", "/login") == [200] * 4


# --- the middleware's marks on DRF views (views without RateSyncThrottle) ------------------------


@pytest.mark.parametrize("path", ["/search-by-middleware", "/search-below-by-middleware"])
def test_limit_above_or_below_api_view(client: Any, path: str) -> None:
    answers = [client.get(path) for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[3].json()["violated-policies"] == ["search"]  # the middleware's problem+json


def test_marks_on_a_viewset_class_and_its_actions_under_a_router(client: Any) -> None:
    assert statuses(client, 4, "get", "/accounts/") == [200, 200, 200, 429]  # the class: search
    assert statuses(client, 6, "get", "/accounts/7/") == [200] * 6  # @exempt on retrieve
    assert statuses(client, 3, "post", "/accounts/login/") == [200, 200, 429]  # an @action
    assert statuses(client, 6, "get", "/accounts/health/") == [200] * 6  # @exempt below @action
    assert statuses(client, 2, "delete", "/accounts/login/") == [405, 405]  # default api, not login


# --- manage.py check ---------------------------------------------------------------------------


def test_checks_find_unknown_limiters_in_drf_views() -> None:
    with override_settings(ROOT_URLCONF="tests.drf_project.typo_urls"):
        errors = {m.obj: m for m in checks.run_checks(tags=["urls"]) if m.id == "ratesync.E012"}

    assert sorted(errors) == [
        "tests.drf_project.typo_urls.Accounts.login",
        "tests.drf_project.typo_urls.Login.throttle_scope",
        "tests.drf_project.typo_urls.search",
    ]
    assert (
        "no limiter 'logn' (did you mean 'login'?)"
        in errors["tests.drf_project.typo_urls.Login.throttle_scope"].msg
    )
    assert "throttle_scope" in errors["tests.drf_project.typo_urls.Login.throttle_scope"].hint
    assert "(did you mean 'search'?)" in errors["tests.drf_project.typo_urls.search"].msg


def test_an_unknown_throttle_scope_fails_start_up() -> None:
    from django.core.handlers.wsgi import WSGIHandler

    with (
        override_settings(ROOT_URLCONF="tests.drf_project.typo_urls"),
        pytest.raises(ImproperlyConfigured, match=r"no limiter 'logn' \(did you mean 'login'\?\)"),
    ):
        WSGIHandler()


# --- a real nats-server -------------------------------------------------------------------------


@pytest.fixture(params=[ClientSite, ASGISite], ids=["wsgi-like", "asgi"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    served: Site = request.param()
    yield served
    served.close()


@pytest.mark.nats
def test_the_throttle_on_nats_keys_by_the_token_user(
    site: Site, tokens: dict[str, str], nats_store: dict[str, Any]
) -> None:
    ratesync = {**CONFIG, "stores": {"main": {**nats_store, "timeout": 2.0}}}
    alice = {"Authorization": f"Token {tokens['alice']}"}
    bob = {"Authorization": f"Token {tokens['bob']}"}
    with override_settings(RATESYNC=ratesync):
        answers = [site.post("/login", headers=alice) for _ in range(3)]
        other = site.post("/login", headers=bob)

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].headers["Retry-After"] == "30"
    assert other.status_code == 200


# --- docs/drf.md -------------------------------------------------------------------------------


def test_the_documented_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: dict[str, str]
) -> None:
    from django.conf import settings
    from rest_framework.test import APIClient

    example = write_example("drf.md", "Set up", tmp_path, monkeypatch)
    documented = example.settings
    # What DRF reads when it is first imported: the tests' settings have the page's.
    assert documented["REST_FRAMEWORK"] == settings.REST_FRAMEWORK
    assert RATESYNC in documented["MIDDLEWARE"]
    with override_settings(ROOT_URLCONF="shop.urls", RATESYNC=documented["RATESYNC"]):
        client = as_user(APIClient(), tokens["alice"])
        orders = [client.post("/orders") for _ in range(3)]
        catalogue = client.get("/catalogue/")
        health = [client.get("/catalogue/health/") for _ in range(8)]
        as_user(client, tokens["bob"])
        other = client.post("/orders")

    assert [o.status_code for o in orders] == [201, 201, 429]
    assert orders[0].json() == {"placed_by": "alice"}
    assert orders[2].json() == {
        "detail": "Request was throttled. Expected available in 30 seconds."
    }
    assert orders[2].headers["Retry-After"] == "30"
    assert orders[2].headers["RateLimit-Policy"] == '"orders";q=2;w=60'
    assert orders[2].headers["RateLimit"] == '"orders";r=0;t=30'
    assert catalogue.headers["RateLimit-Policy"] == '"api";q=5;w=5'
    assert [h.status_code for h in health] == [200] * 8
    assert "RateLimit" not in health[0].headers
    assert other.status_code == 201
