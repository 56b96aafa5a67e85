# mypy: disable-error-code="import-untyped"
"""The Django middleware: a request in, a `Decision` out, in both of Django's handler modes.

    MIDDLEWARE = [..., "ratesync_middleware.django.RateLimitMiddleware", ...]
    RATESYNC = {"config": BASE_DIR / "rate-sync.toml"}

Under ASGI the middleware is a coroutine that awaits the store on the server's event loop, with
no thread in between. Under WSGI it goes through `SyncRequestLimiter`, the one sync driver. The
limiting itself lives in the core (`lifecycle.py`, `plans.py`), shared with the other adapters;
an admitted request is finished when Django closes its response.

Each request is counted exactly once. Requests that reach a view are checked in `process_view`,
where the view (and its `@limit` / `@exempt` marks) is known, so a refused request never runs its
view. Requests that reach no view (a 404, a response from a middleware listed later, or one an
earlier middleware's `process_view` refused) are checked by `[[routes]]` and the default once
their response is known; a refusal replaces that response. A DRF view limited by
`ratesync_middleware.drf.RateSyncThrottle` is left to the throttle (it decides after DRF's
authentication, with this middleware's limiter); if DRF answers before its throttles run (a
failed authentication, a denied permission), the middleware counts it after the response.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.urls import get_resolver

from ..client_ip import ClientAddress
from ..compat import mark_django_response_logged, on_django_response_close
from ..config import Config, load_config
from ..errors import ConfigError
from ..facts import RequestFacts
from ..headers import add_missing, text_headers
from ..lifecycle import Admission, RequestLimiter
from ..limiter import AsyncRateLimiter, DecisionHook
from ..plans import BoundedCache, Plan
from ..sync import SyncRequestLimiter
from .conf import SETTING, LimitedView, import_hook, import_view, read_settings
from .endpoints import marked_endpoints, throttle_candidates, throttled_by_ratesync, view_candidates

__all__ = ["DjangoFacts", "RateLimitMiddleware", "view_candidates"]

ADMISSION_ATTRIBUTE: Final = "_ratesync_admission"  # on the request, once process_view decided
UNPREFIXED_HEADERS: Final = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})  # as Django's HttpHeaders

ViewFunction = Callable[..., Any]
_Response = TypeVar("_Response", bound=HttpResponseBase)
_UNCHECKED: Final[Any] = object()
_UNRESOLVED: Final[Any] = object()

# Bumped when settings.RATESYNC changes (override_settings in tests): every middleware rebuilds
# its limiter on its next request.
_generation = 0


def _settings_changed(sender: object, setting: str, **kwargs: Any) -> None:
    global _generation
    if setting == SETTING:
        _generation += 1


setting_changed.connect(_settings_changed, dispatch_uid="ratesync_middleware.django.middleware")


# --- a Django request as RequestFacts ------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _meta_key(name: str) -> str:
    """The `request.META` key of a header: `x-api-key` -> `HTTP_X_API_KEY`."""
    key = name.upper().replace("-", "_")
    return key if key in UNPREFIXED_HEADERS else f"HTTP_{key}"


class DjangoFacts(RequestFacts):
    """An `HttpRequest` as `RequestFacts`: headers and the peer from `META`, the user's `pk`.

    The user is `request.user` (read on demand, as a sync view would) unless `user` was set
    beforehand: the async path sets it from `await request.auser()`, because touching the lazy
    `request.user` on the event loop would run a database query there.
    """

    __slots__ = ("_django_request", "user")

    def __init__(self, request: HttpRequest, client_address: ClientAddress) -> None:
        RequestFacts.__init__(  # not super(): this runs on every request
            self,
            request.method or "GET",
            request.path_info,
            request.META.get("REMOTE_ADDR") or None,
            client_address,
        )
        self._django_request = request
        self.user: Any = _UNRESOLVED

    def header(self, name: str) -> str | None:
        value = self._django_request.META.get(_meta_key(name))
        return None if value is None else str(value)

    def user_id(self) -> str | None:
        user = self.user
        if user is _UNRESOLVED:  # None without django.contrib.auth's AuthenticationMiddleware
            user = getattr(self._django_request, "user", None)
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        pk = getattr(user, "pk", None)
        return None if pk is None else str(pk)

    @property
    def request(self) -> HttpRequest:
        """The Django `HttpRequest`."""
        return self._django_request


async def _auser(request: HttpRequest) -> Any:
    """The request's user without blocking the event loop; None without auth middleware."""
    auser = getattr(request, "auser", None)
    if auser is not None:  # Django >= 5.0
        return await auser()
    if not hasattr(request, "user"):
        return None
    return await sync_to_async(_evaluated_user)(request)  # Django 4.2: the lazy user, in a thread


