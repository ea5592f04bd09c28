"""A small TOML writer for the configurations the tests write (tomllib only reads).

It renders what a proxy configuration holds: tables, arrays of tables (``[[hsms]]``), their
sub-tables (``[hsms.env]``), and strings, integers, floats, booleans and arrays of those as
values.  ``tomllib.loads(dumps(data)) == data`` for any such *data* (tests/unit checks it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a TOML key must be a string, not {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(item, Mapping) for item in value)
    )


def _table(
    path: tuple[str, ...], table: Mapping[str, Any], header: str | None, needed: bool = False
) -> list[str]:
    """*table*'s lines: its header (unless the table holds only tables and need not be named:
    they define it), its values, then its sub-tables."""
    values, nested = [], []
    for key, value in table.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            nested.append((key, value))
        else:
            values.append(f"{_key(key)} = {_value(value)}")
    named = header is not None and (values or needed or not nested)
    lines = ["", header, *values] if named and header is not None else values
    for key, value in nested:
        sub = (*path, _key(key))
        name = ".".join(sub)
        if isinstance(value, Mapping):
            lines += _table(sub, value, f"[{name}]")
        else:
            for item in value:
                lines += _table(sub, item, f"[[{name}]]", needed=True)
    return lines


def dumps(data: Mapping[str, Any]) -> str:
    """*data* as a TOML document."""
    return "\n".join(_table((), data, None)).lstrip("\n") + "\n"
