"""MkDocs hooks (mkdocs.yml `hooks:`): the API reference pages and the changelog page.

The reference has one page per public module, found by walking the package's files, so a module
added to `ratesync_middleware/` appears in the site without anyone editing a list; a module or
package whose name starts with `_` is private and left out. The changelog page is CHANGELOG.md
from the project root, so it is written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ratesync_middleware"

# The order a reader wants first; every other public module follows in alphabetical order.
FIRST = [
    PACKAGE,
    f"{PACKAGE}.asgi",
    f"{PACKAGE}.wsgi",
    f"{PACKAGE}.flask",
    f"{PACKAGE}.django",
    f"{PACKAGE}.limiter",
    f"{PACKAGE}.lifecycle",
    f"{PACKAGE}.config",
    f"{PACKAGE}.errors",
    f"{PACKAGE}.metrics",
]


def public_modules() -> list[str]:
    """Every importable module of the package whose dotted name has no `_`-prefixed part."""
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") for part in parts):
            continue
        packages = path.relative_to(ROOT).parents
        if all((ROOT / parent / "__init__.py").exists() for parent in list(packages)[:-1]):
            found.append(".".join(parts))
    return sorted(
        found, key=lambda name: (FIRST.index(name) if name in FIRST else len(FIRST), name)
    )


def reference_uri(module: str) -> str:
    return f"reference/{module}.md"


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    nav = config.nav or []
    nav.append({"API reference": [{module: reference_uri(module)} for module in public_modules()]})
    config.nav = nav
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    for module in public_modules():
        files.append(File.generated(config, reference_uri(module), content=f"::: {module}\n"))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files
