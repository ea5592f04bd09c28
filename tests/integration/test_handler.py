"""The HTTP edge in-process, over real HTTP on 127.0.0.1, with a fake HSM behind the Protocol.

Used for what a real HSM cannot be made to do on demand: raise every error class, or fail
with an unexpected exception.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from aiohttp.test_utils import TestServer

from tests.support.fake_hsm import FakeHsm, post_encrypt, serve_handler
from xksproxy import errors, log


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeHsm, TestServer]]:
    hsm = FakeHsm()
    server = await serve_handler(hsm)
    yield hsm, server
    await server.close()


ERROR_CLASSES = [
    errors.ValidationError,
    errors.InvalidStateError,
    errors.InvalidCiphertextError,
    errors.InvalidKeyUsageError,
    errors.AccessDeniedError,
    errors.KeyNotFoundError,
    errors.InvalidUriPathError,
    errors.ThrottlingError,
    errors.UnsupportedOperationError,
    errors.InternalError,
    errors.DependencyTimeoutError,
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.error_name)
async def test_every_error_renders_as_the_spec_says(
    fake: tuple[FakeHsm, TestServer], cls: type[errors.XksError]
) -> None:
    hsm, server = fake
    hsm.failure = cls()
    status, text, headers = await post_encrypt(server)
    assert status == cls.http_status == errors.ERROR_TABLE[cls.error_name]
    assert headers["Content-Type"].startswith("application/json")
    assert "\n" not in text
    assert json.loads(text) == {"errorName": cls.error_name, "errorMessage": cls.default_message}


async def test_authentication_failure_renders_401(fake: tuple[FakeHsm, TestServer]) -> None:
    hsm, server = fake
    hsm.failure = errors.AuthenticationFailedError("test")
    status, text, _ = await post_encrypt(server)
    assert status == 401
    assert json.loads(text)["errorName"] == "AuthenticationFailedException"
    assert "test" not in json.loads(text)["errorMessage"]  # the reason stays in the log


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure("info", stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def test_unexpected_exception_is_internal_and_logged_not_sent(
    fake: tuple[FakeHsm, TestServer], log_stream: io.StringIO
) -> None:
    hsm, server = fake
    hsm.failure = RuntimeError("secret detail of a bug")
    status, text, _ = await post_encrypt(server)
    assert status == 500
    assert json.loads(text) == {"errorName": "InternalException", "errorMessage": "internal error"}
    out = log_stream.getvalue()
    assert "secret detail of a bug" in out and "Traceback" in out
    assert "secret detail" not in text


async def test_success_goes_through_the_fake(fake: tuple[FakeHsm, TestServer]) -> None:
    _, server = fake
    status, text, _ = await post_encrypt(server)
    assert status == 200
    body = json.loads(text)
    assert base64.b64decode(body["ciphertext"]) == bytes(b ^ 1 for b in b"hello")
    assert base64.b64decode(body["ciphertextMetadata"]) == b"\x01\x00\x00\x00\x01"
