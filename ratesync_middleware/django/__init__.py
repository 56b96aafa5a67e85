"""Django integration: the middleware, the view decorators, and an app with system checks.

    INSTALLED_APPS = [..., "ratesync_middleware.django"]      # system checks (ratesync.E001...)
    MIDDLEWARE = [..., "ratesync_middleware.django.RateLimitMiddleware", ...]
    RATESYNC = {"config": BASE_DIR / "rate-sync.toml"}

    from ratesync_middleware.django import limit, exempt

See docs/django.md. Importing this package needs Django; the rest of the package does not.
"""

from __future__ import annotations

from ..marks import exempt, limit
from .middleware import RateLimitMiddleware

__all__ = ["RateLimitMiddleware", "exempt", "limit"]
