"""The exceptions ratesync-middleware raises.

    RateSyncError
    ├── ConfigError                    a rate-sync.toml (or dict) that cannot be used
    └── StoreError                     the shared store failed to answer
        ├── StoreUnavailableError      deadline passed, connection lost, back-off in force
        ├── ConnectionRefusedError     "Connection refused": nothing listens at the URL
        ├── AuthenticationError        "Authentication violation": bad token, user or password
        ├── JetStreamNotEnabledError   "JetStream not enabled": server started without -js
        ├── InsufficientPermissionsError  "Insufficient permissions": may not create the bucket
        └── BucketNotFoundError        "Bucket not found": auto_create = false and no bucket

Messages start with the names used in docs/setup/nats-setup.md and end with the remedy.
No message ever contains a token, password or credential.
"""

from __future__ import annotations

import builtins

PRECREATE_COMMAND = "nats kv add {bucket} --history=1 --ttl=24h"


class RateSyncError(Exception):
    """Base class of every error this package raises."""


class ConfigError(RateSyncError):
    """A configuration that cannot be used; the message names the file, table and key."""


class StoreError(RateSyncError):
    """The store could not give a decision. Limiters turn it into fail-open or fail-closed."""


class StoreUnavailableError(StoreError):
    """A transient failure: deadline passed, connection lost, or a back-off is in force."""


class ConnectionRefusedError(StoreError, builtins.ConnectionRefusedError):
    """Nothing accepted a connection at any of the store's URLs."""


class AuthenticationError(StoreError):
    """The server rejected the token, user/password, creds or nkey."""


class JetStreamNotEnabledError(StoreError):
    """The server answers but has no JetStream."""


class InsufficientPermissionsError(StoreError):
    """The account may not create (or use) the bucket."""


class BucketNotFoundError(StoreError):
    """`auto_create = false` and the bucket does not exist."""
