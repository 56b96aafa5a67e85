"""docs/fastapi.md and docs/litestar.md, run as written: each page's app and rate-sync.toml, and
what the page says the client sees."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from litestar.testing import TestClient as LitestarTestClient

from .test_recipes import run_app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def page_blocks(page: str) -> dict[str, list[str]]:
    """The fenced blocks of a page, by language (the app and its rate-sync.toml)."""
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w*)\n(.*?)```", (DOCS / page).read_text(), re.S):
        blocks.setdefault(language, []).append(body)
    return blocks


def test_fastapi_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app: Any = run_app(page_blocks("fastapi.md"), tmp_path, monkeypatch)
    acme, globex = {"X-API-Key": "k-123"}, {"X-API-Key": "k-456"}
    with TestClient(app) as client:
        assert client.get("/reports").status_code == 401  # no key: nothing spent
        assert [client.get("/reports", headers=acme).status_code for _ in range(3)] == [200] * 3
        refused = client.get("/reports", headers=acme)
        assert client.get("/reports", headers=globex).status_code == 200  # another customer
        assert client.get("/exports?rows=60").json() == {"rows": 60}
        assert client.get("/exports?rows=60").status_code == 429

    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["RateLimit"].startswith('"reports";r=0;')


def test_litestar_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app: Any = run_app(page_blocks("litestar.md"), tmp_path, monkeypatch)
    kim = {"X-Username": "kim"}
    with LitestarTestClient(app=app) as client:
        assert client.get("/items").status_code == 200
        assert [client.post("/login", headers=kim).status_code for _ in range(2)] == [200, 200]
        assert client.post("/account/password", headers=kim).status_code == 200
        refused = client.post("/login", headers=kim)
        assert client.post("/login", headers={"X-Username": "lee"}).status_code == 200
        assert [client.get("/health").status_code for _ in range(5)] == [200] * 5
        assert "RateLimit" not in client.get("/health").headers

    assert refused.status_code == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.headers["RateLimit"].startswith('"login";r=0;')
