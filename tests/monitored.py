"""What a monitored nats-server (the `monitored_nats` fixture) says of its clients."""

from __future__ import annotations

import httpx


def connections(monitoring: str) -> int:
    """The client connections the server has now (`/connz` of its monitoring URL)."""
    count: int = httpx.get(f"{monitoring}/connz").json()["num_connections"]
    return count
