"""One version: `ratesync_middleware.__version__`, the package metadata and `ratesync --version`.

The version is written once, as a literal in `ratesync_middleware/__init__.py`; setuptools reads it
from there (`dynamic = ["version"]`, `attr`) without importing the package. The wheel built from the
tree carries the same one (tests/test_packaging.py).
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

import ratesync_middleware

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_a_literal_in_the_package() -> None:
    tree = ast.parse((ROOT / "ratesync_middleware" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(target, "id", None) for target in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert literals == [ratesync_middleware.__version__]
    assert str(Version(ratesync_middleware.__version__)) == ratesync_middleware.__version__


def test_the_metadata_takes_the_version_from_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "ratesync_middleware.__version__"}


def test_installed_metadata_and_command_agree_with_the_package() -> None:
    assert importlib.metadata.version("ratesync-middleware") == ratesync_middleware.__version__
    command = Path(sys.executable).with_name("ratesync")
    result = subprocess.run(
        [str(command), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ratesync {ratesync_middleware.__version__}\n"
