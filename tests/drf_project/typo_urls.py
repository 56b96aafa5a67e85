"""A URLconf whose DRF views name limiters that no configuration defines (check E012)."""

from __future__ import annotations

from django.urls import path
from rest_framework.decorators import action, api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView
from rest_framework.viewsets import ViewSet

from ratesync_middleware.django import limit


class Login(APIView):
    throttle_scope = "logn"

    def post(self, request: Request) -> Response:
        return Response({})


@api_view(["GET"])
@limit("serch")
def search(request: Request) -> Response:
    return Response({})


class Accounts(ViewSet):
    @limit("lgin")
    @action(detail=False, methods=["post"])
    def login(self, request: Request) -> Response:
        return Response({})


router = SimpleRouter()
router.register("accounts", Accounts, basename="accounts")

urlpatterns = [path("login", Login.as_view()), path("search", search), *router.urls]
