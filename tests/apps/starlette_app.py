"""A minimal Starlette app for tests that run real servers; the configuration is discovered
through `$RATE_SYNC_CONFIG`, as a deployed app's would be. Every path answers "ok" (after
`?sleep=SECONDS`: a request in flight; a `[[routes]]` rule may give a path limiters of its own),
and every answer, refusals included, names the process in an `X-Worker` header."""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ratesync_middleware import RateLimitMiddleware


class NameTheWorker:
    """Outside the rate limiting, so that a 429 or a 403 says which process answered too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message["headers"], (b"x-worker", b"%d" % os.getpid())],
                }
            await send(message)

        await self.app(scope, receive, named)


async def index(request: Request) -> PlainTextResponse:
    await asyncio.sleep(float(request.query_params.get("sleep", 0)))  # a request in flight
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/{path:path}", index)],
    middleware=[Middleware(NameTheWorker), Middleware(RateLimitMiddleware)],
)
