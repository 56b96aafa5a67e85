"""Hostile configurations: every one is a ConfigError naming the file, the table and the key.

Nothing a file or dict can hold may end in a traceback (RecursionError, ValueError, OverflowError)
at load time or later, when headers are precomputed or a request is decided.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware import config as config_module
from ratesync_middleware.bucket import NS_PER_SECOND, Policy
from ratesync_middleware.config import (
    MAX_COUNT,
    MAX_REFILL_SECONDS,
    MAX_WINDOW_SECONDS,
    Config,
    load_config,
)
from ratesync_middleware.errors import ConfigError
from ratesync_middleware.headers import RateLimitHeaders

DEEP = 5_000


@pytest.fixture(autouse=True)
def in_tmp_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["parser-state", "bisection"])
def locator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the TOML parser cannot hold is located from its state, or, where that is not
    available (another parser version), by parsing prefixes of the file: both must name it."""
    if request.param == "bisection":
        monkeypatch.setattr(config_module, "_statement_in_traceback", lambda exc: None)
    return str(request.param)


def load_file(text: str) -> Config:
    path = Path("rate-sync.toml")
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def file_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_file(text)
    return caught.value


def dict_error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(data)
    return caught.value


def assert_names(error: ConfigError, source: str, table: str | None, key: str | None) -> None:
    """The place is both in the message (for people) and in the fields (for tools)."""
    assert (error.source, error.table, error.key) == (source, table, key)
    place = " ".join(part for part in (table, key) if part)
    assert str(error).startswith(f"{source}: {place}: ")


def nested_list(depth: int) -> list[Any]:
    top: list[Any] = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return top


def nested_dict(depth: int) -> dict[str, Any]:
    top: dict[str, Any] = {}
    inner = top
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    return top


def use(config: Config) -> None:
    """What happens after loading: headers precomputed, one request decided per limiter."""
    RateLimitHeaders.for_config(config)

    async def decide() -> None:
        limiter = AsyncRateLimiter(config)
        try:
            for name in config.limiters:
                decision = await limiter.hit(name, key="client")
                assert decision.allowed
        finally:
            await limiter.aclose()

    asyncio.run(decide())


# --- nesting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "{a = " * DEEP + "1" + "}" * DEEP,  # inline tables: RecursionError in the parser
        "[" * DEEP + "1" + "]" * DEEP,  # arrays on one line
        "[\n" * DEEP + "1" + "\n]" * DEEP,  # arrays over thousands of lines
        "[" * 100 + "1" + "]" * 100,  # parsed fine, too deep for us
    ],
    ids=["inline-tables", "arrays", "multi-line-arrays", "100-arrays"],
)
def test_deeply_nested_toml_values_name_their_table_and_key(value: str, locator: str) -> None:
    error = file_error(f"[stores.main]\n[limiters.api]\nrate_per_second = 1\nkey = {value}\n")
    assert_names(error, "rate-sync.toml", "[limiters.api]", "key")
    assert error.kind == "bad_value"
    assert "nested more than 16 levels deep" in str(error)


def test_the_parser_limit_error_names_the_line(locator: str) -> None:
    error = file_error(
        "[middleware]\nheaders = 'draft'\n\n[[routes]]\npath = '/x'\n"
        "limiters = " + "[" * DEEP + "]" * DEEP + "\n"
    )
    assert_names(error, "rate-sync.toml", "[[routes]]", "limiters")
    assert ": line 6: " in str(error)


def test_a_parser_limit_deep_in_a_big_file_is_found(locator: str) -> None:
    tables = "".join(f"[limiters.l{i}]\nrate_per_second = 1\n" for i in range(5_000))
    error = file_error(tables + "[limiters.last]\nrate_per_second = 1\nburst = " + "9" * 5_000)
    assert_names(error, "rate-sync.toml", "[limiters.last]", "burst")
    assert ": line 10003: an integer with thousands of digits" in str(error)


def test_a_dotted_key_at_the_top_is_named_as_written(locator: str) -> None:
    error = file_error("limiters.api.rate_per_second = 1\nlimiters.api.burst = " + "9" * 5_000)
    assert_names(error, "rate-sync.toml", "[limiters.api]", "burst")
    error = file_error('[limiters]\n"api".key = ' + "[" * DEEP + "]" * DEEP)
    assert_names(error, "rate-sync.toml", "[limiters.api]", "key")


@pytest.mark.parametrize(
    ("data", "table", "key"),
    [
        (
            {"limiters": {"api": {"rate_per_second": 1, "key": nested_list(DEEP)}}},
            "[limiters.api]",
            "key",
        ),
        ({"stores": {"main": {"url": nested_dict(DEEP)}}}, "[stores.main]", "url"),
        ({"middleware": {"trusted_proxies": nested_list(DEEP)}}, "[middleware]", "trusted_proxies"),
        ({"routes": [{"path": "/x", "methods": nested_list(DEEP)}]}, "[[routes]] #1", "methods"),
        ({"limiters": {"api": nested_list(DEEP)}}, "[limiters.api]", None),
        ({"stores": nested_list(DEEP)}, None, "stores"),
        ({"unknown": nested_dict(DEEP)}, None, "unknown"),
    ],
    ids=["limiter-key", "store-url", "middleware", "route", "table", "section", "unknown"],
)
def test_deeply_nested_dict_values_name_their_table_and_key(
    data: dict[str, Any], table: str | None, key: str | None
) -> None:
    error = dict_error(data)
    assert_names(error, "<dict>", table, key)
    assert error.kind == "bad_value"


def test_a_dict_that_contains_itself_is_refused_like_a_deep_one() -> None:
    proxies: list[Any] = []
    proxies.append(proxies)
    error = dict_error({"middleware": {"trusted_proxies": proxies}})
    assert_names(error, "<dict>", "[middleware]", "trusted_proxies")


