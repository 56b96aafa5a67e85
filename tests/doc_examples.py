"""A documentation page's example, as a reader would copy it: its `settings.py`, `rate-sync.toml`
and Python files (a block whose first line is `# package/module.py`)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass
class Example:
    settings: dict[str, Any]  # what the page's settings.py assigns (BASE_DIR: the example's folder)
    packages: list[str]  # the top-level packages it wrote, importable from sys.path


def write_example(
    page: str, section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Example:
    """The fenced blocks of `## {section}` of `docs/{page}`, written into `tmp_path`."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```(\w*)\n(.*?)```", text[start : end if end > 0 else None], re.S)
    settings: dict[str, Any] = {}
    packages = []
    for language, body in blocks:
        named = re.match(r"# (\S+)\n", body)
        if language == "toml":
            (tmp_path / "rate-sync.toml").write_text(body)
        elif language == "python" and named and named.group(1) == "settings.py":
            exec(body, {"BASE_DIR": tmp_path}, settings)
        elif language == "python" and named:
            target = tmp_path / named.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / "__init__.py").touch()
            target.write_text(body)
            packages.append(Path(named.group(1)).parts[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    for package in set(packages):
        for name in [m for m in sys.modules if m.split(".")[0] == package]:
            del sys.modules[name]  # another example's package of that name
    return Example(settings, sorted(set(packages)))