def _evaluated_user(request: HttpRequest) -> Any:
    user = request.user
    user.is_authenticated  # noqa: B018  (evaluates the SimpleLazyObject: at most one query)
    return user


# --- the view of a request ------------------------------------------------------------------


def _resolved_view(request: HttpRequest) -> ViewFunction | None:
    """The view URL resolution found for a request that did not reach it (None for a 404)."""
    match = getattr(request, "resolver_match", None)
    return None if match is None else match.func


class Deferred:
    """Left on a request whose view `RateSyncThrottle` limits: the throttle decides it with
    these limits and replaces this with its admission; still there after the response, the
    throttle never ran (DRF refused first) and the middleware counts the request."""

    __slots__ = ("limits",)

    def __init__(self, limits: Limits) -> None:
        self.limits = limits


# --- everything RATESYNC decides -----------------------------------------------------------


class Limits:
    """The limiter, headers and refusal view of one value of `settings.RATESYNC`.

    `sync` drives the limiter for a synchronous middleware; an asynchronous one awaits `core`.
    """

    def __init__(
        self,
        config: Config,
        view: LimitedView | None,
        *,
        asynchronous: bool,
        on_decision: DecisionHook | None = None,
    ) -> None:
        self.config = config
        limiter = AsyncRateLimiter(config, on_decision=on_decision)
        self.sync = None if asynchronous else SyncRequestLimiter(limiter)
        self.core = RequestLimiter(limiter) if self.sync is None else self.sync.core
        self.client_address = self.core.client_address
        self.view = view
        self._needs_user: dict[Plan, bool] = {}
        self._throttled: BoundedCache[ViewFunction | None, bool] = BoundedCache(1024)

    def plan(
        self, request: HttpRequest, view: ViewFunction | None, *, throttled: bool = False
    ) -> Plan:
        """The plan of a request to `view`; `throttled`: as `RateSyncThrottle` decides it (its
        view's `throttle_scope` after its marks)."""
        method = request.method or "GET"
        plans = (self.sync or self.core).plans
        path = request.path_info
        find = throttle_candidates if throttled else view_candidates
        key = (view, method, path, True) if throttled else (view, method, path)
        try:
            return plans.cached_plan(key, method, path, find, view, method)
        except TypeError:  # an unhashable callable as a view: not cached
            return plans.plan(method, path, *find(view, method))

    def throttled(self, view: ViewFunction | None) -> bool:
        """Whether `RateSyncThrottle` decides the requests to `view` (a DRF view using it)."""
        try:
            found = self._throttled.get(view)
        except TypeError:  # an unhashable callable as a view
            return throttled_by_ratesync(view)
        if found is None:
            found = self._throttled.put(view, throttled_by_ratesync(view))
        return found

    def check_marks(self) -> None:
        """Every mark reachable from the URLconf names a limiter (or is a well-formed inline
        rate): `ImproperlyConfigured` with the first that does not, so a typo fails start-up."""
        try:
            patterns = get_resolver().url_patterns
        except Exception:  # no or a broken ROOT_URLCONF: Django reports it at the first request
            return
        plans = (self.sync or self.core).plans
        for endpoint, marks in marked_endpoints(patterns):
            try:
                plans.marked_plan(marks, endpoint)
            except ConfigError as error:
                raise ImproperlyConfigured(f"{SETTING}: {error}") from error

    def admit(self, request: HttpRequest, plan: Plan, user: Any) -> Admission:
        """The admission of a plan for `RateSyncThrottle`, from a synchronous DRF view (under
        ASGI, Django runs it in a thread: the store is awaited on the server's loop)."""
        facts = DjangoFacts(request, self.client_address)
        facts.user = user
        if self.sync is not None:
            return self.sync.begin(facts, plan)
        begun = self.core.begin(facts, plan)
        return begun if isinstance(begun, Admission) else async_to_sync(_awaited)(begun)

    def begin(self, request: HttpRequest, plan: Plan) -> Admission:
        """The admission of a plan, blocking (synchronous middleware)."""
        assert self.sync is not None
        return self.sync.begin(DjangoFacts(request, self.client_address), plan)

    async def abegin(self, request: HttpRequest, plan: Plan) -> Admission:
        """The admission of a plan, on the running event loop (asynchronous middleware)."""
        facts = DjangoFacts(request, self.client_address)
        if self._user_keyed(plan):
            facts.user = await _auser(request)
        admission = self.core.begin(facts, plan)
        return admission if isinstance(admission, Admission) else await admission

    def _user_keyed(self, plan: Plan) -> bool:
        needed = self._needs_user.get(plan)
        if needed is None:
            limiter = self.core.limiter.limiter  # the configuration's, or an inline @limit's
            needed = any("user" in limiter(item.name).key for item in plan)
            self._needs_user[plan] = needed
        return needed

    # -- responses --------------------------------------------------------------------------

    def denial(self, admission: Admission) -> HttpResponse:
        """The 429 (503 for a failing fail-closed store): problem+json, as the ASGI adapter's."""
        denial = admission.denial()
        # All headers at construction: setting them one by one after the default Content-Type
        # costs Django's validation twice for that one.
        headers = dict(text_headers(denial.headers))
        return _unlogged(HttpResponse(denial.body, status=denial.status, headers=headers))

    def complete(self, response: HttpResponseBase, admission: Admission) -> HttpResponseBase:
        """A refusal from `RATESYNC["view"]`, with `Retry-After` and the rate-limit headers."""
        if response is None:
            raise ImproperlyConfigured(f"{SETTING}['view'] returned None instead of a response")
        add_missing(response, admission.refusal_headers())  # what the view set stays
        return _unlogged(response)

    def respond(self, response: HttpResponseBase, admission: Admission | None) -> HttpResponseBase:
        """An admitted request's response: the rate-limit headers, and `finish` at its close."""
        if admission is None:
            return response
        if not admission.allowed:  # RateSyncThrottle's refusal (DRF's), with its headers
            return _unlogged(response)
        add_missing(response, admission.headers())
        if admission.settles:  # Django closes a response once sent (a streamed one at its end)
            on_django_response_close(
                response, admission.finish, response.status_code, response.items()
            )
        return response

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()

    async def aclose(self) -> None:
        if self.sync is None:
            await self.core.aclose()
        else:
            await sync_to_async(self.close, thread_sensitive=False)()


