"""Loading rate-sync.toml: discovery, ${VAR} expansion, strict types and messages that say where."""

from __future__ import annotations

import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratesync_middleware.bucket import NS_PER_SECOND, Policy, Rates, consume
from ratesync_middleware.config import (
    DEFAULT_STORE_NAME,
    Config,
    RateSyncConfigWarning,
    StoreConfig,
    discover_config_path,
    load_config,
)
from ratesync_middleware.errors import ConfigError
from ratesync_middleware.headers import RateLimitHeaders
from ratesync_middleware.window import SlidingWindow


def write(text: str, name: str = "rate-sync.toml") -> Path:
    """Write a file relative to the working directory (each test runs in its own tmp_path)."""
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(text: str) -> Config:
    return load_config(write(text))


def load_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return str(caught.value)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray rate-sync.toml or $RATE_SYNC_CONFIG from the developer's machine."""
    monkeypatch.delenv("RATE_SYNC_CONFIG", raising=False)
    monkeypatch.delenv("NATS_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)


# --- discovery and sources ---------------------------------------------------------------------


def test_nothing_to_discover_gives_one_memory_store() -> None:
    assert discover_config_path() is None
    config = load_config()
    assert config.stores == {DEFAULT_STORE_NAME: StoreConfig(DEFAULT_STORE_NAME)}
    assert config.stores[DEFAULT_STORE_NAME].engine == "memory"
    assert config.limiters == {}
    assert config.source == "<default>"


def test_discovery_order(monkeypatch: pytest.MonkeyPatch) -> None:
    write("[stores.from_config_dir]", "config/rate-sync.toml")
    assert discover_config_path() == Path("config/rate-sync.toml")
    assert list(load_config().stores) == ["from_config_dir"]

    write("[stores.from_cwd]")
    assert discover_config_path() == Path("rate-sync.toml")
    assert list(load_config().stores) == ["from_cwd"]

    elsewhere = write("[stores.from_env]", "elsewhere/limits.toml")
    monkeypatch.setenv("RATE_SYNC_CONFIG", str(elsewhere))
    assert discover_config_path() == elsewhere
    config = load_config()
    assert list(config.stores) == ["from_env"]
    assert config.source == str(elsewhere)


def test_rate_sync_config_naming_a_missing_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write("[stores.ignored]")
    monkeypatch.setenv("RATE_SYNC_CONFIG", "/nowhere/rate-sync.toml")
    with pytest.raises(ConfigError, match=r"/nowhere/rate-sync\.toml"):
        load_config()


def test_missing_file_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: no such file"):
        load_config("missing.toml")


def test_toml_syntax_error_names_the_file_and_the_parser_message(tmp_path: Path) -> None:
    path = tmp_path / "rate-sync.toml"
    path.write_text("[stores.prod]\nengine = nats\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message


def test_a_config_is_returned_unchanged() -> None:
    config = load_config({"stores": {"prod": {}}})
    assert load_config(config) is config


def test_dict_is_validated_like_parsed_toml() -> None:
    config = load_config(
        {
            "stores": {"mem": {"engine": "memory"}},
            "limiters": {"api": {"rate_per_second": 5, "key": ["ip", "path"]}},
        }
    )
    assert config.source == "<dict>"
    assert config.limiters["api"].store == "mem"
    assert config.limiters["api"].key == ("ip", "path")
    with pytest.raises(ConfigError, match=r"^<dict>: \[limiters\.api\] burst: "):
        load_config({"limiters": {"api": {"rate_per_second": 5, "burst": 0}}})


def test_path_objects_and_strings_both_work() -> None:
    path = write("[limiters.api]\nlimit = '10/second'\n")
    assert load_config(path).source == str(path)
    assert load_config(str(path)).limiters["api"].policy == Policy.per_second("api", 10, 10)


# --- the seed guide and the design ---------------------------------------------------------------

SEED_BLOCKS = {
    "auto_create_false": """
[stores.prod]
engine = "nats"
url = "nats://prod.example.com:4222"
bucket_name = "rate_limits"
auto_create = false  # Bucket must already exist
""",
    "basic": """
[stores.prod]
engine = "nats"
url = "nats://nats.example.com:4222"
""",
    "token": """
[stores.prod]
engine = "nats"
url = "nats://nats.example.com:4222"
token = "${NATS_TOKEN}"  # From environment variable
""",
    "user_password": """
[stores.prod]
engine = "nats"
url = "nats://user:password@nats.example.com:4222"
""",
    "tls": """
[stores.prod]
engine = "nats"
url = "tls://nats.example.com:4222"  # Use tls:// scheme
token = "${NATS_TOKEN}"
""",
    "custom_bucket": """
[stores.prod]
engine = "nats"
url = "nats://nats.example.com:4222"
bucket_name = "myapp_rate_limits"  # Custom bucket name
""",
    "high_availability": """
[stores.prod_ha]
engine = "nats"
# Client will try each URL until successful connection
url = "nats://nats-1.prod:4222,nats://nats-2.prod:4222,nats://nats-3.prod:4222"
token = "${NATS_TOKEN}"
""",
}


@pytest.mark.parametrize("text", SEED_BLOCKS.values(), ids=SEED_BLOCKS.keys())
def test_every_seed_guide_block_loads(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_TOKEN", "s3cret")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load(text)
    (store,) = config.stores.values()
    assert store.engine == "nats"
    assert store.servers
    assert "s3cret" not in repr(config)
    if "NATS_TOKEN" in text:
        assert store.token == "s3cret"


def test_seed_defaults_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_TOKEN", "s3cret")
    basic = load(SEED_BLOCKS["basic"]).stores["prod"]
    assert (basic.bucket_name, basic.auto_create, basic.replicas) == ("rate_limits", True, 1)
    assert basic.token is None
    assert load(SEED_BLOCKS["auto_create_false"]).stores["prod"].auto_create is False
    custom = load(SEED_BLOCKS["custom_bucket"]).stores["prod"]
    assert custom.bucket_name == "myapp_rate_limits"
    write(SEED_BLOCKS["high_availability"])
    ha = load_config()
    assert ha.source == "rate-sync.toml"  # discovered in the working directory
    assert ha.stores["prod_ha"].servers == (
        "nats://nats-1.prod:4222",
        "nats://nats-2.prod:4222",
        "nats://nats-3.prod:4222",
    )


DESIGN_EXAMPLE = """
[stores.prod]                         # the seed's keys, same meaning and defaults
engine = "nats"                       # "nats" | "memory"
url = "nats://a:4222,nats://b:4222"   # one URL, a comma-separated list, or a TOML list
token = "${NATS_TOKEN}"               # or user:password@ in the URL
bucket_name = "rate_limits"           # default
auto_create = true                    # default

[limiters.api]
store = "prod"
rate_per_second = 10.0                # refill rate (rate-sync's key); or `limit = "600/minute"`
burst = 20                            # bucket capacity
key = "ip"                            # default "ip"
fail_closed = false                   # store unreachable: false lets requests through

[limiters.login]
store = "prod"
limit = "5/minute"
key = ["ip", "header:X-API-Key"]

[middleware]
default = "api"
trusted_proxies = ["10.0.0.0/8"]
headers = "draft"

[[routes]]
path = "/auth/*"
methods = ["post"]
limiters = ["login"]
[[routes]]
path = "/health"
exempt = true
"""


def test_design_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_TOKEN", "t0ken")
    config = load(DESIGN_EXAMPLE)
    assert config.stores["prod"].servers == ("nats://a:4222", "nats://b:4222")
    api = config.limiters["api"]
    assert (api.store, api.policy, api.key, api.fail_closed) == (
        "prod",
        Policy.per_second("api", 10.0, 20),
        ("ip",),
        False,
    )
    assert config.limiters["login"].policy == Policy.per_period("login", 5, 60, 5)
    assert config.middleware.default == ("api",)
    assert config.middleware.trusted_proxies == ("10.0.0.0/8",)
    assert config.middleware.ipv6_prefix == 64
    auth, health = config.routes
    assert (auth.path, auth.methods, auth.limiters, auth.exempt) == (
        "/auth/*",
        ("POST",),
        ("login",),
        False,
    )
    assert (health.path, health.methods, health.exempt) == ("/health", None, True)


# --- URLs and secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        '"nats://a:4222, nats://b:4222 ,tls://c:4222"',
        '["nats://a:4222", "nats://b:4222", "tls://c:4222"]',
    ],
)
def test_url_lists(url: str) -> None:
    config = load(f"[stores.prod]\nengine = 'nats'\nurl = {url}\n")
    assert config.stores["prod"].servers == ("nats://a:4222", "nats://b:4222", "tls://c:4222")


def test_websocket_urls_are_accepted() -> None:
    config = load("[stores.prod]\nengine = 'nats'\nurl = ['ws://a:8080', 'wss://b']\n")
    assert config.stores["prod"].servers == ("ws://a:8080", "wss://b")


def test_credentials_in_url_are_kept_but_never_shown() -> None:
    config = load(SEED_BLOCKS["user_password"])
    store = config.stores["prod"]
    assert store.servers == ("nats://user:password@nats.example.com:4222",)
    assert store.redacted_servers == ("nats://***@nats.example.com:4222",)
    assert "password" not in repr(config)


@pytest.mark.parametrize(
    "url",
    ["http://user:hunter2@host:4222", "nats://user:hunter2@", "nats://host:99999", "host:4222"],
)
def test_bad_urls_are_errors_without_the_password(url: str) -> None:
    message = load_error(f"[stores.prod]\nengine = 'nats'\nurl = '{url}'\n")
    assert "[stores.prod] url: expected nats://, tls://" in message
    assert "hunter2" not in message


def test_a_token_of_the_wrong_type_is_not_echoed() -> None:
    message = load_error("[stores.prod]\nengine='nats'\nurl='nats://h'\ntoken=918273\n")
    assert "[stores.prod] token: expected a string, got a value of type int" in message
    assert "918273" not in message


def test_nats_store_needs_a_url() -> None:
    message = load_error("[stores.prod]\nengine = 'nats'\nurl = ' , '\n")
    assert "[stores.prod] url: a nats store needs a url" in message
    assert "[stores.prod] url:" in load_error("[stores.prod]\nengine = 'nats'\n")


def test_memory_store_ignores_nats_keys_so_one_file_fits_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = """
[stores.main]
engine = "${ENGINE:-memory}"
url = "${NATS_URL:-}"
token = "${NATS_TOKEN:-}"
max_keys = 1000
"""
    store = load(text).stores["main"]
    assert store == StoreConfig("main", "memory", max_keys=1000)
    monkeypatch.setenv("ENGINE", "nats")
    monkeypatch.setenv("NATS_URL", "nats://n1:4222")
    store = load(text).stores["main"]
    assert (store.engine, store.servers, store.token) == ("nats", ("nats://n1:4222",), None)


def test_all_nats_options() -> None:
    store = load(
        """
[stores.prod]
engine = "nats"
url = "tls://h:4222"
replicas = 3
creds = "/etc/nats/app.creds"
nkey = ""
tls_ca = "ca.pem"
tls_cert = "cert.pem"
tls_key = "key.pem"
connect_timeout = 1
timeout = 0.1
backoff = 2.5
max_keys = 10
""",
    ).stores["prod"]
    assert (store.replicas, store.creds, store.nkey) == (3, "/etc/nats/app.creds", None)
    assert (store.tls_ca, store.tls_cert, store.tls_key) == ("ca.pem", "cert.pem", "key.pem")
    assert (store.connect_timeout, store.timeout, store.backoff, store.max_keys) == (
        1.0,
        0.1,
        2.5,
        10,
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("engine = 'nats'\nurl = 'nats://h'\ntls_cert = 'c.pem'", "tls_cert"),
        ("engine = 'nats'\nurl = 'nats://h'\ntls_key = 'k.pem'\ntls_cert = ''", "tls_cert"),
        ("bucket_name = 'rate.limits'", "bucket_name"),
        ("replicas = 7", "replicas"),
        ("timeout = 0", "timeout"),
        ("backoff = nan", "backoff"),
        ("max_keys = 0", "max_keys"),
        ("engine = 'redis'", "engine"),
    ],
)
def test_store_value_errors(line: str, key: str) -> None:
    message = load_error(f"[stores.prod]\n{line}\n")
    assert f"rate-sync.toml: [stores.prod] {key}: " in message