def test_nesting_a_real_file_needs_still_loads() -> None:
    config = load_file(
        'stores = {main = {engine = "nats", url = ["nats://a:4222", "nats://b:4222"]}}\n'
        'limiters = {api = {rate_per_second = 1, key = ["ip", "path"]}}\n'
    )
    assert config.stores["main"].servers == ("nats://a:4222", "nats://b:4222")
    assert config.limiters["api"].key == ("ip", "path")


# --- huge numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ("burst = " + "9" * 5_000, "burst", "line 3: an integer with thousands of digits"),
        ("burst = " + "9" * 401, "burst", f"expected an integer from 1 to {MAX_COUNT}"),
        ("burst = 1000000001", "burst", f"expected an integer from 1 to {MAX_COUNT}"),
        (
            "rate_per_second = 1" + "0" * 400,
            "rate_per_second",
            "expected a number > 0 and <= 1000000000",
        ),
        ("rate_per_second = 1e300", "rate_per_second", "expected a number > 0 and <= 1000000000"),
        ("rate_per_second = 1e-300", "rate_per_second", "unusable rate"),
        ("rate_per_second = 1e-9", "rate_per_second", "more than 315360000 s (10 years)"),
    ],
)
def test_huge_limiter_numbers(line: str, key: str, words: str) -> None:
    rate = "" if line.startswith("rate_per_second") else "rate_per_second = 1\n"
    error = file_error(f"[limiters.api]\n{rate}{line}\n")
    assert_names(error, "rate-sync.toml", "[limiters.api]", key)
    assert error.kind == "bad_value"
    assert words in str(error)


@pytest.mark.parametrize(
    ("lines", "key", "words"),
    [
        (
            "limit = 5\nwindow_seconds = 1" + "0" * 309,
            "window_seconds",
            f"from 1 to {MAX_WINDOW_SECONDS}",
        ),
        (f"limit = 5\nwindow_seconds = {MAX_WINDOW_SECONDS + 1}", "window_seconds", "from 1 to"),
        ("limit = '1000000001/second'", "limit", f"expected N from 1 to {MAX_COUNT}"),
        ("limit = '999999999999999999999/second'", "limit", 'expected "N/second"'),
        ("limit = 1" + "0" * 400 + "\nwindow_seconds = 60", "limit", "expected N from 1 to"),
        ("limit = '1/day'\nburst = 1000000000", "burst", "unusable rate"),
        ("limit = 1\nwindow_seconds = 31622400\nburst = 100", "burst", "(10 years)"),
    ],
)
def test_huge_limits_and_windows(lines: str, key: str, words: str) -> None:
    error = file_error(f"[limiters.api]\n{lines}\n")
    assert_names(error, "rate-sync.toml", "[limiters.api]", key)
    assert words in str(error)


@pytest.mark.parametrize("key", ["connect_timeout", "timeout", "backoff"])
@pytest.mark.parametrize("value", ["1" + "0" * 400, "1e308", "3600.5"])
def test_huge_store_durations(key: str, value: str) -> None:
    error = file_error(f"[stores.main]\nengine = 'nats'\nurl = 'nats://h'\n{key} = {value}\n")
    assert_names(error, "rate-sync.toml", "[stores.main]", key)
    assert "expected a number > 0 and <= 3600" in str(error)


def test_huge_max_keys() -> None:
    error = file_error("[stores.main]\nmax_keys = " + "9" * 401 + "\n")
    assert_names(error, "rate-sync.toml", "[stores.main]", "max_keys")
    assert "expected an integer from 1 to 100000000" in str(error)


def test_huge_numbers_in_a_dict() -> None:
    error = dict_error({"limiters": {"api": {"rate_per_second": 1, "burst": 10**5000}}})
    assert_names(error, "<dict>", "[limiters.api]", "burst")
    error = dict_error({"stores": {"s": {"timeout": 10**400}}})
    assert_names(error, "<dict>", "[stores.s]", "timeout")


@pytest.mark.parametrize(
    "limiter",
    [
        "rate_per_second = 1000000000\nburst = 1000000000",
        "rate_per_second = 0.000001",
        f"limit = 1\nwindow_seconds = {MAX_WINDOW_SECONDS}",
        "limit = '1000000000/second'",
        "limit = '1/day'\nburst = 3650",
    ],
)
def test_the_largest_accepted_numbers_work_downstream(limiter: str) -> None:
    config = load_file(
        "[stores.main]\ntimeout = 3600\nconnect_timeout = 3600\nbackoff = 3600\n"
        f"max_keys = 100000000\n[limiters.api]\n{limiter}\n"
    )
    policy = config.limiters["api"].policy
    assert policy.window_ns <= MAX_REFILL_SECONDS * NS_PER_SECOND
    use(config)


# --- many tables -----------------------------------------------------------------------------


def test_twenty_thousand_limiters_load() -> None:
    count = 20_000
    config = load_file(
        "".join(f"[limiters.l{i}]\nrate_per_second = {i % 100 + 1}\n" for i in range(count))
    )
    assert len(config.limiters) == count
    assert list(config.limiters)[:3] == ["l0", "l1", "l2"]
    assert config.limiters["l12345"].policy == Policy.per_second("l12345", 46, 1)


def test_a_name_made_twice_by_expansion_among_many(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAST", "l0")
    tables = {f"l{i}": {"rate_per_second": 1} for i in range(20_000)}
    error = dict_error({"limiters": {**tables, "${LAST}": {"rate_per_second": 1}}})
    assert_names(error, "<dict>", "[limiters.l0]", None)
    assert (str(error), error.kind) == ("<dict>: [limiters.l0]: defined twice", "conflict")
