"""gunicorn with --preload and two forked workers shares one NATS limit, checked over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.servers import gunicorn_server

pytestmark = pytest.mark.nats

BURST = 5
REQUESTS = 40  # well above the burst
CONFIG = """
[stores.shared]
engine = "nats"
url = "${NATS_URL}"
bucket_name = "${RATESYNC_BUCKET}"

[limiters.api]
store = "shared"
limit = "5/hour"        # a burst of 5 that does not refill during the test: the count is exact

[middleware]
default = "api"
"""


@pytest.fixture
def gunicorn(nats_url: str, bucket_name: str, tmp_path: Path) -> Iterator[str]:
    """`gunicorn --preload -w 2` serving tests/apps/flask_app.py; yields its base URL."""
    config = tmp_path / "rate-sync.toml"
    config.write_text(CONFIG)
    env = {"RATE_SYNC_CONFIG": str(config), "NATS_URL": nats_url, "RATESYNC_BUCKET": bucket_name}
    log = tmp_path / "gunicorn.log"
    with gunicorn_server("tests.apps.flask_app:app", 2, env, log) as server:
        yield server.url


def test_forked_workers_share_one_exact_limit(gunicorn: str) -> None:
    with httpx.Client(timeout=10.0) as client, ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda _: client.get(f"{gunicorn}/"), range(REQUESTS)))
        elapsed = time.monotonic() - started

    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == BURST, statuses
    assert statuses.count(429) == REQUESTS - BURST, statuses
    refused = [answer for answer in answers if answer.status_code == 429]
    assert all(answer.headers["Retry-After"] for answer in refused)
    assert all(answer.headers["RateLimit-Policy"] == '"api";q=5;w=3600' for answer in answers)
    assert len({answer.headers["X-Worker"] for answer in answers}) == 2  # both workers decided
    assert elapsed < 20.0
