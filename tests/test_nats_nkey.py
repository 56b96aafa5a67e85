"""NKey authentication: a seed file on the client, the public key in the server's configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest

from ratesync_middleware import AsyncRateLimiter
from ratesync_middleware.errors import AuthenticationError
from ratesync_middleware.stores.nats import NatsStore
from tests.conftest import start_server
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats


def new_user_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


@pytest.fixture(scope="module")
def nkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    seed = new_user_seed()
    public_key = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path_factory.mktemp("nkey") / "user.nk"
    seed_file.write_bytes(seed)
    admin_seed = new_user_seed()
    admin_key = nkeys.from_seed(bytearray(admin_seed)).public_key.decode()
    server = start_server(
        jetstream=False,
        config=f"""
        jetstream {{ store_dir: "{{store_dir}}" }}
        authorization {{ users = [ {{ nkey: {public_key} }}, {{ nkey: {admin_key} }} ] }}
        """,
        nkey_seed=str(seed_file),
    )
    yield server, seed_file
    server.cleanup()


async def test_nkey_seed_file(nkey_server: tuple[NatsServer, Path], bucket_name: str) -> None:
    server, seed_file = nkey_server
    config = {
        "stores": {
            "prod": {
                "engine": "nats",
                "url": server.url,
                "nkey": str(seed_file),
                "bucket_name": bucket_name,
            }
        },
        "limiters": {"api": {"store": "prod", "rate_per_second": 1.0, "burst": 1}},
    }
    async with AsyncRateLimiter(config) as limiter:
        first = await limiter.hit("api", key="k")
        second = await limiter.hit("api", key="k")
    assert first.allowed
    assert not first.degraded
    assert not second.allowed


async def test_unknown_nkey_is_an_authentication_violation(
    nkey_server: tuple[NatsServer, Path], tmp_path: Path
) -> None:
    server, _ = nkey_server
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_user_seed())
    from ratesync_middleware.config import StoreConfig

    store = NatsStore(StoreConfig("prod", "nats", servers=(server.url,), nkey=str(stranger)))
    with pytest.raises(AuthenticationError, match=r"^Authentication violation") as raised:
        await store.ready()
    assert "nkey" in str(raised.value)
    assert stranger.read_text() not in str(raised.value)
