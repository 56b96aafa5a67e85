"""rate-sync's environment switching: a value that is exactly one `${...}` takes its key's type.

`rate_per_second = "${API_RATE:-10.0}"` is rate-sync's documented pattern; the expansion is parsed
strictly (an int is decimal digits, a float Python's decimal syntax and finite, a boolean `true` or
`false`), and a literal string is never a number.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ratesync_middleware.bucket import Policy
from ratesync_middleware.config import Config, load_config
from ratesync_middleware.errors import ConfigError


@pytest.fixture(autouse=True)
def in_tmp_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    for name in ("API_RATE", "BURST", "AUTO", "CLOSED", "TIMEOUT", "ENGINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def load(text: str) -> Config:
    path = Path("rate-sync.toml")
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value


RATE_SYNC_EXAMPLE = """
[stores.main]
engine = "nats"
url = "nats://localhost:4222"
auto_create = "${AUTO:-false}"
timeout = "${TIMEOUT:-0.5}"

[limiters.api]
store = "main"
rate_per_second = "${API_RATE:-10.0}"
burst = "${BURST:-20}"
fail_closed = "${CLOSED:-true}"
"""


def test_defaults_are_parsed_as_the_keys_types() -> None:
    config = load(RATE_SYNC_EXAMPLE)
    store, api = config.stores["main"], config.limiters["api"]
    assert (store.auto_create, store.timeout) == (False, 0.5)
    assert api.policy == Policy.per_second("api", 10.0, 20)
    assert api.fail_closed is True


def test_variables_are_parsed_as_the_keys_types(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"API_RATE": "2.5", "BURST": "7", "AUTO": "true", "CLOSED": "false"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TIMEOUT", "1")  # an integer is a float too, as in TOML
    config = load(RATE_SYNC_EXAMPLE)
    store, api = config.stores["main"], config.limiters["api"]
    assert (store.auto_create, store.timeout) == (True, 1.0)
    assert api.policy == Policy.per_second("api", 2.5, 7)
    assert api.fail_closed is False


@pytest.mark.parametrize(
    ("line", "value", "words"),
    [
        ('rate_per_second = "${API_RATE}"', "ten", "expected a number"),
        ('rate_per_second = "${API_RATE}"', "1e999", "expected a number > 0 and <= 1000000000"),
        ('rate_per_second = "${API_RATE}"', "inf", "expected a number"),
        ('rate_per_second = "${API_RATE}"', "nan", "expected a number"),
        ('rate_per_second = "${API_RATE}"', "1_000", "expected a number"),
        ('rate_per_second = "${API_RATE}"', " 10", "expected a number"),
        ('rate_per_second = "${API_RATE}"', "-1", "expected a number > 0"),
        ('burst = "${BURST}"', "1.5", "expected an integer (decimal digits only)"),
        ('burst = "${BURST}"', "1_000", "expected an integer (decimal digits only)"),
        ('burst = "${BURST}"', "+5", "expected an integer (decimal digits only)"),
        ('burst = "${BURST}"', "0", "expected an integer >= 1"),
        ('burst = "${BURST}"', "9" * 5000, "expected an integer from 1 to 1000000000"),
        ('fail_closed = "${CLOSED}"', "yes", "expected true or false"),
        ('fail_closed = "${CLOSED}"', "True", "expected true or false"),
        ('fail_closed = "${CLOSED}"', "1", "expected true or false"),
    ],
)
def test_an_expansion_that_does_not_parse_names_the_variable(
    line: str, value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = line.split("${")[1].rstrip('}"')
    monkeypatch.setenv(variable, value)
    rate = "" if line.startswith("rate_per_second") else "rate_per_second = 1\n"
    error = load_error(f"[limiters.api]\n{rate}{line}\n")
    key = line.split(" =")[0]
    message = str(error)
    assert message.startswith(f"rate-sync.toml: [limiters.api] {key}: environment variable ")
    assert f"environment variable {variable} is " in message
    assert words in message
    assert (error.kind, error.variable, error.table, error.key) == (
        "env_var",
        variable,
        "[limiters.api]",
        key,
    )


def test_a_default_that_does_not_parse_says_it_is_the_default() -> None:
    error = load_error('[limiters.api]\nrate_per_second = "${API_RATE:-ten}"\n')
    assert str(error) == (
        "rate-sync.toml: [limiters.api] rate_per_second: ${API_RATE:-ten} gives its default"
        " 'ten' (API_RATE is not set): expected a number"
    )
    assert (error.kind, error.variable) == ("env_var", "API_RATE")


def test_an_empty_expansion_is_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURST", "")
    error = load_error('[limiters.api]\nrate_per_second = 1\nburst = "${BURST:-}"\n')
    assert "burst: ${BURST:-} gives its default '' (BURST is not set)" in str(error)


def test_an_unset_variable_without_default_is_still_named() -> None:
    error = load_error('[limiters.api]\nrate_per_second = "${API_RATE}"\n')
    assert "rate_per_second: environment variable API_RATE is not set" in str(error)
    assert (error.kind, error.variable) == ("env_var", "API_RATE")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('rate_per_second = "10"', "rate_per_second: expected a number > 0, got '10' (str)"),
        ('burst = "20"', "burst: expected an integer >= 1, got '20' (str)"),
        ('fail_closed = "false"', "fail_closed: expected true or false, got 'false' (str)"),
        ('burst = "${BURST:-2}0"', "burst: expected an integer >= 1, got '20' (str)"),
        ('burst = "${BURST:-1}${BURST:-1}"', "burst: expected an integer >= 1, got '11' (str)"),
    ],
)
def test_literal_and_mixed_strings_are_never_numbers(line: str, words: str) -> None:
    rate = "" if line.startswith("rate_per_second") else "rate_per_second = 1\n"
    error = load_error(f"[limiters.api]\n{rate}{line}\n")
    assert f"rate-sync.toml: [limiters.api] {words}" in str(error)
    assert error.kind == "bad_value"


def test_auto_create_as_a_literal_string_stays_an_error() -> None:
    error = load_error("[stores.main]\nauto_create = 'false'\n")
    assert str(error) == (
        "rate-sync.toml: [stores.main] auto_create: expected true or false, got 'false' (str)"
    )


def test_string_keys_keep_their_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_TOKEN", "12345")
    store = load(
        '[stores.main]\nengine = "nats"\nurl = "${NATS_URL:-nats://localhost:4222}"\n'
        'token = "${NATS_TOKEN}"\nbucket_name = "${BUCKET:-2024}"\n'
    ).stores["main"]
    assert store.token == "12345"
    assert store.servers == ("nats://localhost:4222",)
    assert store.bucket_name == "2024"


def test_an_integer_limit_and_a_period_limit_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = '[limiters.login]\nlimit = "${LOGIN_LIMIT:-5}"\nwindow_seconds = "${WINDOW:-300}"\n'
    assert load(text).limiters["login"].policy == Policy.per_period("login", 5, 300, 5)
    monkeypatch.setenv("LOGIN_LIMIT", "600/minute")
    error = load_error(text)
    assert "[limiters.login] window_seconds: cannot be combined" in str(error)
    per_period = load('[limiters.api]\nlimit = "${API_LIMIT:-600/minute}"\n')
    assert per_period.limiters["api"].policy == Policy.per_period("api", 600, 60, 600)


def test_dict_sources_expand_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURST", "30")
    config = load_config({"limiters": {"api": {"rate_per_second": 5, "burst": "${BURST}"}}})
    assert config.limiters["api"].policy == Policy.per_second("api", 5, 30)


def test_routes_and_middleware_booleans_and_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTH_EXEMPT", "true")
    config = load(
        '[middleware]\nipv6_prefix = "${PREFIX:-56}"\n'
        '[[routes]]\npath = "/health"\nexempt = "${HEALTH_EXEMPT}"\n'
    )
    assert config.middleware.ipv6_prefix == 56
    assert config.routes[0].exempt is True


# --- rate-sync's other engines ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ["redis", "postgres"])
def test_rate_syncs_other_engines_point_to_nats(engine: str) -> None:
    error = load_error(f'[stores.main]\nengine = "{engine}"\nurl = "{engine}://localhost"\n')
    message = str(error)
    assert message.startswith(
        f"rate-sync.toml: [stores.main] engine: expected one of 'nats', 'memory', got '{engine}'"
    )
    assert f"rate-sync's {engine} store is not one of the engines of ratesync-middleware" in message
    assert "('nats' and 'memory')" in message
    assert "docs/setup/nats-setup.md" in message
    assert (error.kind, error.table, error.key) == ("bad_value", "[stores.main]", "engine")


def test_another_engine_from_the_environment_is_explained_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENGINE", "redis")
    error = load_error('[stores.main]\nengine = "${ENGINE:-memory}"\n')
    assert "rate-sync's redis store" in str(error)


def test_an_unknown_engine_is_a_plain_choice_error() -> None:
    error = load_error('[stores.main]\nengine = "mongo"\n')
    assert str(error) == (
        "rate-sync.toml: [stores.main] engine: expected one of 'nats', 'memory', got 'mongo' (str)"
    )
