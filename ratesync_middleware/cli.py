"""`ratesync`: check a NATS set-up and inspect the shared buckets, without the `nats` CLI.

    ratesync check  [--config PATH] [--store NAME]   the setup guide's verification steps
    ratesync status                                  bucket settings, key count, bytes
    ratesync get|reset LIMITER [--key IDENTITY]      one group's decoded state; refill it
    ratesync watch                                   live decoded updates
    ratesync override|ban|unban LIMITER --key ID     live rules for one group, in every process
    ratesync overrides                               the overrides and bans in force
    ratesync fleet                                   the processes sharing each bucket
    ratesync top [--interval S] [--once]             the busiest and most refused groups
    ratesync watch --events                          denials, bans and overrides, live

The shared options (`--config`, `--store`, `--json`) go before or after the command alike.
Human-readable by default, `--json` for scripts. A composite identity is given part by part,
`--key ip=127.0.0.13 --key user=kim`, and shown decoded: `login ip=127.0.0.13 user=kim`.

Exit status, so that a script can tell the cases apart:

    0  success (a check's warnings included)
    1  not found (a group never written, no ban or override to lift) or a check failed
    2  a bad command line or configuration: a missing, unreadable or invalid file, none found
       at all, no NATS store to act on
    3  the store is unreachable or refused us (connection, name, credentials, permissions)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import nats.js.errors

from . import __version__
from .bucket import NS_PER_SECOND, Policy, Rates, peek
from .client_ip import ClientAddress
from .config import (
    ENV_CONFIG,
    SEARCH_PATHS,
    Config,
    LimiterConfig,
    StoreConfig,
    discover_config_path,
    load_config,
)
from .errors import (
    AuthenticationError,
    ConfigError,
    RateSyncError,
    StoreError,
)
from .keys import (
    SLOTS_TOKEN,
    TIER_TOKEN,
    decode_identity,
    group_key,
    join_identity,
    slots_key,
    split_identity,
    tier_key,
)
from .limiter import AsyncRateLimiter
from .rules import OVERRIDE_TOKEN, Override, override_policy
from .slots import live_holders
from .stores import limiter_windows_ns
from .stores.nats import BUCKET_HISTORY, BUCKET_TTL_SECONDS, NatsStore, StoredEntry, decode_value
from .stores.nats.bucket import bucket_ttl_seconds, key_expiry, precreate_command
from .stores.nats.control import (
    RuleKind,
    events_subject,
    fleet,
    open_rules,
    reset_subject,
    rules_bucket,
)
from .stores.nats.wire import decode_slots, decode_state
from .window import SlidingWindow

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # also: a check failed
EXIT_CONFIG = 2
EXIT_STORE = 3

EXIT_STATUS_HELP = """exit status:
  0  success (a check's warnings included)
  1  not found (a group never written, no ban or override to lift), or a check failed
  2  bad command line or configuration (no NATS store to act on included)
  3  store unreachable or refused (connection, name, credentials, permissions)"""


@dataclass
class Step:
    """One line of `ratesync check`; a warning is ok (exit 0) but says what to change."""

    store: str
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        mark = "FAIL" if not self.ok else "WARN" if self.warning else "ok  "
        return f"  {mark}  {self.name:<24} {self.detail}"


# What a bucket's limits must leave room for. Today's value (`encode_value`) is about 71 bytes and
# a write adds about 50 bytes of headers (the compare-and-set's expected sequence), which count
# against the bucket's max value size too; the allowances leave room for bigger values to come.
VALUE_ALLOWANCE = 256
HEADER_ALLOWANCE = 128
MESSAGE_ALLOWANCE = VALUE_ALLOWANCE + HEADER_ALLOWANCE
# One key as the stream stores it: the message, its subject `$KV.<bucket>.<key>` and the record's
# own overhead (about 190 bytes per key today).
KEY_ALLOWANCE = 512
# The fewest keys a bucket should hold: one per limited identity (IP, user) active within the TTL.
MIN_KEYS = 10_000
# A bucket this full refuses (or, with discard "old", drops) keys soon: a failure, not a warning.
FULL_FRACTION = 0.9


# -- check --------------------------------------------------------------------------------------


async def check_store(
    config: StoreConfig, windows_ns: Mapping[str, int] | None = None
) -> list[Step]:
    """The guide's verification steps for one store, stopping at the first that fails."""
    if config.engine != "nats":
        return [Step(config.name, "memory store", True, "in-process, nothing to set up")]
    steps: list[Step] = []

    def step(name: str, ok: bool, detail: str) -> bool:
        steps.append(Step(config.name, name, ok, detail))
        return ok

    servers = ", ".join(config.redacted_servers)
    windows_ns = windows_ns or {}
    store = NatsStore(config, windows_ns=windows_ns)
    try:
        nc = await store.connect()
    except AuthenticationError as error:
        step("server reachable", True, servers)
        step("authentication accepted", False, str(error))
        return steps
    except StoreError as error:
        step("server reachable", False, str(error))
        return steps
    try:
        version = nc.connected_server_version
        shown = f"{version.major}.{version.minor}.{version.patch}"
        step("server reachable", True, f"{servers} (nats-server {shown})")
        step("authentication accepted", True, _auth_form(config))
        js = nc.jetstream(timeout=max(config.timeout, 2.0))
        try:
            await js.account_info()
        except Exception as error:
            step("JetStream enabled", False, str(store._jetstream_failure(error)))
            return steps
        step("JetStream enabled", True, "account info answered")
        existed = await _bucket_exists(js, config.bucket_name)
        try:
            info = await store.open_bucket(js)
        except StoreError as error:
            step(
                "bucket present" if not config.auto_create else "bucket creatable",
                False,
                str(error),
            )
            return steps
        if existed:
            step("bucket present", True, config.bucket_name)
        else:
            step("bucket creatable", True, f"{config.bucket_name} created (auto_create = true)")
        name, ok, detail = _settings_step(config, info, bucket_ttl_seconds(windows_ns))
        step(name, ok, f"{detail}; {key_expiry(info, (version.major, version.minor))[1]}")
        steps.append(Step(config.name, *_limits_step(config, info)))
        step(*await _control_step(store, nc))
        step(*await _rules_step(config, js))
    finally:
        await store._close_client(nc)
    return steps


async def _control_step(store: NatsStore, nc: Any) -> tuple[str, bool, str]:
    """Resets are announced on `ratesync.<bucket>.reset`: every process subscribes to it."""
    subject = reset_subject(store.config.bucket_name)
    store._permission_denied = False
    subscription = await nc.subscribe(subject)
    await nc.publish(subject, b"")  # an empty key: nobody forgets anything
    await nc.flush(timeout=store.config.connect_timeout)
    await asyncio.sleep(0.1)  # a permissions violation arrives as an asynchronous -ERR
    with suppress(Exception):
        await subscription.unsubscribe()
    if store._permission_denied:
        return (
            "control subject",
            False,
            f"these credentials may not subscribe to or publish on {subject}: grant "
            f"ratesync.{store.config.bucket_name}.> (without it, resets reach other processes "
            "only through the one-second re-check of cached denials)",
        )
    return "control subject", True, f"{subject}: subscribe and publish allowed"


async def _rules_step(config: StoreConfig, js: Any) -> tuple[str, bool, str]:
    """Overrides and bans live in `<bucket>_rules`: processes watch it, operators write it."""
    name = rules_bucket(config.bucket_name)
    existed = await _bucket_exists(js, name)
    try:
        kv = await open_rules(js, config)
        await kv.keys()
    except nats.js.errors.NoKeysError:
        pass
    except Exception as error:
        return (
            "rules bucket",
            False,
            f"{name}: {type(error).__name__}; overrides and bans need it: pre-create it with "
            f"`nats kv add {name} --history=1` and grant the permissions of "
            "docs/setup/nats-setup.md, Operating a fleet",
        )
    return "rules bucket", True, name if existed else f"{name} created (auto_create = true)"


def _auth_form(config: StoreConfig) -> str:
    if config.creds:
        return "creds file"
    if config.nkey:
        return "nkey"
    if config.token:
        return "token"
    if any("@" in url for url in config.servers):
        return "user and password"
    return "no authentication"


async def _bucket_exists(js: Any, bucket: str) -> bool:
    try:
        await js.stream_info(f"KV_{bucket}")
    except Exception:
        return False
    return True


def _settings_step(config: StoreConfig, info: Any, expected_ttl: int) -> tuple[str, bool, str]:
    """The bucket's settings against the guide's: history 1, the TTL (24 h, or the longest
    window of the store's limiters when longer), the configured replicas."""
    history = info.config.max_msgs_per_subject
    ttl = info.config.max_age or 0
    replicas = info.config.num_replicas or 1
    shown = f"history {history}, TTL {_duration(ttl)}, replicas {replicas}"
    wrong = []
    if history != BUCKET_HISTORY:
        wrong.append(f"history is {history}, the guide's is {BUCKET_HISTORY}")
    if abs(ttl - expected_ttl) > 1:
        expected = (
            "the guide's is 24h"
            if expected_ttl == BUCKET_TTL_SECONDS
            else (f"the longest window of its limiters needs {_duration(expected_ttl)}")
        )
        wrong.append(f"TTL is {_duration(ttl)}, {expected}")
    if replicas != config.replicas:
        wrong.append(f"replicas is {replicas}, configured {config.replicas}")
    if not wrong:
        return "bucket settings", True, shown
    bucket = config.bucket_name
    fix = f"fix: `nats kv rm {bucket}` then `{precreate_command(bucket, expected_ttl)}`"
    return "bucket settings", False, f"{'; '.join(wrong)} ({fix})"


def _limits_step(config: StoreConfig, info: Any) -> tuple[str, bool, str, bool]:
    """Size limits of the bucket that would reject our writes: (name, ok, detail, warning).

    A max value size below one write's allowance fails (every write may be refused); a bucket
    nearly full fails; a max bytes or max msgs that holds fewer than MIN_KEYS keys warns, since
    whether it is enough depends on how many identities the application limits.
    """
    stream = info.config
    max_msg_size = _limit(stream.max_msg_size)
    max_bytes = _limit(stream.max_bytes)
    max_msgs = _limit(stream.max_msgs)
    discard = str(getattr(stream.discard, "value", stream.discard) or "new")
    full_effect = (
        "the oldest keys are dropped (their groups start again with a full bucket)"
        if discard == "old"
        else "writes of new keys are refused"
    )
    failures: list[str] = []
    warnings: list[str] = []
    flags: list[str] = []
    if max_msg_size is not None and max_msg_size < MESSAGE_ALLOWANCE:
        failures.append(
            f"max value size is {max_msg_size} B, a write needs up to {MESSAGE_ALLOWANCE} B "
            f"(a value up to {VALUE_ALLOWANCE} B and its headers): writes are refused"
        )
        flags.append("--max-msg-size=-1")
    for label, flag, limit, used, per_key in (
        ("max bytes", "--max-bytes=-1", max_bytes, _stream_state(info, "bytes"), KEY_ALLOWANCE),
        ("max msgs", "--max-msgs=-1", max_msgs, _stream_state(info, "messages"), 1),
    ):
        if limit is None:
            continue
        keys = limit // per_key
        shown = _size(limit) if per_key > 1 else f"{limit:,}"
        if used >= FULL_FRACTION * limit:
            failures.append(f"{label} is {shown} and {used / limit:.0%} used: {full_effect}")
            flags.append(flag)
        elif keys < MIN_KEYS:
            warnings.append(
                f"{label} is {shown}, room for about {keys:,} keys (fewer than {MIN_KEYS:,}); "
                f"once full, {full_effect}"
            )
            flags.append(flag)
    if not failures and not warnings:
        if max_msg_size is None and max_bytes is None and max_msgs is None:
            return "bucket limits", True, "no size limits", False
        shown_limits = [
            f"max value size {_size(max_msg_size)}" if max_msg_size is not None else "",
            f"max bytes {_size(max_bytes)} (~{max_bytes // KEY_ALLOWANCE:,} keys)"
            if max_bytes is not None
            else "",
            f"max msgs {max_msgs:,}" if max_msgs is not None else "",
        ]
        return "bucket limits", True, ", ".join(s for s in shown_limits if s), False
    fix = f"fix: `nats stream edit KV_{config.bucket_name} {' '.join(flags)}`"
    if failures:
        return "bucket limits", False, f"{'; '.join(failures + warnings)} ({fix})", False
    return "bucket limits", True, f"{'; '.join(warnings)} ({fix})", True


def _stream_state(info: Any, field: str) -> int:
    """A counter of the stream's state (`bytes`, `messages`), 0 when the server did not say."""
    return int(getattr(info.state, field, 0) or 0)


def _limit(value: int | None) -> int | None:
    """A stream limit, None for unlimited (the server's -1; 0 and absent mean the same)."""
    return value if value is not None and value > 0 else None


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}" if size % scale == 0 else f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _duration(seconds: float) -> str:
    if not seconds:
        return "none"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return (
        "".join(
            f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if value
        )
        or f"{seconds:g}s"
    )