# --- ${VAR} expansion ----------------------------------------------------------------------------


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_HOST", "n1")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.setenv("STORE", "shared")
    config = load(
        """
[stores."${STORE}"]
engine = "nats"
url = ["nats://${NATS_HOST}:4222", "nats://${NATS_HOST_2:-n2}:4222"]
bucket_name = "${BUCKET:-app_limits}"
token = "${NATS_TOKEN:-}"
creds = "${EMPTY}"
nkey = "${EMPTY:-seed.nk}"
tls_ca = "$$HOME/${NOPE:-ca}.pem"
""",
    )
    store = config.stores["shared"]
    assert store.servers == ("nats://n1:4222", "nats://n2:4222")
    assert store.bucket_name == "app_limits"
    assert store.token is None
    assert store.creds is None
    assert store.nkey == "seed.nk"  # like the shell: set-but-empty takes the default
    assert store.tls_ca == "$$HOME/ca.pem"  # only ${...} is special


def test_unset_variable_is_an_error_naming_it() -> None:
    message = load_error(SEED_BLOCKS["token"])
    assert message.startswith("rate-sync.toml: [stores.prod] token: ")
    assert "NATS_TOKEN is not set" in message


def test_malformed_variable_is_an_error() -> None:
    message = load_error("[stores.prod]\nbucket_name = '${NATS TOKEN}'\n")
    assert "[stores.prod] bucket_name: malformed '${NATS TOKEN}'" in message


