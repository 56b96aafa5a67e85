"""The framework-free request path: client address, identities, route plans and the check."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratesync_middleware import ConfigError, Decision
from ratesync_middleware import plans as plans_module
from ratesync_middleware.client_ip import ClientAddress
from ratesync_middleware.facts import RequestFacts
from ratesync_middleware.keys import join_identity
from ratesync_middleware.lifecycle import Admission, Plan, RequestLimiter
from ratesync_middleware.marks import Marks, exempt, get_marks, limit

PROXIES = ("10.0.0.0/8", "2001:db8:ffff::/48")


class Facts(RequestFacts):
    """A request described by hand, as an adapter would describe its own."""

    __slots__ = ("_headers", "_user")

    def __init__(
        self,
        client_address: ClientAddress,
        peer: str | None = "203.0.113.7",
        headers: dict[str, str] | None = None,
        method: str = "GET",
        path: str = "/",
        user: str | None = None,
    ) -> None:
        super().__init__(method, path, peer, client_address)
        self._headers = {name.lower(): value for name, value in (headers or {}).items()}
        self._user = user

    def header(self, name: str) -> str | None:
        return self._headers.get(name)

    def user_id(self) -> str | None:
        return self._user

    @property
    def request(self) -> Any:
        return {"tenant": self._headers.get("x-tenant")}


def client_ip(peer: str | None, headers: dict[str, str] | None = None, **options: Any) -> str:
    return Facts(ClientAddress(**options), peer, headers).client_ip


# --- client address ----------------------------------------------------------------------------


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_ip("203.0.113.7", {"X-Forwarded-For": "1.2.3.4"}) == "203.0.113.7"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    spoofed = {"X-Forwarded-For": "1.2.3.4", "Forwarded": "for=5.6.7.8"}
    assert client_ip("203.0.113.7", spoofed, trusted_proxies=PROXIES) == "203.0.113.7"


def test_forwarded_for_is_read_right_to_left_skipping_trusted_hops() -> None:
    # The client put "1.1.1.1" there itself; the proxies appended the real hops.
    headers = {"X-Forwarded-For": "1.1.1.1, 198.51.100.9, 10.1.2.3"}
    assert client_ip("10.0.0.1", headers, trusted_proxies=PROXIES) == "198.51.100.9"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    headers = {"X-Forwarded-For": "10.9.9.9, 10.1.2.3"}
    assert client_ip("10.0.0.1", headers, trusted_proxies=PROXIES) == "10.9.9.9"


def test_rfc7239_forwarded_header() -> None:
    headers = {"Forwarded": 'for=192.0.2.60;proto=http;by=10.0.0.1, For="[2001:db8:cafe::17]:4711"'}
    ip = client_ip("10.0.0.1", headers, trusted_proxies=PROXIES, forwarded_header="forwarded")
    assert ip == "2001:db8:cafe::/64"


def test_only_the_configured_header_is_believed() -> None:
    # A proxy that sets one header passes the other through as the client sent it.
    headers = {"X-Forwarded-For": "198.51.100.9", "Forwarded": "for=192.0.2.60"}
    assert client_ip("10.0.0.1", headers, trusted_proxies=PROXIES) == "198.51.100.9"
    forwarded = client_ip(
        "10.0.0.1", headers, trusted_proxies=PROXIES, forwarded_header="forwarded"
    )
    assert forwarded == "192.0.2.60"
    assert (
        client_ip("10.0.0.1", {"Forwarded": "for=192.0.2.60"}, trusted_proxies=PROXIES)
        == "10.0.0.1"
    )


@pytest.mark.parametrize(
    "garbage",
    ["", "unknown", "not an ip", "1.2.3.4.5", "_hidden", "[::1", ",,,", "1.2.3.4, bogus"],
)
def test_garbage_in_the_header_falls_back_to_the_peer(garbage: str) -> None:
    headers = {"X-Forwarded-For": garbage}
    assert client_ip("10.0.0.1", headers, trusted_proxies=PROXIES) == "10.0.0.1"


def test_ports_and_brackets_are_stripped() -> None:
    assert (
        client_ip("10.0.0.1", {"X-Forwarded-For": "198.51.100.9:5678"}, trusted_proxies=PROXIES)
        == "198.51.100.9"
    )
    assert (
        client_ip("10.0.0.1", {"X-Forwarded-For": "[2001:db8::1]:80"}, trusted_proxies=PROXIES)
        == "2001:db8::/64"
    )


def test_ipv6_clients_are_grouped_by_prefix() -> None:
    assert client_ip("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_ip("2001:db8:1:2:3:4:5:6", ipv6_prefix=48) == "2001:db8:1::/48"
    assert client_ip("2001:db8:1:2:3:4:5:6", ipv6_prefix=128) == "2001:db8:1:2:3:4:5:6/128"


def test_ipv4_mapped_ipv6_is_the_ipv4_address() -> None:
    assert (
        client_ip("10.0.0.1", {"X-Forwarded-For": "::ffff:198.51.100.9"}, trusted_proxies=PROXIES)
        == "198.51.100.9"
    )


def test_a_request_without_a_peer_is_unknown() -> None:
    assert client_ip(None) == "unknown"


@given(
    peer=st.one_of(
        st.none(), st.sampled_from(["10.0.0.1", "2001:db8:ffff::1", "1.2.3.4"]), st.text()
    ),
    forwarded_for=st.one_of(st.none(), st.text()),
    forwarded=st.one_of(st.none(), st.text()),
)
def test_hostile_headers_never_raise(
    peer: str | None, forwarded_for: str | None, forwarded: str | None
) -> None:
    headers = {}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    if forwarded is not None:
        headers["Forwarded"] = forwarded
    ip = client_ip(peer, headers, trusted_proxies=PROXIES)

    if ip not in (peer, "unknown"):  # anything else is a real address or network
        ipaddress.ip_network(ip, strict=False)


@given(
    st.lists(
        st.sampled_from(["10.0.0.1", "198.51.100.9", "garbage", "::1", "[::1]:80", " "]),
        max_size=200,
    )
)
def test_long_forwarded_chains_never_raise(hops: list[str]) -> None:
    client_ip("10.0.0.1", {"X-Forwarded-For": ", ".join(hops)}, trusted_proxies=PROXIES)


# --- identities --------------------------------------------------------------------------------


def tenant(facts: RequestFacts) -> str | None:
    """A `"tests.test_requests:tenant"` key: the tenant header, else the client IP."""
    value: str | None = facts.request["tenant"]
    return value


async def tenant_async(facts: RequestFacts) -> str | None:
    await asyncio.sleep(0)
    return tenant(facts)


def config(key: Any) -> dict[str, Any]:
    return {
        "limiters": {"api": {"rate_per_second": 1.0, "burst": 2, "key": key}},
        "middleware": {"default": "api"},
    }


async def identity_of(key: Any, facts_options: dict[str, Any] | None = None) -> str | None:
    core = RequestLimiter(config(key))
    facts = Facts(core.client_address, **(facts_options or {}))
    (api,) = core.plan(facts.method, facts.path)
    return await api.identity(facts)


async def test_identity_key_words() -> None:
    assert await identity_of("ip") == "203.0.113.7"
    assert await identity_of("global") is None
    assert await identity_of("path", {"path": "/items/7"}) == "/items/7"
    assert await identity_of("user", {"user": "ada"}) == "ada"
    assert await identity_of("user") == "203.0.113.7"  # anonymous: the client IP
    assert await identity_of("header:X-API-Key", {"headers": {"X-API-Key": "k1"}}) == "k1"
    assert await identity_of("header:X-API-Key") == "203.0.113.7"  # missing: the client IP


async def test_a_list_key_combines_its_parts() -> None:
    identity = await identity_of(["ip", "header:X-User"], {"headers": {"X-User": "ada"}})
    assert identity == join_identity(["203.0.113.7", "ada"])


async def test_callable_keys_sync_and_async() -> None:
    for spec in ("tests.test_requests:tenant", "tests.test_requests:tenant_async"):
        assert await identity_of(spec, {"headers": {"X-Tenant": "acme"}}) == "acme"
        assert await identity_of(spec) == "203.0.113.7"  # None: the client IP
    combined = await identity_of(
        ["tests.test_requests:tenant", "path"], {"headers": {"X-Tenant": "acme"}}
    )
    assert combined == join_identity(["acme", "/"])


async def test_a_callable_key_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[limiters.api\] key: cannot import 'tests.nowhere:f'"):
        await identity_of("tests.nowhere:f")
    core = RequestLimiter(config("tests.test_requests:missing"))
    with pytest.raises(ConfigError, match="missing"):
        await core.startup()


# --- decorators and plans -----------------------------------------------------------------------

RULES: dict[str, Any] = {
    "limiters": {
        "api": {"rate_per_second": 10.0},
        "login": {"limit": "5/minute"},
        "search": {"rate_per_second": 2.0},
    },
    "middleware": {"default": "api"},
    "routes": [
        {"path": "/auth/*", "methods": ["POST"], "limiters": ["login"]},
        {"path": "/search", "methods": ["GET"], "limiters": ["search", "api"]},
        {"path": "/health", "exempt": True},
    ],
}


def names(plan: tuple[Any, ...]) -> list[str]:
    return [item.name for item in plan]


def test_decorators_only_mark_the_function() -> None:
    @limit("login", cost=2)
    def login() -> str:
        return "in"

    @exempt
    def health() -> str:
        return "ok"

    assert login() == "in"
    assert health() == "ok"
    assert get_marks(login) == Marks(limits=(("login", 2),))
    assert get_marks(health) == Marks(exempt=True)
    assert get_marks(lambda: None) is None


def test_stacked_limits_read_top_to_bottom_and_exempt_wins() -> None:
    @limit("login")
    @limit("search", "api")
    def view() -> None: ...

    # None: each limiter's own cost (its `cost` key, else 1)
    assert get_marks(view) == Marks(limits=(("login", None), ("search", None), ("api", None)))
    core = RequestLimiter(RULES)
    assert names(core.plan("GET", "/", view)) == ["login", "search", "api"]
    assert core.plan("GET", "/", exempt(view)) == ()


def test_limit_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        limit()
    with pytest.raises(ValueError, match="cost"):
        limit("api", cost=0)


def test_precedence_decorator_then_route_rule_then_default() -> None:
    core = RequestLimiter(RULES)

    @limit("search")
    def marked() -> None: ...

    def plain() -> None: ...

    assert names(core.plan("POST", "/auth/login", marked)) == ["search"]  # decorator
    assert names(core.plan("POST", "/auth/login", plain)) == ["login"]  # rule
    assert names(core.plan("GET", "/auth/login", plain)) == ["api"]  # rule is POST only: default
    assert names(core.plan("GET", "/other", None)) == ["api"]  # default
    assert core.plan("GET", "/health", plain) == ()  # exempt rule
    assert core.plan("GET", "/health", marked) != ()  # a decorator wins over an exempt rule


def test_route_globs_and_methods() -> None:
    core = RequestLimiter(RULES)
    assert names(core.plan("POST", "/auth/deep/er/path", None)) == ["login"]  # * spans /
    assert names(core.plan("POST", "/auth", None)) == ["api"]
    assert names(core.plan("HEAD", "/search", None)) == ["search", "api"]  # HEAD is a GET
    assert names(core.plan("POST", "/search", None)) == ["api"]


def test_without_default_only_listed_routes_are_limited() -> None:
    core = RequestLimiter({"limiters": {"api": {"rate_per_second": 1.0}}})
    assert core.plan("GET", "/", None) == ()


def test_an_unknown_limiter_in_a_decorator_is_a_config_error() -> None:
    @limit("nope")
    def view() -> None: ...

    with pytest.raises(ConfigError, match="no limiter 'nope'"):
        RequestLimiter(RULES).plan("GET", "/", view)


def test_the_plan_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plans_module, "PLAN_CACHE_SIZE", 16)
    core = RequestLimiter(RULES)
    for number in range(1000):
        assert names(core.plan("GET", f"/hostile/{number}", None)) == ["api"]
    assert len(core.plans._by_path) <= 16


# --- the check ---------------------------------------------------------------------------------

SEVERAL: dict[str, Any] = {
    "limiters": {
        "wide": {"rate_per_second": 0.001, "burst": 10},
        "narrow": {"rate_per_second": 0.001, "burst": 2},
        "site": {"rate_per_second": 0.001, "burst": 100, "key": "global"},
    },
}


@pytest.mark.parametrize("immediate", [False, True], ids=["abegin", "begin"])
async def test_every_limiter_must_allow_and_the_denial_names_its_limiter(immediate: bool) -> None:
    core = RequestLimiter(SEVERAL)

    @limit("wide", "narrow")
    def view() -> None: ...

    plan = core.plan("GET", "/", view)
    facts = Facts(core.client_address)

    async def check() -> Decision | None:
        admission = core.begin(facts, plan) if immediate else await core.abegin(facts, plan)
        assert isinstance(admission, Admission)  # memory stores: decided at once
        return admission.decision

    first = await check()
    assert first is not None
    assert first.allowed
    assert first.policy == "narrow"
    assert first.remaining == 1
    await check()
    denied = await check()
    assert denied is not None
    assert not denied.allowed
    assert denied.policy == "narrow"
    wide = await core.limiter.peek("wide", facts.client_ip)
    assert wide.remaining == 7  # the first denial stops the check: only "wide" spent a third


def test_only_memory_stores_and_keys_without_async_parts_are_decided_immediately() -> None:
    core = RequestLimiter(
        {
            "stores": {
                "here": {"engine": "memory"},
                "shared": {"engine": "nats", "url": "nats://127.0.0.1:4222"},
            },
            "limiters": {
                "local": {"rate_per_second": 1.0, "store": "here"},
                "custom": {
                    "rate_per_second": 1.0,
                    "store": "here",
                    "key": "tests.test_requests:tenant_async",
                },
                "remote": {"rate_per_second": 1.0, "store": "shared"},
            },
        }
    )

    def plan_of(*names: str) -> Plan:
        @limit(*names)
        def view() -> None: ...

        return core.plan("GET", "/", view)

    assert core.decides_now(plan_of("local"))
    assert not core.decides_now(plan_of("local", "remote"))  # a NATS store is awaited
    assert not core.decides_now(plan_of("custom"))  # so is a key function (it may be async)


async def test_not_limited_gives_no_decision() -> None:
    core = RequestLimiter(SEVERAL)
    assert (await core.abegin(Facts(core.client_address), ())).decision is None


async def test_cost_from_the_decorator() -> None:
    core = RequestLimiter(SEVERAL)

    @limit("wide", cost=4)
    def view() -> None: ...

    admission = await core.abegin(Facts(core.client_address), core.plan("GET", "/", view))
    decision = admission.decision
    assert decision is not None
    assert decision.remaining == 6
