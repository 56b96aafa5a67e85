"""The KV bucket: open it, create it with the seed guide's settings, check an existing one.

A bucket's max age (its TTL) is counted from each key's last write when history is 1, and is the
only expiry of idle keys. It must cover the longest refill time of the limiters on the store, or
a group idle for the max age would get a full bucket back before its window ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamInfo

from ...bucket import NS_PER_SECOND
from ...config import StoreConfig
from ...errors import PRECREATE_COMMAND, BucketNotFoundError, BucketTtlTooShortError
from .errors import BUCKET_EXISTS_WITH_OTHER_SETTINGS, Translator, in_cluster

logger = logging.getLogger("ratesync_middleware.nats")

BUCKET_TTL_SECONDS = 24 * 3600
BUCKET_HISTORY = 1


def bucket_ttl_seconds(windows_ns: Mapping[str, int]) -> int:
    """The max age to create a bucket with: 24 h, or the longest window when that is longer."""
    longest = max(windows_ns.values(), default=0)
    return max(BUCKET_TTL_SECONDS, -(-longest // NS_PER_SECOND))


def duration(seconds: float) -> str:
    """A duration as the `nats` CLI takes it: `24h`, `168h`, `90s`."""
    whole = int(seconds)
    if whole == seconds and whole % 3600 == 0 and whole:
        return f"{whole // 3600}h"
    return f"{seconds:g}s"


def key_expiry(info: StreamInfo, server: tuple[int, int]) -> tuple[bool, str]:
    """Whether writes to this bucket carry a per-message TTL (`Nats-TTL`: a key leaves the
    server once its state is full again), and a line saying which expiry applies."""
    if getattr(info.config, "allow_msg_ttl", False):
        return True, "idle keys expire when full again (per-message TTL)"
    kept = f"idle keys are kept {duration(info.config.max_age or 0)} (the bucket's TTL"
    if server < (2, 11):
        return False, f"{kept}: nats-server {server[0]}.{server[1]} has no per-message TTL)"
    return False, (
        f"{kept}: the bucket was made without per-message TTL; "
        f"`nats stream edit {info.config.name} --allow-msg-ttl` enables it)"
    )


def precreate_command(bucket: str, ttl_seconds: int) -> str:
    """The seed guide's `nats kv add` command, with a TTL long enough for this store."""
    if ttl_seconds == BUCKET_TTL_SECONDS:
        return PRECREATE_COMMAND.format(bucket=bucket)
    return f"nats kv add {bucket} --history={BUCKET_HISTORY} --ttl={duration(ttl_seconds)}"


class BucketOpener:
    """Opens one store's bucket (a management call, once per connection)."""

    def __init__(
        self, config: StoreConfig, windows_ns: Mapping[str, int], translator: Translator
    ) -> None:
        self.config = config
        self.windows_ns = dict(windows_ns)
        self.ttl_seconds = bucket_ttl_seconds(windows_ns)
        self.translator = translator
        self.stream = f"KV_{config.bucket_name}"

    async def open(
        self, js: JetStreamContext, permission_denied: Callable[[], bool] = lambda: False
    ) -> StreamInfo:
        """The bucket's stream info, creating the bucket when allowed and missing.

        `permission_denied` says whether the server reported a permissions violation meanwhile
        (nats-py tells it to the error callback, not to the failing call).

        Raises the seed guide's errors, and `BucketTtlTooShortError` for an existing bucket
        whose max age is shorter than a limiter's window.
        """
        bucket = self.config.bucket_name
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not self.config.auto_create:
                raise BucketNotFoundError(
                    f"Bucket not found: KV bucket {bucket!r} does not exist and store "
                    f"{self.config.name!r} has auto_create = false. Create it with "
                    f"`{self.translator.precreate_command}` (or `ratesync check`), "
                    "or set auto_create = true."
                ) from None
            return await self._create(js, permission_denied)
        except Exception as error:
            raise self.translator.bucket_failure(
                error,
                permission_denied=permission_denied(),
                clustered=in_cluster(getattr(js, "_nc", None)),
            ) from None
        self.check(info)
        return info

    async def _create(
        self, js: JetStreamContext, permission_denied: Callable[[], bool]
    ) -> StreamInfo:
        kv_config = KeyValueConfig(
            bucket=self.config.bucket_name,
            history=BUCKET_HISTORY,
            ttl=self.ttl_seconds,
            replicas=self.config.replicas,
            direct=True,
        )
        try:
            await js.create_key_value(kv_config)
            info = await js.stream_info(self.stream)
        except nats.js.errors.BadRequestError as error:
            if error.err_code != BUCKET_EXISTS_WITH_OTHER_SETTINGS:
                raise self.translator.bucket_failure(
                    error, permission_denied=permission_denied()
                ) from None
            info = await js.stream_info(self.stream)  # created meanwhile by another process
            self.check(info)
        except Exception as error:
            raise self.translator.bucket_failure(
                error, permission_denied=permission_denied()
            ) from None
        return info

    def check(self, info: StreamInfo) -> None:
        """Refuse a bucket that forgets keys too early; warn once about other differences."""
        config, bucket = info.config, self.config.bucket_name
        max_age = config.max_age or 0.0  # 0: keys never expire
        if self.windows_ns and max_age:
            limiter, window_ns = max(self.windows_ns.items(), key=lambda item: item[1])
            if max_age * NS_PER_SECOND < window_ns:
                window = window_ns / NS_PER_SECOND
                raise BucketTtlTooShortError(
                    f"Bucket TTL too short: KV bucket {bucket!r} forgets a key "
                    f"{duration(max_age)} after its last write (max age {max_age:g}s), but "
                    f"limiter {limiter!r} of store {self.config.name!r} needs {window:g}s "
                    "to refill, so its groups would get a full bucket back early. Raise the "
                    f"bucket's max age: `nats stream edit {self.stream} "
                    f"--max-age={duration(self.ttl_seconds)}`, or recreate it: "
                    f"`nats kv rm {bucket}` then `{self.translator.precreate_command}`."
                )
        differences = []
        if config.max_msgs_per_subject != BUCKET_HISTORY:
            differences.append(f"history {config.max_msgs_per_subject} (expected {BUCKET_HISTORY})")
        if not max_age or abs(max_age - self.ttl_seconds) > 1:
            differences.append(f"ttl {max_age:g}s (expected {self.ttl_seconds}s)")
        if (config.num_replicas or 1) != self.config.replicas:
            differences.append(f"replicas {config.num_replicas} (expected {self.config.replicas})")
        if differences:
            logger.warning(
                "store %r: KV bucket %r exists with %s; using it as it is. To recreate it: "
                "`nats kv rm %s` then `%s`",
                self.config.name,
                bucket,
                ", ".join(differences),
                bucket,
                self.translator.precreate_command,
            )
