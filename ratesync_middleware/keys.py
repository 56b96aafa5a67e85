"""Group keys: a limiter name and a client identity become one valid, bounded NATS KV key.

NATS keys allow `[-/_=.A-Za-z0-9]` with `.` separating non-empty tokens. An identity becomes a single
token: letters, digits and `-` stay, every other UTF-8 byte becomes `_XX` (so `_` itself is escaped
and the mapping is injective). Identities whose encoding would exceed `MAX_IDENTITY_LENGTH` become
`=` plus the SHA-256 of the identity: `=` never appears in an escaped form, so the two never meet.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

MAX_IDENTITY_LENGTH = 96
_PLAIN = re.compile(r"[A-Za-z0-9-]+")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_EMPTY_IDENTITY = "_"  # the encoding of "" (never produced otherwise: an escape has two hex digits)
# ASCII escapes in one C-speed `str.translate` (an IPv4 address is the most common identity).
_ASCII_ESCAPES = {b: f"_{b:02X}" for b in range(128) if b not in _SAFE_BYTES}
IDENTITY_CACHE_SIZE = 65_536


@functools.lru_cache(maxsize=IDENTITY_CACHE_SIZE)
def encode_identity(identity: str) -> str:
    """Encode any string as one NATS key token, injectively and with bounded length.

    Cached (bounded): the same clients come back request after request.
    """
    if len(identity) <= MAX_IDENTITY_LENGTH and _PLAIN.fullmatch(identity):
        return identity
    if not identity:
        return _EMPTY_IDENTITY
    if identity.isascii():
        if len(identity) <= MAX_IDENTITY_LENGTH:
            encoded = identity.translate(_ASCII_ESCAPES)
            if len(encoded) <= MAX_IDENTITY_LENGTH:
                return encoded
        return "=" + hashlib.sha256(identity.encode("ascii")).hexdigest()
    raw = identity.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_IDENTITY_LENGTH:
        encoded = "".join(chr(b) if b in _SAFE_BYTES else f"_{b:02X}" for b in raw)
        if len(encoded) <= MAX_IDENTITY_LENGTH:
            return encoded
    return "=" + hashlib.sha256(raw).hexdigest()


def join_identity(parts: Sequence[str]) -> str:
    """Combine the parts of a composite key (`key = ["ip", "header:X"]`) into one identity.

    Each part is length-prefixed, so ("a:b", "c") and ("a", "b:c") stay distinct.
    """
    if len(parts) == 1:
        return parts[0]
    return "".join(f"{len(part)}:{part}" for part in parts)


def group_key(limiter: str, identity: str | None) -> str:
    """The store key of one group: the limiter name alone for a global limiter, else name.identity."""
    if identity is None:
        return limiter
    return f"{limiter}.{encode_identity(identity)}"


SLOTS_TOKEN = "=slots"
"""The last token of a group's concurrency-slots key: `=` starts only a hashed identity (`=` and
64 hex digits), so no group key of any limiter ever ends with this token."""


def slots_key(group: str) -> str:
    """The store key of a group's concurrency slots, beside (never equal to) its rate's key."""
    return f"{group}.{SLOTS_TOKEN}"


TIER_TOKEN = "=tier-"
"""What starts the last token of a group's key under a tier: `=` then a name that is never 64
hex digits alone, so no group key and no other key beside a group ever equals one."""


def tier_key(group: str, tier: str) -> str:
    """The store key of a group's state under `tier`, beside its own rate's key: each tier
    counts on its own, so an upgraded group starts at once from the new tier's state."""
    return f"{group}.{TIER_TOKEN}{tier}"


def decode_identity(token: str) -> str | None:
    """The identity a key token encodes (the inverse of `encode_identity`), for display.

    None for a hashed identity (`=` and a SHA-256: the identity is not in the key) and for a
    token this package would not have written.
    """
    if token.startswith("="):
        return None
    if token == _EMPTY_IDENTITY:
        return ""
    if "_" not in token:
        return token
    raw = bytearray()
    index = 0
    try:
        while index < len(token):
            if token[index] == "_":
                raw.append(int(token[index + 1 : index + 3], 16))
                index += 3
            else:
                raw.append(ord(token[index]))
                index += 1
        return raw.decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        return None


def split_identity(identity: str, count: int) -> list[str] | None:
    """The parts `join_identity` combined (`count` of them); None when it does not split so."""
    if count == 1:
        return [identity]
    parts: list[str] = []
    rest = identity
    while rest:
        length, colon, rest = rest.partition(":")
        if not colon or not length.isdigit() or int(length) > len(rest):
            return None
        parts.append(rest[: int(length)])
        rest = rest[int(length) :]
    return parts if len(parts) == count else None