# -- status, get, reset, watch ------------------------------------------------------------------


async def bucket_status(store: NatsStore) -> dict[str, Any]:
    """Settings and size of the store's bucket."""
    js = await store.ready()
    info = await js.stream_info(f"KV_{store.config.bucket_name}")
    kv = await js.key_value(store.config.bucket_name)
    try:
        keys = len(await kv.keys())
    except nats.js.errors.NoKeysError:
        keys = 0
    return {
        "store": store.config.name,
        "bucket": store.config.bucket_name,
        "history": info.config.max_msgs_per_subject,
        "ttl_seconds": info.config.max_age,
        "replicas": info.config.num_replicas,
        "keys": keys,
        "bytes": info.state.bytes,
        "storage": str(getattr(info.config.storage, "value", info.config.storage) or "file"),
    }


# -- groups named by limiter and identity ---------------------------------------------------------

_VALID_KEY = re.compile(r"[-/_=A-Za-z0-9]+(\.[-/_=A-Za-z0-9]+)*")


@dataclass(frozen=True)
class Target:
    """The KV keys a command acts on: a group's rate and/or concurrency slots, or one raw key."""

    store: StoreConfig
    keys: list[str]
    hint: str = ""  # for a raw key that looks like an identity the middleware would encode


# A named part of `--key`: `ip=...`, `user=...`, `path=...`, `header:X-User=...`, `pkg.mod:func=...`.
_NAMED_PART = re.compile(
    r"(ip|user|path|global|header:[-A-Za-z0-9_]+|[\w.]+:[\w.]+)=(.*)", re.DOTALL
)


