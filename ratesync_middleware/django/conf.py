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
    view = value.get("view")
    if view is not None and not (isinstance(view, str) or callable(view)):
        raise ImproperlyConfigured(
            f"{SETTING}['view'] must be a dotted path to a view, not {type(view).__name__}"
        )
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ImproperlyConfigured(
            f"{SETTING}['enabled'] must be True or False, not {type(enabled).__name__}"
        )
    on_decision = value.get("on_decision")
    if on_decision is not None and not (isinstance(on_decision, str) or callable(on_decision)):
        raise ImproperlyConfigured(
            f"{SETTING}['on_decision'] must be a dotted path to a callable,"
            f" not {type(on_decision).__name__}"
        )
    source: ConfigSource = tables or path
    return RateSyncSettings(source, view, enabled, on_decision)


def import_hook(hook: str | DecisionHook) -> DecisionHook:
    """The callable behind `RATESYNC["on_decision"]` (e.g. a `PrometheusMetrics()` instance)."""
    if not isinstance(hook, str):
        return hook
    try:
        found = import_string(hook)
    except ImportError as error:
        raise ImproperlyConfigured(
            f"{SETTING}['on_decision']: cannot import {hook!r}: {error}"
        ) from None
    if not callable(found):
        raise ImproperlyConfigured(f"{SETTING}['on_decision']: {hook!r} is not callable")
    function: DecisionHook = found
    return function


def import_view(view: str | LimitedView) -> LimitedView:
    """The callable behind `RATESYNC["view"]`; `ImproperlyConfigured` when there is none."""
    if not isinstance(view, str):
        return view
    try:
        found = import_string(view)
    except ImportError as error:
        raise ImproperlyConfigured(f"{SETTING}['view']: cannot import {view!r}: {error}") from None
    if not callable(found):
        raise ImproperlyConfigured(f"{SETTING}['view']: {view!r} is not callable")
    function: LimitedView = found
    return function
