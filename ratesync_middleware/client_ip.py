"""The client's address: the peer, or what trusted proxies say the client was.

Only peers in `[middleware] trusted_proxies` are believed about `X-Forwarded-For` / `Forwarded`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import Final

__all__ = ["UNKNOWN_CLIENT", "ClientAddress"]

ADDRESS_CACHE_SIZE: Final = 4096  # parsed peers / IPv6 networks kept
UNKNOWN_CLIENT: Final = "unknown"  # the identity of a request without a peer address (unix socket)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from a header element: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `"[::1]"`; else None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 has at least two colons
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """The client's address: the peer, or what `trusted_proxies` say the client was.

    `X-Forwarded-For` is read right to left, skipping trusted hops; the first untrusted hop is the
    client. Without that header the RFC 7239 `Forwarded` header's `for=` values are read the same
    way. An element that is no IP address (garbage, `unknown`, an obfuscated name) stops the walk
    and the peer is used. IPv6 clients are grouped by network (`ipv6_prefix` bits, /64 default),
    since one subscriber usually holds a whole /64.
    """

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        ipv6_prefix: int = 64,
        forwarded_header: str = "x-forwarded-for",
    ) -> None:
        self.networks = tuple(ipaddress.ip_network(net, strict=False) for net in trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self.forwarded_header = forwarded_header
        # Bounded caches: peers and header values are client-controlled.
        self._peer_is_trusted = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(self._trusted_text)
        self._group_v6 = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(self._group_v6_text)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def _trusted_text(self, peer: str) -> bool:
        address = _parse_ip(peer)
        return address is not None and self._is_trusted(address)

    def _group_v6_text(self, text: str) -> str:
        address = _parse_ip(text)
        return text if address is None else self._group(address)

    def _group(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        if address.version == 4:
            return str(address)
        network = ipaddress.IPv6Network((int(address), self.ipv6_prefix), strict=False)
        return str(network)

    def __call__(self, peer: str | None, header: Callable[[str], str | None]) -> str:
        """The client identity for a request from `peer`; `header(name)` reads a request header."""
        if not peer:
            return UNKNOWN_CLIENT
        if self.networks and self._peer_is_trusted(peer):
            try:
                forwarded = self._from_headers(header)
            except Exception:  # a header getter that chokes on bytes must not fail the request
                forwarded = None
            if forwarded is not None:
                return self._group(forwarded)
        if ":" in peer:
            return self._group_v6(peer)
        return peer

    def _from_headers(
        self, header: Callable[[str], str | None]
    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        # Only the one header the proxies are configured to set: a client may send the other one,
        # and a proxy that does not know it passes it through unchanged.
        value = header(self.forwarded_header)
        if not value:
            return None
        if self.forwarded_header == "forwarded":
            return self._walk(_forwarded_for(value))
        return self._walk(value.split(","))

    def _walk(self, hops: list[str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """Right to left: the first hop that is not a trusted proxy; None on garbage."""
        address = None
        for hop in reversed(hops[-64:]):  # a proxy chain longer than 64 hops is an attack
            address = _parse_ip(hop)
            if address is None:
                return None
            if not self._is_trusted(address):
                return address
        return address  # every hop is trusted: the leftmost one is the client


def _forwarded_for(value: str) -> list[str]:
    """The `for=` values of an RFC 7239 `Forwarded` header, one per element, in order.

    An element without `for=` yields "" (not an address), which stops the walk there.
    """
    hops = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            name, equals, token = pair.partition("=")
            if equals and name.strip().lower() == "for":
                found = token.strip()
                break
        hops.append(found)
    return hops