def _same_part(spec: str, name: str) -> bool:
    if spec.startswith("header:") and name.startswith("header:"):
        return spec.lower() == name.lower()  # header names are case-insensitive
    return spec == name


def _ordered_parts(
    config: Config, limiter: LimiterConfig, specs: Sequence[str], given: Sequence[str]
) -> list[str]:
    """`--key` values in the order of the limiter's `key`: named (`ip=1.2.3.4`) or by position."""
    where = f"{config.source}: limiter {limiter.name!r} has key = {list(specs)}"
    named = [_NAMED_PART.fullmatch(part) for part in given]
    if not any(named):
        if len(given) != len(specs):
            example = " ".join(f"--key {spec}=..." for spec in specs)
            raise ConfigError(
                f"{where}: give --key once per part ({len(given)} given), e.g. {example}"
            )
        return list(given)
    values: dict[str, str] = {}
    for part, match in zip(given, named, strict=True):
        if match is None:
            raise ConfigError(
                f"{where}: --key {part!r} names no part; name every part (--key ip=...) or none"
            )
        name, value = match.group(1), match.group(2)
        spec = next((spec for spec in specs if _same_part(spec, name)), None)
        if spec is None:
            raise ConfigError(
                f"{where}: it has no part {name!r} (its parts: {', '.join(specs)}); the group "
                "named would not be one the application uses"
            )
        if spec in values:
            raise ConfigError(f"{where}: part {spec!r} given twice")
        values[spec] = value
    missing = [spec for spec in specs if spec not in values]
    if missing:
        raise ConfigError(f"{where}: --key {missing[0]}=... is missing")
    return [values[spec] for spec in specs]


def operator_identity(config: Config, limiter: LimiterConfig, parts: Sequence[str]) -> str:
    """The identity the middleware computes for a request with these key parts.

    Each part of the limiter's `key` by name (`key = ["ip", "user"]`: `--key ip=1.2.3.4
    --key user=kim`, in any order), or one value per part in that order. An IPv6 address of an
    `ip` part is grouped by network as the middleware groups it (`ipv6_prefix`).
    """
    specs = [spec for spec in limiter.key if spec != "global"]
    ordered = _ordered_parts(config, limiter, specs, parts)
    address = ClientAddress((), config.middleware.ipv6_prefix)
    values = [
        address(part, lambda _: None) if spec == "ip" and part else part
        for spec, part in zip(specs, ordered, strict=True)
    ]
    return join_identity(values)


