"""Reserve, then settle: refunds and overdraws in the algorithms, the stores and every adapter."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from flask import request as flask_request
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from werkzeug.test import Client

from ratesync_middleware import AsyncRateLimiter, ConfigError, RateLimiter, RateLimitMiddleware
from ratesync_middleware.algorithms import Algorithm, Settlement
from ratesync_middleware.bucket import NS_PER_SECOND, Policy, Rates
from ratesync_middleware.config import load_config
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.window import SlidingWindow
from ratesync_middleware.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

NOW = 1_800_000_000 * NS_PER_SECOND
MS = 1_000_000

# A step: a gap (ns), then a request of `reserved` units to be charged `actual` in the end,
# or (reserved = 0) the settle of one of the admissions still pending, picked by `actual`.
gaps = st.one_of(st.sampled_from([0, 0, 5 * MS, 50 * MS, 100 * MS]), st.integers(0, 400 * MS))
steps = st.lists(
    st.tuples(gaps, st.integers(0, 4), st.integers(0, 6)),
    min_size=1,
    max_size=60,
)


def _run(
    algorithm: Algorithm, steps: list[tuple[int, int, int]], overdraw: bool
) -> list[tuple[int, int]]:
    """Apply the steps; every admission as (admitted at, units charged in the end)."""
    state: Any = algorithm.empty
    now = NOW
    pending: list[tuple[int, int, int, Any]] = []  # (admitted at, reserved, actual, receipt)
    charged: list[tuple[int, int]] = []

    def settle(index: int) -> None:
        nonlocal state
        at, reserved, actual, receipt = pending.pop(index)
        settled, _ = Settlement(algorithm, receipt, reserved, actual).consume(state, now)
        if settled is not None:
            _check_refund(algorithm, state, settled, now, reserved, actual)
            state = settled
        charged.append((at, min(actual, reserved)))

    for gap, reserved, pick in steps:
        now += gap
        if reserved == 0:
            if pending:
                settle(pick % len(pending))
            continue
        admitted, decision = algorithm.consume(state, now, reserved)
        assert decision.remaining >= 0
        if admitted is not None:
            state = admitted
            actual = pick if overdraw else min(pick, reserved)
            pending.append((now, reserved, actual, decision.receipt))
    while pending:
        settle(0)
    return charged


def _check_refund(
    algorithm: Algorithm, state: Any, settled: Any, now: int, reserved: int, actual: int
) -> None:
    """Never more given back than was reserved, never past full; an overdraw only takes."""
    before = algorithm.peek(state, now)
    after = algorithm.peek(settled, now)
    assert 0 <= after.remaining <= algorithm.burst
    if actual >= reserved:
        assert after.remaining <= before.remaining
    else:
        assert before.remaining <= after.remaining <= before.remaining + reserved - actual


def _within_the_rate(policy: Policy, charged: list[tuple[int, int]]) -> None:
    charged.sort()
    for i, (start, _) in enumerate(charged):
        spent = 0
        for end, units in charged[i:]:
            spent += units
            allowance = policy.burst + Fraction(end - start, policy.interval_ns)
            assert spent <= allowance


# Found by hand: a refund of units that time had given back already (2 reserved, 1 refilled and
# taken, both refunded), and refunds settled in another order than their admissions.
REFILLED_THEN_REFUNDED = [(0, 2, 0), (100 * MS, 1, 1), (0, 0, 0), (0, 2, 2)]
OUT_OF_ORDER = [(0, 1, 0), (0, 1, 0), (0, 0, 0), (50 * MS, 1, 1), (50 * MS, 0, 0), (0, 2, 2)]


@settings(max_examples=400, deadline=None)
@given(
    interval_ms=st.one_of(st.sampled_from([50, 100]), st.integers(1, 300)),
    burst=st.integers(1, 12),
    steps=steps,
    overdraw=st.booleans(),
)
@example(interval_ms=100, burst=2, steps=REFILLED_THEN_REFUNDED, overdraw=False)
@example(interval_ms=100, burst=2, steps=OUT_OF_ORDER, overdraw=False)
def test_a_bucket_with_refunds_admits_no_more_than_burst_plus_rate_times_t(
    interval_ms: int, burst: int, steps: list[tuple[int, int, int]], overdraw: bool
) -> None:
    """Counting each admission at what it was charged in the end (an overdraw at what it
    reserved: the rest is debt that later requests wait for), settled in any order."""
    policy = Policy("p", interval_ms * MS, burst)
    _within_the_rate(policy, _run(policy, steps, overdraw))


@settings(max_examples=300, deadline=None)
@given(burst=st.integers(1, 12), steps=steps, overdraw=st.booleans())
def test_several_rates_with_refunds_keep_every_rate(
    burst: int, steps: list[tuple[int, int, int]], overdraw: bool
) -> None:
    fast, slow = Policy("fast", 20 * MS, burst), Policy("slow", 300 * MS, burst * 3)
    charged = _run(Rates("both", (fast, slow)), steps, overdraw)
    _within_the_rate(fast, list(charged))
    _within_the_rate(slow, list(charged))


@settings(max_examples=400, deadline=None)
@given(
    limit=st.integers(1, 12),
    window_ms=st.integers(1, 3000),
    steps=steps,
    overdraw=st.booleans(),
)
def test_a_window_with_refunds_holds_at_most_limit_charged_units_in_any_window(
    limit: int, window_ms: int, steps: list[tuple[int, int, int]], overdraw: bool
) -> None:
    window = SlidingWindow("w", limit, window_ms * MS)
    charged = _run(window, steps, overdraw)
    for start, _ in charged:
        inside = sum(u for t, u in charged if start <= t < start + window.window_ns)
        assert inside <= limit


def test_an_overdraw_makes_later_requests_wait_for_it() -> None:
    policy = Policy("llm", 10 * MS, 100)  # 100 tokens a second, 100 at once
    tat, decision = policy.consume(0, NOW, 10)
    assert tat is not None
    tat = policy.settle(tat, NOW, decision.receipt, 10, 150)  # the answer took 150 tokens
    assert tat is not None
    assert policy.consume(tat, NOW, 1)[0] is None  # 50 tokens of debt, then a full bucket
    assert policy.peek(tat, NOW + 500 * MS).remaining == 0
    assert policy.peek(tat, NOW + 600 * MS).remaining == 10


def test_a_refund_gives_back_only_what_time_has_not_given_back_already() -> None:
    policy = Policy("p", 100 * MS, 2)  # 2 at once, one more every 100 ms
    tat, first = policy.consume(0, NOW, 2)
    assert tat is not None
    later = NOW + 100 * MS  # one unit has come back
    tat, second = policy.consume(tat, later, 1)
    assert tat is not None
    assert second.remaining == 0
    # Refunding both units of the first would hand out the unit that came back twice.
    refunded = policy.settle(tat, later, first.receipt, 2, 0)
    assert refunded is not None
    assert policy.peek(refunded, later).remaining == 1


def test_a_window_refund_removes_only_that_admission() -> None:
    window = SlidingWindow("login", 5, 300 * NS_PER_SECOND)
    log, first = window.consume(window.empty, NOW, 1)
    assert log is not None
    log, _ = window.consume(log, NOW + MS, 1)
    assert log is not None
    log = window.settle(log, NOW + 2 * MS, first.receipt, 1, 0)  # the first login succeeded
    assert log == ((NOW + MS, 1),)
    assert window.settle(log, NOW + 2 * MS, first.receipt, 1, 0) is None  # nothing left of it


def test_refunds_settled_out_of_order_keep_the_bound() -> None:
    policy = Policy("p", 1000 * MS, 2)  # 2 at once, one more a second
    early, late = NOW, NOW + 500 * MS
    tat, z = policy.consume(0, early, 1)
    tat, a = policy.consume(tat, early, 1)
    tat = policy.settle(tat, early, z.receipt, 1, 0) or tat  # z charged nothing
    tat, late_one = policy.consume(tat, late, 1)
    assert late_one.allowed
    then = NOW + 1000 * MS
    tat = policy.settle(tat, then, a.receipt, 1, 0) or tat  # a charged nothing
    # From `late` to `then`: c, plus what the bucket allows now, within 2 + 0.5 units.
    assert policy.peek(tat, then).remaining + 1 <= 2.5


# --- the stories, through every adapter ----------------------------------------------------------
#
# /login answers 401 unless the password header is right; /complete answers with the number of
# tokens its answer took in X-Tokens (here: what the client asked for in X-Want).

LOGIN = {"algorithm": "sliding_window", "limit": 5, "window_seconds": 300, "count_status": [401]}
LLM = {"limit": 100, "window_seconds": 86400, "cost": 50, "settle_header": "X-Tokens"}


def stories(store: dict[str, Any] | None = None) -> dict[str, Any]:
    """The login and LLM limiters on their routes, on a memory store or the given one."""
    settings: dict[str, Any] = {
        "limiters": {"login": dict(LOGIN), "llm": dict(LLM)},
        "routes": [
            {"path": "/login", "limiters": ["login"]},
            {"path": "/complete", "limiters": ["llm"]},
        ],
    }
    if store is not None:  # a generous deadline: the counts are exact, on a loaded machine too
        settings["stores"] = {"shared": {**store, "timeout": 2.0}}
    return settings


Post = Callable[..., tuple[int, dict[str, str]]]  # (path, headers) -> (status, lower-case headers)


def _login_status(password: str | None) -> int:
    return 200 if password == "s3cret" else 401


def starlette_app(settings: dict[str, Any]) -> Iterator[Post]:
    async def login(request: Request) -> Response:
        status = _login_status(request.headers.get("X-Password"))
        return PlainTextResponse("welcome" if status == 200 else "no", status_code=status)

    async def complete(request: Request) -> Response:
        return PlainTextResponse("an answer", headers=_tokens(request.headers.get("X-Want")))

    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/complete", complete, methods=["POST"]),
        ],
        middleware=[Middleware(RateLimitMiddleware, config=settings)],
    )
    with TestClient(app) as client:

        def post(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
            response = client.post(path, headers=headers)
            return response.status_code, {k.lower(): v for k, v in response.headers.items()}

        yield post


def flask_app(settings: dict[str, Any]) -> Iterator[Post]:
    app = Flask(__name__)
    ratelimit = RateLimit(app, config=settings)

    @app.post("/login")
    def login() -> tuple[str, int]:
        status = _login_status(flask_request.headers.get("X-Password"))
        return ("welcome" if status == 200 else "no"), status

    @app.post("/complete")
    def complete() -> tuple[str, int, dict[str, str]]:
        return "an answer", 200, _tokens(flask_request.headers.get("X-Want"))

    client = app.test_client()

    def post(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        response = client.post(path, headers=headers)
        response.get_data()
        response.close()  # what a server does once the body is sent: the request ends
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}

    yield post
    ratelimit.close()


def wsgi_app(settings: dict[str, Any]) -> Iterator[Post]:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if environ["PATH_INFO"] == "/login":
            status = _login_status(environ.get("HTTP_X_PASSWORD"))
            start_response("200 OK" if status == 200 else "401 Unauthorized", [])
            return [b"welcome" if status == 200 else b"no"]
        start_response("200 OK", list(_tokens(environ.get("HTTP_X_WANT")).items()))
        return [b"an answer"]

    middleware = WSGIRateLimitMiddleware(app, config=settings)
    client = Client(middleware)

    def post(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        response = client.post(path, headers=headers)
        response.get_data()
        response.close()
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}

    yield post
    middleware.close()


def _tokens(wanted: str | None) -> dict[str, str]:
    return {} if wanted is None else {"X-Tokens": wanted}


ADAPTERS = {"starlette": starlette_app, "flask": flask_app, "wsgi": wsgi_app}


@pytest.fixture(params=sorted(ADAPTERS))
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[[dict[str, Any]], Post]]:
    """serve(config) -> post: the adapter's app under this configuration."""
    opened: list[Iterator[Post]] = []

    def start(settings: dict[str, Any]) -> Post:
        served = ADAPTERS[request.param](settings)
        opened.append(served)
        return next(served)

    yield start
    for served in opened:
        for _ in served:  # run its clean-up
            pass


