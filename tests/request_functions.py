"""Cost and exempt_when functions named by the tests' configurations ("tests.request_functions:...").

Each takes the framework's own request object; `SEEN` records its type, so a test can check what
the adapter passed.
"""

from __future__ import annotations

import time
from typing import Any

SEEN: list[type] = []


def header(request: Any, name: str) -> str | None:
    """A request header from any framework's request (a WSGI environ is a dict)."""
    if isinstance(request, dict):
        value = request.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)
    return request.headers.get(name)  # type: ignore[no-any-return]


def units(request: Any) -> int:
    """The cost an LLM-style API would charge: the X-Units header, default 1."""
    SEEN.append(type(request))
    return int(header(request, "X-Units") or 1)


def internal(request: Any) -> bool:
    """Requests from our own monitoring are never limited."""
    SEEN.append(type(request))
    return header(request, "X-Internal") == "yes"


def broken(request: Any) -> int:
    raise KeyError("the secret token abc123 is not in the request")


def slow(request: Any) -> int:
    """A cost function that blocks (a database call made in the request's thread)."""
    time.sleep(0.15)
    return 1


def not_a_number(request: Any) -> Any:
    return "3"


async def asynchronous(request: Any) -> int:
    return 1


ACCOUNTS: dict[str, str] = {}
"""The app's own record of each user's plan (X-User -> tier name), as a database would hold it."""


def account_tier(request: Any) -> str | None:
    """The tier of the user the X-User header names: their plan, None for an unknown user."""
    user = header(request, "X-User")
    return ACCOUNTS.get(user) if user else None


def numbered_tier(request: Any) -> Any:
    return 2
