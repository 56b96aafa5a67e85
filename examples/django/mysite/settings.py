"""Settings of the example project: the middleware, the RATESYNC setting, and little else.

No database and no django.contrib apps: the example runs without `migrate`.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-only-do-not-deploy")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "ratesync_middleware.django",  # system checks: `manage.py check` reports ratesync.E...
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Early: its 429 skips the work of the middleware below. Requests are checked where the
    # view is known (process_view), so @limit and @exempt on views apply.
    "ratesync_middleware.django.RateLimitMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
ASGI_APPLICATION = "mysite.asgi.application"

DATABASES: dict[str, dict[str, object]] = {}
USE_TZ = True

RATESYNC = {
    "config": BASE_DIR / "rate-sync.toml",
    # "view": "mysite.views.too_many_requests",   # render your own 429 instead of problem+json
}
