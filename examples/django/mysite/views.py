"""Views of the example project, one per way of choosing a limit.

Try it (python manage.py runserver): `curl -i localhost:8000/` six times in a row (the sixth
answers 429 with Retry-After), `curl -i -X POST localhost:8000/login` (3 a minute),
`curl -i localhost:8000/health` (never limited).
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from ratesync_middleware.django import exempt, limit


def index(request: HttpRequest) -> HttpResponse:
    """Limited by the `[middleware] default` limiter, `api`: a burst of 5, then 2 a second."""
    return JsonResponse({"hello": "world"})


async def item(request: HttpRequest, item_id: int) -> HttpResponse:
    """Also `api` (one bucket per client address for all its views); async views work too."""
    return JsonResponse({"item_id": item_id})


@method_decorator(limit("search"), name="dispatch")
class SearchView(View):
    """A class-based view limited by `search`: marks on `dispatch` cover every method."""

    def get(self, request: HttpRequest) -> HttpResponse:
        return JsonResponse({"query": request.GET.get("q", ""), "results": []})


@csrf_exempt  # a JSON endpoint for curl; a form login keeps CSRF and is limited the same way
@require_POST
@limit("login")
def login(request: HttpRequest) -> HttpResponse:
    """Limited by `login` instead of the default: 3 a minute per address."""
    return JsonResponse({"status": "welcome"})


@exempt
def health(request: HttpRequest) -> HttpResponse:
    """Never limited, so a load balancer's probes always get through."""
    return JsonResponse({"status": "ok"})


def too_many_requests(request: HttpRequest, decision: object) -> HttpResponse:
    """A custom refusal (enable it with RATESYNC["view"]); Retry-After is added for you."""
    return HttpResponse("Slow down, please.", status=429, content_type="text/plain")
