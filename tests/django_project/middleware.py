"""Middleware for the tests' MIDDLEWARE lists."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse


class ShortCircuit:
    """Answers `/short` itself, as a cache or a redirecting middleware would (sync only)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/short":
            return HttpResponse("from the middleware")
        return self.get_response(request)
