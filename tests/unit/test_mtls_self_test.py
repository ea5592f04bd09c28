"""The mutual-TLS self-test fails closed (xksproxy/http/mtls.py): run in memory (ssl.MemoryBIO),
no socket.  Mutual TLS against a real proxy: tests/integration/test_mtls.py."""

from __future__ import annotations

import pytest


def test_the_self_test_fails_closed_when_names_are_not_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unit test of the guard: were the name not enforced (simulated by skipping the call that
    sets it), the self-test refuses mutual TLS rather than let any name in."""
    from xksproxy.http import mtls

    monkeypatch.setattr(mtls, "set_client_name", lambda ctx, name: None)
    with pytest.raises(mtls.MtlsUnavailable, match="another name was let in"):
        mtls.self_test.__wrapped__()
