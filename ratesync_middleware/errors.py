"""The exceptions ratesync-middleware raises.

    RateSyncError
    ├── ConfigError                    a rate-sync.toml (or dict) that cannot be used
    ├── RateLimitExceeded              `acquire` was refused (`.decision` says by what)
    ├── RequestFunctionError           a cost or exempt_when function raised or returned junk
    └── StoreError                     the shared store failed to answer
        ├── StoreUnavailableError      deadline passed, connection lost, back-off in force
        ├── ConnectionRefusedError     "Connection refused": nothing listens at the URL
        ├── NameNotResolvedError       "Name not resolved": the URL's host is not in the DNS
        ├── ConnectTimeoutError        "No answer": nothing answered a connection in time
        ├── AuthenticationError        "Authentication violation": bad token, user or password,
        │                              or none configured where the server wants one
        ├── JetStreamNotEnabledError   "JetStream not enabled": server started without -js
        ├── InsufficientPermissionsError  "Insufficient permissions": may not create or use
        │                                 the bucket (the message names the subject refused)
        ├── BucketNotFoundError        "Bucket not found": auto_create = false and no bucket
        └── BucketTtlTooShortError     the bucket would forget keys before their window ends

Messages start with the names used in docs/setup/nats-setup.md and end with the remedy.
No message ever contains a token, password or credential.

A `ConfigError` also says where and what in fields, set where it is raised, so that tools (Django's
system checks, `ratesync check`) need not read the message: `source` (the file, `<dict>`,
`<default>`), `table` (as the message shows it: `[limiters.api]`, `[middleware]`, `[[routes]] #2`;
None at the top level), `key` (None for a whole table), `variable` (the environment variable of an
`env_var` error) and `kind`, one of:

    file                 the file does not exist (a path given, or $RATE_SYNC_CONFIG)
    unreadable           the file exists but cannot be read, or is not UTF-8
    toml_syntax          not TOML
    unknown_key          a key or table nobody knows (a typo)
    bad_value            a value of the wrong type, out of range, nested too deeply, or an engine
                         this package does not have
    missing              a required key is absent
    conflict             keys that cannot go together; a name defined twice
    undefined_reference  a name that refers to no store or limiter
    env_var              ${...}: an unset variable, a malformed expression, or an expansion that
                         does not parse as the key's type
    other                anything else (the default)
"""

from __future__ import annotations

import builtins
from typing import Any, Literal

PRECREATE_COMMAND = "nats kv add {bucket} --history=1 --ttl=24h"


class RateSyncError(Exception):
    """Base class of every error this package raises."""


ConfigErrorKind = Literal[
    "file",
    "unreadable",
    "toml_syntax",
    "unknown_key",
    "bad_value",
    "missing",
    "conflict",
    "undefined_reference",
    "env_var",
    "other",
]


class ConfigError(RateSyncError):
    """A configuration that cannot be used; the message names the file, table and key.

    The same facts are fields (see the module docstring), so no caller parses the message.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        table: str | None = None,
        key: str | None = None,
        kind: ConfigErrorKind = "other",
        variable: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.table = table
        self.key = key
        self.kind: ConfigErrorKind = kind
        self.variable = variable

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling (multiprocessing, pytest-xdist) this way.
        return _rebuild_config_error, (str(self), self._fields())

    def _fields(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "table": self.table,
            "key": self.key,
            "kind": self.kind,
            "variable": self.variable,
        }


def _rebuild_config_error(message: str, fields: dict[str, Any]) -> ConfigError:
    return ConfigError(message, **fields)


class RateLimitExceeded(RateSyncError):  # noqa: N818 (the public name, as rate-sync has it)
    """`AsyncRateLimiter.acquire` / `RateLimiter.acquire` refused: `.decision` is the refusal
    (its `policy` names the rate, or `<limiter>:concurrent` for `max_concurrent`)."""

    def __init__(self, decision: Any) -> None:
        super().__init__(decision.reason or f"limit {decision.policy!r} exceeded")
        self.decision = decision

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.decision,)


class RequestFunctionError(RateSyncError):
    """A user function of a limiter (`cost`, `exempt_when`) raised, or returned what it may not.

    Never reaches the client: the request is answered by the limiter's fail rule (fail-open
    admits it, `fail_closed` refuses it with 503), and the failure is logged (throttled).
    """


class StoreError(RateSyncError):
    """The store could not give a decision. Limiters turn it into fail-open or fail-closed."""


class StoreUnavailableError(StoreError):
    """A transient failure: deadline passed, connection lost, or a back-off is in force."""


class ConnectionRefusedError(StoreError, builtins.ConnectionRefusedError):
    """Nothing accepted a connection at any of the store's URLs."""


class NameNotResolvedError(StoreError):
    """The host name of every URL failed to resolve (DNS, /etc/hosts, a container network)."""


class ConnectTimeoutError(StoreError):
    """No server answered a connection within `connect_timeout` (a firewall that drops
    packets, a host that is down): unlike a refused connection, this waits the deadline out."""


class AuthenticationError(StoreError):
    """The server rejected the token, user/password, creds or nkey."""


class JetStreamNotEnabledError(StoreError):
    """The server answers but has no JetStream."""


class InsufficientPermissionsError(StoreError):
    """The account may not create the bucket, or (at run time) publish or subscribe on one of
    its subjects: the message names the subject refused."""


class BucketTtlTooShortError(StoreError):
    """An existing bucket's max age is shorter than a limiter's window: keys would expire early.

    Unlike an outage, this refuses the start-up: limiting on it would over-admit for ever.
    """


class BucketNotFoundError(StoreError):
    """`auto_create = false` and the bucket does not exist."""
