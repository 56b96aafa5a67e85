"""A URLconf whose views name a limiter that no configuration defines (system check E012)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import include, path
from django.utils.decorators import method_decorator
from django.views import View

from ratesync_middleware.django import limit

from . import views


@limit("logn")
def typo(request: HttpRequest) -> HttpResponse:
    return HttpResponse("typo")


class TypoOnPost(View):
    @method_decorator(limit("serch"))
    def post(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("typo")


urlpatterns = [
    path("", views.hello),
    path("nested/", include([path("typo", typo)])),
    path("cbv", TypoOnPost.as_view()),
]