def _unlogged(response: _Response) -> _Response:
    """A refusal that Django's `django.request` logger skips (docs/django.md, "Logging").

    Django logs every response >= 400 (a 503 at ERROR, mailed to ADMINS in production): one line,
    or one mail, per refused request would turn a flood into a flood of logs. The server's access
    log still shows each refusal, `on_decision` reports it, and store failures are logged by
    ratesync, throttled.
    """
    mark_django_response_logged(response)
    return response


def _load(*, asynchronous: bool, check_marks: bool = True) -> Limits | None:
    """The `Limits` of the current `settings.RATESYNC`, None when it says `enabled: False`.

    `check_marks`: fail on a mark of the URLconf that names no limiter (a middleware's start-up;
    not the first request of a throttle without the middleware, which would turn every API
    request into a 500: `manage.py check` reports it there)."""
    options = read_settings()
    if not options.enabled:
        return None
    try:
        config = load_config(options.source)
    except ConfigError as error:
        raise ImproperlyConfigured(f"{SETTING}: {error}") from error
    view = None if options.view is None else import_view(options.view)
    hook = None if options.on_decision is None else import_hook(options.on_decision)
    limits = Limits(config, view, asynchronous=asynchronous, on_decision=hook)
    if check_marks:
        limits.check_marks()
    return limits


async def _awaited(admission: Coroutine[Any, Any, Admission]) -> Admission:
    return await admission


_standalone: tuple[int, Limits | None] | None = None
_standalone_lock = threading.Lock()


def standalone_limits() -> Limits | None:
    """The `Limits` of the current `settings.RATESYNC` for a request no middleware handles
    (`RateSyncThrottle` without the middleware): one per process, synchronous, rebuilt when
    the setting changes as a middleware's are. None when it says `enabled: False`."""
    global _standalone
    known = _standalone
    if known is not None and known[0] == _generation:
        return known[1]
    with _standalone_lock:
        known = _standalone
        if known is None or known[0] != _generation:
            generation, retired = _generation, None if known is None else known[1]
            known = _standalone = (generation, _load(asynchronous=False, check_marks=False))
            if retired is not None:
                retired.close()
    return known[1]


def _rendered(response: HttpResponseBase) -> HttpResponseBase:
    render = getattr(response, "render", None)
    return render() if callable(render) else response


# --- the middleware ------------------------------------------------------------------------