def test_only_a_whole_expression_is_parsed_as_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICAS", "3")
    nats = "[stores.prod]\nengine = 'nats'\nurl = 'nats://h'\n"
    assert load(nats + "replicas = '${REPLICAS}'\n").stores["prod"].replicas == 3
    message = load_error("[stores.prod]\nreplicas = '0${REPLICAS}'\n")
    assert "[stores.prod] replicas: expected an integer from 1 to 5, got '03' (str)" in message


# --- strict types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "line", "expected"),
    [
        ("stores.s", 'auto_create = "false"', "auto_create: expected true or false, got 'false'"),
        ("limiters.api", 'rate_per_second = "10"', "rate_per_second: expected a number > 0"),
        ("limiters.api", "burst = true", "burst: expected an integer >= 1, got True (bool)"),
        ("limiters.api", "burst = 2.0", "burst: expected an integer >= 1, got 2.0 (float)"),
        ("limiters.api", "fail_closed = 0", "fail_closed: expected true or false, got 0 (int)"),
        ("stores.s", "connect_timeout = true", "connect_timeout: expected a number > 0"),
        ("middleware", "ipv6_prefix = '64'", "ipv6_prefix: expected an integer from 1 to 128"),
        ("stores.s", "url = 4222", "url: expected a URL"),
    ],
)
def test_no_coercion(table: str, line: str, expected: str) -> None:
    assert f"rate-sync.toml: [{table}] {expected}" in load_error(f"[{table}]\n{line}\n")


