"""Pure pieces of the service: AAD construction, ciphertextMetadata, CDIV, the error table."""

from __future__ import annotations

import base64

import pytest

from xksproxy import errors
from xksproxy.errors import InvalidCiphertextError
from xksproxy.service import cdiv, decode_cm, encode_cm, hsm_aad


def test_cdiv_reproduces_the_spec_vector() -> None:
    d = base64.b64decode
    value = cdiv(
        d("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"),
        d("a2V5X3ZlcnNpb249MQ=="),
        d("HMrlRw85cAJUd5Ax"),
        d("ghxkK1txeDNn3q8Y"),
        d("vBxN2ncH1oEkR8WVXpmyYQ=="),
    )
    assert base64.b64encode(value).decode() == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


def test_cdiv_treats_absent_aad_and_metadata_as_empty() -> None:
    assert cdiv(None, None, b"i", b"c", b"t") == cdiv(b"", b"", b"i", b"c", b"t")


@pytest.mark.parametrize(
    ("aad", "cm", "expected"),
    [
        (None, None, b"\x00\x00\x00"),
        (b"AB", None, b"\x00\x02AB\x00"),
        (None, b"M", b"\x00\x00\x01M"),
        (b"AB", b"M", b"\x00\x02AB\x01M"),
    ],
)
def test_hsm_aad_is_length_prefixed(aad: bytes | None, cm: bytes | None, expected: bytes) -> None:
    assert hsm_aad(aad, cm) == expected


def test_metadata_swapped_into_aad_gives_a_different_hsm_aad() -> None:
    assert hsm_aad(None, b"M") != hsm_aad(b"M", None)


def test_hsm_aad_takes_the_largest_aad() -> None:
    assert hsm_aad(bytes(65535), None)[:2] == b"\xff\xff"


@pytest.mark.parametrize("version", [1, 2, 255, 2**32 - 1])
def test_ciphertext_metadata_carries_the_key_version(version: int) -> None:
    cm = encode_cm(version)
    assert len(cm) <= 20
    assert cm[0] == 0x01
    assert decode_cm(cm) == version


@pytest.mark.parametrize(
    "cm", [None, b"", b"\x01", b"\x02\x00\x00\x00\x01", b"\x01\x00\x00\x00\x00", bytes(6)]
)
def test_foreign_ciphertext_metadata_is_invalid_ciphertext(cm: bytes | None) -> None:
    with pytest.raises(InvalidCiphertextError):
        decode_cm(cm)


SPEC_TABLE = {
    "ValidationException": 400,
    "InvalidStateException": 400,
    "InvalidCiphertextException": 400,
    "InvalidKeyUsageException": 400,
    "AuthenticationFailedException": 401,
    "AccessDeniedException": 403,
    "KeyNotFoundException": 404,
    "InvalidUriPathException": 404,
    "ThrottlingException": 429,
    "UnsupportedOperationException": 501,
    "DependencyTimeoutException": 503,
    "InternalException": 500,
}


@pytest.mark.parametrize(("name", "status"), sorted(SPEC_TABLE.items()))
def test_error_table_matches_the_spec(name: str, status: int) -> None:
    assert errors.ERROR_TABLE[name] == status


def test_error_table_has_exactly_the_twelve_spec_errors() -> None:
    assert set(errors.ERROR_TABLE) == set(SPEC_TABLE)


@pytest.mark.parametrize("message", ["é" * 600, "a\nb\tc\x00", "x" * 1000])
def test_error_messages_are_short_printable_ascii(message: str) -> None:
    msg = errors.ValidationError(message).message
    assert len(msg) < 512
    assert all(0x20 <= ord(c) <= 0x7E for c in msg)
