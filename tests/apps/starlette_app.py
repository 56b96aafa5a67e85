"""A minimal Starlette app for tests that run real servers; the configuration is discovered
through `$RATE_SYNC_CONFIG`, as a deployed app's would be."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ratesync_middleware import RateLimitMiddleware


async def index(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", index)], middleware=[Middleware(RateLimitMiddleware)])
