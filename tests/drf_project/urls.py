"""URLs of the test API."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from . import views

router = DefaultRouter()
router.register("accounts", views.Accounts, basename="accounts")
router.register("sessions", views.Sessions, basename="sessions")

urlpatterns = [
    path("login", views.Login.as_view()),
    path("whoami", views.Whoami.as_view()),
    path("profile", views.Profile.as_view()),
    path("picks-its-throttles", views.PicksItsThrottles.as_view()),
    path("search", views.search),
    path("search-by-middleware", views.search_by_middleware),
    path("search-below-by-middleware", views.search_below_by_middleware),
    path("", include(router.urls)),
]
