"""A Ninja API whose operations name limiters that no configuration defines (check E012)."""

from __future__ import annotations

from django.http import HttpRequest
from django.urls import path
from ninja import NinjaAPI

from ratesync_middleware.django import limit

api = NinjaAPI(urls_namespace="ratesync-typos")


@limit("logn")
@api.post("/login")
def login(request: HttpRequest) -> dict[str, bool]:
    return {"ok": True}


@api.get("/search")
@limit("serch")
def search(request: HttpRequest) -> dict[str, bool]:
    return {"ok": True}


urlpatterns = [path("api/", api.urls)]
