"""Token-bucket rate limiting for ASGI, Django and Flask, shared through NATS JetStream KV.

The core (`load_config`, `AsyncRateLimiter`, `RateLimiter`, `Decision`) imports no web framework;
`limit` and `exempt` mark endpoints of any framework; `RateLimitMiddleware` (ASGI) loads
Starlette on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._logging import install as _install_log_fallback
from .bucket import Decision, Policy
from .config import Config, load_config
from .errors import ConfigError, RateLimitExceeded, RateSyncError, StoreError
from .limiter import AsyncRateLimiter, RateLimiter
from .marks import exempt, limit
from .permits import Permit, SyncPermit

if TYPE_CHECKING:
    from .asgi import RateLimitMiddleware

__version__ = "0.1.0"

_install_log_fallback()  # level and name on our log lines under servers that configure none

__all__ = [
    "AsyncRateLimiter",
    "Config",
    "ConfigError",
    "Decision",
    "Permit",
    "Policy",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "RateSyncError",
    "StoreError",
    "SyncPermit",
    "__version__",
    "exempt",
    "limit",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name == "RateLimitMiddleware":  # loads Starlette only for ASGI users
        from .asgi import RateLimitMiddleware

        return RateLimitMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
