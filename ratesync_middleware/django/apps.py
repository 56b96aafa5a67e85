# mypy: disable-error-code="import-untyped"
"""The app behind `INSTALLED_APPS = [..., "ratesync_middleware.django"]`: it registers the checks."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class RateSyncConfig(AppConfig):  # type: ignore[misc]  # AppConfig is untyped
    """Registers the `ratesync.*` system checks, so `manage.py check` reports a bad config."""

    name = "ratesync_middleware.django"
    label = "ratesync"
    verbose_name = "ratesync-middleware"

    def ready(self) -> None:
        from . import checks as ratesync_checks

        checks.register(ratesync_checks.check_settings, ratesync_checks.TAG)
        checks.register(ratesync_checks.check_views, ratesync_checks.TAG, checks.Tags.urls)
