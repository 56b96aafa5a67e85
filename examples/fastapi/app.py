"""A FastAPI app limited by ratesync-middleware, configured by the rate-sync.toml beside it.

    uvicorn examples.fastapi.app:app          # from the repository root
    python examples/fastapi/app.py            # the same, on http://127.0.0.1:8000

Try it: `curl -i localhost:8000/` six times in a row (the sixth answers 429 with Retry-After),
`curl -i -X POST localhost:8000/login` (3 a minute), `curl -i localhost:8000/health` (never limited).
`RATESYNC_ENGINE=nats NATS_URL=nats://127.0.0.1:4222` shares the buckets of every process.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, WebSocket

from ratesync_middleware import RateLimitMiddleware, exempt, limit

CONFIG = Path(__file__).with_name("rate-sync.toml")

app = FastAPI(title="ratesync-middleware example")
app.add_middleware(RateLimitMiddleware, config=CONFIG)


@app.get("/")
async def index() -> dict[str, str]:
    """Limited by the `[middleware] default` limiter, `api`: a burst of 5, then 2 a second."""
    return {"hello": "world"}


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    """Also `api`: one bucket per client address across every route it covers."""
    return {"item_id": item_id}


@app.post("/login")
@limit("login")
async def login() -> dict[str, str]:
    """Limited by `login` instead of the default: 3 a minute per address and user name."""
    return {"status": "welcome"}


@app.get("/health")
@exempt
async def health() -> dict[str, str]:
    """Never limited, so a load balancer's probes always get through."""
    return {"status": "ok"}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    """Checked once when it connects: a client over its limit is refused before `accept`."""
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(text)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
