# mypy: disable-error-code="import-untyped"
"""System checks: a bad `RATESYNC` shows at `manage.py check` time, not at the first request.

The ids are stable (silence one with `SILENCED_SYSTEM_CHECKS`); docs/django.md lists them.

    ratesync.E001  settings.RATESYNC itself is malformed
    ratesync.E002  the configuration file does not exist                  (ConfigError kind: file)
    ratesync.E003  the configuration file cannot be read or is not TOML   (unreadable, toml_syntax)
    ratesync.E004  an unknown key in the configuration                    (unknown_key)
    ratesync.E005  a value of the wrong type or out of range              (bad_value)
    ratesync.E006  a name that refers to no store or limiter              (undefined_reference;
                   a limiter without `store` among several stores)       (missing, key "store")
    ratesync.E007  a NATS store without a url                             (missing, key "url")
    ratesync.E008  ${VAR}: unset, malformed, or not of the key's type     (env_var)
    ratesync.E009  any other configuration error                          (conflict, missing, other)
    ratesync.E010  RATESYNC["view"] cannot be imported or is not callable
    ratesync.E011  a key, cost, exempt_when or tier function ("package.module:function") cannot
                   be imported (or is an async def)
    ratesync.E012  a view's @limit (or the throttle_scope of a DRF view limited by
                   RateSyncThrottle) names a limiter that does not exist
    ratesync.E013  a view's inline @limit("N/period") has a malformed rate or key
    ratesync.W001  RateLimitMiddleware is not in MIDDLEWARE
    ratesync.W002  a rate-sync key that the middleware ignores
    ratesync.W003  a "user" key without django.contrib.auth's AuthenticationMiddleware

Checks never connect to NATS: `ratesync check` (the command line) verifies the server side.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.urls import get_resolver
from django.utils.module_loading import import_string

from ..config import Config, RateSyncConfigWarning, load_config
from ..errors import ConfigError, ConfigErrorKind
from ..identities import Identity
from ..plans import PlanResolver
from .conf import SETTING, RateSyncSettings, import_view, read_settings
from .endpoints import ScopeMark, marked_endpoints
from .middleware import RateLimitMiddleware

__all__ = ["TAG", "check_settings", "check_views"]

TAG: Final = "ratesync"
DOCS_URL: Final = "https://ratesync.github.io/ratesync-middleware/"  # mkdocs.yml's site_url
DOCS: Final = f"See {DOCS_URL}django/ and {DOCS_URL}configuration/."
_MAX_URLCONF_DEPTH: Final = 32

# A ConfigError's id and hint, from the fields it was raised with (never its message):
# (kind, key) first, for the few keys that have an id of their own, then (kind, None); E009 else.
_CONFIG_PROBLEMS: Final[Mapping[tuple[ConfigErrorKind, str | None], tuple[str, str]]] = {
    ("file", None): (
        "ratesync.E002",
        f"Point {SETTING}['config'] (or $RATE_SYNC_CONFIG) at an existing rate-sync.toml,"
        " or give its tables inline in RATESYNC.",
    ),
    ("unreadable", None): (
        "ratesync.E003",
        "The configuration must be a readable UTF-8 TOML file.",
    ),
    ("toml_syntax", None): (
        "ratesync.E003",
        "The configuration must be a readable UTF-8 TOML file.",
    ),
    ("unknown_key", None): ("ratesync.E004", f"Remove or correct the key. {DOCS}"),
    ("bad_value", None): (
        "ratesync.E005",
        "Give the key a value of its documented type and range (strings are never converted:"
        f" write 10, not '10'). {DOCS}",
    ),
    ("undefined_reference", None): (
        "ratesync.E006",
        "Define the store or limiter it names, or correct the name.",
    ),
    ("missing", "store"): (
        "ratesync.E006",
        'Name the limiter\'s store: store = "<one of the [stores.<name>] tables>".',
    ),
    ("missing", "url"): (
        "ratesync.E007",
        'Give the NATS store a url, e.g. url = "nats://localhost:4222", or engine = "memory".',
    ),
    ("env_var", None): (
        "ratesync.E008",
        "Set the variable (to a value of the key's type), or give a default in the file:"
        " ${VAR:-default}.",
    ),
}


def _config_error(error: ConfigError) -> checks.Error:
    check_id, hint = _CONFIG_PROBLEMS.get(
        (error.kind, error.key), _CONFIG_PROBLEMS.get((error.kind, None), ("ratesync.E009", DOCS))
    )
    return checks.Error(str(error), hint=hint, id=check_id)


def _load(options: RateSyncSettings) -> tuple[Config | None, list[checks.CheckMessage]]:
    """The configuration, or the error that stops it; ignored rate-sync keys become warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RateSyncConfigWarning)
        try:
            config = load_config(options.source)
        except ConfigError as error:
            return None, [_config_error(error)]
    messages: list[checks.CheckMessage] = []
    for warning in caught:
        if issubclass(warning.category, RateSyncConfigWarning):
            messages.append(
                checks.Warning(
                    str(warning.message),
                    hint="rate-sync reads this key; ratesync-middleware does not. Remove it"
                    " to silence this warning.",
                    id="ratesync.W002",
                )
            )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return config, messages


