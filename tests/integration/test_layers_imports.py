"""The request path's lower layers never load aiohttp or python-pkcs11 where they should not
(docs/architecture.md §2), each checked in a fresh interpreter.  The package's import graph:
tests/unit/test_layers.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import ROOT


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        (["xksproxy.service", "xksproxy.metrics", "xksproxy.sigv4"], ["aiohttp", "pkcs11"]),
        (["xksproxy.hsm.pkcs11_backend", "xksproxy.keys.byok", "xksproxy.cli"], ["aiohttp"]),
    ],
)
def test_lower_layers_load_neither_aiohttp_nor_pkcs11_where_they_should_not(
    modules: list[str], absent: list[str]
) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted(m for m in {absent!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout
