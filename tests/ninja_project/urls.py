"""A Ninja API with each way an operation is limited, above or below the route decorator."""

from __future__ import annotations

from django.http import HttpRequest
from django.urls import path
from ninja import NinjaAPI

from ratesync_middleware.django import exempt, limit

api = NinjaAPI(urls_namespace="ratesync-tests")


@limit("login")  # above the route decorator
@api.post("/login")
def login(request: HttpRequest) -> dict[str, bool]:
    return {"ok": True}


@api.get("/login")  # the same path, another method: no mark
def login_form(request: HttpRequest) -> dict[str, str]:
    return {"form": "login"}


@api.get("/search")
@limit("search")  # below the route decorator
def search(request: HttpRequest, q: str = "") -> dict[str, str]:
    return {"q": q}


@api.get("/async-search")
@limit("search")
async def async_search(request: HttpRequest, q: str = "") -> dict[str, str]:
    return {"q": q}


@exempt
@api.get("/health")
def health(request: HttpRequest) -> dict[str, str]:
    return {"status": "ok"}


@api.get("/items")  # no mark: [middleware] default
def items(request: HttpRequest) -> list[int]:
    return []


urlpatterns = [path("api/", api.urls)]
