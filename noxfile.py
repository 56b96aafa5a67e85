"""The version matrix: the suite against the oldest supported and the newest releases.

    nox                       # the two combinations CI runs: "oldest" and "newest"
    nox -s oldest             # Python 3.10 with every declared minimum of pyproject.toml
    nox -s newest             # the newest Python here with the latest release of everything
    nox -s tests              # the latest releases on every Python interpreter found here
    nox -s django flask quart asgi nats   # one dependency at its minimum, then at its latest
    nox -s docs               # the documentation site, `mkdocs build --strict`
    nox -l                    # every session

The minimums are read from pyproject.toml (the runtime dependencies and the framework extras), so
what is declared is what is tested. Matrix sessions run `-m "not slow"`: the unit, adapter and
NATS-store tests against the `nats-server` of the `test` extra, in a little over a minute; the
slow ones (cluster, fault injection, packaging, the example script) run once, in `scripts/test`.
Extra arguments go to pytest: `nox -s oldest -- -x tests/test_flask.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import nox
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

nox.options.default_venv_backend = "venv"
nox.options.envdir = str(ROOT / "build" / "nox")  # build/ is ignored by git
nox.options.sessions = ["oldest", "newest"]
nox.options.error_on_missing_interpreters = True  # a missing Python fails, never skips

PYTEST = ("-m", "not slow", "-p", "no:cacheprovider", "-q")
# The extras whose minimums are part of the contract, with the runtime dependencies.
USER_EXTRAS = ("fastapi", "django", "flask", "quart", "litestar", "prometheus", "drf", "ninja")
# Quart (>= 0.19) is built on Flask >= 3.0, above Flask's own minimum: where Flask is at its
# minimum, Quart is left out, and `oldest` tests it afterwards at its minimum on this Flask.
QUART_TESTS = ("tests/test_quart.py",)
QUART_OLDEST_FLASK = "flask==3.0.0"


def find_interpreters() -> list[str]:
    """The CPython X.Y versions this machine has that `requires-python` admits, oldest first.

    pyenv's interpreters are reached through shims that answer only for the selected version, so
    each found binary is linked as `pythonX.Y` into build/nox-pythons, which goes first on PATH.
    """
    admitted = SpecifierSet(PROJECT["requires-python"])
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    links = ROOT / "build" / "nox-pythons"
    found = []
    for minor in range(8, 20):
        version = f"3.{minor}"
        if f"{version}.0" not in admitted:
            continue
        candidates = sorted(pyenv.glob(f"{version}.*/bin/python{version}"), reverse=True)
        candidates += [Path(f"/usr/bin/python{version}"), Path(f"/usr/local/bin/python{version}")]
        binary = next((path for path in candidates if path.is_file()), None)
        if binary is None:
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"python{version}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(binary)
        found.append(version)
    os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"
    return found


PYTHONS = find_interpreters()
OLDEST_PYTHON = PYTHONS[0] if PYTHONS else "3.10"
NEWEST_PYTHON = PYTHONS[-1] if PYTHONS else "3.13"


def declared_minimums() -> dict[str, str]:
    """`name -> "name==minimum; marker"` for the runtime dependencies and the user extras."""
    requirements = list(PROJECT["dependencies"])
    for extra in USER_EXTRAS:
        requirements += PROJECT["optional-dependencies"][extra]
    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        (specifier,) = requirement.specifier  # each is a plain lower bound: `name>=X`
        if specifier.operator != ">=":
            raise ValueError(f"{text!r}: declare a minimum as `>=X`")
        marker = f"; {requirement.marker}" if requirement.marker else ""
        pins[requirement.name] = f"{requirement.name}=={specifier.version}{marker}"
    return pins


MINIMUMS = declared_minimums()
# Not a declared minimum but what the oldest Starlette's TestClient needs: httpx 0.28 dropped
# the `app=` argument that Starlette < 0.41 passes. 0.27 is also the test extra's minimum.
OLDEST_TEST_TOOLS = ["httpx==0.27.0"]


# Tests that use a test-client feature newer than the oldest supported framework, left out
# (pytest reports them as deselected, never as passed) only where that framework is at its minimum.
# Their owners can make them version-aware; the package code they test supports the minimum.
NEEDS_NEWER_TEST_CLIENT = {
    # starlette.testclient.TestClient(client=...) arrived in Starlette 0.42-0.44.
    "starlette": [
        "tests/test_asgi.py::test_forwarded_for_from_a_trusted_proxy_separates_clients",
        "tests/test_asgi.py::test_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_the_key",
        "tests/test_asgi_nats.py::test_spoofed_forwarded_for_from_an_untrusted_peer",
        "tests/test_cli_identities.py::test_a_ban_by_parts_refuses_the_apps_next_request",
    ],
    # django.test.AsyncClient.aforce_login() and request.auser() arrived in Django 5.0.
    "django": ["tests/test_django.py::test_user_key_under_asgi_reads_the_user_with_auser"],
}


def deselected(names: list[str]) -> list[str]:
    return [
        f"--deselect={test}" for name in names for test in NEEDS_NEWER_TEST_CLIENT.get(name, [])
    ]


def run_suite(
    session: nox.Session,
    *pins: str,
    tests: tuple[str, ...] = (),
    at_minimum: list[str] | None = None,
) -> None:
    at_minimum = at_minimum or []
    if "flask" in at_minimum:  # no Quart: it needs a newer Flask
        test_extra = PROJECT["optional-dependencies"]["test"]
        without_quart = [text for text in test_extra if Requirement(text).name != "quart"]
        session.install("-e", ".", *without_quart, *pins)
        left_out = [f"--ignore={path}" for path in QUART_TESTS]
    else:
        session.install("-e", ".[test]", *pins)
        left_out = []
    session.run("python", "-m", "pip", "list", "--format=freeze")
    args = session.posargs or [*tests, *deselected(at_minimum)]
    session.run("python", "-m", "pytest", *PYTEST, *args, *left_out)


@nox.session(python=OLDEST_PYTHON)
def oldest(session: nox.Session) -> None:
    """The oldest Python with every declared minimum (Django 4.2, Flask 2.3, ...), then Quart
    at its minimum with the oldest Flask it accepts."""
    minimums = [name for name in MINIMUMS if name != "quart"]
    pins = [MINIMUMS[name] for name in minimums]
    run_suite(session, *pins, *OLDEST_TEST_TOOLS, at_minimum=minimums)
    session.install(MINIMUMS["quart"], QUART_OLDEST_FLASK)
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("python", "-m", "pytest", *PYTEST, *QUART_TESTS)


@nox.session(python=NEWEST_PYTHON)
def newest(session: nox.Session) -> None:
    """The newest Python here with the latest release of every dependency."""
    run_suite(session, "--upgrade", "--upgrade-strategy", "eager")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The latest releases on each Python interpreter."""
    run_suite(session, "--upgrade", "--upgrade-strategy", "eager")


