"""Django system checks take a ConfigError's id from its fields, never from its message's words.

Each RATESYNC below has a message that quotes words which used to select another id
("no such file", "unknown key", "environment variable" inside a value).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.test import override_settings

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