def remaining(headers: dict[str, str]) -> int:
    """The `r=` of the RateLimit header: units left when the request was admitted."""
    value = headers["ratelimit"]
    return int(value.split(";r=")[1].split(";")[0])


def login_story(post: Post) -> None:
    """Successful logins are never counted; the 6th failure in 5 minutes is refused, and then
    so is the right password (the attacker is locked out, not the user's next try counted)."""
    right, wrong = {"X-Password": "s3cret"}, {"X-Password": "guess"}
    assert [post("/login", right)[0] for _ in range(8)] == [200] * 8
    assert [post("/login", wrong)[0] for _ in range(5)] == [401] * 5
    status, headers = post("/login", wrong)
    assert status == 429
    assert int(headers["retry-after"]) > 200  # the first failure leaves the window in ~300 s
    assert post("/login", right)[0] == 429


def llm_story(post: Post) -> None:
    """Each call reserves 50 of 100 tokens and is charged what its X-Tokens says."""
    status, headers = post("/complete", {"X-Want": "10"})
    assert (status, remaining(headers)) == (200, 50)  # 50 reserved
    status, headers = post("/complete", {"X-Want": "10"})
    assert (status, remaining(headers)) == (200, 40)  # 10 charged before, 50 reserved now
    status, headers = post("/complete", {"X-Want": "200"})  # a long answer: overdrawn
    assert (status, remaining(headers)) == (200, 30)
    status, headers = post("/complete", {"X-Want": "1"})
    assert status == 429  # 220 charged of 100: refused until the debt is paid off
    assert int(headers["retry-after"]) > 86400  # 120 tokens of debt, at 100 a day


