"""nats-py's errors translated into ours, in one place, by type.

    StoreError (errors.py)
    ├── StoreUnavailableError
    │   ├── DeadlineError          no answer within the decision's deadline
    │   ├── StalledError           the connection's outgoing buffer does not drain
    │   ├── BucketGoneError        nothing stores the bucket's subjects (deleted)
    │   └── WriteRejectedError     the server refused the write, with its reason
    └── BucketTtlTooShortError     the bucket would forget keys before their window ends
    (and the seed guide's: ConnectionRefusedError, AuthenticationError, ...)

The kind of failure is the class, so the store decides what to do (back off, probe the
connection, reopen the bucket) without reading messages. The only text tests left are the two
that nats-py reports as text alone: a permissions violation, and an authorization violation
while connecting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from ...config import StoreConfig
from ...errors import (
    AuthenticationError,
    ConnectionRefusedError,
    InsufficientPermissionsError,
    JetStreamNotEnabledError,
    StoreError,
    StoreUnavailableError,
)

WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
BUCKET_EXISTS_WITH_OTHER_SETTINGS = 10058

NatsFailure = (nats.errors.Error, OSError, asyncio.TimeoutError)
"""What a NATS call can raise besides our own errors."""


class DeadlineError(StoreUnavailableError):
    """NATS gave no answer within the decision's deadline."""


class StalledError(StoreUnavailableError):
    """The connection's outgoing buffer does not drain: the link or the server hangs."""


class BucketGoneError(StoreUnavailableError):
    """Nothing stores `$KV.<bucket>.>` any more: the bucket was deleted."""


class WriteRejectedError(StoreUnavailableError):
    """The server refused a write (`max_value_size`, `max_bytes`, ...); the message says why."""


def is_wrong_last_sequence(error: BaseException) -> bool:
    """A compare-and-set that lost the race: not a failure, the caller reads and retries."""
    return isinstance(error, nats.js.errors.APIError) and error.err_code in WRONG_LAST_SEQUENCE


def is_auth_rejection(error: BaseException) -> bool:
    """The server rejected the credentials."""
    if isinstance(error, nats.errors.AuthorizationError):
        return True
    # While connecting, nats-py raises the server's "-ERR 'Authorization Violation'" as a plain
    # Error (nats-py 2.16, `_process_connect_init`): told apart by its text, here only.
    return type(error) is nats.errors.Error and "authorization violation" in str(error).lower()


def is_permission_violation(error: BaseException) -> bool:
    """The server refused a subject to these credentials (nats-py reports it only as text)."""
    return isinstance(error, nats.errors.Error) and "permissions violation" in str(error).lower()


@dataclass(frozen=True)
class Translator:
    """Builds our errors, with their remedies, for one store's configuration."""

    config: StoreConfig
    precreate_command: str  # `nats kv add ...` with the TTL this store needs

    @property
    def _servers(self) -> str:
        return ", ".join(self.config.redacted_servers)

    def connect_failure(self, errors: Sequence[BaseException]) -> StoreError:
        """The seed guide's error for what went wrong while connecting."""
        config = self.config
        if any(is_auth_rejection(error) for error in errors):
            how = (
                "the token (check the environment variable it comes from, e.g. `echo $NATS_TOKEN`)"
            )
            if config.creds or config.nkey:
                how = "the creds/nkey file"
            elif any("@" in url for url in config.servers):
                how = "the user and password in the URL"
            return AuthenticationError(
                f"Authentication violation: the NATS server at {self._servers} rejected the "
                f"credentials of store {config.name!r}. Verify {how} against the server "
                "configuration."
            )
        reasons = sorted({type(error).__name__ for error in errors}) or ["no answer"]
        return ConnectionRefusedError(
            f"Connection refused: no NATS server accepted a connection at {self._servers} within "
            f"{config.connect_timeout:g}s ({', '.join(reasons)}). Verify the URL, that "
            "nats-server is running, and that the network and firewall let this host reach it "
            "(e.g. `telnet HOST 4222`)."
        )

    def bucket_failure(self, error: BaseException, *, permission_denied: bool) -> StoreError:
        """Opening or creating the bucket failed (a management call, once per connection)."""
        config, bucket = self.config, self.config.bucket_name
        if isinstance(error, StoreError):
            return error
        if isinstance(
            error, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError
        ):
            return JetStreamNotEnabledError(
                f"JetStream not enabled: the NATS server of store {config.name!r} answers "
                "but has no JetStream. Start nats-server with the `-js` flag (or `jetstream {}` "
                "in its configuration), or ask your NATS administrator to enable it."
            )
        if permission_denied or is_permission_violation(error):
            return InsufficientPermissionsError(
                f"Insufficient permissions: the credentials of store {config.name!r} may not "
                f"create KV bucket {bucket!r}. Ask your NATS administrator to grant it, or "
                f"pre-create it with `{self.precreate_command}` and set auto_create = false."
            )
        return StoreUnavailableError(
            f"store {config.name!r}: opening KV bucket {bucket!r} failed ({describe(error)})"
        )

    def call_failure(self, error: BaseException, what: str = "request") -> StoreError:
        """A call of a decision, a read or a reset failed; the class says what to do next."""
        name, bucket = self.config.name, self.config.bucket_name
        if isinstance(error, StoreError):
            return error
        if isinstance(error, nats.errors.TimeoutError | asyncio.TimeoutError):
            return DeadlineError(
                f"store {name!r}: no answer from NATS to a {what} within the deadline "
                f"({self.config.timeout:g}s)"
            )
        if isinstance(error, nats.errors.OutboundBufferLimitError):
            return StalledError(
                f"store {name!r}: the connection to NATS does not drain its outgoing buffer "
                "(the server or the link hangs)"
            )
        if isinstance(error, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            return BucketGoneError(
                f"store {name!r}: KV bucket {bucket!r} does not answer (deleted?); it is opened "
                "again after the back-off"
            )
        if isinstance(error, nats.js.errors.APIError):
            return WriteRejectedError(
                f"store {name!r}: KV bucket {bucket!r} refused a {what}: {describe(error)}. "
                f"Check the bucket's limits with `nats kv status {bucket}` (or `ratesync check`)"
            )
        return StoreUnavailableError(f"store {name!r}: a {what} failed ({describe(error)})")

    @contextmanager
    def calls(self, what: str) -> Iterator[None]:
        """Translate what a block of NATS calls raises (off the hot path, which calls
        `call_failure` directly to spare a context manager per decision)."""
        try:
            yield
        except NatsFailure as error:
            raise self.call_failure(error, what) from None


def describe(error: BaseException) -> str:
    """An error for a log line: the server's description and codes when it gave them."""
    if isinstance(error, nats.js.errors.APIError):
        parts = [error.description or "no description"]
        codes = [f"code {error.code}"] if error.code is not None else []
        if error.err_code is not None:
            codes.append(f"error {error.err_code}")
        return f"{parts[0]} ({', '.join(codes)})" if codes else parts[0]
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