def test_integers_are_accepted_for_floats() -> None:
    config = load("[stores.s]\ntimeout = 1\n[limiters.api]\nrate_per_second = 4\n")
    assert config.limiters["api"].policy == Policy.per_second("api", 4.0, 1)


def test_the_documented_message_shape() -> None:
    message = load_error('[limiters.api]\nrate_per_second = 10\nburst = "x"\n')
    assert (
        message == "rate-sync.toml: [limiters.api] burst: expected an integer >= 1, got 'x' (str)"
    )


# --- unknown and rate-sync keys ------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one() -> None:
    message = load_error("[limiters.api]\nrate_per_second = 1\nbrust = 5\n")
    assert message.startswith("rate-sync.toml: [limiters.api] brust: unknown key")
    assert "did you mean 'burst'?" in message
    assert (
        "known keys are: algorithm, burst, cost, count_status, exempt_when, fail_closed, fail_mode,"
        " key, lease_seconds, limit" in message
    )


def test_unknown_key_without_a_close_match() -> None:
    message = load_error("[stores.s]\nzzzzzz = 1\n")
    assert "[stores.s] zzzzzz: unknown key; known keys are: " in message
    assert "did you mean" not in message


def test_unknown_top_level_table() -> None:
    message = load_error("[limiter.api]\nrate_per_second = 1\n")
    assert message.startswith("rate-sync.toml: limiter: unknown key (did you mean 'limiters'?)")
    assert "stores" in load_error("engine = 'nats'\n")


RATE_SYNC_STORE_KEYS = [
    *("retry_interval", "max_retries", "timing_margin_ms", "db", "password", "key_prefix"),
    *("pool_min_size", "pool_max_size", "socket_timeout", "socket_connect_timeout"),
    *("table_name", "schema_name"),
]


@pytest.mark.parametrize("key", RATE_SYNC_STORE_KEYS)
def test_rate_sync_store_keys_load_with_a_warning(key: str) -> None:
    warning = rf"^rate-sync\.toml: \[stores\.s\] {key}: rate-sync key ignored"
    with pytest.warns(RateSyncConfigWarning, match=warning):
        config = load(f"[stores.s]\n{key} = 1\n")
    assert config.stores["s"] == StoreConfig("s")


@pytest.mark.parametrize("key", ["max_retries", "retry_interval"])
def test_rate_sync_limiter_keys_load_with_a_warning(key: str) -> None:
    warning = rf"^rate-sync\.toml: \[limiters\.api\] {key}: rate-sync key ignored"
    with pytest.warns(RateSyncConfigWarning, match=warning):
        config = load(f"[limiters.api]\nrate_per_second = 1\n{key} = 5\n")
    assert config.limiters["api"].policy == Policy.per_second("api", 1, 1)


def test_timeout_is_how_long_a_request_may_wait() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load(
            "[limiters.a]\nrate_per_second = 1\ntimeout = 2.5\n"
            "[limiters.b]\nmax_concurrent = 3\ntimeout = 0\n"
            "[limiters.c]\nrate_per_second = 1\n"
        )
    assert config.limiters["a"].timeout == 2.5
    assert config.limiters["b"].timeout == 0.0
    assert config.limiters["c"].timeout == 0.0
    for bad in ("-1", "'5'", "true", "inf", "3601"):
        message = load_error(f"[limiters.a]\nrate_per_second = 1\ntimeout = {bad}\n")
        assert "[limiters.a] timeout" in message
        assert "a number >= 0" in message


