"""A Flask app limited by ratesync-middleware, configured by the rate-sync.toml beside it.

    flask --app examples/flask/app.py run                      # from the repository root
    python examples/flask/app.py                               # the same, on http://127.0.0.1:8000
    RATESYNC_ENGINE=nats gunicorn --preload -w 4 -b 127.0.0.1:8000 examples.flask.app:app

Try it: `curl -i localhost:8000/` six times in a row (the sixth answers 429 with Retry-After),
`curl -i -X POST localhost:8000/login` (3 a minute), `curl -i localhost:8000/health` (never
limited), `curl -i localhost:8000/api/items` (10 at once, then 10 a second, JSON errors).
`RATESYNC_ENGINE=nats` shares the buckets of every process through NATS (`NATS_URL`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask

from ratesync_middleware.flask import RateLimit, RateLimitExceeded

CONFIG = Path(__file__).with_name("rate-sync.toml")

ratelimit = RateLimit()  # bound to the app in create_app, as with any Flask extension

api = Blueprint("api", __name__, url_prefix="/api")
ratelimit.limit("api")(api)  # every view of the blueprint: the `api` limiter, per user


@api.get("/items")
def items() -> list[dict[str, Any]]:
    return [{"id": 1, "name": "teapot"}]


@api.errorhandler(RateLimitExceeded)
def api_rate_limited(error: RateLimitExceeded) -> tuple[dict[str, Any], int]:
    """The API's clients get its own error format; Retry-After and RateLimit are added."""
    return {"error": "rate limit exceeded", "limiter": error.decision.policy}, 429


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.setdefault("RATESYNC_CONFIG", CONFIG)

    @app.get("/")
    def index() -> dict[str, str]:
        """Limited by the `[middleware] default` limiter, `pages`: a burst of 5, then 2 a second."""
        return {"hello": "world"}

    @app.post("/login")
    @ratelimit.limit("login")
    def login() -> dict[str, str]:
        """Limited by `login` instead of the default: 3 a minute per address and user name."""
        return {"status": "welcome"}

    @app.get("/health")
    @ratelimit.exempt
    def health() -> dict[str, str]:
        """Never limited, so a load balancer's probes always get through."""
        return {"status": "ok"}

    @app.get("/robots.txt")
    def robots() -> str:
        """Exempt by a `[[routes]]` rule in the TOML."""
        return "User-agent: *\nAllow: /\n"

    app.register_blueprint(api)
    ratelimit.init_app(app)
    return app


app = create_app()


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
