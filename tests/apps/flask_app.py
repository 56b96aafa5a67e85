"""A Flask app for the gunicorn test: its configuration is discovered through `$RATE_SYNC_CONFIG`
(a TOML naming `${NATS_URL}` and `${RATESYNC_BUCKET}`), as a deployed app's would be."""

from __future__ import annotations

import os
import time

from flask import Flask, Response

from ratesync_middleware.flask import RateLimit

app = Flask(__name__)
ratelimit = RateLimit(app)


@app.get("/")
def index() -> str:
    return "ok"


@app.get("/health")
@ratelimit.exempt
def health() -> str:
    return "ok"


@app.after_request
def name_the_worker(response: Response) -> Response:
    """Say which worker answered, and hold it a moment so concurrent requests use both."""
    response.headers["X-Worker"] = str(os.getpid())
    time.sleep(0.02)
    return response


# With --preload this runs in the gunicorn master, before it forks: the master connects to NATS,
# and each worker must still open a connection (and an event loop thread) of its own.
ratelimit.startup(app)