def test_algorithm() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load("[limiters.a]\nrate_per_second = 1\nalgorithm = 'token_bucket'\n")
        config = load(
            "[limiters.a]\nlimit = 100\nwindow_seconds = 60\nalgorithm = 'sliding_window'\n",
        )
    assert config.limiters["a"].policy == SlidingWindow("a", 100, 60 * NS_PER_SECOND)
    message = load_error("[limiters.a]\nrate_per_second = 1\nalgorithm = 'leaky'\n")
    assert "[limiters.a] algorithm: expected one of 'token_bucket', 'sliding_window'" in message


def test_a_sliding_window_as_rate_sync_writes_it() -> None:
    """rate-sync's login protection: at most 5 in any 300 s (an exact window, no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load(
            '[limiters.login]\nalgorithm = "sliding_window"\nlimit = 5\nwindow_seconds = 300\n'
        )
    assert config.limiters["login"].policy == SlidingWindow("login", 5, 300 * NS_PER_SECOND)
    per_minute = load('[limiters.a]\nalgorithm = "sliding_window"\nlimit = "5/minute"\n')
    assert per_minute.limiters["a"].policy == SlidingWindow("a", 5, 60 * NS_PER_SECOND)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("rate_per_second = 1.0", "limit: a sliding window counts admissions"),
        ("limit = 5", "limit: an integer limit needs window_seconds"),
        ("limit = 5\nwindow_seconds = 60\nburst = 9", "burst: a sliding window has no burst"),
        ('limit = ["5/minute", "50/hour"]', "limit: a sliding window takes one limit"),
    ],
)
def test_a_sliding_window_needs_a_count_and_a_window(table: str, message: str) -> None:
    text = f'[limiters.a]\nalgorithm = "sliding_window"\n{table}\n'
    assert f"rate-sync.toml: [limiters.a] {message}" in load_error(text)


def test_several_rates_each_with_its_own_capacity() -> None:
    config = load('[limiters.api]\nlimit = ["10/second", "1000/day"]\n')
    assert config.limiters["api"].policy == Rates(
        "api",
        (
            Policy.per_period("api:10/second", 10, 1, 10),
            Policy.per_period("api:1000/day", 1000, 86400, 1000),
        ),
    )
    single = load('[limiters.api]\nlimit = ["10/second"]\n')
    assert single.limiters["api"].policy == Policy.per_period("api", 10, 1, 10)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('limit = ["10/second", "1000/day"]\nburst = 20', "burst: cannot be combined with several"),
        ('limit = ["10/second", 5]', 'limit: expected a list of "N/period" strings, got 5 (int)'),
        ('limit = ["10/second", "ten/day"]', 'limit: expected "N/second"'),
        ('limit = ["10/second", "10/second"]', "limit: the same rate is listed twice"),
        ("limit = []", 'limit: expected at least one "N/period" rate'),
    ],
)
def test_several_rates_are_checked(table: str, message: str) -> None:
    assert f"rate-sync.toml: [limiters.api] {message}" in load_error(f"[limiters.api]\n{table}\n")


# --- limiters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "policy"),
    [
        ("limit = '600/minute'", Policy.per_period("x", 600, 60, 600)),
        ("limit = '10/s'", Policy.per_period("x", 10, 1, 10)),
        ("limit = '5 / Hour'", Policy.per_period("x", 5, 3600, 5)),
        ("limit = '1000/d'\nburst = 50", Policy.per_period("x", 1000, 86400, 50)),
        ("limit = 30\nwindow_seconds = 90", Policy.per_period("x", 30, 90, 30)),
        ("rate_per_second = 2.5", Policy.per_second("x", 2.5, 1)),
        ("rate_per_second = 0.1", Policy.per_second("x", 0.1, 1)),
        ("rate_per_second = 90", Policy.per_second("x", 90, 1)),
        ("rate_per_second = 10\nburst = 20", Policy.per_second("x", 10, 20)),
    ],
)
def test_rate_forms_and_default_bursts(lines: str, policy: Policy) -> None:
    assert load(f"[limiters.x]\n{lines}\n").limiters["x"].policy == policy


@pytest.mark.parametrize(
    ("lines", "key", "words"),
    [
        ("burst = 3", "limit", "exactly one of"),
        ("rate_per_second = 1\nlimit = '1/s'", "rate_per_second", "exactly one of"),
        ("limit = 30", "limit", "needs window_seconds"),
        ("limit = '30/minute'\nwindow_seconds = 60", "window_seconds", "cannot be combined"),
        ("rate_per_second = 1\nwindow_seconds = 60", "rate_per_second", "two algorithms"),
        ("limit = '10/week'", "limit", 'expected "N/second"'),
        ("limit = '0/second'", "limit", 'expected "N/second"'),
        ("limit = 0\nwindow_seconds = 1", "limit", "expected"),
        ("rate_per_second = -1", "rate_per_second", "expected a number > 0"),
        ("rate_per_second = inf", "rate_per_second", "expected a number > 0"),
        ("rate_per_second = 1e-300", "rate_per_second", "unusable rate"),
    ],
)
def test_rate_errors(lines: str, key: str, words: str) -> None:
    message = load_error(f"[limiters.x]\n{lines}\n")
    assert f"rate-sync.toml: [limiters.x] {key}: " in message
    assert words in message


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ('"global"', ("global",)),
        ('"user"', ("user",)),
        ('["ip", "path"]', ("ip", "path")),
        ('"header:X-API-Key"', ("header:X-API-Key",)),
        ('["user", "myapp.limits:tenant_of"]', ("user", "myapp.limits:tenant_of")),
    ],
)
def test_key_forms(key: str, parts: tuple[str, ...]) -> None:
    limiter = load(f"[limiters.x]\nrate_per_second = 1\nkey = {key}\n").limiters["x"]
    assert limiter.key == parts
    assert limiter.is_global == (parts == ("global",))


def test_key_defaults_to_ip() -> None:
    assert load("[limiters.x]\nrate_per_second = 1\n").limiters["x"].key == ("ip",)


@pytest.mark.parametrize(
    "key", ['"cookie"', '"header:"', '"header:X Key"', '["global", "ip"]', "[]", '"mod:"', "1"]
)
def test_bad_keys(key: str) -> None:
    message = load_error(f"[limiters.x]\nrate_per_second = 1\nkey = {key}\n")
    assert "rate-sync.toml: [limiters.x] key: expected" in message


def test_limiter_store_defaults() -> None:
    no_stores = load("[limiters.x]\nrate_per_second = 1\n")
    assert no_stores.limiters["x"].store == DEFAULT_STORE_NAME
    assert no_stores.stores[DEFAULT_STORE_NAME].engine == "memory"
    one_store = load("[stores.only]\n[limiters.x]\nrate_per_second = 1\n")
    assert one_store.limiters["x"].store == "only"
    assert DEFAULT_STORE_NAME not in one_store.stores

    message = load_error("[stores.a]\n[stores.b]\n[limiters.x]\nrate_per_second = 1\n")
    assert "[limiters.x] store: missing; name one of the stores: a, b" in message
    message = load_error("[stores.prod]\n[limiters.x]\nstore='prd'\nrate_per_second=1\n")
    assert "[limiters.x] store: no store named 'prd' (did you mean 'prod'?)" in message


def test_fail_closed() -> None:
    text = "[limiters.x]\nrate_per_second = 1\nfail_closed = true\n"
    assert load(text).limiters["x"].fail_closed is True


@pytest.mark.parametrize("table", ['limiters."a b"', 'limiters."a.b"', 'stores."é"'])
def test_names_must_be_nats_safe(table: str) -> None:
    message = load_error(f"[{table}]\nrate_per_second = 1\n")
    assert "names may only use letters, digits, '_' and '-'" in message


def test_names_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP", "shop")
    config = load('[limiters."${APP}_api"]\nrate_per_second = 1\n')
    assert list(config.limiters) == ["shop_api"]
    assert config.limiters["shop_api"].policy.name == "shop_api"
    message = load_error('[limiters."${APP}"]\nlimit=1\n[limiters.shop]\nlimit=2\n')
    assert "defined twice" in message


# --- middleware and routes -----------------------------------------------------------------------

LIMITERS = "[limiters.api]\nrate_per_second = 10\n[limiters.login]\nlimit = '5/minute'\n"


def test_middleware_settings() -> None:
    config = load(
        LIMITERS + "[middleware]\ndefault = ['api']\ntrusted_proxies = ['10.1.2.3/8', '::1']\n"
        "headers = 'legacy'\nipv6_prefix = 56\n",
    )
    middleware = config.middleware
    assert middleware.default == ("api",)
    assert middleware.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert (middleware.headers, middleware.ipv6_prefix) == ("legacy", 56)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("default = 'apj'", "default: no limiter named 'apj' (did you mean 'api'?)"),
        ("trusted_proxies = ['10.0.0.0/33']", "trusted_proxies: expected an IP address or network"),
        ("headers = 'ietf'", "headers: expected one of 'draft', 'legacy', 'none'"),
        ("ipv6_prefix = 129", "ipv6_prefix: expected an integer from 1 to 128"),
        ("limiters = ['api']", "limiters: unknown key"),
    ],
)
def test_middleware_errors(line: str, words: str) -> None:
    message = load_error(LIMITERS + f"[middleware]\n{line}\n")
    assert f"rate-sync.toml: [middleware] {words}" in message


def test_routes() -> None:
    config = load(
        LIMITERS + "[[routes]]\npath = '/api/*'\nlimiters = 'api'\n"
        "[[routes]]\npath = '/login'\nmethods = ['post', 'Put']\nlimiters = ['login', 'api']\n"
        "[[routes]]\npath = '/health'\nexempt = true\n",
    )
    api, login, health = config.routes
    assert (api.path, api.methods, api.limiters, api.exempt) == ("/api/*", None, ("api",), False)
    assert (login.methods, login.limiters) == (("POST", "PUT"), ("login", "api"))
    assert (health.limiters, health.exempt) == ((), True)


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ("path = '/x'", "limiters: a rule needs either limiters or exempt = true"),
        ("path = '/x'\nexempt = false", "limiters: a rule needs either"),
        ("path = '/x'\nlimiters = 'api'\nexempt = true", "limiters: a rule needs either"),
        ("limiters = 'api'", "path: missing"),
        ("path = 'x/*'\nlimiters = 'api'", "path: expected a path starting with '/'"),
        ("path = '/x'\nlimiters = ['nope']", "limiters: no limiter named 'nope'"),
        ("path = '/x'\nmethods = ['GET POST']\nexempt = true", "methods: expected HTTP method"),
        ("path = '/x'\nexempt = 'yes'", "exempt: expected true or false"),
    ],
)
def test_route_errors(lines: str, words: str) -> None:
    message = load_error(
        LIMITERS + f"[[routes]]\npath = '/ok'\nexempt = true\n[[routes]]\n{lines}\n"
    )
    assert f"rate-sync.toml: [[routes]] #2 {words}" in message


def test_routes_must_be_an_array_of_tables() -> None:
    message = load_error(LIMITERS + "[routes]\npath = '/x'\n")
    assert "rate-sync.toml: routes: expected [[routes]] tables" in message


# --- anything in, ConfigError or a Config out ----------------------------------------------------

STORE_KEYS = ["engine", "url", "token", "bucket_name", "auto_create", "replicas", "tls_cert"]
STORE_KEYS += ["tls_key", "timeout", "max_keys", "retry_interval"]
LIMITER_KEYS = ["store", "rate_per_second", "limit", "window_seconds", "burst", "key"]
LIMITER_KEYS += ["fail_closed", "algorithm", "max_concurrent", "lease_seconds"]
MIDDLEWARE_KEYS = ["default", "headers", "trusted_proxies", "ipv6_prefix"]
ROUTE_KEYS = ["path", "methods", "limiters", "exempt"]
INTERESTING_STRINGS = [
    *("nats", "memory", "nats://h:4222", "nats://a,tls://b", "http://u:p@h", "nats://h:0x"),
    *("600/minute", "10/s", "0/d", "ip", "global", "header:X", "header:", "a.b:c", "/x/*"),
    *("${RATESYNC_TEST_UNSET}", "${RATESYNC_TEST_UNSET:-}", "${HOME:-x}", "${bad var}", "${"),
    *("token_bucket", "sliding_window", "draft", "10.0.0.0/8", "::1", "api", "prod", "default"),
    *("${RATESYNC_TEST_UNSET:-10.0}", "${RATESYNC_TEST_UNSET:-20}", "${RATESYNC_TEST_UNSET:-true}"),
    *("${RATESYNC_TEST_UNSET:-ten}", "${RATESYNC_TEST_UNSET:-1e999}", "999999999999/second"),
]
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 5, 60, 128, 129, 10**9, 10**9 + 1, 31_622_401, 10**400]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(INTERESTING_STRINGS),
)


def nested_list(depth: int) -> list[Any]:
    return [nested_list(depth - 1)] if depth else []


values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.builds(nested_list, st.integers(min_value=12, max_value=40)),
)


def tables(known: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly the section's own keys (to get past "unknown key"), sometimes anything."""
    anything = st.dictionaries(st.text(max_size=6), values, max_size=2)
    return (
        st.dictionaries(st.sampled_from(known), values, max_size=4) | anything
        if known
        else anything
    )