@dataclass(frozen=True)
class GroupName:
    """A KV key as an operator reads it: `login ip=127.0.0.13 user=kim`, not its encoding."""

    key: str
    limiter: str
    identity: dict[str, str] | None  # part -> value; {} for a global limiter; None: unknown
    note: str = ""  # "slots", "tier pro", "override", "hashed identity"

    def __str__(self) -> str:
        shown = [self.limiter]
        if self.identity:  # a global limiter's group is its name alone
            shown += [f"{part}={value}" for part, value in self.identity.items()]
        if self.note:
            shown.append(f"({self.note})")
        return " ".join(shown)

    def fields(self) -> dict[str, Any]:
        """For `--json`: the KV key, the limiter, the identity's parts and the shown name."""
        return {"limiter": self.limiter, "identity": self.identity, "name": str(self)}


def name_group(config: Config, key: str) -> GroupName:
    """Decode a group's KV key with the limiter's `key` parts (docs/engines/nats.md)."""
    limiter_name, *tokens = key.split(".")
    limiter = config.limiters.get(limiter_name)
    notes: list[str] = []
    identity: dict[str, str] | None = None
    if limiter is not None and limiter.is_global:
        identity = {}
    elif tokens and not (tokens[0].startswith("=") and len(tokens[0]) != 65):
        token, tokens = tokens[0], tokens[1:]
        decoded = decode_identity(token)
        specs = [spec for spec in (limiter.key if limiter else ("identity",)) if spec != "global"]
        parts = split_identity(decoded, len(specs)) if decoded is not None else None
        if parts is not None:
            identity = dict(zip(specs, parts, strict=True))
        elif token.startswith("="):
            notes.append(f"hashed identity {token[:13]}...")
        else:
            notes.append(f"identity {token}")
    for token in tokens:
        if token == SLOTS_TOKEN:
            notes.append("slots")
        elif token == OVERRIDE_TOKEN:
            notes.append("override")
        elif token.startswith(TIER_TOKEN):
            notes.append(f"tier {token[len(TIER_TOKEN) :]}")
        else:
            notes.append(token)
    return GroupName(key, limiter_name, identity, ", ".join(notes))


def resolve_target(
    config: Config, name: str, identity: Sequence[str] | None, store_name: str | None
) -> Target:
    """`LIMITER [--key IDENTITY]...` or a raw KV key, as the keys of the store that holds them."""
    limiter = config.limiters.get(name)
    if limiter is None:
        if identity:
            known = ", ".join(sorted(config.limiters)) or "none"
            raise ConfigError(f"{config.source}: no limiter {name!r} for --key (defined: {known})")
        if not _VALID_KEY.fullmatch(name):
            raise ConfigError(
                f"{name!r} is neither a limiter of {config.source} nor a valid KV key; for an "
                "identity as the application sees it, give LIMITER --key IDENTITY"
            )
        owner = config.limiters.get(name.split(".", 1)[0])
        if owner is not None and store_name is None and config.stores[owner.store].engine == "nats":
            store = config.stores[owner.store]
        else:
            store = _one_nats_store(config, store_name)
        return Target(store, [name], _raw_key_hint(config, name))
    if store_name is not None and _nats_stores(config, store_name)[0].name != limiter.store:
        raise ConfigError(
            f"{config.source}: limiter {name!r} uses store {limiter.store!r}, not {store_name!r}"
        )
    store = config.stores[limiter.store]
    if store.engine != "nats":
        raise ConfigError(
            f"{config.source}: limiter {name!r} uses the memory store {store.name!r}: its state "
            "lives inside each application process"
        )
    group = group_key(name, limiter_identity(config, limiter, identity))
    keys = [group] if limiter.policy is not None else []
    keys += [tier_key(group, tier) for tier in limiter.tiers]  # the group under each tier
    if limiter.slots is not None:
        keys.append(slots_key(group))
    return Target(store, keys)


def limiter_identity(
    config: Config, limiter: LimiterConfig, identity: Sequence[str] | None
) -> str | None:
    """The identity `--key` names for `limiter` (None for a global limiter, which takes none)."""
    if limiter.is_global:
        if identity:
            raise ConfigError(
                f'{config.source}: limiter {limiter.name!r} is global (key = "global"): one '
                "group for everybody, no --key"
            )
        return None
    if not identity:
        raise ConfigError(
            f"{config.source}: limiter {limiter.name!r} has key = {list(limiter.key)}: give "
            "--key IDENTITY (an IP, a user id, a header value, as the application sees it)"
        )
    return operator_identity(config, limiter, identity)


def _raw_key_hint(config: Config, key: str) -> str:
    """For `api.127.0.0.1`: the command that names that identity (its key is api.127_2E0...)."""
    first, _, rest = key.partition(".")
    limiter = config.limiters.get(first)
    if limiter is None or limiter.is_global or not rest or len(limiter.key) != 1:
        return ""
    encoded = group_key(first, operator_identity(config, limiter, [rest]))
    if encoded == key:
        return ""
    return f" For identity {rest!r} of limiter {first!r} (key {encoded}): --key {rest}"


def describe_entry(entry: StoredEntry | None, group: str, now_ns: int) -> dict[str, Any]:
    """A group's decoded state, for every kind of value the store writes (docs/engines/nats.md)."""
    if entry is None:
        return {"group": group, "exists": False, "written": False}
    result: dict[str, Any] = {
        "group": group,
        "exists": not entry.deleted,
        "written": True,
        "revision": entry.revision,
        "updated": entry.written_at.isoformat() if entry.written_at else None,
    }
    if entry.deleted:
        result["state"] = "deleted (a full bucket)"
        return result
    result.update(describe_value(entry.data, group, now_ns))
    return result


