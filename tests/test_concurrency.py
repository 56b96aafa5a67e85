"""`max_concurrent`: at most N requests of a group in flight, released when the response ends.

The memory store in one process, then each adapter through a real app: a request in flight
holds its slot (a second one is refused with 429), and the slot comes back after a normal
response, a streamed one (after its last chunk) and an exception. NATS across processes is
tests/test_nats_slots.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from flask import Response as FlaskResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from werkzeug.test import Client

from ratesync_middleware import (
    AsyncRateLimiter,
    ConfigError,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    load_config,
)
from ratesync_middleware.flask import RateLimit
from ratesync_middleware.slots import Slots
from ratesync_middleware.stores.memory import MemoryStore
from ratesync_middleware.wsgi import RateLimitMiddleware as WSGIRateLimitMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def config(**limiter: Any) -> dict[str, Any]:
    return {
        "limiters": {"upload": {"max_concurrent": 1, "key": "global", **limiter}},
        "middleware": {"default": "upload"},
    }


# --- configuration -------------------------------------------------------------------------------


def test_max_concurrent_alone_loads_with_the_default_lease() -> None:
    limiter = load_config({"limiters": {"upload": {"max_concurrent": 10}}}).limiters["upload"]
    assert limiter.policy is None
    assert limiter.slots == Slots("upload:concurrent", 10, 30_000_000_000)


def test_max_concurrent_with_a_rate_and_a_lease() -> None:
    table = {"rate_per_second": 5.0, "max_concurrent": 2, "lease_seconds": 2.5}
    limiter = load_config({"limiters": {"upload": table}}).limiters["upload"]
    assert limiter.policy is not None
    assert limiter.policy.burst == 1  # rate-sync: one every 1/rate
    assert limiter.slots == Slots("upload:concurrent", 2, 2_500_000_000)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_concurrent": 1_000_001}, "max_concurrent"),
        ({"max_concurrent": 2.0}, "max_concurrent"),
        ({"max_concurrent": 2, "lease_seconds": 0}, "lease_seconds"),
        ({"max_concurrent": 2, "lease_seconds": 3601}, "lease_seconds"),
        ({"rate_per_second": 1, "lease_seconds": 5}, "lease_seconds"),
        ({"max_concurrent": 2, "burst": 5}, "limit"),  # a burst without a rate
    ],
)
def test_bad_concurrency_keys_are_errors_naming_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config({"limiters": {"upload": table}})
    assert error.value.key == key
    assert error.value.table == "[limiters.upload]"


# --- the memory store ----------------------------------------------------------------------------


def test_the_memory_store_holds_at_most_the_limit_until_released() -> None:
    store = MemoryStore()
    slots = Slots.of("upload", 2)
    first, second, third = (store.acquire_slot_now("k", slots) for _ in range(3))
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert (first.remaining, second.remaining, third.remaining) == (1, 0, 0)
    assert third.retry_after == 1.0
    assert third.policy == "upload:concurrent"
    assert store.acquire_slot_now("other", slots).allowed  # groups are apart
    ticket = first.receipt
    assert isinstance(ticket, int)
    store.release_slot("k", slots, ticket)
    assert store.slots_held("k") == 1
    assert store.acquire_slot_now("k", slots).allowed
    store.release_slot("k", slots, ticket)
    store.release_slot("k", slots, ticket)
    assert store.slots_held("k") == 0
    store.release_slot("k", slots, ticket)  # one release too many gives nothing away
    assert [store.acquire_slot_now("k", slots).allowed for _ in range(3)] == [True, True, False]


def test_the_memory_store_never_evicts_held_slots() -> None:
    store = MemoryStore(max_keys=2)
    slots = Slots.of("upload", 1)
    assert store.acquire_slot_now("held", slots).allowed
    for n in range(50):  # rate states come and go past max_keys
        store.hit_now(f"rate-{n}", load_config(config(rate_per_second=1)).limiters["upload"].policy)  # type: ignore[arg-type]
    assert not store.acquire_slot_now("held", slots).allowed


async def test_a_rate_refusal_gives_the_slot_back_and_a_slot_refusal_spends_no_rate() -> None:
    limiter = AsyncRateLimiter(config(limit="2/minute", max_concurrent=1))
    from ratesync_middleware.lifecycle import RequestLimiter

    core = RequestLimiter(limiter)
    plan = core.plan("GET", "/")
    facts: Any = None  # key = "global" reads nothing of the request
    first = core.begin(facts, plan)
    assert not isinstance(first, asyncio.Future)
    assert hasattr(first, "finish")
    assert first.allowed  # type: ignore[union-attr]
    refused = core.begin(facts, plan)
    assert not refused.allowed  # type: ignore[union-attr]
    assert refused.decision.policy == "upload:concurrent"  # type: ignore[union-attr]
    first.finish(200)  # type: ignore[union-attr]
    # The refusal by the slot spent nothing of the rate: one of its two is left.
    second = core.begin(facts, plan)
    assert second.allowed
    assert second.decision.remaining == 0
    second.finish(200)  # type: ignore[union-attr]
    third = core.begin(facts, plan)  # the rate refuses: the slot it took is given back
    assert not third.allowed
    assert third.decision.policy == "upload"
    store = limiter.store("default")
    assert isinstance(store, MemoryStore)
    assert store.slots_held("upload.=slots") == 0


# --- ASGI ----------------------------------------------------------------------------------------


class Gate:
    """An endpoint that holds its request until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def endpoint(self, request: Request) -> Response:
        self.entered.set()
        await self.opened.wait()
        return PlainTextResponse("done")


