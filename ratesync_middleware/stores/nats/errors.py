"""nats-py's errors translated into ours, in one place, by type.

    StoreError (errors.py)
    ├── StoreUnavailableError
    │   ├── DeadlineError          no answer within the decision's deadline
    │   ├── StalledError           the connection's outgoing buffer does not drain
    │   ├── BucketGoneError        nothing stores the bucket's subjects (deleted)
    │   │   └── NoQuorumError      "No JetStream quorum": in a cluster, the stream has no leader
    │   └── WriteRejectedError     the server refused the write, with its reason
    └── BucketTtlTooShortError     the bucket would forget keys before their window ends
    (and the seed guide's: ConnectionRefusedError, NameNotResolvedError, ConnectTimeoutError,
    AuthenticationError, InsufficientPermissionsError, ...)

The kind of failure is the class, so the store decides what to do (back off, probe the
connection, reopen the bucket) without reading messages. The only text tests left are the two
that nats-py reports as text alone: a permissions violation, and an authorization violation
while connecting. A deadline missed right after the server refused one of the bucket's subjects
is that refusal (the server answers a forbidden publish with an -ERR, never with a reply), so it
is named as such; "no answer within the deadline" is left for real timeouts.
"""

from __future__ import annotations

import asyncio
import builtins
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from ...config import StoreConfig
from ...errors import (
    AuthenticationError,
    ConnectionRefusedError,
    ConnectTimeoutError,
    InsufficientPermissionsError,
    JetStreamNotEnabledError,
    NameNotResolvedError,
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


class SilentLinkError(nats.errors.TimeoutError):
    """A request missed its deadline and NATS answered no other request meanwhile: a hang, a
    black hole, a partition, or (in a cluster) a stream without a leader."""


class NoQuorumError(BucketGoneError):
    """In a cluster, no server answers for the bucket's stream: it has no leader (the cluster
    lost its majority), or the bucket was deleted. Reopened after the back-off, like a gone
    bucket, which succeeds once a leader is elected."""


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


_REFUSED_SUBJECT = re.compile(r'permissions violation for (\w+) to "?([^"\s]+)"?', re.IGNORECASE)


def refused_subject(error: BaseException) -> str | None:
    """The subject of a permissions violation (`Publish to "$KV.b.k"`), as the server named it."""
    if not is_permission_violation(error):
        return None
    match = _REFUSED_SUBJECT.search(str(error))
    return f"{match.group(1).lower()} to {match.group(2)}" if match else "a subject"


def in_cluster(nc: object) -> bool:
    """Whether the connected server is part of a cluster (its INFO names one)."""
    info = getattr(nc, "_server_info", None)  # nats-py keeps the server's INFO there
    return isinstance(info, dict) and bool(info.get("cluster"))


def _is_refused(error: BaseException) -> bool:
    return isinstance(error, builtins.ConnectionRefusedError)


def _is_unresolved(error: BaseException) -> bool:
    return isinstance(error, socket.gaierror)


def is_definite_connect_failure(error: BaseException) -> bool:
    """A failure that waiting will not change: refused, not resolved, or credentials rejected
    (a timeout is not: a server may still answer)."""
    return _is_refused(error) or _is_unresolved(error) or is_auth_rejection(error)


@dataclass(frozen=True)
class Translator:
    """Builds our errors, with their remedies, for one store's configuration."""

    config: StoreConfig
    precreate_command: str  # `nats kv add ...` with the TTL this store needs

    @property
    def _servers(self) -> str:
        return ", ".join(self.config.redacted_servers)

    @property
    def _credentials_configured(self) -> bool:
        config = self.config
        return bool(
            config.token or config.creds or config.nkey or any("@" in u for u in config.servers)
        )

    def connect_failure(self, errors: Sequence[BaseException]) -> StoreError:
        """The seed guide's error for what went wrong while connecting, by cause."""
        config = self.config
        if any(is_auth_rejection(error) for error in errors):
            if not self._credentials_configured:
                return AuthenticationError(
                    f"Authentication violation: the NATS server at {self._servers} wants "
                    f"credentials and store {config.name!r} has none configured. Set `token` "
                    '(e.g. token = "${NATS_TOKEN}"), user:password@ in `url`, `creds` or '
                    f"`nkey` in [stores.{config.name}]."
                )
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
        if errors and all(_is_unresolved(error) for error in errors):
            return NameNotResolvedError(
                f"Name not resolved: the host of {self._servers} (store {config.name!r}) is "
                "not known to this host's resolver. Verify the host name in `url` (DNS, "
                "/etc/hosts, the container network)."
            )
        if any(_is_refused(error) for error in errors):
            return ConnectionRefusedError(
                f"Connection refused: nothing accepts connections at {self._servers} (store "
                f"{config.name!r}). Verify the URL and port, and that nats-server is running "
                "there (e.g. `telnet HOST 4222`)."
            )
        reasons = sorted({type(error).__name__ for error in errors}) or ["no answer"]
        return ConnectTimeoutError(
            f"No answer: no NATS server at {self._servers} (store {config.name!r}) completed a "
            f"connection within connect_timeout = {config.connect_timeout:g}s "
            f"({', '.join(reasons)}). Verify that the host is up and that the network and "
            "firewall let this host reach it (e.g. `telnet HOST 4222`)."
        )

    def no_quorum(self, what: str) -> NoQuorumError:
        name, bucket = self.config.name, self.config.bucket_name
        return NoQuorumError(
            f"No JetStream quorum: no server of the NATS cluster answers for KV bucket "
            f"{bucket!r} (store {name!r}, {what}): its stream has no leader, because the cluster "
            "lost its majority (servers down or partitioned; or the bucket was deleted). "
            "Decisions follow each limiter's fail rule until a leader is elected; check the "
            "cluster with `nats server report jetstream`."
        )

    def refused(self, subject: str, what: str = "request") -> InsufficientPermissionsError:
        """The server refused one of the bucket's subjects to these credentials."""
        bucket = self.config.bucket_name
        return InsufficientPermissionsError(
            f"Insufficient permissions: the NATS server refused store {self.config.name!r} "
            f"{subject} (a {what} on KV bucket {bucket!r}). Ask your NATS administrator to grant "
            f"publish on `$KV.{bucket}.>` and `$JS.API.>` and subscribe on `_INBOX.>` to these "
            "credentials (docs/setup/nats-setup.md, Permissions)."
        )

    def bucket_failure(
        self, error: BaseException, *, permission_denied: bool, clustered: bool = False
    ) -> StoreError:
        """Opening or creating the bucket failed (a management call, once per connection)."""
        config, bucket = self.config, self.config.bucket_name
        if isinstance(error, StoreError):
            return error
        if clustered and isinstance(
            error,
            nats.errors.TimeoutError
            | asyncio.TimeoutError
            | nats.js.errors.ServiceUnavailableError
            | nats.errors.NoRespondersError,
        ):
            # A cluster whose JetStream answers nothing (no meta leader) or answers 503.
            return self.no_quorum("opening the bucket")
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

    def call_failure(
        self,
        error: BaseException,
        what: str = "request",
        *,
        refused: str | None = None,
        clustered: bool = False,
    ) -> StoreError:
        """A call of a decision, a read or a reset failed; the class says what to do next.

        `refused`: a subject of the bucket the server refused just now (a permissions
        violation), which is why no answer came; `clustered`: the server is in a cluster,
        where nobody answering for the bucket means its stream has no leader.
        """
        name, bucket = self.config.name, self.config.bucket_name
        if isinstance(error, StoreError):
            return error
        timeout = isinstance(error, nats.errors.TimeoutError | asyncio.TimeoutError)
        if refused is not None and (timeout or is_permission_violation(error)):
            return self.refused(refused, what)
        if timeout and clustered and isinstance(error, SilentLinkError):
            # Nothing of the cluster answered: the stream may have no leader (servers answer,
            # JetStream does not), or the server or link hangs (the PING probe tells, next).
            return DeadlineError(
                f"No JetStream quorum, or a server or link that hangs: nothing of the NATS "
                f"cluster answered store {name!r} within the deadline ({self.config.timeout:g}s)"
                f" for KV bucket {bucket!r} (a {what}). Decisions follow each limiter's fail "
                "rule meanwhile; check the cluster with `nats server report jetstream`."
            )
        if timeout:
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
            if clustered:
                return self.no_quorum(f"a {what}")
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