names = st.one_of(
    st.sampled_from(["api", "prod", "default", "${RATESYNC_TEST_UNSET:-x}"]), st.text(max_size=5)
)
sections = st.fixed_dictionaries(
    {},
    optional={
        "stores": st.dictionaries(names, tables(STORE_KEYS), max_size=3),
        "limiters": st.dictionaries(names, tables(LIMITER_KEYS), max_size=3),
        "middleware": tables(MIDDLEWARE_KEYS),
        "routes": st.lists(tables(ROUTE_KEYS), max_size=3),
    },
)
strays: st.SearchStrategy[dict[str, Any]] = st.just({}) | st.dictionaries(
    st.text(max_size=5), tables([]), max_size=1
)
documents = st.builds(lambda stray, known: {**stray, **known}, strays, sections)


def toml_value(value: Any) -> str:
    """Just enough of a TOML writer for the values the strategies above produce."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # nan, inf and -inf are TOML too
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = "".join(
        f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in value
    )
    return f'"{escaped}"'


def to_toml(document: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, content in document.items():
        if isinstance(content, list):  # [[routes]]
            tables = [(f"[[{toml_value(section)}]]", table) for table in content]
        elif all(isinstance(table, dict) for table in content.values()):  # [stores.NAME]
            tables = [(f"[{toml_value(section)}.{toml_value(n)}]", t) for n, t in content.items()]
        else:  # [middleware]
            tables = [(f"[{toml_value(section)}]", content)]
        for header, table in tables:
            lines.append(header)
            lines.extend(f"{toml_value(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def usable_or_config_error(source: Path | dict[str, Any]) -> None:
    """Loads, and then nothing downstream overflows (headers, one decision per limiter), or a
    ConfigError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateSyncConfigWarning)
        try:
            config = load_config(source)
        except ConfigError:
            return
    RateLimitHeaders.for_config(config)
    now = time.time_ns()
    for limiter in config.limiters.values():
        tat, decision = consume(limiter.policy, now, now, limiter.policy.burst)
        assert decision.allowed
        assert tat is not None
        assert tat < 2**63
        assert consume(limiter.policy, tat, now)[1].retry_after < math.inf