def test_five_failed_logins_then_429_successes_never_counted(serve: Callable[..., Post]) -> None:
    login_story(serve(stories()))


def test_an_llm_endpoint_is_charged_the_tokens_its_answer_says(serve: Callable[..., Post]) -> None:
    llm_story(serve(stories()))


def test_a_response_without_the_header_keeps_its_reservation_and_says_so(
    serve: Callable[..., Post], caplog: pytest.LogCaptureFixture
) -> None:
    post = serve(stories())
    with caplog.at_level(logging.WARNING, "ratesync_middleware"):
        assert remaining(post("/complete")[1]) == 50  # no X-Tokens: 50 stay charged
        assert remaining(post("/complete", {"X-Want": "many"})[1]) == 0  # malformed: the same
        assert post("/complete", {"X-Want": "1"})[0] == 429
    warnings = [r.getMessage() for r in caplog.records if "x-tokens" in r.getMessage()]
    assert warnings == [
        "limiter 'llm': the response has no x-tokens header; the request stays charged what"
        " it reserved"
    ]  # throttled: one line per 10 s, the count of the others in the next one


def test_websocket_messages_have_no_response_to_settle_by_each_is_charged() -> None:
    from tests.test_policies import CHAT, chat_app

    app = chat_app([{"path": "/ws/*", "messages": ["chat"]}], chat={**CHAT, "count_status": [401]})
    with TestClient(app) as client, client.websocket_connect("/ws/chat") as socket:
        echoed, closed = _chat(socket, ["one", "two", "three", "four"])
    assert echoed == ["one", "two", "three"]  # the fourth closed it: none was refunded
    assert closed == 1008


