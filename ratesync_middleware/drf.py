# mypy: disable-error-code="import-untyped"
"""Django REST framework: `RateSyncThrottle`, a DRF throttle over the same limiter as the middleware.

    REST_FRAMEWORK = {"DEFAULT_THROTTLE_CLASSES": ["ratesync_middleware.drf.RateSyncThrottle"]}

    class Login(APIView):
        throttle_scope = "login"        # the limiter's name; no scope: the view's @limit marks,
                                        # [[routes]], then [middleware] default

DRF authenticates inside the view, after every Django middleware, so only a throttle sees
`request.user` as a token, session or JWT authentication set it: a `key = "user"` limiter keys
by that user here. The configuration is `settings.RATESYNC`, as for the middleware; with the
middleware installed, the throttle uses its limiter (one set of stores per process) and the
middleware leaves these views to the throttle, so a request is charged once. See docs/drf.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from django.http import HttpRequest
from rest_framework.exceptions import APIException

from .compat import mark_django_response_logged, on_django_response_close
from .django.endpoints import throttle_candidates
from .django.middleware import ADMISSION_ATTRIBUTE, Deferred, Limits, standalone_limits
from .headers import Header, text_headers
from .lifecycle import Admission
from .plans import Plan

if TYPE_CHECKING:  # rest_framework.views imports the throttle classes of its settings: this one
    from rest_framework.request import Request
    from rest_framework.views import APIView

__all__ = ["RateLimitRefused", "RateSyncThrottle"]


class RateLimitRefused(APIException):  # type: ignore[misc]  # APIException is untyped
    """A refusal that is not "too many requests": 503 when a `fail_closed` store cannot decide,
    403 for a banned identity. DRF renders it as any `APIException`."""

    default_code = "rate_limited"
    default_detail = "The rate limiter refused the request."

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail or None)
        self.status_code = status


class RateSyncThrottle:
    """A DRF throttle deciding with `settings.RATESYNC` after DRF's authentication.

    DRF calls a throttle's `allow_request(request, view)` and, when it refuses, `wait()`. Not a
    subclass of DRF's `BaseThrottle`, whose module reads DRF's settings when it is imported:
    this one imports before Django is configured, as the rest of the package does.

    The limiters of a request: the view's `@limit` / `@exempt` marks, else its
    `throttle_scope` (a limiter's name), else the first matching `[[routes]]` rule, else
    `[middleware] default`. A refusal is DRF's `Throttled` (429, `Retry-After`, the rate-limit
    headers); an allowed response carries the rate-limit headers too.
    """

    ratesync_throttle = True  # THROTTLE_ATTRIBUTE: the middleware leaves its views to it

    def __init__(self) -> None:
        self.admission: Admission | None = None

    def allow_request(self, request: Request, view: APIView) -> bool:
        django_request: HttpRequest = request._request
        decided = django_request.__dict__.get(ADMISSION_ATTRIBUTE, _ABSENT)
        if isinstance(decided, Admission) or decided is None:
            # The middleware (or this throttle, called again) has decided this request already.
            self.admission = decided
            _add_headers(view, decided)
            return True
        limits = decided.limits if isinstance(decided, Deferred) else standalone_limits()
        if limits is None:  # RATESYNC["enabled"] is False
            return True
        plan = _plan(limits, django_request, view)
        admission = limits.admit(django_request, plan, request.user) if plan else None
        self.admission = admission
        # Decided: the middleware, if any, finishes the admission with the response, and
        # another call for this request reports it without charging again.
        django_request.__dict__[ADMISSION_ATTRIBUTE] = admission
        standalone = not isinstance(decided, Deferred)
        if standalone and admission is not None and (admission.settles or not admission.allowed):
            _on_response(view, admission)
        _add_headers(view, admission)
        if admission is None or admission.allowed:
            return True
        denial = admission.denial()
        if denial.status != 429:
            raise RateLimitRefused(denial.status, denial.detail)
        return False

    def wait(self) -> float | None:
        """Seconds until the refused request could pass (DRF's `Retry-After`)."""
        admission = self.admission
        if admission is None or admission.decision is None:
            return None
        retry_after = admission.decision.retry_after
        return retry_after if math.isfinite(retry_after) else None


_ABSENT: Any = object()


def _plan(limits: Limits, request: HttpRequest, view: APIView) -> Plan:
    """The plan of the request: its view's marks, `throttle_scope`, rules, the default."""
    match = getattr(request, "resolver_match", None)
    if match is not None:
        return limits.plan(request, match.func, throttled=True)
    # Called without URL resolution (DRF's APIRequestFactory): from the view instance.
    method = request.method or "GET"
    plans = (limits.sync or limits.core).plans
    return plans.plan(method, request.path_info, *throttle_candidates(_AsView(view), method))


class _AsView:
    """What `as_view()` would have returned for a view instance: its class, with a ViewSet's
    `actions` (DRF's `action_map`), for `throttle_candidates`."""

    def __init__(self, view: APIView) -> None:
        actions = getattr(view, "action_map", None)
        if isinstance(actions, dict):
            self.cls, self.actions = type(view), actions
        else:
            self.view_class = type(view)


def _add_headers(view: APIView, admission: Admission | None) -> None:
    """The rate-limit headers (and, for a refusal, `Retry-After`) onto DRF's response:
    `finalize_response` copies `view.headers` onto it, a refusal's included."""
    if admission is None or admission.decision is None:
        return
    headers: list[Header] = (
        admission.headers() if admission.allowed else admission.refusal_headers()
    )
    view.headers.update(text_headers(headers))


def _on_response(view: APIView, admission: Admission) -> None:
    """Without the middleware, what it would do with the response: a refusal is left out of
    Django's `django.request` log (as the middleware's are), an admission that settles is
    finished when Django closes the response."""
    finalize = view.finalize_response

    def finalize_response(request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = finalize(request, response, *args, **kwargs)
        if not admission.allowed:
            mark_django_response_logged(response)
        elif admission.settles:
            on_django_response_close(
                response, admission.finish, response.status_code, response.items()
            )
        return response

    view.finalize_response = finalize_response
