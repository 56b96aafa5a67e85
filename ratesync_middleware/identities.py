"""Identities: a limiter's `key` compiled once, request facts in, the identity string out."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .callables import call_timed, import_callable
from .config import LimiterConfig
from .errors import RequestFunctionError
from .facts import RequestFacts
from .keys import join_identity

__all__ = ["Identity", "KeyFunction"]

KeyFunction = Callable[[RequestFacts], Any]
"""A `"pkg.mod:func"` key: called with the `RequestFacts`; returns a str (or int), None meaning
"use the client IP"; may be a coroutine function."""


def _part_ip(facts: RequestFacts) -> str:
    return facts.client_ip


def _part_user(facts: RequestFacts) -> str:
    return facts.user_id() or facts.client_ip


def _part_path(facts: RequestFacts) -> str:
    return facts.path


def _part_header(name: str) -> Callable[[RequestFacts], str]:
    def part(facts: RequestFacts) -> str:
        return facts.header(name) or facts.client_ip

    return part


class Identity:
    """A limiter's `key` compiled once: request facts in, the identity string out.

    `sync` identities (everything but `"pkg.mod:func"` parts) are computed without awaiting.
    A global limiter's identity is None: one bucket for everybody.
    """

    __slots__ = ("_callables", "_labels", "_parts", "_source", "_table", "is_global", "sync")

    def __init__(self, config: LimiterConfig, source: str, table: str | None = None) -> None:
        """`table`: where the key is written, for errors (default `[limiters.<name>]`)."""
        self.is_global = config.is_global
        self._parts: list[Callable[[RequestFacts], Any]] = []
        self._callables: list[tuple[int, str]] = []  # (index, spec) still to import
        self._labels: dict[int, str] = {}  # index -> spec of each "pkg.mod:func" part
        for spec in config.key:
            if spec == "global":
                continue
            if spec == "ip":
                self._parts.append(_part_ip)
            elif spec == "user":
                self._parts.append(_part_user)
            elif spec == "path":
                self._parts.append(_part_path)
            elif spec.startswith("header:"):
                self._parts.append(_part_header(spec[len("header:") :].lower()))
            else:
                self._callables.append((len(self._parts), spec))
                self._labels[len(self._parts)] = spec
                self._parts.append(_part_ip)  # placeholder until imported
        self.sync = not self._callables
        self._table, self._source = table or f"[limiters.{config.name}]", source

    def load(self) -> None:
        """Import the `"pkg.mod:func"` parts (done lazily on first use, or at start-up)."""
        for index, spec in self._callables:
            self._parts[index] = import_callable(
                spec, source=self._source, table=self._table, key="key"
            )
        self._callables = []

    def now(self, facts: RequestFacts) -> str | None:
        """The identity of a key without callables."""
        if self.is_global:
            return None
        parts = self._parts
        if len(parts) == 1:
            identity: str = parts[0](facts)
            return identity
        return join_identity([part(facts) for part in parts])

    async def __call__(self, facts: RequestFacts) -> str | None:
        """The identity, awaiting async key functions; `RequestFunctionError` when one raises
        (answered by the limiter's fail rule, never a 500)."""
        if self.is_global:
            return None
        if self._callables:
            self.load()
        values = []
        labels = self._labels
        for index, part in enumerate(self._parts):
            label = labels.get(index)
            if label is None:  # a built-in part: ip, user, path, header
                value = part(facts)
            else:
                try:
                    value = call_timed(label, part, facts)
                    if inspect.isawaitable(value):
                        value = await value
                except Exception as error:  # the user's code: reported without its text
                    raise RequestFunctionError(
                        f"key function {label!r} raised {type(error).__name__}"
                    ) from error
            values.append(facts.client_ip if value is None else str(value))
        return values[0] if len(values) == 1 else join_identity(values)
