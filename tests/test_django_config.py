"""Django and the configuration: check ids from a ConfigError's fields; no configuration at all.

System checks never read the words of a message: each RATESYNC below has a message that quotes
words which used to select another id ("no such file", "environment variable" inside a value).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core import checks
from django.http import HttpResponse
from django.test import RequestFactory, override_settings

from ratesync_middleware.config import reset_no_config_warning
from ratesync_middleware.django import RateLimitMiddleware
from tests.test_django import (
    django_project,  # noqa: F401  (the module's autouse settings)
    with_config,
)


def config_errors(ratesync: Any) -> list[checks.CheckMessage]:
    with override_settings(RATESYNC=ratesync):
        messages = checks.run_checks(tags=["ratesync"])
    return [message for message in messages if message.id.startswith("ratesync.E")]


def nested(depth: int) -> list[Any]:
    top: list[Any] = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return top


@pytest.mark.parametrize(
    ("ratesync", "check_id", "words"),
    [
        ({"stores": {"main": {"engine": "no such file"}}}, "ratesync.E005", "engine: expected"),
        ({"stores": {"main": {"engine": "redis"}}}, "ratesync.E005", "docs/setup/nats-setup.md"),
        (
            with_config(limiters={"api": {"rate_per_second": 1, "key": "environment variable"}}),
            "ratesync.E005",
            "[limiters.api] key: expected",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": 1, "environment variable": 5}}),
            "ratesync.E004",
            "[limiters.api] 'environment variable': unknown key",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": "${RATESYNC_TEST_RATE:-ten}"}}),
            "ratesync.E008",
            "RATESYNC_TEST_RATE is not set",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": 1, "key": nested(5_000)}}),
            "ratesync.E005",
            "nested more than 16 levels deep",
        ),
        (
            with_config(limiters={"api": {"rate_per_second": 1, "burst": 10**400}}),
            "ratesync.E005",
            "from 1 to 1000000000",
        ),
        (
            {"stores": {"a": {}, "b": {}}, "limiters": {"api": {"rate_per_second": 1}}},
            "ratesync.E006",
            "store: missing; name one of the stores: a, b",
        ),
        (
            with_config(routes=[{"path": "/x", "limiters": ["api"], "exempt": True}]),
            "ratesync.E009",
            "a rule needs either limiters or exempt = true",
        ),
    ],
)
def test_the_check_id_follows_the_errors_kind(ratesync: Any, check_id: str, words: str) -> None:
    [error] = config_errors(ratesync)
    assert error.id == check_id
    assert words in error.msg


def test_an_env_var_hint_says_how_to_fix_it() -> None:
    [error] = config_errors({"stores": {"main": {"auto_create": "${RATESYNC_TEST_AUTO:-yes}"}}})
    assert error.id == "ratesync.E008"
    assert "${VAR:-default}" in error.hint


def test_hints_point_at_the_published_documentation() -> None:
    """A pip user has no docs/ directory: hints name pages of the documentation site."""
    mkdocs = (Path(__file__).parent.parent / "mkdocs.yml").read_text()
    site = next(
        line.split(":", 1)[1].strip()
        for line in mkdocs.splitlines()
        if line.startswith("site_url:")
    )
    [error] = config_errors({"stores": {"main": {"engine": "memory", "colour": "blue"}}})
    assert error.id == "ratesync.E004"
    assert f"{site}django/" in error.hint
    assert f"{site}configuration/" in error.hint
    assert "docs/" not in error.hint.replace(site, "")


def test_the_middleware_without_ratesync_setting_warns_that_nothing_is_configured(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_no_config_warning()
    with (
        override_settings(ROOT_URLCONF="tests.django_project.plain_urls"),
        caplog.at_level(logging.WARNING, logger="ratesync_middleware"),
    ):
        del settings.RATESYNC  # inside override_settings: absent until the block ends
        middleware = RateLimitMiddleware(lambda request: HttpResponse("ok"))
        assert middleware(RequestFactory().get("/")).status_code == 200
    reset_no_config_warning()
    [record] = [r for r in caplog.records if "No rate-sync configuration found" in r.getMessage()]
    assert (record.name, record.levelno) == ("ratesync_middleware", logging.WARNING)
    assert str(tmp_path / "rate-sync.toml") in record.getMessage()
    assert str(tmp_path / "config" / "rate-sync.toml") in record.getMessage()
