"""URLs of the test project."""

from __future__ import annotations

from django.urls import include, path

from ratesync_middleware.django import limit

from . import views

urlpatterns = [
    path("", views.hello),
    path("async", views.hello_async),
    path("login", views.login),
    path("health", views.health),
    path("busy", views.busy),
    path("whoami", views.whoami),
    path("ruled/<path:rest>", views.hello),
    path("free/<path:rest>", views.hello),
    path("cbv/class", views.SearchByClass.as_view()),
    path("cbv/dispatch", views.SearchByDispatch.as_view()),
    path("cbv/as-view", limit("search")(views.Plain.as_view())),
    path("cbv/account", views.Account.as_view()),
    path("cbv/status", views.Status.as_view()),
    path("cbv/post-only", limit("login")(views.PostOnly.as_view())),
    path("streamed", views.streamed),
    path("broken", views.broken),
    path("held", views.held),
    path("held-async", views.held_async),
    path("api/", include([path("v1/login", views.login)])),
    path("inline", views.inline),
    path("inline-async", views.inline_async),
    path("signin", views.signin),
    path("signin-async", views.signin_async),
    path("complete", views.complete),
    path("complete-async", views.complete_async),
]