def _middleware_classes() -> Iterator[type]:
    for path in getattr(settings, "MIDDLEWARE", None) or ():
        try:
            found = import_string(path)
        except Exception:  # Django itself reports a middleware that cannot be imported
            continue
        if isinstance(found, type):
            yield found


def _is_auth_middleware(cls: type) -> bool:
    return any(
        base.__name__ == "AuthenticationMiddleware"
        and base.__module__ == "django.contrib.auth.middleware"
        for base in cls.__mro__
    )


def check_settings(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[Any]:
    """`settings.RATESYNC`, the configuration it names, its view and key functions."""
    try:
        options = read_settings()
    except ImproperlyConfigured as error:
        hint = f"For example: {SETTING} = {{'config': BASE_DIR / 'rate-sync.toml'}}. {DOCS}"
        return [checks.Error(str(error), hint=hint, id="ratesync.E001")]
    messages: list[checks.CheckMessage] = []
    middleware = list(_middleware_classes())
    if not any(issubclass(cls, RateLimitMiddleware) for cls in middleware):
        messages.append(
            checks.Warning(
                "ratesync_middleware.django.RateLimitMiddleware is not in MIDDLEWARE,"
                " so no request is rate limited.",
                hint="Add it to MIDDLEWARE, e.g. right after SecurityMiddleware.",
                id="ratesync.W001",
            )
        )
    if not options.enabled:
        return messages
    if options.view is not None:
        try:
            import_view(options.view)
        except ImproperlyConfigured as error:
            messages.append(
                checks.Error(
                    str(error),
                    hint="A view called as view(request, decision) that returns a response.",
                    id="ratesync.E010",
                )
            )
    config, problems = _load(options)
    messages.extend(problems)
    if config is None:
        return messages
    for limiter in config.limiters.values():
        try:
            Identity(limiter, config.source).load()
        except ConfigError as error:
            messages.append(
                checks.Error(
                    str(error),
                    hint="A key function is 'package.module:function', importable by the"
                    " project, called with the request's facts.",
                    id="ratesync.E011",
                )
            )
    for function in PlanResolver(config).request_functions:
        try:
            function.load()
        except ConfigError as error:
            messages.append(
                checks.Error(
                    str(error),
                    hint="A cost, exempt_when or tier function is 'package.module:function',"
                    " importable by the project, a plain def called with the HttpRequest.",
                    id="ratesync.E011",
                )
            )
    user_keyed = sorted(name for name, limiter in config.limiters.items() if "user" in limiter.key)
    if user_keyed and not any(_is_auth_middleware(cls) for cls in middleware):
        messages.append(
            checks.Warning(
                f"limiters {', '.join(user_keyed)} use key 'user', but MIDDLEWARE has no"
                " django.contrib.auth AuthenticationMiddleware: every request is keyed by IP.",
                hint="Add django.contrib.auth.middleware.AuthenticationMiddleware to MIDDLEWARE.",
                id="ratesync.W003",
            )
        )
    return messages


# --- @limit on the views of the URLconf ----------------------------------------------------


def _label(endpoint: Any) -> str:
    if isinstance(endpoint, ScopeMark):
        return repr(endpoint)
    module = getattr(endpoint, "__module__", None)
    name = getattr(endpoint, "__qualname__", None) or repr(endpoint)
    return f"{module}.{name}" if module else name


def check_views(app_configs: Iterable[Any] | None = None, **kwargs: Any) -> list[Any]:
    """Every `@limit` reachable from the URLconf names a limiter of the configuration, or is
    a well-formed inline rate (`@limit("5/minute")`)."""
    try:
        options = read_settings()
    except ImproperlyConfigured:
        return []  # check_settings reports it
    if not options.enabled:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateSyncConfigWarning)
        try:
            plans = PlanResolver(load_config(options.source))
        except ConfigError:
            return []  # check_settings reports it
    try:
        patterns = get_resolver().url_patterns
    except Exception:  # no or a broken ROOT_URLCONF: Django's URL checks report it
        return []
    errors: list[checks.CheckMessage] = []
    for endpoint, marks in marked_endpoints(patterns):
        try:
            plans.marked_plan(marks, endpoint)
        except ConfigError as error:
            unknown = error.kind == "undefined_reference"
            errors.append(
                checks.Error(
                    str(error),
                    hint="Define the limiter in the configuration, or correct the"
                    f" name in {_written_as(endpoint)}."
                    if unknown
                    else 'An inline rate is "N/second", "N/minute", "N/hour" or'
                    ' "N/day", e.g. @limit("5/minute", key="header:X-User").',
                    obj=_label(endpoint),
                    id="ratesync.E012" if unknown else "ratesync.E013",
                )
            )
    return errors


def _written_as(endpoint: Any) -> str:
    return "throttle_scope" if isinstance(endpoint, ScopeMark) else "@limit(...)"
