"""Tampering with an audit log, line by line, as the audit-chain tests do it (each function
takes the log's lines and an index, and returns the edited lines)."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable

Tamper = Callable[[list[bytes], int], list[bytes]]


def seq_of(line: bytes) -> int:
    seq: int = json.loads(line)["seq"]
    return seq


def cid_of(line: bytes) -> str:
    cid: str = json.loads(line)["chain_id"]
    return cid


def alter(lines: list[bytes], i: int) -> list[bytes]:
    out = list(lines)
    out[i] = out[i].replace(b'"status": 200', b'"status": 201')
    assert out[i] != lines[i]
    return out


def alter_seq(lines: list[bytes], i: int) -> list[bytes]:
    out = list(lines)
    seq = seq_of(out[i])
    out[i] = out[i].replace(f'"seq": {seq}'.encode(), f'"seq": {seq + 5}'.encode())
    return out


def remove(lines: list[bytes], i: int) -> list[bytes]:
    return lines[:i] + lines[i + 1 :]


def forge(lines: list[bytes], i: int) -> list[bytes]:
    """Insert before line i a line claiming the seq of line i in its chain, MAC made up."""
    body = lines[i][: lines[i].rindex(b',"chain":"')].replace(b'"status": 200', b'"status": 403')
    fake = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=")
    return [*lines[:i], body + b',"chain":"' + fake + b'"}', *lines[i:]]


def forge_unchained(lines: list[bytes], i: int) -> list[bytes]:
    return [*lines[:i], b'{"event": "xks_request", "status": 200, "worker": 0}', *lines[i:]]


def swap(lines: list[bytes], i: int) -> list[bytes]:
    """Swap line i with the next line of the same chain."""
    j = next(
        k for k in range(i + 1, len(lines)) if lines[k].startswith(b"{") and same_chain(lines, i, k)
    )
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def same_chain(lines: list[bytes], i: int, k: int) -> bool:
    return b'"chain_id"' in lines[k] and cid_of(lines[k]) == cid_of(lines[i])


def duplicate(lines: list[bytes], i: int) -> list[bytes]:
    return [*lines[: i + 1], lines[i], *lines[i + 1 :]]


def relabel(lines: list[bytes], i: int) -> list[bytes]:
    """Move line i into the other worker's chain by editing its chain_id."""
    other = next(cid_of(x) for x in lines if b'"chain_id"' in x and cid_of(x) != cid_of(lines[i]))
    out = list(lines)
    out[i] = out[i].replace(cid_of(lines[i]).encode(), other.encode())
    return out
