"""Our log lines carry their level and the package's name under servers started bare, without
the application configuring logging, and appear once (its own way) when it does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port
from tests.test_nats_errors import closed_port

APP = """
import logging
import os

from flask import Flask
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ratesync_middleware import RateLimitMiddleware
from ratesync_middleware.flask import RateLimit

if os.environ.get("APP_LOGGING"):
    logging.basicConfig(format="APP %(levelname)s [%(name)s] %(message)s")


async def home(request):
    return PlainTextResponse("ok")


asgi = Starlette(routes=[Route("/", home)])
asgi.add_middleware(RateLimitMiddleware, config=os.environ["CONFIG"])

flask_app = Flask(__name__)
RateLimit(flask_app, config=os.environ["CONFIG"])


@flask_app.get("/")
def flask_home():
    return "ok"
"""


DJANGO_SETTINGS = """
import os

SECRET_KEY = "not-a-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "djurls"
INSTALLED_APPS = []
MIDDLEWARE = ["ratesync_middleware.django.RateLimitMiddleware"]
RATESYNC = {"config": os.environ["CONFIG"]}
"""

DJANGO_URLS = """
from django.http import HttpResponse
from django.urls import path

urlpatterns = [path("", lambda request: HttpResponse("ok"))]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "logapp.py").write_text(APP)
    (tmp_path / "djsettings.py").write_text(DJANGO_SETTINGS)
    (tmp_path / "djurls.py").write_text(DJANGO_URLS)
    (tmp_path / "rate-sync.toml").write_text(
        f"""
[stores.prod]
engine = "nats"
url = "nats://127.0.0.1:{closed_port()}"

[limiters.api]
store = "prod"
limit = "10/second"

[middleware]
default = "api"
"""
    )
    return tmp_path


@contextmanager
def serving(command: list[str], project: Path, port: int, **env: str) -> Iterator[list[str]]:
    """Run a server as an operator would, from the project directory; yield its stderr lines
    (filled once it stopped)."""
    environment = {
        **os.environ,
        "PYTHONPATH": f"{project}{os.pathsep}{ROOT}",
        "CONFIG": str(project / "rate-sync.toml"),
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=project,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200  # fail-open: NATS is down
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.1)
        yield lines
    finally:
        process.terminate()
        lines.extend(process.communicate(timeout=30)[1].splitlines())


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if "store 'prod'" in line]


def uvicorn(port: int) -> list[str]:
    return ["uvicorn", "logapp:asgi", "--host", "127.0.0.1", "--port", str(port)]


def test_under_a_bare_uvicorn(project: Path) -> None:
    port = free_port()
    with serving(uvicorn(port), project, port) as lines:
        pass
    shown = ours(lines)
    assert shown, lines
    assert all(line.startswith("WARNING ratesync_middleware") for line in shown), shown
    assert any("did not open at start-up" in line for line in shown)


def test_under_flask_run(project: Path) -> None:
    port = free_port()
    command = ["flask", "--app", "logapp:flask_app", "run", "--port", str(port)]
    with serving(command, project, port) as lines:
        pass
    shown = ours(lines)
    assert shown, lines
    assert all(line.startswith("WARNING ratesync_middleware") for line in shown), shown
    assert any("failed: Connection refused" in line for line in shown)


def test_under_runserver(project: Path) -> None:
    port = free_port()
    command = ["django", "runserver", f"127.0.0.1:{port}", "--noreload"]
    with serving(command, project, port, DJANGO_SETTINGS_MODULE="djsettings") as lines:
        pass
    shown = ours(lines)
    assert shown, lines
    assert all(line.startswith("WARNING ratesync_middleware") for line in shown), shown


def test_under_gunicorn(project: Path) -> None:
    port = free_port()
    command = ["gunicorn", "logapp:flask_app", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with serving(command, project, port) as lines:
        pass
    shown = ours(lines)
    assert shown, lines
    assert all(line.startswith("WARNING ratesync_middleware") for line in shown), shown


def test_an_application_that_configures_logging_sees_each_line_once(project: Path) -> None:
    port = free_port()
    with serving(uvicorn(port), project, port, APP_LOGGING="1") as lines:
        pass
    shown = ours(lines)
    assert shown, lines
    assert all(line.startswith("APP WARNING [ratesync_middleware") for line in shown), shown
