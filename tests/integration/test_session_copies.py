"""Session copies of keys ([[hsms]] session_key_copies): what they are, and that they follow
the token.  Driven through tests/support/copies_probe.py in a subprocess, on the shared rig."""

from __future__ import annotations

import json
import uuid

from tests.support.commands import run_module, xksproxy
from tests.support.rigs import Rig


def test_session_copies_are_sensitive_session_objects_that_follow_the_token(rig: Rig) -> None:
    key = f"copies-{uuid.uuid4().hex[:8]}"
    xksproxy("keys", "create", key, "-c", str(rig.config))
    seen = json.loads(run_module("tests.support.copies_probe", str(rig.config), key).stdout)

    assert seen["token"] == {
        "uses_token_object": True,
        "same_ciphertext": True,
        "session_objects": 0,
    }
    copies = seen["copies"]
    assert copies["uses_token_object"] is False
    assert copies["same_ciphertext"] is True  # the same key material
    assert copies["copy"] == {"sensitive": True, "extractable": False, "token": False}
    assert copies["session_objects"] == 1
    assert copies["session_objects_after_second_lookup"] == 1  # reused, not copied again
    assert copies["lookup_after_delete"] == "KeyNotFound"
    assert copies["session_objects_after_delete"] == 0  # the copy went with the key
