"""Starlette apps for tests/test_asgi_servers.py, served by real ASGI servers.

`chat`: a WebSocket echo at /ws/chat whose messages are limited (three, then the socket is
closed by the limiter). `typo` and `litestar_typo`: an endpoint marked with a limiter name that
does not exist.
"""

from __future__ import annotations

import litestar
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ratesync_middleware import RateLimitMiddleware, limit
from ratesync_middleware.litestar import RateLimitPlugin

CHAT_CONFIG = {
    "limiters": {"chat": {"limit": "3/day"}},
    "routes": [{"path": "/ws/*", "messages": ["chat"]}],
}


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


chat = Starlette(
    routes=[WebSocketRoute("/ws/chat", echo)],
    middleware=[Middleware(RateLimitMiddleware, config=CHAT_CONFIG)],
)


@limit("logn")  # a typo: the limiter is "login"
async def login(request: Request) -> Response:
    return PlainTextResponse("welcome")


typo = Starlette(
    routes=[Route("/login", login)],
    middleware=[
        Middleware(RateLimitMiddleware, config={"limiters": {"login": {"limit": "3/minute"}}})
    ],
)


@litestar.get("/login")
@limit("logn")  # the same typo, in a Litestar app
async def litestar_login() -> str:
    return "welcome"


litestar_typo = litestar.Litestar(
    route_handlers=[litestar_login],
    plugins=[RateLimitPlugin(config={"limiters": {"login": {"limit": "3/minute"}}})],
)
