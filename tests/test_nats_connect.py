"""Connecting as the seed guide configures it: several URLs, TLS with a CA made at test time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from ratesync_middleware import AsyncRateLimiter
from tests.conftest import start_server
from tests.natsserver import NatsServer

pytestmark = pytest.mark.nats


async def test_several_urls_one_of_them_dead(nats_server: NatsServer, bucket_name: str) -> None:
    config = {
        "stores": {
            "prod_ha": {
                "engine": "nats",
                "url": f"nats://127.0.0.1:1,{nats_server.url}",
                "bucket_name": bucket_name,
            }
        },
        "limiters": {"api": {"store": "prod_ha", "rate_per_second": 1.0, "burst": 1}},
    }
    async with AsyncRateLimiter(config) as limiter:
        first = await limiter.hit("api", key="k")
        second = await limiter.hit("api", key="k")
    assert first.allowed
    assert not first.degraded
    assert not second.allowed
    assert not second.degraded


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    server_cert = authority.issue_cert("127.0.0.1", "localhost")
    authority.cert_pem.write_to_path(str(directory / "ca.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server_cert.private_key_pem.write_to_path(str(directory / "server-key.pem"))
    server = start_server(
        jetstream=False,
        config=f"""
        jetstream {{ store_dir: "{{store_dir}}" }}
        tls {{
          cert_file: "{directory / "server.pem"}"
          key_file: "{directory / "server-key.pem"}"
        }}
        """,
        tls_ca=str(directory / "ca.pem"),
    )
    yield server, directory / "ca.pem"
    server.cleanup()


async def test_tls_with_a_private_ca(tls_server: tuple[NatsServer, Path], bucket_name: str) -> None:
    server, ca = tls_server
    config = {
        "stores": {
            "prod": {
                "engine": "nats",
                "url": f"tls://127.0.0.1:{server.port}",
                "tls_ca": str(ca),
                "bucket_name": bucket_name,
            }
        },
        "limiters": {"api": {"store": "prod", "rate_per_second": 1.0, "burst": 2}},
    }
    async with AsyncRateLimiter(config) as limiter:
        decisions = [await limiter.hit("api", key="k") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert not any(d.degraded for d in decisions)


async def test_tls_without_the_ca_is_refused(tls_server: tuple[NatsServer, Path]) -> None:
    server, _ = tls_server
    config = {
        "stores": {
            "prod": {
                "engine": "nats",
                "url": f"tls://127.0.0.1:{server.port}",
                "connect_timeout": 0.5,
            }
        },
        "limiters": {"api": {"store": "prod", "rate_per_second": 1.0, "fail_closed": True}},
    }
    async with AsyncRateLimiter(config) as limiter:
        decision = await limiter.hit("api", key="k")
    assert decision.degraded
    assert not decision.allowed
