"""Unit tests: no SoftHSM or other PKCS#11 module loaded, no IPv4/IPv6 socket, no process
started; the whole directory runs in seconds.  Every test here runs under the guard of
tests/support/unit_guard.py, which fails the test that does any of these."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.unit_guard import UnitGuard


@pytest.fixture(autouse=True)
def unit_guard() -> Iterator[UnitGuard]:
    with UnitGuard().watching() as guard:
        yield guard
