"""A key function for `key = "tests.django_project.keys:tenant"`."""

from __future__ import annotations

import threading

from ratesync_middleware.facts import RequestFacts


def tenant(facts: RequestFacts) -> str | None:
    """The `tenant` query parameter of the Django request (None: the client IP)."""
    return facts.request.GET.get("tenant") or None


seen_threads: list[int] = []


def thread_witness(facts: RequestFacts) -> str | None:
    """Records the thread the limiter runs on; None keys by the client IP."""
    seen_threads.append(threading.get_ident())
    return None
