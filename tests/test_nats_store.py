"""The NATS KV store against real nats-server processes: layout, the seed guide's errors, hot path."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig

from ratesync_middleware import AsyncRateLimiter, Decision, RateLimiter
from ratesync_middleware.errors import (
    AuthenticationError,
    BucketNotFoundError,
    ConnectionRefusedError,
    InsufficientPermissionsError,
    JetStreamNotEnabledError,
)
from ratesync_middleware.stores.nats import NatsStore
from tests.conftest import start_server
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats


def config(store: dict[str, Any], **limiters: dict[str, Any]) -> dict[str, Any]:
    return {
        "stores": {"prod": store},
        "limiters": {n: {"store": "prod", **t} for n, t in limiters.items()},
    }


async def bucket_status(url: str, bucket: str) -> Any:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        return await kv.status()
    finally:
        await nc.close()


def nats_store_of(limiter: AsyncRateLimiter, name: str = "prod") -> NatsStore:
    store = limiter.store(name)
    assert isinstance(store, NatsStore)
    return store


# -- layout -------------------------------------------------------------------------------------


async def test_bucket_is_created_with_the_guides_settings(nats_url: str, bucket_name: str) -> None:
    store = {"engine": "nats", "url": nats_url, "bucket_name": bucket_name}
    async with AsyncRateLimiter(config(store, api={"rate_per_second": 10.0})) as limiter:
        assert (await limiter.hit("api", key="1.2.3.4")).allowed

    status = await bucket_status(nats_url, bucket_name)
    assert status.history == 1
    assert status.ttl == 24 * 3600
    assert status.stream_info.config.num_replicas == 1
    assert status.stream_info.config.allow_direct


async def test_default_bucket_and_global_key_are_the_guides(nats_server: NatsServer) -> None:
    # `nats kv get rate_limits api_external` shows the group of a global limiter named api_external.
    store = {"engine": "nats", "url": nats_server.url}
    limits = config(store, api_external={"limit": "100/minute", "key": "global"})
    async with AsyncRateLimiter(limits) as limiter:
        for _ in range(3):
            assert (await limiter.hit("api_external", key="ignored-for-global")).allowed

    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("rate_limits")
        entry = await kv.get("api_external")
        value = json.loads(entry.value)
        assert value["v"] == 1
        assert value["burst"] == 100
        assert value["interval_ns"] == 600_000_000
        assert value["tat_ns"] > time.time_ns()
        await kv.delete("api_external")
    finally:
        await nc.close()


async def test_identity_keys_live_under_the_limiter_name(nats_url: str, bucket_name: str) -> None:
    # A generous deadline: under a loaded machine a late answer would be a fail-open guess.
    store = {"engine": "nats", "url": nats_url, "bucket_name": bucket_name, "timeout": 2.0}
    hostile = ["*", ">", "a b", "..", "ünï", "x" * 10_000, "", "a.b", "_2E"]
    async with AsyncRateLimiter(config(store, api={"rate_per_second": 1.0, "burst": 1})) as limiter:
        for identity in hostile:
            assert (await limiter.hit("api", key=identity)).allowed, identity
        for identity in hostile:  # each identity has a bucket of its own, now empty
            assert not (await limiter.hit("api", key=identity)).allowed, identity

    nc = await nats.connect(nats_url)
    try:
        keys = await (await nc.jetstream().key_value(bucket_name)).keys()
    finally:
        await nc.close()
    assert len(keys) == len(hostile)
    assert all(key.startswith("api.") and len(key) < 120 for key in keys)


async def test_existing_bucket_with_other_settings_is_used_with_a_warning(
    nats_url: str, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_url)
    try:
        from nats.js.api import KeyValueConfig

        await nc.jetstream().create_key_value(KeyValueConfig(bucket=bucket_name, history=5, ttl=60))
    finally:
        await nc.close()

    store = {"engine": "nats", "url": nats_url, "bucket_name": bucket_name}
    with caplog.at_level(logging.WARNING, logger="ratesync_middleware"):
        async with AsyncRateLimiter(config(store, api={"rate_per_second": 1.0})) as limiter:
            assert (await limiter.hit("api", key="k")).allowed
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "history 5 (expected 1)" in warning
    assert "ttl 60s" in warning
    assert f"nats kv add {bucket_name} --history=1 --ttl=24h" in warning


# -- the seed guide's failures ------------------------------------------------------------------


async def test_auto_create_false_without_bucket_is_bucket_not_found(
    nats_url: str, bucket_name: str
) -> None:
    store = NatsStore_for(nats_url, bucket_name=bucket_name, auto_create=False)
    with pytest.raises(BucketNotFoundError, match=r"^Bucket not found") as raised:
        await store.ready()
    assert f"nats kv add {bucket_name} --history=1 --ttl=24h" in str(raised.value)
    assert "auto_create = false" in str(raised.value)


async def test_auto_create_false_uses_an_existing_bucket(nats_url: str, bucket_name: str) -> None:
    created = NatsStore_for(nats_url, bucket_name=bucket_name)
    await created.ready()
    await created.aclose()
    store = NatsStore_for(nats_url, bucket_name=bucket_name, auto_create=False)
    await store.ready()
    await store.aclose()


async def test_server_without_jetstream(server_without_jetstream: NatsServer) -> None:
    store = NatsStore_for(server_without_jetstream.url)
    with pytest.raises(JetStreamNotEnabledError, match=r"^JetStream not enabled") as raised:
        await store.ready()
    assert "-js" in str(raised.value)


async def test_token_authentication(token_server: NatsServer) -> None:
    store = NatsStore_for(token_server.url, token="s3cret-token")
    await store.ready()
    await store.aclose()


async def test_wrong_token_is_an_authentication_violation(token_server: NatsServer) -> None:
    store = NatsStore_for(token_server.url, token="wrong-token-value", connect_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match=r"^Authentication violation") as raised:
        await store.ready()
    assert time.monotonic() - started < 2.0  # a rejected login fails at once, not at the deadline
    assert "wrong-token-value" not in str(raised.value)
    assert "wrong-token-value" not in repr(store)


async def test_user_password_in_the_url(users_server: NatsServer, bucket_name: str) -> None:
    store = NatsStore_for(
        f"nats://admin:adm1n-pw@127.0.0.1:{users_server.port}", bucket_name=bucket_name
    )
    await store.ready()
    assert "adm1n-pw" not in repr(store)
    await store.aclose()


async def test_wrong_password_is_an_authentication_violation(users_server: NatsServer) -> None:
    store = NatsStore_for(f"nats://admin:not-the-pw@127.0.0.1:{users_server.port}")
    with pytest.raises(AuthenticationError, match=r"^Authentication violation") as raised:
        await store.ready()
    assert "not-the-pw" not in str(raised.value)
    assert "user and password" in str(raised.value)


async def test_user_who_may_not_create_the_bucket(
    users_server: NatsServer, bucket_name: str
) -> None:
    url = f"nats://limited:l1mited-pw@127.0.0.1:{users_server.port}"
    store = NatsStore_for(url, bucket_name=bucket_name, timeout=0.5)
    with pytest.raises(InsufficientPermissionsError, match=r"^Insufficient permissions") as raised:
        await store.ready()
    assert "auto_create = false" in str(raised.value)
    assert "l1mited-pw" not in str(raised.value)

    admin = NatsStore_for(
        f"nats://admin:adm1n-pw@127.0.0.1:{users_server.port}", bucket_name=bucket_name
    )
    await admin.ready()  # the administrator pre-creates it
    await admin.aclose()
    limited = AsyncRateLimiter(
        config(
            {"engine": "nats", "url": url, "bucket_name": bucket_name, "auto_create": False},
            api={"rate_per_second": 1.0, "burst": 2},
        )
    )
    decisions = [await limited.hit("api", key="k") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert not any(d.degraded for d in decisions)
    await limited.aclose()


async def test_closed_port_is_connection_refused_within_the_deadline() -> None:
    store = NatsStore_for("nats://user:pa55word@127.0.0.1:1", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match=r"^Connection refused") as raised:
        await store.ready()
    assert time.monotonic() - started < 1.5
    assert "pa55word" not in str(raised.value)
    assert "127.0.0.1:1" in str(raised.value)


# -- failing and recovering ---------------------------------------------------------------------


async def test_fail_open_and_fail_closed_while_the_store_is_down() -> None:
    store = {"engine": "nats", "url": "nats://127.0.0.1:1", "connect_timeout": 0.2, "backoff": 5.0}
    limits = config(
        store,
        open={"rate_per_second": 1.0},
        closed={"rate_per_second": 1.0, "fail_closed": True},
    )
    async with AsyncRateLimiter(limits) as limiter:
        opened = await limiter.hit("open", key="k")
        assert opened.allowed
        assert opened.degraded
        started = time.monotonic()
        closed = await limiter.hit("closed", key="k")
        assert time.monotonic() - started < 0.05  # the back-off answers at once
        assert not closed.allowed
        assert closed.degraded
        assert closed.retry_after == 5.0


async def test_limiting_resumes_after_the_server_returns(bucket_name: str) -> None:
    server = start_server()
    try:
        store = {"engine": "nats", "url": server.url, "bucket_name": bucket_name, "backoff": 0.2}
        async with AsyncRateLimiter(
            config(store, api={"rate_per_second": 0.001, "burst": 3})
        ) as limiter:
            assert (await limiter.hit("api", key="k")).allowed
            server.kill()
            during = await limiter.hit("api", key="k")
            assert during.allowed
            assert during.degraded
            server.start()
            deadline = time.monotonic() + 10
            decision = await limiter.hit("api", key="k")
            while decision.degraded and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                decision = await limiter.hit("api", key="k")
            assert not decision.degraded, "limiting did not resume"
            # State survived in the file store: 1 before the outage + this one; the timed-out
            # write during the outage may or may not have landed.
            assert decision.remaining in (0, 1)
    finally:
        server.cleanup()


# -- the hot path -------------------------------------------------------------------------------


def out_messages(store: NatsStore) -> int:
    assert store._nc is not None
    return int(store._nc.stats["out_msgs"])


async def test_steady_state_is_one_round_trip_and_denials_cost_none(
    nats_store: dict[str, Any],
) -> None:
    async with AsyncRateLimiter(
        config(nats_store, api={"rate_per_second": 0.01, "burst": 10})
    ) as limiter:
        await limiter.hit("api", key="warm")  # connects, creates the bucket and the key
        store = nats_store_of(limiter)
        before = out_messages(store)
        for _ in range(9):
            assert (await limiter.hit("api", key="warm")).allowed
        assert out_messages(store) - before == 9  # one compare-and-set each, no reads

        before = out_messages(store)
        denials = [await limiter.hit("api", key="warm") for _ in range(1000)]
        assert not any(d.allowed for d in denials)
        assert out_messages(store) == before  # the cache proves the bucket empty


async def test_concurrent_decisions_on_one_key_are_coalesced(nats_store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(
        config(nats_store, api={"rate_per_second": 0.01, "burst": 50})
    ) as limiter:
        await limiter.hit("api", key="hot")
        store = nats_store_of(limiter)
        before = out_messages(store)
        decisions = await asyncio.gather(*(limiter.hit("api", key="hot") for _ in range(64)))
        assert sum(d.allowed for d in decisions) == 49  # exactly the tokens left, no more, no less
        assert [d.allowed for d in decisions] == [True] * 49 + [False] * 15  # in arrival order
        assert out_messages(store) - before <= 3


async def test_a_stale_cache_is_corrected_by_compare_and_set(nats_store: dict[str, Any]) -> None:
    limits = config(nats_store, api={"rate_per_second": 0.01, "burst": 4})
    async with AsyncRateLimiter(limits) as first, AsyncRateLimiter(limits) as second:
        assert (await first.hit("api", key="k")).allowed
        assert (await second.hit("api", key="k")).allowed  # conflict, read, retry
        assert (await first.hit("api", key="k")).allowed  # first's cache was stale
        last = await second.hit("api", key="k")
        assert last.allowed
        assert last.remaining == 0
        assert not (await first.hit("api", key="k")).allowed


@pytest.mark.parametrize("direct", [True, False], ids=["direct-get", "no-direct-get"])
async def test_another_writers_values_and_resets_are_read_back(
    nats_url: str, bucket_name: str, direct: bool
) -> None:
    # An operator may have created the bucket without direct get: it is read through the API.
    nc = await nats.connect(nats_url)
    kv_config = KeyValueConfig(bucket=bucket_name, history=1, ttl=24 * 3600, direct=direct)
    await nc.jetstream().create_key_value(kv_config)
    await nc.close()
    store = {"engine": "nats", "url": nats_url, "bucket_name": bucket_name, "auto_create": False}
    limits = config(store, api={"rate_per_second": 0.01, "burst": 3})
    async with AsyncRateLimiter(limits) as first, AsyncRateLimiter(limits) as second:
        assert (await first.hit("api", key="k")).remaining == 2
        assert (await second.hit("api", key="k")).remaining == 1  # a conflict, then a read
        await second.reset("api", key="k")  # a delete marker
        assert (await first.hit("api", key="k")).remaining == 2  # the marker reads as full
        assert (await second.peek("api", key="k")).remaining == 2


async def test_writers_racing_on_one_key_admit_exactly_the_burst(
    nats_store: dict[str, Any],
) -> None:
    # Three stores (as three processes would) each send waves of concurrent decisions: they lose
    # compare-and-sets to each other, read, and pace their writes; none admits a token twice.
    # A generous deadline: each decision's covers its queueing and every retry, and on a loaded
    # 2-core machine a fail-open answer would blur the count.
    limits = config({**nats_store, "timeout": 2.0}, api={"rate_per_second": 0.01, "burst": 120})
    async with (
        AsyncRateLimiter(limits) as a,
        AsyncRateLimiter(limits) as b,
        AsyncRateLimiter(limits) as c,
    ):
        decisions: list[Decision] = []
        for _ in range(5):
            waves = [limiter.hit("api", key="hot") for limiter in (a, b, c) for _ in range(16)]
            decisions += await asyncio.gather(*waves)

    assert not any(d.degraded for d in decisions)
    assert sum(d.allowed for d in decisions) == 120  # 240 asked, the burst admitted, no more


async def test_reset_refills_a_group(nats_store: dict[str, Any]) -> None:
    async with AsyncRateLimiter(
        config(nats_store, api={"rate_per_second": 0.01, "burst": 1})
    ) as limiter:
        assert (await limiter.hit("api", key="k")).allowed
        assert not (await limiter.hit("api", key="k")).allowed
        assert (await limiter.peek("api", key="k")).remaining == 0
        await limiter.reset("api", key="k")
        assert (await limiter.peek("api", key="k")).remaining == 1
        assert (await limiter.hit("api", key="k")).allowed


# -- across processes ---------------------------------------------------------------------------


def _spend(url: str, bucket: str, attempts: int, results: Any) -> None:
    limiter = RateLimiter(
        config({"engine": "nats", "url": url, "bucket_name": bucket}, api={"limit": "20/hour"})
    )
    allowed = sum(limiter.hit("api", key="shared").allowed for _ in range(attempts))
    limiter.close()
    results.put(allowed)


def test_two_processes_admit_exactly_the_burst(nats_url: str, bucket_name: str) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_spend, args=(nats_url, bucket_name, 15, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    admitted = [results.get(timeout=5), results.get(timeout=5)]
    assert sum(admitted) == 20, admitted


# -- the sync facade ----------------------------------------------------------------------------


def test_sync_limiter_over_nats(nats_store: dict[str, Any]) -> None:
    with RateLimiter(config(nats_store, api={"rate_per_second": 0.01, "burst": 2})) as limiter:
        decisions: list[Decision] = [limiter.hit("api", key="k") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]


def _hit_after_fork(limiter: RateLimiter, results: Any) -> None:
    results.put(limiter.hit("api", key="k").allowed)


def test_sync_limiter_survives_fork(nats_store: dict[str, Any]) -> None:
    limiter = RateLimiter(config(nats_store, api={"rate_per_second": 0.01, "burst": 2}))
    assert limiter.hit("api", key="k").allowed  # the parent's loop and connection exist now
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_hit_after_fork, args=(limiter, results))
    child.start()
    child.join(30)
    assert results.get(timeout=5) is True  # the child connected afresh: second token
    assert not limiter.hit("api", key="k").allowed  # the parent sees the child's spending
    limiter.close()


def NatsStore_for(url: str, **options: Any) -> NatsStore:  # noqa: N802 - reads like a constructor
    from ratesync_middleware.config import StoreConfig

    return NatsStore(StoreConfig(name="prod", engine="nats", servers=(url,), **options))


async def test_a_deleted_bucket_is_created_again(nats_store: dict[str, Any]) -> None:
    limits = config({**nats_store, "backoff": 0.1}, api={"rate_per_second": 0.01, "burst": 5})
    async with AsyncRateLimiter(limits) as limiter:
        assert (await limiter.hit("api", key="k")).allowed
        nc = await nats.connect(nats_store["url"])
        await nc.jetstream().delete_key_value(nats_store["bucket_name"])
        await nc.close()
        lost = await limiter.hit("api", key="k")
        assert lost.degraded
        assert lost.allowed
        await asyncio.sleep(0.2)
        recreated = await limiter.hit("api", key="k")
        assert recreated.allowed
        assert not recreated.degraded
        assert recreated.remaining == 4  # the state went with the bucket: a fresh, full bucket
    status = await bucket_status(nats_store["url"], nats_store["bucket_name"])
    assert status.history == 1