def describe_value(data: bytes | None, group: str, now_ns: int) -> dict[str, Any]:
    """A stored value's meaning now: units available, time to full, slots held."""
    try:
        value = json.loads(data or b"")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {"state": "not a ratesync value"}
    kind = value.get("kind")
    try:
        if kind is None:
            fields = decode_value(data)
            if fields is None:
                return {"state": "not a ratesync value"}
            policy = Policy(group, fields["interval_ns"], fields["burst"])
            return {"kind": "token_bucket", **_bucket(policy, fields["tat_ns"], now_ns)}
        if kind == "rates":
            rates = tuple(
                Policy(f"{group}:{index}", interval, burst)
                for index, (interval, burst) in enumerate(value["rates"])
            )
            tats, problem = decode_state(Rates(group, rates), data)
            per_rate = [
                _bucket(rate, tat, now_ns)
                for rate, tat in zip(rates, tats or (0,) * len(rates), strict=True)
            ]
            return {
                "kind": "rates",
                "available": min(rate["available"] for rate in per_rate),
                "rates": per_rate,
                **({"problem": problem} if problem else {}),
            }
        if kind == "window":
            window = SlidingWindow(group, value["limit"], value["window_ns"])
            log, problem = decode_state(window, data)
            state = window.peek(log, now_ns)
            return {
                "kind": "sliding_window",
                "available": state.remaining,
                "limit": window.limit,
                "window_seconds": window.window_ns / NS_PER_SECOND,
                "full_in_seconds": round(state.reset_after, 3),
                **({"problem": problem} if problem else {}),
            }
        if kind == "slots":
            holders, problem = decode_slots(data)
            live = live_holders(holders, now_ns, "")
            return {
                "kind": "slots",
                "in_use": sum(count for count, _ in live.values()),
                "limit": value["limit"],
                "lease_seconds": value["lease_ns"] / NS_PER_SECOND,
                "holders": [
                    {
                        "holder": holder,
                        "slots": count,
                        "lease_left_seconds": round((until - now_ns) / NS_PER_SECOND, 3),
                    }
                    for holder, (count, until) in live.items()
                ],
                **({"problem": problem} if problem else {}),
            }
    except (KeyError, TypeError, ValueError):
        pass
    return {"state": f"not a ratesync value (kind {kind!r})"}


def _bucket(policy: Policy, tat: int, now_ns: int) -> dict[str, Any]:
    state = peek(policy, tat, now_ns)
    return {
        "available": state.remaining,
        "burst": policy.burst,
        "rate_per_second": round(policy.rate, 6),
        "full_in_seconds": round(state.reset_after, 3),
        "tat_ns": tat,
    }


_LABELS = {
    "revision": "revision",
    "updated": "updated",
    "state": "state",
    "kind": "kind",
    "available": "available",
    "in_use": "in use",
    "rate_per_second": "rate/s",
    "window_seconds": "window (s)",
    "lease_seconds": "lease (s)",
    "full_in_seconds": "full in (s)",
    "problem": "problem",
}


def _shown(result: Mapping[str, Any]) -> str:
    """A result's group as an operator reads it (its decoded name), else its KV key."""
    return str(result.get("name") or result["group"])


def _format_entry(described: dict[str, Any]) -> str:
    if not described.get("written", True):
        return (
            f"{_shown(described)}: never written (not found: no request has been counted in this "
            "group, or it was idle for longer than the bucket's TTL)"
        )
    lines = [f"{'group':<12} {_shown(described)}"]
    if "name" in described:
        lines.append(f"{'KV key':<12} {described['group']}")
    of = described.get("burst", described.get("limit"))
    for key, label in _LABELS.items():
        value = described.get(key)
        if value is None:
            continue
        if key in ("available", "in_use") and of is not None:
            value = f"{value} of {of}"
        lines.append(f"{label:<12} {value}")
    for index, rate in enumerate(described.get("rates", ()), 1):
        lines.append(
            f"{f'rate {index}':<12} {rate['available']} of {rate['burst']} available, "
            f"{rate['rate_per_second']}/s, full in {rate['full_in_seconds']} s"
        )
    for holder in described.get("holders", ()):
        lines.append(
            f"{'holder':<12} {holder['holder']}: {holder['slots']} slots, lease "
            f"{holder['lease_left_seconds']} s left"
        )
    return "\n".join(lines)


async def watch(
    store: NatsStore,
    out: TextIO,
    as_json: bool,
    stop: asyncio.Event,
    config: Config | None = None,
) -> None:
    """Print decoded updates of the bucket until `stop` is set."""
    js = await store.ready()
    kv = await js.key_value(store.config.bucket_name)
    watcher: Any = await kv.watchall()
    try:
        while not stop.is_set():
            try:
                update = await watcher.updates(timeout=0.5)
            except Exception:
                continue
            if update is None:
                continue
            deleted = update.operation in ("DEL", "PURGE")
            entry = StoredEntry(
                key=update.key,
                revision=update.revision or 0,
                written_at=update.created,
                deleted=deleted,
                value=None if deleted else decode_value(update.value),
                data=None if deleted else update.value,
            )
            described = describe_entry(entry, update.key, time.time_ns())
            if config is not None:
                described.update(name_group(config, update.key).fields())
            shown = _shown(described)
            if as_json:
                out.write(json.dumps(described) + "\n")
            elif deleted:
                out.write(f"{shown}: deleted (rev {entry.revision})\n")
            else:
                available = described.get("available", "?")
                out.write(
                    f"{shown}: {available}/{described.get('burst', '?')} available, "
                    f"full in {described.get('full_in_seconds', '?')}s (rev {entry.revision})\n"
                )
            out.flush()
    finally:
        await watcher.stop()


