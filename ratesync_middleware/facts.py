"""What the core needs to know of one request, read on demand; each adapter subclasses it."""

from __future__ import annotations

from typing import Any

from .client_ip import ClientAddress

__all__ = ["RequestFacts"]


class RequestFacts:
    """One request as the limiter sees it; adapters subclass it.

    A subclass overrides `header` (one header's value by lower-case name, repeated fields joined
    with ", "), `user_id` (the authenticated user's id, else None) and `request` (the framework's
    own request object, for `"pkg.mod:func"` keys). Everything is computed on demand.
    """

    __slots__ = ("_client_address", "_client_ip", "method", "path", "peer")

    def __init__(
        self, method: str, path: str, peer: str | None, client_address: ClientAddress
    ) -> None:
        self.method = method
        self.path = path
        self.peer = peer
        self._client_address = client_address
        self._client_ip: str | None = None

    def header(self, name: str) -> str | None:
        """The value of header `name` (lower case), None when absent."""
        return None

    def user_id(self) -> str | None:
        """The authenticated user's id, None for anonymous requests."""
        return None

    @property
    def request(self) -> Any:
        """The framework's request object (Starlette `Request`, Django `HttpRequest`, ...)."""
        return None

    @property
    def client_ip(self) -> str:
        """The client address (behind trusted proxies), IPv6 grouped by network."""
        ip = self._client_ip
        if ip is None:
            ip = self._client_ip = self._client_address(self.peer, self.header)
        return ip
