"""`ratesync get|reset LIMITER --key IDENTITY`: groups named as the application sees them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.keys import join_identity
from tests.test_cli import ratesync

pytestmark = pytest.mark.nats


@pytest.fixture
def config(nats_url: str, bucket_name: str, tmp_path: Path) -> Path:
    path = tmp_path / "rate-sync.toml"
    path.write_text(
        f"""
[stores.prod]
engine = "nats"
url = "{nats_url}"
bucket_name = "{bucket_name}"

[limiters.login]
store = "prod"
limit = "3/hour"

[limiters.api]
store = "prod"
limit = ["2/second", "10/hour"]
key = ["ip", "header:X-User"]

[limiters.search]
store = "prod"
algorithm = "sliding_window"
limit = 5
window_seconds = 60
key = "user"

[limiters.upload]
store = "prod"
max_concurrent = 3
key = "user"
"""
    )
    return path


def spend(config: Path, limiter: str, key: str, times: int = 1) -> None:
    async def run() -> None:
        async with AsyncRateLimiter(str(config)) as rate_limiter:
            for _ in range(times):
                await rate_limiter.hit(limiter, key=key)

    asyncio.run(run())


def test_get_and_reset_a_client_by_its_ip(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spend(config, "login", "127.0.0.1", times=3)

    status, output = ratesync("get", "login", "--key", "127.0.0.1", "--config", config)
    assert status == 0
    assert "login.127_2E0_2E0_2E1" in output
    assert "available    0 of 3" in output
    # The raw KV key still works, with the same answer.
    raw = ratesync("get", "login.127_2E0_2E0_2E1", "--json", "--config", config)
    assert json.loads(raw[1])["available"] == 0

    # The IP written into the key by hand is another key, never written: said so, exit 1.
    status, output = ratesync("reset", "login.127.0.0.1", "--config", config)
    assert status == 1
    assert "never written" in output
    assert "--key 127.0.0.1" in capsys.readouterr().err

    reset = ratesync("reset", "login", "--key", "127.0.0.1", "--config", config)
    assert reset == (0, "login ip=127.0.0.1: reset\n")
    state = json.loads(
        ratesync("get", "login", "--key", "127.0.0.1", "--json", "--config", config)[1]
    )
    assert state["exists"] is False


def test_an_ipv6_client_is_found_by_any_address_of_its_network(config: Path) -> None:
    spend(config, "login", "2001:db8::/64")  # the middleware's identity for 2001:db8::1
    status, output = ratesync(
        "get", "login", "--key", "2001:db8::abcd", "--json", "--config", config
    )
    assert status == 0, output
    assert json.loads(output)["available"] == 2


def test_a_composite_key_takes_one_key_per_part(config: Path) -> None:
    spend(config, "api", join_identity(["10.0.0.7", "kim"]))
    status, output = ratesync(
        "get", "api", "--key", "10.0.0.7", "--key", "kim", "--json", "--config", config
    )
    assert status == 0, output
    state = json.loads(output)
    assert state["kind"] == "rates"
    assert [rate["available"] for rate in state["rates"]] == [1, 9]
    assert state["identity"] == {"ip": "10.0.0.7", "header:X-User": "kim"}
    assert ratesync("get", "api", "--key", "10.0.0.7", "--config", config)[0] == 2


def test_a_composite_key_by_part_names_shown_decoded(config: Path) -> None:
    spend(config, "api", join_identity(["10.0.0.7", "kim"]))
    named = ("--key", "header:x-user=kim", "--key", "ip=10.0.0.7")  # any order, any case
    status, output = ratesync("get", "api", *named, "--config", config)
    assert status == 0, output
    assert "group        api ip=10.0.0.7 header:X-User=kim\n" in output
    assert "KV key       api.8_3A10_2E0_2E0_2E73_3Akim\n" in output
    assert ratesync("reset", "api", *named, "--config", config) == (
        0,
        "api ip=10.0.0.7 header:X-User=kim: reset\n",
    )


def test_a_key_part_the_limiter_does_not_have_is_an_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Banning another group than the application's would report success and change nothing."""
    for given in (
        ("--key", "ip=10.0.0.7", "--key", "user=kim"),  # api's parts: ip, header:X-User
        ("--key", "ip=10.0.0.7"),  # a part missing
        ("--key", "ip=10.0.0.7", "--key", "kim"),  # named and not
        ("--key", "ip=10.0.0.7", "--key", "ip=10.0.0.8"),  # twice
    ):
        assert ratesync("ban", "api", *given, "--config", config)[0] == 2
    assert "it has no part 'user' (its parts: ip, header:X-User)" in capsys.readouterr().err
    assert ratesync("ban", "login", "--key", "user=kim", "--config", config)[0] == 2
    assert ratesync("overrides", "--config", config) == (0, "no overrides or bans in force\n")


def test_a_group_never_written_exits_1_for_get_and_reset(config: Path) -> None:
    status, output = ratesync("get", "login", "--key", "10.9.9.9", "--config", config)
    assert (status, "never written" in output) == (1, True)
    status, output = ratesync("reset", "login", "--key", "10.9.9.9", "--json", "--config", config)
    assert status == 1
    assert json.loads(output) == {
        "group": "login.10_2E9_2E9_2E9",
        "limiter": "login",
        "identity": {"ip": "10.9.9.9"},
        "name": "login ip=10.9.9.9",
        "reset": False,
        "written": False,
    }


