"""Views of the test project, one per way a view can be limited, and custom refusals."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.template import engines
from django.template.response import SimpleTemplateResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.http import require_POST

from ratesync_middleware import Decision
from ratesync_middleware.django import exempt, limit


def hello(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    return HttpResponse("hello")


async def hello_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello, asynchronously")


@require_POST  # a decorator made with functools.wraps keeps the marks below it
@limit("login")
def login(request: HttpRequest) -> HttpResponse:
    return HttpResponse("welcome")


@exempt
def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


@limit("api", "search")
def busy(request: HttpRequest) -> HttpResponse:
    return HttpResponse("busy")


def whoami(request: HttpRequest) -> HttpResponse:
    user = getattr(request, "user", None)
    return JsonResponse({"user": getattr(user, "username", None)})


@limit("search")
class SearchByClass(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("search")


@method_decorator(limit("search"), name="dispatch")
class SearchByDispatch(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("search")


class Plain(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("plain")


class Account(View):
    """GET is limited by the default; POST (changing the password, say) by `login`."""

    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("account")

    @method_decorator(limit("login"))
    def post(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("changed")


@exempt
class Status(View):
    def get(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("status")


class PostOnly(View):
    """Marked in the URLconf (`limit("login")(PostOnly.as_view())`); a GET is Django's 405."""

    def post(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse("welcome")


def streamed(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"one ", b"two ", b"three"]))


def broken(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed")


class Gate:
    """Holds requests in flight until the test opens it (threads of a WSGI server, or tasks)."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.opened = threading.Event()

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


gate = Gate()


def held(request: HttpRequest) -> HttpResponse:
    gate.entered.release()
    gate.opened.wait(30)
    return HttpResponse("done")


async def held_async(request: HttpRequest) -> HttpResponse:
    gate.entered.release()
    await asyncio.to_thread(gate.opened.wait, 30)
    return HttpResponse("done")


# --- RATESYNC["view"] ------------------------------------------------------------------------


def too_many(request: HttpRequest, decision: Decision) -> HttpResponse:
    return JsonResponse(
        {"error": "slow down", "path": request.path, "limiter": decision.policy}, status=429
    )


async def too_many_async(request: HttpRequest, decision: Decision) -> HttpResponse:
    return HttpResponse(f"slow down ({decision.policy})", status=429)


def too_many_come_back_tomorrow(request: HttpRequest, decision: Decision) -> HttpResponse:
    return HttpResponse("later", status=429, headers={"Retry-After": "86400"})


def unavailable_or_too_many(request: HttpRequest, decision: Decision) -> HttpResponse:
    status = 503 if decision.degraded else 429
    return HttpResponse("cannot tell" if decision.degraded else "slow down", status=status)


def too_many_template(request: HttpRequest, decision: Decision) -> SimpleTemplateResponse:
    """A refusal rendered late, as a TemplateResponse: the middleware renders it when needed."""
    template = engines["django"].from_string("wait {{ wait }} s for {{ policy }}")
    context = {"wait": round(decision.retry_after), "policy": decision.policy}
    return SimpleTemplateResponse(template, context, status=429)


@limit("2/minute")
def inline(request: HttpRequest) -> HttpResponse:
    return HttpResponse("limited inline")


@limit("2/minute", key="header:X-User")
async def inline_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse("limited inline, asynchronously")


def _signed_in(request: HttpRequest) -> HttpResponse:
    if request.headers.get("X-Password") == "s3cret":
        return HttpResponse("welcome")
    return HttpResponse("no", status=401)


def signin(request: HttpRequest) -> HttpResponse:
    """A login that answers 401 to a wrong password (`count_status = [401]` counts those)."""
    return _signed_in(request)


async def signin_async(request: HttpRequest) -> HttpResponse:
    return _signed_in(request)


def _answered(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("an answer")
    wanted = request.headers.get("X-Want")
    if wanted is not None:
        response["X-Tokens"] = wanted  # what the answer took (`settle_header = "X-Tokens"`)
    return response


def complete(request: HttpRequest) -> HttpResponse:
    """An LLM-style endpoint that says in X-Tokens how many tokens its answer took."""
    return _answered(request)


async def complete_async(request: HttpRequest) -> HttpResponse:
    return _answered(request)
