"""A Quart app for the hypercorn test: its configuration is discovered through `$RATE_SYNC_CONFIG`
(a TOML naming `${NATS_URL}` and `${RATESYNC_BUCKET}`), as a deployed app's would be."""

from __future__ import annotations

from quart import Quart, request

from ratesync_middleware.quart import RateLimit

app = Quart(__name__)
ratelimit = RateLimit(app)


@app.get("/")
async def index() -> str:
    return "ok"


@app.post("/login")
@ratelimit.limit("login")
async def login() -> tuple[str, int]:
    right = request.headers.get("X-Password") == "s3cret"
    return ("welcome", 200) if right else ("no", 401)


@app.get("/health")
@ratelimit.exempt
async def health() -> str:
    return "ok"
