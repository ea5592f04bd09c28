"""The systemd units shipped in systemd/, read as systemd reads them."""

from __future__ import annotations

import configparser
from pathlib import Path

from tests.support.paths import ROOT

UNITS = sorted(
    p for p in (ROOT / "systemd").glob("xksproxy*.*") if p.suffix in (".service", ".timer")
)


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser
