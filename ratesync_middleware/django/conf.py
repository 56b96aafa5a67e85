# mypy: disable-error-code="import-untyped"
"""The `RATESYNC` setting, read in one place for the middleware and the system checks.

    RATESYNC = {"config": BASE_DIR / "rate-sync.toml"}            # a TOML file
    RATESYNC = {"limiters": {...}, "middleware": {...}}          # or its tables inline
    RATESYNC = {"config": ..., "view": "myapp.views.too_many"}   # plus the options below

Options: `view` (a dotted path, or the callable itself, answering refused requests) and
`enabled` (False: the middleware passes every request through). No `RATESYNC` at all, or one
without `config` and tables, discovers the file as everywhere else (`$RATE_SYNC_CONFIG`,
`./rate-sync.toml`, `./config/rate-sync.toml`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ..config import ConfigSource
from ..limiter import DecisionHook

__all__ = ["SETTING", "RateSyncSettings", "import_view", "read_settings"]

SETTING: Final = "RATESYNC"
TABLES: Final = frozenset({"stores", "limiters", "middleware", "routes"})
OPTIONS: Final = frozenset({"config", "view", "enabled", "on_decision"})

LimitedView = Callable[..., Any]
"""`view(request, decision)` -> a response; sync or `async def`."""


@dataclass(frozen=True)
class RateSyncSettings:
    """`settings.RATESYNC`, checked: where the configuration comes from, and the options."""

    source: ConfigSource  # a path, the inline tables, or None for discovery
    view: str | LimitedView | None = None
    enabled: bool = True
    on_decision: str | DecisionHook | None = None  # a dotted path or a callable


def read_settings() -> RateSyncSettings:
    """`settings.RATESYNC` as `RateSyncSettings`; `ImproperlyConfigured` names what is wrong."""
    value = getattr(settings, SETTING, None)
    if value is None:
        return RateSyncSettings(None)
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(
            f"{SETTING} must be a dict such as {{'config': BASE_DIR / 'rate-sync.toml'}},"
            f" not {type(value).__name__}"
        )
    for key in value:
        if key not in TABLES | OPTIONS:
            known = sorted(TABLES | OPTIONS)
            close = difflib.get_close_matches(str(key), known, n=1)
            did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
            raise ImproperlyConfigured(
                f"{SETTING}: unknown key {key!r}{did_you_mean}; known keys are: {', '.join(known)}"
            )
    tables = {key: table for key, table in value.items() if key in TABLES}
    path = value.get("config")
    if tables and path is not None:
        raise ImproperlyConfigured(
            f"{SETTING}: give either 'config' (a file) or the tables inline"
            f" ({', '.join(sorted(tables))}), not both"
        )
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ImproperlyConfigured(
            f"{SETTING}['config'] must be a path (str or Path), not {type(path).__name__}"
        )
    view = _dotted_or_callable(value, "view")
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ImproperlyConfigured(
            f"{SETTING}['enabled'] must be True or False, not {type(enabled).__name__}"
        )
    on_decision = _dotted_or_callable(value, "on_decision")
    source: ConfigSource = tables or path
    return RateSyncSettings(source, view, enabled, on_decision)


def _dotted_or_callable(settings_value: Mapping[str, Any], option: str) -> Any:
    """The option's value when it is None, a dotted path or a callable."""
    found = settings_value.get(option)
    if found is not None and not (isinstance(found, str) or callable(found)):
        raise ImproperlyConfigured(
            f"{SETTING}[{option!r}] must be a dotted path to a callable, not {type(found).__name__}"
        )
    return found


def _import_callable(option: str, value: str | Callable[..., Any]) -> Callable[..., Any]:
    """The callable an option names (a dotted path) or is; `ImproperlyConfigured` otherwise."""
    if not isinstance(value, str):
        return value
    try:
        found = import_string(value)
    except ImportError as error:
        raise ImproperlyConfigured(
            f"{SETTING}[{option!r}]: cannot import {value!r}: {error}"
        ) from None
    if not callable(found):
        raise ImproperlyConfigured(f"{SETTING}[{option!r}]: {value!r} is not callable")
    function: Callable[..., Any] = found
    return function


def import_hook(hook: str | DecisionHook) -> DecisionHook:
    """The callable behind `RATESYNC["on_decision"]` (e.g. a `PrometheusMetrics()` instance)."""
    return _import_callable("on_decision", hook)


def import_view(view: str | LimitedView) -> LimitedView:
    """The callable behind `RATESYNC["view"]`; `ImproperlyConfigured` when there is none."""
    return _import_callable("view", view)
