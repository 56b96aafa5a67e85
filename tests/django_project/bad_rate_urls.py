"""A URLconf whose view has a malformed inline rate (system check E013)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path

from ratesync_middleware.django import limit

from . import views


@limit("5/fortnight")
def fortnightly(request: HttpRequest) -> HttpResponse:
    return HttpResponse("never served")


urlpatterns = [
    path("", views.hello),
    path("fortnightly", fortnightly),
]
