"""The published artefacts: `python -m build` without warnings, `twine check --strict`, a wheel
that carries the package, `py.typed` and the license and nothing else, and that installs into a
fresh virtual environment where every public name imports.

One build for the module (about a minute with the fresh environment): marked slow, so the version
matrix leaves it to the main run. Needs the `dev` extra (build, twine) and the package registry for
the wheel's dependencies.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import ratesync_middleware

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHONDONTWRITEBYTECODE makes setuptools warn "byte-compiling is disabled" for each build
    # step: a fact of the caller's environment, not of the project, so the build runs without it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, ROOT)
    noisy = [
        line
        for line in (build.stdout + build.stderr).splitlines()
        if "warning" in line.lower() or "deprecat" in line.lower() or "!!" in line
    ]
    assert noisy == [], "python -m build printed warnings:\n" + "\n".join(noisy)
    return out


def the_wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


def test_twine_check_strict_passes(dist: Path) -> None:
    artefacts = sorted(dist.iterdir())
    assert sorted(path.suffix for path in artefacts) == [".gz", ".whl"]
    result = run(sys.executable, "-m", "twine", "check", "--strict", *artefacts)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_holds_the_package_its_types_and_license_only(dist: Path) -> None:
    with zipfile.ZipFile(the_wheel(dist)) as wheel:
        names = wheel.namelist()
        info = f"ratesync_middleware-{ratesync_middleware.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert "ratesync_middleware/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert {name.split("/")[0] for name in names} == {"ratesync_middleware", info}
    assert not [name for name in names if "/tests/" in name or "/bench/" in name], names
    assert not [name for name in names if name.endswith((".pyc", ".pyo"))], names

    assert metadata["Name"] == "ratesync-middleware"
    assert metadata["Version"] == ratesync_middleware.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    classifiers = metadata.get_all("Classifier") or []
    for expected in (
        "Framework :: AsyncIO",
        "Framework :: Django",
        "Framework :: FastAPI",
        "Framework :: Flask",
        "Typing :: Typed",
        "Topic :: Internet :: WWW/HTTP",
    ):
        assert expected in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # SPDX expression instead
    urls = {entry.split(",")[0] for entry in metadata.get_all("Project-URL") or []}
    assert urls == {"Documentation", "Changelog", "Source", "Issues"}
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {
        "django",
        "flask",
        "quart",
        "fastapi",
        "prometheus",
        "docs",
        "drf",
        "ninja",
        "litestar",
    } <= extras


IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib, importlib.metadata, pathlib, pkgutil, subprocess, sys

    import ratesync_middleware

    here = pathlib.Path(ratesync_middleware.__file__).resolve()
    assert pathlib.Path(sys.prefix).resolve() in here.parents, here  # the wheel, not the tree
    modules = ["ratesync_middleware"] + [
        info.name
        for info in pkgutil.walk_packages(ratesync_middleware.__path__, "ratesync_middleware.")
    ]
    names = 0
    for name in modules:
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            getattr(module, public)
            names += 1
    for adapter in ("asgi", "wsgi", "flask", "quart", "django", "metrics", "cli"):
        assert f"ratesync_middleware.{adapter}" in modules, adapter
    version = ratesync_middleware.__version__
    assert importlib.metadata.version("ratesync-middleware") == version
    shown = subprocess.run(
        [str(pathlib.Path(sys.executable).with_name("ratesync")), "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert shown == f"ratesync {version}\\n", shown
    print(len(modules), "modules", names, "names")
    """
)


def test_the_wheel_installs_into_a_fresh_venv_and_every_public_name_imports(
    dist: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    wheel = the_wheel(dist)
    # The wheel itself from disk, its dependencies (and the extras the adapters need) from the index.
    run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        f"ratesync-middleware[django,drf,flask,quart,fastapi,litestar,prometheus] @ {wheel.as_uri()}",
    )
    # Run away from the tree, so that only the installed copy can be imported.
    result = run(python, "-c", IMPORT_EVERYTHING, cwd=tmp_path)
    modules, _, names, _ = result.stdout.split()
    assert int(modules) >= 20
    assert int(names) >= len(ratesync_middleware.__all__)
