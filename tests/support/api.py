"""The XKS API's answers, as the specification requires them."""

from __future__ import annotations

import base64

from tests.support.xks_client import Response


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def assert_error(resp: Response, status: int, name: str) -> None:
    """An error response as §4 requires: status, JSON body, errorName, short printable message."""
    assert resp.status == status, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    assert b"\n" not in resp.body.strip()
    body = resp.json
    assert body["errorName"] == name
    msg = body.get("errorMessage", "")
    assert len(msg) < 512
    assert all(0x20 <= ord(c) <= 0x7E for c in msg)
