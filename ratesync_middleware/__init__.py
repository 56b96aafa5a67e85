"""Token-bucket rate limiting for ASGI, Django and Flask, shared through NATS JetStream KV.

The core (`load_config`, `AsyncRateLimiter`, `RateLimiter`, `Decision`) imports no web framework;
the ASGI names (`RateLimitMiddleware`, `limit`, `exempt`) load Starlette on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bucket import Decision, Policy
from .config import Config, load_config
from .errors import ConfigError, RateSyncError, StoreError
from .limiter import AsyncRateLimiter, RateLimiter

if TYPE_CHECKING:
    from .asgi import RateLimitMiddleware, exempt, limit

__version__ = "0.1.0"

__all__ = [
    "AsyncRateLimiter",
    "Config",
    "ConfigError",
    "Decision",
    "Policy",
    "RateLimitMiddleware",
    "RateLimiter",
    "RateSyncError",
    "StoreError",
    "__version__",
    "exempt",
    "limit",
    "load_config",
]

_ASGI_NAMES = frozenset({"RateLimitMiddleware", "limit", "exempt"})


def __getattr__(name: str) -> Any:
    if name in _ASGI_NAMES:
        from . import asgi

        return getattr(asgi, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
