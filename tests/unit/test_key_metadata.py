"""A key's metadata object (xksproxy/hsm/objects.py): what it records, how it reads back, and
which of several copies wins.  The key commands that write it:
tests/integration/test_key_custody.py.
"""

from __future__ import annotations

import pytest

from xksproxy.hsm import objects

# ---- the metadata object -------------------------------------------------------------------


def test_metadata_round_trips() -> None:
    now = objects.now_utc()
    meta = objects.KeyMeta(
        status="PENDING_DELETION",
        revision=4,
        deletion=objects.Deletion(now, now),
        rotation_days=90,
        versions={
            1: objects.VersionMeta(now, "generated"),
            2: objects.VersionMeta(now, "imported", "ab12"),
        },
    )
    assert objects.KeyMeta.from_bytes(meta.to_bytes()) == meta
    assert b'"importToken":"ab12"' in meta.to_bytes() and meta.to_bytes().count(b"importToken") == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"status":"ON"}',
        b'{"status":"ENABLED","rev":-1}',
        b'{"status":"ENABLED","rotationDays":0}',
        b'{"status":"PENDING_DELETION"}',  # pending without a window
        b'{"status":"ENABLED","deletion":{"scheduled":"x","after":"y"}}',
        b'{"status":"ENABLED","versions":{"1":{"created":"2026","origin":"generated"}}}',
        b'{"status":"ENABLED","versions":{"1":{"created":"2026-01-02T03:04:05Z",'
        b'"origin":"imported","importToken":7}}}',
    ],
)
def test_unreadable_metadata_fails_closed(raw: bytes) -> None:
    meta = objects.KeyMeta.from_bytes(raw)
    assert meta.status == "DISABLED" and not meta.serving


def test_the_highest_revision_wins_and_a_tie_goes_to_the_stricter() -> None:
    enabled = objects.KeyMeta("ENABLED", 3).to_bytes()
    disabled_old = objects.KeyMeta("DISABLED", 2).to_bytes()
    disabled_tie = objects.KeyMeta("DISABLED", 3).to_bytes()
    assert objects.current_meta([disabled_old, enabled]).status == "ENABLED"
    assert objects.current_meta([enabled, disabled_tie]).status == "DISABLED"
    assert objects.current_meta([]).status == "ENABLED"  # no object: enabled (older keys)
    assert objects.current_meta([enabled, b"garbage"]).status == "DISABLED"