class RateLimitMiddleware:
    """Rate limiting for Django, configured by `settings.RATESYNC` (see the module docstring).

    Sync- and async-capable like Django's own middleware, with both paths written out: an async
    request never goes through a thread to be limited. `close()` / `aclose()` close the stores
    (NATS connections), which tests may want; a server process simply exits.
    """

    sync_capable = True
    async_capable = True

    process_view: Callable[
        [HttpRequest, ViewFunction, tuple[Any, ...], dict[str, Any]],
        HttpResponseBase | Awaitable[HttpResponseBase | None] | None,
    ]

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
            # Django awaits an async process_view directly and runs a sync one in a thread.
            self.process_view = self._process_view_async
        else:
            self.process_view = self._process_view_sync
        self._reload_lock = threading.Lock()
        self._generation = _generation
        self._limits = _load(asynchronous=self.async_mode)  # a bad RATESYNC fails at start-up

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} get_response={self.get_response!r}>"

    # -- synchronous (WSGI) -----------------------------------------------------------------

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        limits = self._current()
        if limits is None:
            return self.get_response(request)
        response = self.get_response(request)
        admission = request.__dict__.pop(ADMISSION_ATTRIBUTE, _UNCHECKED)
        if admission is _UNCHECKED or type(admission) is Deferred:  # not counted yet: now, once
            view = _resolved_view(request)
            throttled = admission is not _UNCHECKED or limits.throttled(view)
            plan = limits.plan(request, view, throttled=throttled)
            admission = limits.begin(request, plan) if plan else None
            if admission is not None and not admission.allowed:
                return self._refuse(limits, request, admission, render=True)
        return limits.respond(response, admission)

    def _process_view_sync(
        self,
        request: HttpRequest,
        view: ViewFunction,
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        limits = self._current()
        if limits is None:
            return None
        if limits.throttled(view):
            request.__dict__[ADMISSION_ATTRIBUTE] = Deferred(limits)
            return None
        plan = limits.plan(request, view)
        admission = limits.begin(request, plan) if plan else None
        request.__dict__[ADMISSION_ATTRIBUTE] = admission
        if admission is None or admission.allowed:
            return None
        return self._refuse(limits, request, admission, render=False)

    def _refuse(
        self, limits: Limits, request: HttpRequest, admission: Admission, *, render: bool
    ) -> HttpResponseBase:
        view = limits.view
        if view is None:
            return limits.denial(admission)
        decision = admission.decision
        if iscoroutinefunction(view):
            response = async_to_sync(view)(request, decision)
        else:
            response = view(request, decision)
        # From process_view, Django renders a TemplateResponse itself; after the fact, we do.
        return limits.complete(_rendered(response) if render else response, admission)

    def _current(self) -> Limits | None:
        if self._generation == _generation:
            return self._limits
        with self._reload_lock:
            if self._generation != _generation:
                generation, retired = _generation, self._limits
                self._limits = _load(asynchronous=False)
                self._generation = generation
                if retired is not None:
                    retired.close()
        return self._limits

    # -- asynchronous (ASGI) ----------------------------------------------------------------

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        limits = await self._acurrent()
        if limits is None:
            return await self.get_response(request)
        response = await self.get_response(request)
        admission = request.__dict__.pop(ADMISSION_ATTRIBUTE, _UNCHECKED)
        if admission is _UNCHECKED or type(admission) is Deferred:
            view = _resolved_view(request)
            throttled = admission is not _UNCHECKED or limits.throttled(view)
            plan = limits.plan(request, view, throttled=throttled)
            admission = await limits.abegin(request, plan) if plan else None
            if admission is not None and not admission.allowed:
                return await self._arefuse(limits, request, admission, render=True)
        return limits.respond(response, admission)

    async def _process_view_async(
        self,
        request: HttpRequest,
        view: ViewFunction,
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        limits = await self._acurrent()
        if limits is None:
            return None
        if limits.throttled(view):
            request.__dict__[ADMISSION_ATTRIBUTE] = Deferred(limits)
            return None
        plan = limits.plan(request, view)
        admission = await limits.abegin(request, plan) if plan else None
        request.__dict__[ADMISSION_ATTRIBUTE] = admission
        if admission is None or admission.allowed:
            return None
        return await self._arefuse(limits, request, admission, render=False)

    async def _arefuse(
        self, limits: Limits, request: HttpRequest, admission: Admission, *, render: bool
    ) -> HttpResponseBase:
        view = limits.view
        if view is None:
            return limits.denial(admission)
        decision = admission.decision
        if iscoroutinefunction(view):
            response = await view(request, decision)
        else:  # as Django runs a sync view under ASGI; write it `async def` to skip the thread
            response = await sync_to_async(view)(request, decision)
        if render:
            response = await sync_to_async(_rendered)(response)
        return limits.complete(response, admission)

    async def _acurrent(self) -> Limits | None:
        if self._generation == _generation:
            return self._limits
        generation, retired = _generation, self._limits
        self._limits = _load(asynchronous=True)  # no await before this: one reload per change
        self._generation = generation
        if retired is not None:
            await retired.aclose()
        return self._limits

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the stores of a synchronous middleware (an async one: `await aclose()`)."""
        limits = self._limits
        if limits is not None:
            limits.close()

    async def aclose(self) -> None:
        """Close the stores, on the event loop that served the requests."""
        limits = self._limits
        if limits is not None:
            await limits.aclose()