def loads_or_config_error(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    usable_or_config_error(path)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_any_text_loads_or_raises_config_error(text: str, tmp_path: Path) -> None:
    loads_or_config_error(tmp_path / "fuzz.toml", text)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_any_document_loads_or_raises_config_error(
    document: dict[str, Any], tmp_path: Path
) -> None:
    loads_or_config_error(tmp_path / "fuzz.toml", to_toml(document))
    usable_or_config_error(document)


# --- what a ConfigError says in fields -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "table", "key"),
    [
        ("[stores.prod]\nengine = nats\n", "toml_syntax", None, None),
        (
            "[limiters.api]\nrate_per_second = 1\nbrust = 5\n",
            "unknown_key",
            "[limiters.api]",
            "brust",
        ),
        ("[limiter.api]\n", "unknown_key", None, "limiter"),
        ("[limiters.api]\nburst = 'x'\n", "bad_value", "[limiters.api]", "burst"),
        ("[stores.prod]\nengine = 'nats'\n", "missing", "[stores.prod]", "url"),
        ("[limiters.api]\nburst = 5\n", "missing", "[limiters.api]", "limit"),
        ("[[routes]]\nexempt = true\n", "missing", "[[routes]] #1", "path"),
        (
            "[limiters.api]\nrate_per_second = 1\nlimit = '1/s'\n",
            "conflict",
            "[limiters.api]",
            "rate_per_second",
        ),
        ("[[routes]]\npath = '/x'\n", "conflict", "[[routes]] #1", "limiters"),
        (
            "[limiters.api]\nstore = 'nope'\nrate_per_second = 1\n",
            "undefined_reference",
            "[limiters.api]",
            "store",
        ),
        ("[middleware]\ndefault = 'nope'\n", "undefined_reference", "[middleware]", "default"),
        ("[stores.prod]\ntoken = '${NATS_TOKEN}'\n", "env_var", "[stores.prod]", "token"),
        ("[stores.prod]\ntoken = '${NATS TOKEN}'\n", "env_var", "[stores.prod]", "token"),
    ],
)
def test_config_errors_say_where_and_what_in_fields(
    text: str, kind: str, table: str | None, key: str | None
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    error = caught.value
    assert (error.source, error.kind, error.table, error.key) == (
        "rate-sync.toml",
        kind,
        table,
        key,
    )
    place = " ".join(part for part in (table, key) if part)
    assert str(error).startswith(f"rate-sync.toml: {place}: " if place else "rate-sync.toml: ")
    assert error.variable == ("NATS_TOKEN" if "NATS_TOKEN" in text else None)


def test_missing_and_unreadable_files_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("missing.toml")
    assert (caught.value.kind, caught.value.source) == ("file", "missing.toml")
    Path("latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config("latin1.toml")
    assert (caught.value.kind, caught.value.source) == ("unreadable", "latin1.toml")
    monkeypatch.setenv("RATE_SYNC_CONFIG", "/nowhere/rate-sync.toml")
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert (caught.value.kind, caught.value.source) == ("file", "/nowhere/rate-sync.toml")


def test_a_config_error_keeps_its_fields_through_pickle() -> None:
    with pytest.raises(ConfigError) as caught:
        load("[limiters.api]\nrate_per_second = '${API_RATE:-ten}'\n")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert (copy.source, copy.table, copy.key, copy.kind, copy.variable) == (
        "rate-sync.toml",
        "[limiters.api]",
        "rate_per_second",
        "env_var",
        "API_RATE",
    )


def test_a_config_error_raised_elsewhere_has_the_defaults() -> None:
    error = ConfigError("something else")
    assert (error.source, error.table, error.key, error.kind, error.variable) == (
        None,
        None,
        None,
        "other",
        None,
    )
