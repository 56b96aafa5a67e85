"""Group keys: any identity becomes a valid, bounded NATS key, and distinct ones never meet."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from ratesync_middleware.keys import (
    MAX_IDENTITY_LENGTH,
    decode_identity,
    encode_identity,
    group_key,
    join_identity,
    split_identity,
)

NATS_KEY = re.compile(r"[-/_=.A-Za-z0-9]+")


def valid_nats_key(key: str) -> bool:
    return bool(NATS_KEY.fullmatch(key)) and "" not in key.split(".")


def test_readable_identities_stay_readable() -> None:
    assert group_key("api", "user-42") == "api.user-42"
    assert group_key("api_external", None) == "api_external"


def test_hostile_identities() -> None:
    for identity in ["*", ">", "a b", "..", ".", "ünï", "x" * 10_000, "", "a\r\nb", "_", "=x"]:
        key = group_key("api", identity)
        assert valid_nats_key(key), (identity, key)
        assert len(key) <= len("api.") + 65


@given(st.text())
def test_every_string_becomes_a_valid_bounded_key(identity: str) -> None:
    key = group_key("api", identity)
    assert valid_nats_key(key)
    assert len(encode_identity(identity)) <= max(MAX_IDENTITY_LENGTH, 65)


@given(st.text(), st.text())
def test_distinct_identities_never_share_a_key(first: str, second: str) -> None:
    if first != second:
        assert encode_identity(first) != encode_identity(second)


@given(st.lists(st.text(), min_size=2, max_size=4), st.lists(st.text(), min_size=2, max_size=4))
def test_composite_identities_stay_distinct(first: list[str], second: list[str]) -> None:
    if first != second and len(first) == len(second):
        assert join_identity(first) != join_identity(second)


def test_escapes_and_hashes_cannot_collide() -> None:
    assert encode_identity("_") != encode_identity("")
    assert encode_identity("a_b") != encode_identity("a_5Fb")
    assert encode_identity("a_5Fb") == "a_5F5Fb"
    assert encode_identity("x" * 200).startswith("=")


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_an_operator_reads_back_every_identity_that_was_not_hashed(parts: list[str]) -> None:
    """`ratesync` shows groups decoded: the encoding is reversible, and so is the joining."""
    token = encode_identity(join_identity(parts))
    decoded = decode_identity(token)
    if token.startswith("="):
        assert decoded is None  # hashed: the identity is not in the key
    else:
        assert decoded is not None
        assert split_identity(decoded, len(parts)) == parts


def test_the_documented_example_decodes() -> None:
    assert decode_identity("10_3A127_2E0_2E0_2E133_3Akim") == "10:127.0.0.133:kim"
    assert split_identity("10:127.0.0.133:kim", 2) == ["127.0.0.13", "kim"]
    assert split_identity("10:127.0.0.133:kim", 3) is None
    assert decode_identity("_") == ""
    assert decode_identity("_ZZ") is None
