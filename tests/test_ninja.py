"""Django Ninja: `@limit` / `@exempt` on operation functions, above or below `@api.get`.

The API is tests/ninja_project, served through the middleware by Django's test clients (Ninja's
own `TestClient` calls operations without Django's middleware); tests/test_django.py
configures Django.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.wsgi import WSGIHandler
from django.test import AsyncClient, Client, override_settings

from tests.doc_examples import write_example
from tests.test_django import (
    AUTH,
    CONFIG,
    RATESYNC,
    SESSION,
    django_project,  # noqa: F401  (the module's autouse settings)
)


@pytest.fixture(autouse=True)
def ninja_api(django_project: None) -> Iterator[None]:  # noqa: F811
    with override_settings(
        ROOT_URLCONF="tests.ninja_project.urls",
        MIDDLEWARE=[SESSION, AUTH, RATESYNC],
        RATESYNC=CONFIG,
    ):
        yield


def statuses(client: Client, count: int, method: str, path: str) -> list[int]:
    return [getattr(client, method)(path).status_code for _ in range(count)]


def test_limit_above_the_route_decorator() -> None:
    client = Client()
    answers = [client.post("/api/login") for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert answers[2].json()["violated-policies"] == ["login"]
    assert answers[2].headers["Retry-After"] == "30"


def test_limit_below_the_route_decorator() -> None:
    client = Client()

    assert statuses(client, 4, "get", "/api/search?q=x") == [200, 200, 200, 429]


def test_an_operation_without_marks_on_a_marked_path_takes_the_default() -> None:
    client = Client()
    answers = [client.get("/api/login") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert answers[0].headers["RateLimit-Policy"] == '"api";q=5;w=500'


def test_exempt_and_unmarked_operations() -> None:
    client = Client()

    assert statuses(client, 7, "get", "/api/health") == [200] * 7
    assert statuses(client, 6, "get", "/api/items") == [200] * 5 + [429]


def test_a_method_the_path_does_not_have_spends_the_default_not_the_operations_limit() -> None:
    client = Client()

    assert statuses(client, 3, "delete", "/api/search") == [405] * 3
    assert statuses(client, 3, "get", "/api/search") == [200] * 3  # search untouched


async def test_async_operation_under_the_async_client() -> None:
    client = AsyncClient()
    answers = [await client.get("/api/async-search") for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]


def test_checks_find_unknown_limiters_in_ninja_operations() -> None:
    with override_settings(ROOT_URLCONF="tests.ninja_project.typo_urls"):
        errors = {m.obj: m for m in checks.run_checks(tags=["urls"]) if m.id == "ratesync.E012"}

    assert sorted(errors) == [
        "tests.ninja_project.typo_urls.login",
        "tests.ninja_project.typo_urls.search",
    ]
    assert (
        "no limiter 'logn' (did you mean 'login'?)"
        in errors["tests.ninja_project.typo_urls.login"].msg
    )


def test_an_unknown_limiter_on_an_operation_fails_start_up() -> None:
    with (
        override_settings(ROOT_URLCONF="tests.ninja_project.typo_urls"),
        pytest.raises(ImproperlyConfigured, match=r"no limiter 'logn' \(did you mean 'login'\?\)"),
    ):
        WSGIHandler()


# --- docs/ninja.md -----------------------------------------------------------------------------


def test_the_documented_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    documented = write_example("ninja.md", "Set up", tmp_path, monkeypatch).settings
    assert RATESYNC in documented["MIDDLEWARE"]
    with override_settings(ROOT_URLCONF="blog.urls", RATESYNC=documented["RATESYNC"]):
        client = Client()
        logins = [client.post("/api/login") for _ in range(4)]
        searches = statuses(client, 3, "get", "/api/search?q=ninja")
        posts = client.get("/api/posts")
        health = [client.get("/api/health") for _ in range(8)]

    assert [r.status_code for r in logins] == [200, 200, 200, 429]
    refused = logins[3]
    assert refused.headers["Retry-After"] == "20"
    assert refused.headers["RateLimit-Policy"] == '"login";q=3;w=60'
    assert refused.headers["RateLimit"] == '"login";r=0;t=20'
    assert refused.json()["violated-policies"] == ["login"]
    assert searches == [200, 200, 429]
    assert posts.headers["RateLimit-Policy"] == '"api";q=100;w=60'
    assert [r.status_code for r in health] == [200] * 8
