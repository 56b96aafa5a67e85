"""Live overrides and bans of single groups, applied from memory on the request path.

An operator (or code, `limiter.override` / `limiter.ban`) sets them while the application runs;
a NATS store keeps them in its rules bucket and every process watches it (stores/nats/control.py),
a memory store only in this process. A request looks its group up in a dict, and only when the
store holds any rule at all: no I/O, and nothing when there is none.

An override judges its group by another rate from now on: its state lives under a key of its
own (`<group>.=override`, `=` never starts an identity's last token but a hash), which starts
full, so a group exhausted under the TOML rule is admitted at once under a larger one. When it
ends (`ttl`, or removed) the TOML rule applies again to the group's own key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .bucket import NS_PER_SECOND, Decision, Policy
from .config import _LIMIT, _UNITS

__all__ = ["BANNED", "Ban", "Override", "Rules", "override_key", "override_policy"]

BANNED = "banned"
"""The `reason` of a decision refusing a banned group (headers.py answers it with a 403)."""

OVERRIDE_TOKEN = "=override"


def override_key(group: str) -> str:
    """The store key of an override's own state, beside (never equal to) the group's."""
    return f"{group}.{OVERRIDE_TOKEN}"


def override_policy(limiter: str, limit: str, burst: int | None = None) -> Policy:
    """The token bucket of an override: `limit` as rate-sync writes it (`"100/second"`).

    Its name, `<limiter>:<limit>` (with `:burst=N` when the burst is not the count), is what
    the rate-limit headers report; `ValueError` for a limit or burst that is not one.
    """
    match = _LIMIT.fullmatch(limit) if isinstance(limit, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or int(match.group(1)) < 1:
        raise ValueError(f'limit must be "N/second|minute|hour|day" with N >= 1, not {limit!r}')
    count = int(match.group(1))
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise ValueError(f"burst must be a whole number >= 1, not {burst!r}")
    name = f"{limiter}:{count}/{unit}"
    if burst is not None and burst != count:
        name += f":burst={burst}"
    return Policy.per_period(name, count, _UNITS[unit], burst or count)


def expiry_ns(ttl: float | None, now_ns: int) -> int:
    """When a rule set now with `ttl` seconds ends; 0 for never. `ValueError` for a bad ttl."""
    if ttl is None:
        return 0
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    return now_ns + math.ceil(ttl * NS_PER_SECOND)


@dataclass(frozen=True, slots=True)
class Override:
    """Another rate for one group until `until_ns` (0: until removed)."""

    policy: Policy
    until_ns: int = 0


@dataclass(frozen=True, slots=True)
class Ban:
    """One group refused (403) until `until_ns` (0: until unbanned)."""

    until_ns: int = 0

    def decision(self, limit: int, policy: str, now_ns: int) -> Decision:
        wait = (self.until_ns - now_ns) / NS_PER_SECOND if self.until_ns else math.inf
        return Decision(False, limit, 0, wait, 0.0 if math.isinf(wait) else wait, policy, BANNED)


class Rules:
    """The live overrides and bans of one store's groups, by store key.

    `empty` is what the request path reads first: one attribute, false only while a rule exists
    or while the rules are not `loaded` yet (a store that loads them when it opens).
    """

    __slots__ = ("bans", "empty", "loaded", "overrides")

    def __init__(self, *, loaded: bool = True) -> None:
        self.bans: dict[str, Ban] = {}
        self.overrides: dict[str, Override] = {}
        self.loaded = loaded
        self.empty = loaded

    def mark_loaded(self) -> None:
        self.loaded = True
        self.empty = not (self.bans or self.overrides)

    def set(self, kind: str, group: str, rule: Ban | Override | None) -> None:
        """Set (None, or a rule of the other kind: remove) the `kind` rule of `group`."""
        if kind == "ban":
            if isinstance(rule, Ban):
                self.bans[group] = rule
            else:
                self.bans.pop(group, None)
        elif isinstance(rule, Override):
            self.overrides[group] = rule
        else:
            self.overrides.pop(group, None)
        self.empty = self.loaded and not (self.bans or self.overrides)

    def ban(self, group: str, now_ns: int) -> Ban | None:
        """The ban of `group` in force at `now_ns`, if any."""
        ban = self.bans.get(group)
        if ban is None or (ban.until_ns and ban.until_ns <= now_ns):
            return None
        return ban

    def override(self, group: str, now_ns: int) -> Override | None:
        """The override of `group` in force at `now_ns`, if any."""
        override = self.overrides.get(group)
        if override is None or (override.until_ns and override.until_ns <= now_ns):
            return None
        return override

    def policy(self, name: str) -> Policy | None:
        """The policy of a live override called `name` (for the rate-limit headers)."""
        for override in self.overrides.values():
            if override.policy.name == name:
                return override.policy
        return None