async def call(app: Any, path: str) -> tuple[int, bytes]:
    """One request through the ASGI app, as a server would make it: status and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("203.0.113.7", 50000),
        "server": ("test", 80),
    }
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    with contextlib.suppress(RuntimeError):  # the endpoint that raises: a server answers 500
        await app(scope, receive, send)
    status = next((m["status"] for m in messages if m["type"] == "http.response.start"), 500)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


async def test_asgi_refuses_beyond_max_concurrent_and_releases_after_each_kind_of_end() -> None:
    gate = Gate()

    async def streamed(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in (b"one ", b"two ", b"three"):
                await asyncio.sleep(0)
                yield chunk

        return StreamingResponse(chunks())

    async def broken(request: Request) -> Response:
        raise RuntimeError("the endpoint failed")

    app = Starlette(
        routes=[
            Route("/held", gate.endpoint),
            Route("/streamed", streamed),
            Route("/broken", broken),
            Route("/", lambda request: PlainTextResponse("hello")),
        ],
        middleware=[Middleware(RateLimitMiddleware, config=config())],
    )
    held = asyncio.create_task(call(app, "/held"))
    await asyncio.wait_for(gate.entered.wait(), 5)
    status, body = await call(app, "/")
    assert status == 429
    assert b"Concurrency limit 'upload' reached" in body
    gate.opened.set()
    assert await held == (200, b"done")
    assert await call(app, "/streamed") == (200, b"one two three")
    assert (await call(app, "/broken"))[0] == 500
    assert await call(app, "/") == (200, b"hello")  # nothing leaked: the one slot is free


# --- WSGI and Flask ------------------------------------------------------------------------------


def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/broken":
        raise RuntimeError("the app failed")
    start_response("200 OK", [("Content-Type", "text/plain")])
    if path == "/streamed":
        return (chunk for chunk in (b"one ", b"two ", b"three"))
    return [b"hello"]


def test_wsgi_holds_the_slot_until_the_body_is_closed() -> None:
    client = Client(WSGIRateLimitMiddleware(wsgi_app, config=config()))
    streaming = client.get("/streamed")  # the server has not sent the body yet
    refused = client.get("/")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "RateLimit-Policy" not in refused.headers  # a concurrency limit is no quota
    assert streaming.get_data() == b"one two three"
    streaming.close()
    with pytest.raises(RuntimeError, match="the app failed"):
        client.get("/broken")
    with client.get("/") as response:
        assert response.status_code == 200


def flask_app() -> Flask:
    app = Flask(__name__)
    RateLimit(app, config=config())

    @app.get("/")
    def index() -> str:
        return "hello"

    @app.get("/broken")
    def broken_view() -> str:
        raise RuntimeError("the view failed")

    @app.get("/streamed")
    def streamed_view() -> FlaskResponse:
        def chunks() -> Iterator[str]:
            yield from ("one ", "two ", "three")

        return FlaskResponse(chunks())

    return app


def test_flask_holds_the_slot_until_the_response_is_closed() -> None:
    client = flask_app().test_client()
    streaming = client.get("/streamed")
    refused = client.get("/")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    streaming.close()
    with client.get("/broken") as response:
        assert response.status_code == 500
    for _ in range(3):
        with client.get("/") as response:
            assert response.status_code == 200


# --- the framework-free API: acquire and permits -------------------------------------------------


async def test_acquire_gives_a_permit_released_on_exit_and_raises_when_refused() -> None:
    limiter = AsyncRateLimiter(config(max_concurrent=2))
    async with await limiter.acquire("upload") as first:
        second = await limiter.acquire("upload")
        with pytest.raises(RateLimitExceeded) as refused:
            await limiter.acquire("upload")
        assert refused.value.decision.policy == "upload:concurrent"
        assert refused.value.decision.retry_after == 1.0
        await second.release()
        await second.release()  # idempotent: gives nothing more away
        third = await limiter.acquire("upload")
        assert not first.released
    assert first.released
    fourth = await limiter.acquire("upload")
    with pytest.raises(RateLimitExceeded):
        await limiter.acquire("upload")  # third and fourth hold both
    await third.release()
    await fourth.release()


async def test_acquire_with_a_rate_spends_nothing_when_the_slot_refuses() -> None:
    limiter = AsyncRateLimiter(config(limit="2/minute", max_concurrent=1))
    permit = await limiter.acquire("upload")
    assert permit.decision.policy == "upload"
    with pytest.raises(RateLimitExceeded):
        await limiter.acquire("upload")  # the slot refuses: the rate is not spent
    await permit.release()
    async with await limiter.acquire("upload") as last:
        assert last.decision.remaining == 0
    with pytest.raises(RateLimitExceeded) as refused:
        await limiter.acquire("upload")  # the rate refuses: the slot it took comes back
    assert refused.value.decision.policy == "upload"
    store = limiter.store("default")
    assert isinstance(store, MemoryStore)
    assert store.slots_held("upload.=slots") == 0


def test_the_sync_limiter_acquires_with_a_with_block() -> None:
    limiter = RateLimiter(config(max_concurrent=1))
    with limiter.acquire("upload") as permit:
        with pytest.raises(RateLimitExceeded):
            limiter.acquire("upload")
        assert not permit.released
    with limiter.acquire("upload"):
        pass
    limiter.close()
