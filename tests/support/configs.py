"""Proxy configurations as data: read with tomllib, changed as dicts, written back with
:func:`tests.support.toml_writer.dumps`; never edited as text."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.support.toml_writer import dumps

Settings = Mapping[str, Any]


def read_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(dumps(data))
    return path


def merge(data: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Apply *settings* to *data* (in place; returned): tables are merged key by key, a table of
    settings given for an array of tables (``hsms``) applies to each of its tables, and None
    removes a key."""
    for key, value in settings.items():
        current = data.get(key)
        if value is None:
            data.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(current, dict):
            merge(current, value)
        elif isinstance(value, Mapping) and isinstance(current, list):
            for table in current:
                merge(table, value)
        elif isinstance(value, Mapping):
            data[key] = merge({}, value)
        else:
            data[key] = copy.deepcopy(value)
    return data


def edit_config(
    path: Path,
    settings: Settings | None = None,
    *,
    change: Callable[[dict[str, Any]], None] | None = None,
    to: Path | None = None,
) -> Path:
    """The configuration at *path* with *settings* merged in and *change* applied, written to
    *to* (beside it, to keep its relative paths) or back to *path*."""
    data = merge(read_config(path), settings or {})
    if change is not None:
        change(data)
    return write_config(to or path, data)
