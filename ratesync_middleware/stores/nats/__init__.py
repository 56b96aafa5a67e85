"""The NATS JetStream KV store (docs/engines/nats.md).

store.py   NatsStore: the hot path, the connection, deadlines and back-off
wire.py    the stored value's encoding, and the request/reply of decisions
bucket.py  opening, creating and checking the bucket (its TTL covers the windows)
errors.py  nats-py's errors translated into ours, in one place
"""

from __future__ import annotations

from ...errors import BucketTtlTooShortError
from .bucket import BUCKET_HISTORY, BUCKET_TTL_SECONDS, bucket_ttl_seconds
from .errors import (
    BucketGoneError,
    DeadlineError,
    StalledError,
    WriteRejectedError,
)
from .store import NatsStore
from .wire import VALUE_VERSION, StoredEntry, decode_tat, decode_value, encode_value

__all__ = [
    "BUCKET_HISTORY",
    "BUCKET_TTL_SECONDS",
    "VALUE_VERSION",
    "BucketGoneError",
    "BucketTtlTooShortError",
    "DeadlineError",
    "NatsStore",
    "StalledError",
    "StoredEntry",
    "WriteRejectedError",
    "bucket_ttl_seconds",
    "decode_tat",
    "decode_value",
    "encode_value",
]
