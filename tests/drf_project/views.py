"""Views of the test API, one per way a DRF view is limited.

Every view here is throttled by `RateSyncThrottle` (the tests' DEFAULT_THROTTLE_CLASSES) unless
it says `throttle_classes = []`: those are limited by the Django middleware alone.
"""

from __future__ import annotations

from typing import Any

from rest_framework.decorators import action, api_view, throttle_classes
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.viewsets import ViewSet

from ratesync_middleware.django import exempt, limit


def username(request: Request) -> str:
    return request.user.get_username() if request.user.is_authenticated else ""


class Login(APIView):
    """DRF's convention: the throttle scope names the limiter."""

    throttle_scope = "login"

    def post(self, request: Request) -> Response:
        return Response({"user": username(request)})


class Whoami(APIView):
    """No scope and no mark: `[middleware] default`."""

    def get(self, request: Request) -> Response:
        return Response({"user": username(request)})


class Profile(APIView):
    """A mark wins over the scope, for its method only."""

    throttle_scope = "login"

    @limit("search")
    def get(self, request: Request) -> Response:
        return Response({"user": username(request)})

    @exempt
    def put(self, request: Request) -> Response:
        return Response({"user": username(request)})


@api_view(["GET"])
@limit("search")  # below @api_view
def search(request: Request) -> Response:
    return Response({"q": request.query_params.get("q", "")})


@limit("search")  # above @api_view
@api_view(["GET"])
@throttle_classes([])
def search_by_middleware(request: Request) -> Response:
    return Response({"q": request.query_params.get("q", "")})


@api_view(["GET"])
@throttle_classes([])
@limit("search")
def search_below_by_middleware(request: Request) -> Response:
    return Response({"q": request.query_params.get("q", "")})


@limit("search")
class Accounts(ViewSet):
    """A ViewSet under a router, limited by the middleware: marks on the class and actions."""

    throttle_classes = ()

    def list(self, request: Request) -> Response:
        return Response([])

    @exempt
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response({"id": pk})

    @limit("login")
    @action(detail=False, methods=["post"])
    def login(self, request: Request) -> Response:
        return Response({"user": username(request)})

    @action(detail=False, methods=["get"])
    @exempt
    def health(self, request: Request) -> Response:
        return Response({"status": "ok"})


class Sessions(ViewSet):
    """A ViewSet throttled by RateSyncThrottle: marks on an action."""

    def list(self, request: Request) -> Response:
        return Response([])

    @limit("login")
    @action(detail=False, methods=["post"])
    def login(self, request: Request) -> Response:
        return Response({"user": username(request)})


class PicksItsThrottles(APIView):
    """Throttles chosen in get_throttles(): the middleware cannot know, and decides itself."""

    throttle_classes = ()

    def get_throttles(self) -> list[Any]:
        from ratesync_middleware.drf import RateSyncThrottle

        return [RateSyncThrottle()]

    def get(self, request: Request) -> Response:
        return Response({"user": username(request)})
