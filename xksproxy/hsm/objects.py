"""How xksproxy keeps its state in the token (DESIGN.md §6), shared by the backend and the CLI.

- A key version is an AES-256 secret key object: ``CKA_LABEL`` = the external key id,
  ``CKA_ID`` = ``xks-v<N>``.  A key made by other tooling (any other ``CKA_ID``) counts as
  version 1 when it is the only such object.
- A key's status lives in a private ``CKO_DATA`` object: ``CKA_LABEL`` = key id,
  ``CKA_APPLICATION`` = ``xksproxy-key-state``, ``CKA_VALUE`` = JSON ``{"status": "ENABLED"}``.
  No such object means ENABLED.
- The health key's expected known-answer output lives in a ``CKO_DATA`` object with the health
  key's label and ``CKA_APPLICATION`` = ``xksproxy-kat``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

STATE_APPLICATION = "xksproxy-key-state"
KAT_APPLICATION = "xksproxy-kat"
VERSION_PREFIX = b"xks-v"

# The known-answer test: fixed input, fixed IV, on the dedicated health key only.
KAT_IV = bytes(range(12))
KAT_AAD = b"xksproxy known-answer test"
KAT_PLAINTEXT = bytes(32)


def version_id(version: int) -> bytes:
    """The CKA_ID of a key version."""
    return VERSION_PREFIX + str(version).encode()


def parse_version(cka_id: bytes) -> int | None:
    """Version from CKA_ID, or None for an ID not written by xksproxy."""
    if cka_id.startswith(VERSION_PREFIX):
        digits = cka_id[len(VERSION_PREFIX) :]
        if digits.isdigit() and len(digits) <= 9 and int(digits) > 0:
            return int(digits)
    return None


@dataclass(frozen=True)
class KeyState:
    status: str = "ENABLED"

    def to_bytes(self) -> bytes:
        return json.dumps({"status": self.status}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyState:
        """Parse a state object; an unreadable one fails closed (DISABLED)."""
        try:
            data = json.loads(raw)
            status = data["status"]
        except (ValueError, KeyError, TypeError):
            return cls("DISABLED")
        return cls(status if status in ("ENABLED", "DISABLED") else "DISABLED")
