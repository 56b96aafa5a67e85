"""A URLconf whose one view names no limiter (for configurations that define none)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [path("", views.hello)]
