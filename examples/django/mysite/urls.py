"""URLs of the example project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("items/<int:item_id>", views.item),
    path("search", views.SearchView.as_view()),
    path("login", views.login),
    path("health", views.health),
]