async def watch_events(
    store: NatsStore,
    out: TextIO,
    as_json: bool,
    stop: asyncio.Event,
    config: Config | None = None,
) -> None:
    """Print the events of the bucket (docs/engines/nats.md, "Events") until `stop` is set."""

    async def show(message: Any) -> None:
        try:
            event = json.loads(message.data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if config is not None and isinstance(event.get("group"), str):
            event.update(name_group(config, event["group"]).fields())
        if as_json:
            out.write(json.dumps(event) + "\n")
        else:
            detail = event.get("count", event.get("policy", ""))
            out.write(
                f"{event.get('type', '?'):<17} {event.get('name', event.get('group', ''))} {detail} "
                f"(pid {event.get('pid')} on {event.get('host')})\n"
            )
        out.flush()

    subscription = await store.subscribe(events_subject(store.config.bucket_name), show)
    try:
        await stop.wait()
    finally:
        with suppress(Exception):
            await subscription.unsubscribe()


async def top(
    store: NatsStore,
    out: TextIO,
    interval: float,
    once: bool,
    as_json: bool,
    config: Config | None = None,
) -> None:
    """Writes (admissions, coalesced) and refusals per group, one table per `interval`.

    Writes are the bucket's own messages (`$KV.<bucket>.>`, seen as they are stored: nothing
    is asked of the application); refusals come from the processes' denial summaries.
    """
    await store.ready()
    bucket = store.config.bucket_name
    prefix = f"$KV.{bucket}."
    writes: dict[str, int] = {}
    refused: dict[str, int] = {}

    async def on_write(message: Any) -> None:
        group = message.subject[len(prefix) :]
        writes[group] = writes.get(group, 0) + 1

    async def on_event(message: Any) -> None:
        with suppress(ValueError, KeyError, TypeError, AttributeError):
            event = json.loads(message.data)
            if event.get("type") == "denied" and "group" in event:
                refused[event["group"]] = refused.get(event["group"], 0) + int(event["count"])

    subscriptions = [
        await store.subscribe(prefix + ">", on_write),
        await store.subscribe(events_subject(bucket), on_event),
    ]
    try:
        while True:
            await asyncio.sleep(interval)
            rows: list[dict[str, Any]] = [
                {
                    "limiter": group.split(".", 1)[0],
                    "group": group,
                    **(name_group(config, group).fields() if config is not None else {}),
                    "writes_per_second": round(writes.get(group, 0) / interval, 1),
                    "refused_per_second": round(refused.get(group, 0) / interval, 1),
                }
                for group in {*writes, *refused}
            ]
            rows.sort(key=lambda r: (-r["refused_per_second"], -r["writes_per_second"], r["group"]))
            writes.clear()
            refused.clear()
            if as_json:
                out.write(json.dumps(rows[:20]) + "\n")
            else:
                out.write(f"{'limiter':<16} {'group':<48} {'writes/s':>9} {'refused/s':>10}\n")
                for row in rows[:20]:
                    out.write(
                        f"{row['limiter']:<16} {_shown(row):<48} "
                        f"{row['writes_per_second']:>9} {row['refused_per_second']:>10}\n"
                    )
                if not rows:
                    out.write("(no writes and no refusals in this interval)\n")
            out.flush()
            if once:
                return
    finally:
        for subscription in subscriptions:
            with suppress(Exception):
                await subscription.unsubscribe()


# -- command line -------------------------------------------------------------------------------


def _shared_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    The top-level parser holds the defaults; each command's copy suppresses them, so an option
    given before the command is not overwritten by the command's default (argparse's sub-parsers
    otherwise set every default of their own).
    """
    options = argparse.ArgumentParser(add_help=False)
    unset: Any = None if defaults else argparse.SUPPRESS
    options.add_argument(
        "--config",
        default=unset,
        help=f"rate-sync.toml (default: ${ENV_CONFIG}, ./rate-sync.toml, ./config/rate-sync.toml)",
    )
    options.add_argument(
        "--store",
        default=unset,
        help="the store to use (default: every NATS store / the only one)",
    )
    options.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="machine-readable output",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratesync",
        description=__doc__.splitlines()[0],
        parents=[_shared_options(True)],
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ratesync {__version__}")
    common = _shared_options(False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", parents=[common], help="verify NATS set-up as the guide does")
    commands.add_parser("status", parents=[common], help="bucket settings, key count, bytes")
    for command, what in (("get", "one group's decoded state"), ("reset", "refill one group")):
        group = commands.add_parser(command, parents=[common], help=what)
        group.add_argument("limiter", help="a limiter (give --key for its identity) or a KV key")
        group.add_argument(
            "--key",
            dest="identity",
            action="append",
            help="the identity as the application sees it (an IP, a user id); once per part of "
            "a composite key, in order",
        )
    watching = commands.add_parser("watch", parents=[common], help="live updates until Ctrl-C")
    watching.add_argument("--events", action="store_true", help="denials, bans and overrides")
    top = commands.add_parser("top", parents=[common], help="the busiest and most refused groups")
    top.add_argument("--interval", type=float, default=2.0, help="seconds per table (default 2)")
    top.add_argument("--once", action="store_true", help="one table after one interval, then exit")
    override = commands.add_parser("override", parents=[common], help="another rate, live")
    ban = commands.add_parser("ban", parents=[common], help="refuse one group (403), live")
    unban = commands.add_parser("unban", parents=[common], help="lift a ban")
    for ruling in (override, ban, unban):
        ruling.add_argument("limiter")
        ruling.add_argument("--key", dest="identity", action="append", help="as for get")
    override.add_argument("--limit", help='the rate from now on, e.g. "100/second"')
    override.add_argument("--burst", type=int, help="its capacity (default: the count)")
    override.add_argument("--clear", action="store_true", help="remove the override")
    for lasting in (override, ban):
        lasting.add_argument("--ttl", type=float, help="seconds until it ends (default: never)")
    commands.add_parser("overrides", parents=[common], help="the overrides and bans in force")
    commands.add_parser("fleet", parents=[common], help="the processes sharing each bucket")
    return parser


def _load(path: str | None) -> Config:
    """The configuration the command acts on; unlike the middleware, never the silent default.

    An application without configuration limits nothing in memory; a command without one has
    nothing to act on, so it says where it looked.
    """
    if path is not None:
        return load_config(path)
    found = discover_config_path()
    if found is None:
        searched = " or ".join(f"./{candidate.as_posix()}" for candidate in SEARCH_PATHS)
        raise ConfigError(
            f"no configuration found: no --config given, ${ENV_CONFIG} is not set, and no "
            f"{searched} in {Path.cwd()}. Give --config PATH or set ${ENV_CONFIG}."
        )
    return load_config(found)


def _nats_stores(config: Config, name: str | None) -> list[StoreConfig]:
    if name is not None:
        if name not in config.stores:
            raise ConfigError(
                f"{config.source}: no store {name!r} (defined: {', '.join(config.stores)})"
            )
        return [config.stores[name]]
    return [store for store in config.stores.values() if store.engine == "nats"]


def _one_nats_store(config: Config, name: str | None) -> StoreConfig:
    stores = _nats_stores(config, name)
    if len(stores) == 1 and stores[0].engine == "nats":
        return stores[0]
    if name is not None:
        raise ConfigError(
            f"{config.source}: store {name!r} is a {stores[0].engine} store; this command "
            'reads a NATS bucket (engine = "nats")'
        )
    if not stores:
        raise ConfigError(
            f"{config.source}: no NATS store (stores found: {_engines(config)}); this command "
            'reads a NATS bucket (engine = "nats")'
        )
    names = ", ".join(s.name for s in stores)
    raise ConfigError(f"{config.source}: several NATS stores ({names}): name one with --store")


def _engines(config: Config) -> str:
    """`dev (memory), prod (nats)`: what a configuration has, for an error that found none."""
    return ", ".join(f"{s.name} ({s.engine})" for s in config.stores.values()) or "none"


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args.config)
    if args.command == "check":
        stores = _nats_stores(config, args.store)
        if not any(store.engine == "nats" for store in stores):
            # Exit 2, not 0: an operator who ran `check` believes NATS was checked.
            raise ConfigError(
                f"{config.source}: nothing to check: "
                + (
                    f"store {args.store!r} is a {stores[0].engine} store"
                    if args.store
                    else f"no NATS store (stores found: {_engines(config)})"
                )
                + '; `ratesync check` verifies a store with engine = "nats" (memory stores '
                "keep their state inside each process and need no set-up)"
            )
        steps = [
            step
            for store in stores
            for step in await check_store(store, limiter_windows_ns(config, store.name))
        ]
        if args.json:
            out.write(json.dumps([step.__dict__ for step in steps], indent=2) + "\n")
        else:
            current = None
            for step in steps:
                if step.store != current:
                    current = step.store
                    out.write(f"store {current}\n")
                out.write(step.line() + "\n")
        return EXIT_OK if all(step.ok for step in steps) else EXIT_NOT_FOUND

    if args.command in ("get", "reset"):
        return await _get_or_reset(config, args, out)
    if args.command in ("override", "ban", "unban"):
        return await _set_rule(config, args, out)
    if args.command == "overrides":
        return await _list_rules(config, args, out)
    if args.command == "fleet":
        return await _fleet(config, args, out)
    store = NatsStore(_one_nats_store(config, args.store))
    try:
        if args.command == "status":
            status = await bucket_status(store)
            _emit(out, args.json, status, lambda s: "\n".join(f"{k:<12} {v}" for k, v in s.items()))
        elif args.command == "top":
            await top(store, out, args.interval, args.once, args.json, config)
        elif args.command == "watch":
            stop = asyncio.Event()
            try:
                if args.events:
                    await watch_events(store, out, args.json, stop, config)
                else:
                    await watch(store, out, args.json, stop, config)
            except asyncio.CancelledError:
                stop.set()
    finally:
        await store.aclose()
    return EXIT_OK


async def _get_or_reset(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """`get` / `reset`: exit 1 when no key of the group was ever written (nothing to show)."""
    target = resolve_target(config, args.limiter, args.identity, args.store)
    keys = target.keys  # a reset frees the group's slots too, as rate-sync's reset() does
    store = NatsStore(target.store)
    results: list[dict[str, Any]] = []
    try:
        for key in keys:
            entry = await store.read_entry(key)
            named = name_group(config, key).fields()
            if args.command == "get":
                results.append({**describe_entry(entry, key, time.time_ns()), **named})
            elif entry is None:
                results.append({"group": key, **named, "reset": False, "written": False})
            else:
                await store.reset(key)
                results.append({"group": key, **named, "reset": True})
    finally:
        await store.aclose()
    human = _format_entry if args.command == "get" else _format_reset
    if args.json:
        shown: Any = results[0] if len(results) == 1 else results
        out.write(json.dumps(shown, indent=2, default=str) + "\n")
    else:
        out.write(("\n\n" if args.command == "get" else "\n").join(map(human, results)) + "\n")
    if any(result.get("written", True) for result in results):
        return EXIT_OK
    if target.hint:
        sys.stderr.write(f"ratesync:{target.hint}\n")
    return EXIT_NOT_FOUND


async def _set_rule(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """`override` / `ban` / `unban`: stored in the rules bucket, applied by every process."""
    limiter = config.limiters.get(args.limiter)
    if limiter is None:
        known = ", ".join(sorted(config.limiters)) or "none"
        raise ConfigError(f"{config.source}: no limiter {args.limiter!r} (defined: {known})")
    if config.stores[limiter.store].engine != "nats":
        raise ConfigError(
            f"{config.source}: limiter {limiter.name!r} uses a memory store: its rules live "
            "inside each application process (use the limiter's methods there)"
        )
    identity = limiter_identity(config, limiter, args.identity)
    group = group_key(limiter.name, identity)
    ttl = getattr(args, "ttl", None)
    result: dict[str, Any] = {
        "group": group,
        **name_group(config, group).fields(),
        "command": args.command,
        "ttl_seconds": ttl,
    }
    shown = _shown(result)
    lifting: RuleKind | None = "ban" if args.command == "unban" else None
    if args.command == "override" and args.clear:
        lifting = "override"
    if lifting is not None:  # like get/reset of a group never written: say so, exit 1
        result["found"] = await _rule_in_force(config.stores[limiter.store], lifting, group)
        if not result["found"]:
            what = "not banned (no ban in force), nothing to unban"
            if lifting == "override":
                what = "no override in force, nothing to clear"
            _emit(out, args.json, result, lambda r: f"{shown}: {what}")
            return EXIT_NOT_FOUND
    async with AsyncRateLimiter(config) as rate_limiter:
        try:
            if args.command == "ban":
                await rate_limiter.ban(limiter.name, identity, ttl)
            elif args.command == "unban":
                await rate_limiter.unban(limiter.name, identity)
            elif args.clear:
                await rate_limiter.override(limiter.name, identity, None)
                result["command"] = "override removed"
            elif args.limit is None:
                raise ConfigError("override: give --limit RATE (e.g. 100/second), or --clear")
            else:
                await rate_limiter.override(limiter.name, identity, args.limit, args.burst, ttl)
                result["policy"] = override_policy(limiter.name, args.limit, args.burst).name
        except ValueError as error:
            raise ConfigError(f"{args.command}: {error}") from None
    done = {"ban": "banned", "unban": "unbanned", "override": "overridden"}.get(
        result["command"], result["command"]
    )
    lasting = args.command in ("ban", "override") and result["command"] != "override removed"
    until = f" for {ttl:g}s" if ttl else " until removed" if lasting else ""
    _emit(out, args.json, result, lambda r: f"{shown}: {done}{until}")
    return EXIT_OK


async def _rule_in_force(config: StoreConfig, kind: RuleKind, group: str) -> bool:
    """Whether `group` has a rule of `kind` that has not expired."""
    now = time.time_ns()
    store = NatsStore(config)
    try:
        rules = await store.read_rules()
    finally:
        await store.aclose()
    return any(
        (found, name) == (kind, group) and not 0 < rule.until_ns <= now
        for found, name, rule in rules
    )


async def _list_rules(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """`overrides`: the rules in force in every NATS store (expired ones left out)."""
    now = time.time_ns()
    rows: list[dict[str, Any]] = []
    for store_config in _nats_stores(config, args.store):
        store = NatsStore(store_config)
        try:
            for kind, group, rule in await store.read_rules():
                if rule.until_ns and rule.until_ns <= now:
                    continue
                row: dict[str, Any] = {
                    "store": store_config.name,
                    "kind": kind,
                    "group": group,
                    **name_group(config, group).fields(),
                }
                if isinstance(rule, Override):
                    row.update(policy=rule.policy.name, burst=rule.policy.burst)
                row["expires_in_seconds"] = (
                    round((rule.until_ns - now) / NS_PER_SECOND, 1) if rule.until_ns else None
                )
                rows.append(row)
        finally:
            await store.aclose()
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    for row in rows:
        what = f"{row['policy']} (burst {row['burst']})" if row["kind"] == "override" else ""
        left = row["expires_in_seconds"]
        until = f"{left:g}s left" if left is not None else "until removed"
        out.write(f"{row['kind']:<9} {_shown(row):<40} {what:<28} {until}\n")
    if not rows:
        out.write("no overrides or bans in force\n")
    return EXIT_OK


async def _fleet(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """`fleet`: every process that answers its bucket's presence call within a second."""
    rows: list[dict[str, Any]] = []
    for store_config in _nats_stores(config, args.store):
        store = NatsStore(store_config)
        nc = await store.connect()
        try:
            for peer in await fleet(nc, store_config.bucket_name):
                rows.append(
                    {"store": store_config.name, "bucket": store_config.bucket_name, **peer}
                )
        finally:
            await store._close_client(nc)
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    for row in rows:
        limiters = ",".join(row.get("limiters", []))
        out.write(
            f"pid {row.get('pid'):<8} {row.get('host')!s:<24} ratesync {row.get('version')!s:<8} "
            f"bucket {row['bucket']}  limiters {limiters}\n"
        )
    if not rows:
        out.write("no process answered (none running, or none may publish on its bucket)\n")
    return EXIT_OK


def _format_reset(result: dict[str, Any]) -> str:
    if result["reset"]:
        return f"{_shown(result)}: reset"
    return f"{_shown(result)}: never written (not found), nothing to reset"


def _emit(out: TextIO, as_json: bool, value: Any, human: Callable[[Any], str]) -> None:
    out.write((json.dumps(value, indent=2, default=str) if as_json else human(value)) + "\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the `ratesync` console script."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    try:
        return asyncio.run(_run(args, out))
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as error:
        sys.stderr.write(f"ratesync: {error}\n")
        return EXIT_CONFIG
    except StoreError as error:
        sys.stderr.write(f"ratesync: {error}\n")
        return EXIT_STORE
    except RateSyncError as error:
        sys.stderr.write(f"ratesync: {error}\n")
        return EXIT_NOT_FOUND


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