def test_a_keyed_limiter_without_key_is_a_usage_error(config: Path) -> None:
    assert ratesync("get", "login", "--config", config)[0] == 2
    assert ratesync("get", "no such key!", "--config", config)[0] == 2


def test_get_decodes_a_sliding_window_and_slots(config: Path) -> None:
    spend(config, "search", "kim", times=2)
    status, output = ratesync("get", "search", "--key", "kim", "--config", config)
    assert status == 0, output
    assert "kind         sliding_window" in output
    assert "available    3 of 5" in output
    assert "window (s)   60.0" in output

    async def hold_a_slot() -> str:
        async with AsyncRateLimiter(str(config)) as limiter:
            permit = await limiter.acquire("upload", key="kim")
            command = ("get", "upload", "--key", "kim", "--json", "--config", config)
            shown = (await asyncio.to_thread(ratesync, *command))[1]
            await permit.release()
            return shown

    state = json.loads(asyncio.run(hold_a_slot()))
    assert state["kind"] == "slots"
    assert state["group"] == "upload.kim.=slots"
    assert (state["in_use"], state["limit"]) == (1, 3)
    assert state["holders"][0]["slots"] == 1


def test_override_ban_unban_and_the_list_in_force(config: Path) -> None:
    spend(config, "login", "127.0.0.1", times=3)
    status, output = ratesync(
        "override",
        "login",
        "--key",
        "127.0.0.1",
        "--limit",
        "10/second",
        "--ttl",
        "60",
        "--config",
        config,
    )
    assert (status, output) == (0, "login ip=127.0.0.1: overridden for 60s\n")
    assert ratesync("ban", "login", "--key", "10.0.0.9", "--config", config) == (
        0,
        "login ip=10.0.0.9: banned until removed\n",
    )
    rules = json.loads(ratesync("overrides", "--json", "--config", config)[1])
    by_kind = {rule["kind"]: rule for rule in rules}
    assert by_kind["override"]["group"] == "login.127_2E0_2E0_2E1"
    assert by_kind["override"]["policy"] == "login:10/second"
    assert 50 < by_kind["override"]["expires_in_seconds"] <= 60
    assert by_kind["ban"]["expires_in_seconds"] is None

    async def decide() -> tuple[bool, str]:
        async with AsyncRateLimiter(str(config)) as limiter:
            overridden = await limiter.hit("login", key="127.0.0.1")
            return overridden.allowed, (await limiter.hit("login", key="10.0.0.9")).reason

    assert asyncio.run(decide()) == (True, "banned")  # a process started later loads both

    assert ratesync("unban", "login", "--key", "10.0.0.9", "--config", config) == (
        0,
        "login ip=10.0.0.9: unbanned\n",
    )
    assert ratesync("override", "login", "--key", "127.0.0.1", "--clear", "--config", config) == (
        0,
        "login ip=127.0.0.1: override removed\n",
    )
    assert ratesync("overrides", "--config", config) == (0, "no overrides or bans in force\n")


def test_lifting_a_rule_never_set_says_so_and_exits_1(config: Path) -> None:
    """Like get/reset of a group never written: an unban of an identity never banned, or an
    override cleared where there is none, changes nothing and says so."""
    unban = ("unban", "login", "--key", "10.9.9.9", "--config", config)
    assert ratesync(*unban) == (
        1,
        "login ip=10.9.9.9: not banned (no ban in force), nothing to unban\n",
    )
    clear = ("override", "login", "--key", "10.9.9.9", "--clear", "--json", "--config", config)
    status, output = ratesync(*clear)
    assert status == 1
    assert json.loads(output) == {
        "group": "login.10_2E9_2E9_2E9",
        "limiter": "login",
        "identity": {"ip": "10.9.9.9"},
        "name": "login ip=10.9.9.9",
        "command": "override",
        "ttl_seconds": None,
        "found": False,
    }
    assert ratesync("ban", "login", "--key", "10.9.9.9", "--ttl", "60", "--config", config)[0] == 0
    assert ratesync(*unban)[0] == 0  # in force: lifted
    assert ratesync(*unban)[0] == 1  # lifted already
    assert ratesync("ban", "login", "--key", "10.9.9.9", "--ttl", "0.1", "--config", config)[0] == 0
    time.sleep(0.2)
    assert ratesync(*unban)[0] == 1  # ended by its ttl: nothing in force
    assert ratesync("overrides", "--config", config) == (0, "no overrides or bans in force\n")


def test_rule_commands_refuse_bad_input(config: Path) -> None:
    assert (
        ratesync("override", "login", "--key", "x", "--limit", "fast", "--config", config)[0] == 2
    )
    assert ratesync("override", "login", "--key", "x", "--config", config)[0] == 2  # no --limit
    assert ratesync("ban", "login", "--config", config)[0] == 2  # no --key
    assert ratesync("ban", "nope", "--key", "x", "--config", config)[0] == 2
    assert ratesync("ban", "login", "--key", "x", "--ttl", "-1", "--config", config)[0] == 2


def test_check_verifies_the_control_subject_and_the_rules_bucket(config: Path) -> None:
    status, output = ratesync("check", "--config", config)
    assert status == 0, output
    assert "ok    control subject" in output
    assert "ok    rules bucket" in output