def _chat(socket: Any, texts: list[str]) -> tuple[list[str], int | None]:
    """Send each text and read its echo; what came back, and the close code if it closed."""
    echoed = []
    for text in texts:
        socket.send_text(text)
        try:
            echoed.append(socket.receive_text())
        except WebSocketDisconnect as closed:
            return echoed, closed.code
    return echoed, None


@pytest.mark.nats
def test_the_stories_on_nats(
    serve: Callable[..., Post], nats_store: dict[str, Any], bucket_name: str
) -> None:
    post = serve(stories(nats_store))
    login_story(post)
    llm_story(post)


# --- Permit.settle, framework-free ---------------------------------------------------------------

BUDGET = {"limiters": {"llm": {"limit": 100, "window_seconds": 86400}}}  # a memory store


async def test_an_async_permit_is_charged_what_it_settles() -> None:
    async with AsyncRateLimiter(BUDGET) as limiter:
        permit = await limiter.acquire("llm", key="ann", cost=80)
        assert not (await limiter.hit("llm", key="ann", cost=30)).allowed
        await permit.settle(20)  # the answer took 20 tokens
        assert (await limiter.hit("llm", key="ann", cost=80)).allowed
        assert not (await limiter.hit("llm", key="ann")).allowed


def test_a_sync_permit_settles_once() -> None:
    with RateLimiter(BUDGET) as limiter:
        permit = limiter.acquire("llm", key="ann", cost=100)
        permit.settle(0)
        permit.settle(0)  # again, the same: nothing more
        with pytest.raises(RuntimeError):
            permit.settle(5)
        assert limiter.peek("llm", key="ann").remaining == 100


# --- the configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"settle_header": "X Tokens"},
            '[limiters.llm] settle_header: expected a response header name such as "X-Cost",'
            " got 'X Tokens' (str)",
        ),
        (
            {"count_status": []},
            "[limiters.llm] count_status: expected a non-empty list of HTTP statuses such as"
            " [401, 403], got [] (list)",
        ),
        (
            {"count_status": 401},
            "[limiters.llm] count_status: expected a non-empty list of HTTP statuses such as"
            " [401, 403], got 401 (int)",
        ),
        (
            {"count_status": [401, "403"]},
            "[limiters.llm] count_status: expected a list of HTTP statuses from 100 to 599,"
            " got '403' (str)",
        ),
        (
            {"count_status": [401, 600]},
            "[limiters.llm] count_status: expected a list of HTTP statuses from 100 to 599,"
            " got 600 (int)",
        ),
    ],
)
def test_bad_settle_keys_are_refused_at_start_up(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config({"limiters": {"llm": {"limit": "100/hour", **table}}})
    assert message in str(refused.value)


def test_settling_needs_a_rate_and_is_not_a_route_key() -> None:
    with pytest.raises(ConfigError, match="count_status: goes with a rate"):
        load_config({"limiters": {"uploads": {"max_concurrent": 3, "count_status": [401]}}})
    rule = {"path": "/login", "limiters": ["login"], "count_status": [401]}
    with pytest.raises(ConfigError, match=r"\[\[routes\]\] #1 count_status: unknown key"):
        load_config({"limiters": {"login": {"limit": "5/minute"}}, "routes": [rule]})


def test_a_limiter_table_with_both_keys() -> None:
    config = load_config({"limiters": {"llm": {"limit": "100/hour", **LLM_KEYS}}})
    assert (config.limiters["llm"].settle_header, config.limiters["llm"].count_status) == (
        "X-Tokens",
        (200,),
    )


LLM_KEYS = {"settle_header": "X-Tokens", "count_status": [200]}
