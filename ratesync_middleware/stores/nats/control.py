"""The fleet's control plane on NATS: what one process or an operator changes, every process hears.

Resets (docs/engines/nats.md, "The control plane"): whoever resets a group deletes its key and
then publishes the key on the bucket's control subject `ratesync.<bucket>.reset` (core NATS, no
JetStream); every process sharing the bucket subscribes to it and forgets its cached state of
that key, so its next decision reads the key again. Nothing of this is on a request's path.

What the subject can miss is covered elsewhere: a process that was disconnected drops its whole
cache when it reconnects (store.py), and a denial answered from the cache is checked against
NATS again once it is older than `RECHECK_NS` (a plain `nats kv del` publishes nothing).
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

__all__ = ["RECHECK_NS", "ResetListener", "reset_subject"]

RECHECK_NS = 1_000_000_000
"""A denial answered from a cached state older than this reads the key first (DESIGN.md: 1 s)."""


def reset_subject(bucket: str) -> str:
    """The core NATS subject on which resets of `bucket`'s keys are announced."""
    return f"ratesync.{bucket}.reset"


class ResetListener:
    """Subscribes one connection to its bucket's resets and hands each reset key to `forget`."""

    def __init__(self, bucket: str, forget: Callable[[str], None]) -> None:
        self.subject = reset_subject(bucket)
        self._forget = forget

    async def start(self, nc: NatsClient) -> None:
        await nc.subscribe(self.subject, cb=self._on_reset)

    async def _on_reset(self, message: Msg) -> None:
        try:
            key = message.data.decode("ascii")
        except UnicodeDecodeError:
            return  # not a key of ours (keys are ASCII): nothing to forget
        self._forget(key)

    async def announce(self, nc: NatsClient, key: str) -> None:
        """Tell every process sharing the bucket that `key` was reset (after it was deleted)."""
        await nc.publish(self.subject, key.encode("ascii"))
        await nc.flush()
