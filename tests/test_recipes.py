"""docs/recipes.md, run as written: each story's TOML and code blocks, and what the page says
the client sees."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"


def recipe(title: str) -> dict[str, list[str]]:
    """The fenced blocks of the section whose heading starts with `title`, by language."""
    text = RECIPES.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w*)\n(.*?)```", section, re.S):
        blocks.setdefault(language, []).append(body)
    return blocks


def run_app(blocks: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write the recipe's rate-sync.toml and its Python files (a block whose first line is
    `# path/to/file.py`) into `tmp_path`, and import the one that defines `app`, from there."""
    (tmp_path / "rate-sync.toml").write_text(blocks["toml"][0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    app_module = None
    for n, code in enumerate(blocks["python"]):
        named = re.match(r"# (\S+)\.py\b", code)
        path = Path(named.group(1) if named else f"recipe_block_{n}")
        target = tmp_path / path.with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        for package in target.relative_to(tmp_path).parents:
            if package != Path("."):
                (tmp_path / package / "__init__.py").touch()
        target.write_text(code)
        if re.search(r"^app = ", code, re.M):
            app_module = ".".join(path.parts)
    assert app_module is not None, "the recipe defines no app"
    for name in [m for m in sys.modules if m.split(".")[0] == app_module.split(".")[0]]:
        del sys.modules[name]  # another recipe's package of the same name
    return importlib.import_module(app_module).app


def test_shadow_roll_out_refuses_nothing_and_counts_what_it_would_have_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    app = run_app(recipe("Roll out a new limit in shadow mode"), tmp_path, monkeypatch)
    with TestClient(app) as client:
        answers = [client.get("/search", params={"q": "x"}) for _ in range(31)]
    assert [a.status_code for a in answers] == [200] * 31  # the 31st too
    for answer in answers:  # invisible to clients
        assert not any(name.lower().startswith("ratelimit") for name in answer.headers)
        assert "retry-after" not in answer.headers
    shadow = {"limiter": "search", "outcome": "shadow_denied"}
    assert registry.get_sample_value("ratesync_decisions_total", shadow) == 1
    allowed = {"limiter": "search", "outcome": "allowed"}
    assert registry.get_sample_value("ratesync_decisions_total", allowed) == 30


def test_websocket_chat_closes_the_socket_on_the_21st_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = run_app(recipe("Limit the messages of a WebSocket chat"), tmp_path, monkeypatch)
    with TestClient(app) as client:
        with client.websocket_connect("/ws/chat") as socket:
            for n in range(20):
                socket.send_text(f"hello {n}")
                assert socket.receive_text() == f"echo: hello {n}"
            socket.send_text("one too many")
            with pytest.raises(WebSocketDisconnect) as closed:
                socket.receive_text()
        assert closed.value.code == 1008
        assert closed.value.reason == "rate limit exceeded"
        # The bucket is the client's, not the socket's: a new socket gets no fresh 20.
        with client.websocket_connect("/ws/chat") as socket:
            socket.send_text("again")
            with pytest.raises(WebSocketDisconnect) as again:
                socket.receive_text()
        assert again.value.code == 1008


def test_api_tiers_give_each_plan_its_rate_and_an_upgrade_takes_effect_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = run_app(recipe("API tiers"), tmp_path, monkeypatch)
    accounts = importlib.import_module("myapi.limits").ACCOUNTS
    with TestClient(app) as client:
        alice = {"X-API-Key": "key-alice"}
        answers = [client.get("/v1/search", headers=alice) for _ in range(101)]
        assert [a.status_code for a in answers] == [200] * 100 + [429]
        assert answers[0].headers["RateLimit-Policy"] == '"api:free";q=100;w=3600'
        assert answers[0].headers["RateLimit"].startswith('"api:free";r=99;')
        refused = answers[-1]
        assert refused.headers["RateLimit"].startswith('"api:free";r=0;')
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["violated-policies"] == ["api:free"]

        bob = client.get("/v1/search", headers={"X-API-Key": "key-bob"})
        assert bob.status_code == 200
        assert bob.headers["RateLimit-Policy"] == (
            '"api:pro:20/second";q=20;w=1, "api:pro:10000/hour";q=10000;w=3600'
        )
        assert bob.headers["RateLimit"].startswith('"api:pro:20/second";r=19;')

        anonymous = client.get("/v1/search")
        assert anonymous.headers["RateLimit-Policy"] == '"api";q=10;w=60'
        assert anonymous.headers["RateLimit"].startswith('"api";r=9;')

        monkeypatch.setitem(accounts, "key-alice", "pro")  # alice pays
        upgraded = client.get("/v1/search", headers=alice)
        assert upgraded.status_code == 200
        assert upgraded.headers["RateLimit"].startswith('"api:pro:20/second";r=19;')


def test_login_brute_force_counts_only_the_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = run_app(recipe("Login brute-force"), tmp_path, monkeypatch)
    right = {"user": "ann", "password": "correct horse"}
    wrong = {"user": "ann", "password": "guess"}
    with TestClient(app) as client:

        def login(form: dict[str, str]) -> tuple[int, str | None, str | None]:
            answer = client.post("/login", json=form)
            return (
                answer.status_code,
                answer.headers.get("RateLimit"),
                answer.headers.get("Retry-After"),
            )

        assert login(right) == (200, '"login";r=4;t=300', None)  # reserved, then refunded
        for left in (4, 3, 2, 1, 0):
            assert login(wrong) == (401, f'"login";r={left};t=300', None)
        status, _, retry_after = login(wrong)
        assert (status, retry_after) == (429, "300")
        assert login(right)[0] == 429  # locked out until the first failure leaves the window