def one_at_a_time(names: list[str]) -> Any:
    """Parametrize a session: these dependencies at their minimums (oldest Python), then latest."""
    oldest_pins = [MINIMUMS[name] for name in names]
    if "starlette" in names:
        oldest_pins += OLDEST_TEST_TOOLS
    return nox.parametrize(
        ("python", "pins", "at_minimum"),
        [
            nox.param(OLDEST_PYTHON, oldest_pins, names, id="oldest"),
            nox.param(NEWEST_PYTHON, ["--upgrade", *names], [], id="latest"),
        ],
    )


DJANGO_TESTS = (
    "tests/test_django.py",
    "tests/test_django_config.py",
    "tests/test_drf.py",
    "tests/test_ninja.py",
)
FLASK_TESTS = ("tests/test_flask.py", "tests/test_wsgi.py", "tests/test_sync.py")
ASGI_TESTS = (
    "tests/test_asgi.py",
    "tests/test_asgi_nats.py",
    "tests/test_requests.py",
    "tests/test_fastapi_dependency.py",
    "tests/test_litestar.py",
    "tests/test_asgi_servers.py",
)
NATS_TESTS = tuple(sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_nats_*.py")))


@nox.session
@one_at_a_time(["django", "djangorestframework", "django-ninja"])
def django(session: nox.Session, pins: list[str], at_minimum: list[str]) -> None:
    """Django 4.2 LTS with the oldest DRF and Django Ninja, then the latest: the Django
    adapter's tests, DRF's and Ninja's."""
    run_suite(session, *pins, tests=DJANGO_TESTS, at_minimum=at_minimum)


@nox.session
@one_at_a_time(["flask"])
def flask(session: nox.Session, pins: list[str], at_minimum: list[str]) -> None:
    """Flask 2.3, then the latest Flask: the Flask and WSGI adapters' tests."""
    run_suite(session, *pins, tests=FLASK_TESTS, at_minimum=at_minimum)


@nox.session
@one_at_a_time(["quart"])
def quart(session: nox.Session, pins: list[str], at_minimum: list[str]) -> None:
    """Quart 0.19, then the latest Quart: the Quart extension's tests."""
    run_suite(session, *pins, tests=QUART_TESTS, at_minimum=at_minimum)


@nox.session
@one_at_a_time(["starlette", "fastapi", "litestar"])
def asgi(session: nox.Session, pins: list[str], at_minimum: list[str]) -> None:
    """The declared minimum Starlette, FastAPI and Litestar, then the latest: the ASGI
    adapters' tests (the middleware, the FastAPI dependency, the Litestar plugin, the servers)."""
    run_suite(session, *pins, tests=ASGI_TESTS, at_minimum=at_minimum)


@nox.session
@one_at_a_time(["nats-py"])
def nats(session: nox.Session, pins: list[str], at_minimum: list[str]) -> None:
    """The declared minimum nats-py, then the latest: the NATS store's tests."""
    run_suite(session, *pins, tests=NATS_TESTS, at_minimum=at_minimum)


@nox.session(python=NEWEST_PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site into build/site; a broken link, page or anchor fails it."""
    session.install(*PROJECT["optional-dependencies"]["docs"])
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
