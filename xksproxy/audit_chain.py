"""A keyed hash chain over the audit lines of the log, and its verifier (docs/audit.md).

Each process that serves requests writes its own chain: its first line is
``audit_chain_started`` (seq 1), then every ``xks_request`` line, and at an orderly stop
``audit_chain_closed``.  Every chained line carries ``chain_id``, ``seq`` and, last,
``"chain"``: base64url of HMAC-SHA256(mac key, previous MAC || the line's exact bytes without
its ``chain`` field).  The MAC of seq 1 chains from a value derived from the chain id.  Chains of
several workers and of restarts are interleaved in one file; each is verified on its own.

Only a holder of the key can make or check a MAC: someone who can edit the file cannot
recompute the chain after changing, removing, inserting or reordering a line.  The key itself
and the derived MAC key never reach a log line.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

MIN_KEY_BYTES = 32
CHAIN_STARTED = "audit_chain_started"
CHAIN_CLOSED = "audit_chain_closed"
# Lines that are chained.  All are written from the event loop's thread of their process, so
# a MAC is computed and its line written without another chained line in between.
CHAINED_EVENTS = frozenset({"xks_request", CHAIN_STARTED, CHAIN_CLOSED})
FORMAT = "hmac-sha256-v1"

_LABEL = b"xksproxy audit chain v1"
_TAIL = re.compile(rb'^(\{.*),"chain":"([A-Za-z0-9_-]{43})"\}$', re.DOTALL)
_MARK = b'"chain":"'


class ChainKeyError(ValueError):
    """The key text is not a usable chain key; the message says why (never the key)."""


def parse_key(text: str) -> bytes:
    """The key from its text form: hex digits, at least 64 (32 bytes); whitespace ignored."""
    digits = "".join(text.split())
    if not digits:
        raise ChainKeyError("is empty")
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        raise ChainKeyError("must be hex digits (for example: openssl rand -hex 32)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ChainKeyError(
            f"must be at least {2 * MIN_KEY_BYTES} hex digits ({MIN_KEY_BYTES} bytes)"
        )
    return key


def _mac_key(key: bytes) -> bytes:
    # A key of its own for the MACs: the configured key is never used directly.
    return hmac.digest(key, _LABEL, "sha256")


def _start(mac_key: bytes, chain_id: str) -> bytes:
    return hmac.digest(mac_key, b"start\0" + chain_id.encode(), "sha256")


def _b64(mac: bytes) -> str:
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _default_encode(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "), default=repr)


class AuditChain:
    """One process's chain: :meth:`seal` turns an event into its chained JSON line."""

    def __init__(
        self,
        key: bytes,
        chain_id: str | None = None,
        encode: Callable[[Any], str] = _default_encode,
    ) -> None:
        self._mac_key = _mac_key(key)
        self.chain_id = chain_id or secrets.token_hex(8)
        self.seq = 0
        self._prev = _start(self._mac_key, self.chain_id)
        self._encode = encode

    def seal(self, event: MutableMapping[str, Any]) -> str:
        """The line for *event*, with chain_id, seq and (last) its chain MAC."""
        self.seq += 1
        event["chain_id"] = self.chain_id
        event["seq"] = self.seq
        event.pop("chain", None)  # only the MAC below may be the last field
        body = self._encode(event).encode("ascii")
        mac = hmac.digest(self._mac_key, self._prev + body, "sha256")
        self._prev = mac
        return body[:-1].decode("ascii") + ',"chain":"' + _b64(mac) + '"}'

    def started_fields(self) -> dict[str, Any]:
        """Fields of the ``audit_chain_started`` line (never the key)."""
        return {"chain_format": FORMAT, "pid": os.getpid()}


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first problem found: where, in which chain, and what kind."""

    line: int
    kind: str  # altered | removed | inserted | duplicated | reordered | unchained
    detail: str
    chain_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.chain_id is not None:
            where += f" (chain {self.chain_id} seq {self.seq})"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class ChainSummary:
    chain_id: str
    first_line: int
    last_line: int = 0
    lines: int = 0
    closed: bool = False


@dataclass
class Report:
    """What :func:`verify_lines` found."""

    problem: Problem | None = None
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    chained_lines: int = 0
    unchained_lines: int = 0  # JSON lines outside the chain (supervisor, library logs)
    ignored_lines: int = 0  # not JSON objects (tracebacks, blank lines)

    @property
    def not_closed(self) -> list[ChainSummary]:
        return [c for c in self.chains.values() if not c.closed]


@dataclass
class _Entry:
    line: int
    raw: bytes
    body: bytes
    mac: bytes
    seq: int
    event: Any


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=")


def _parse(number: int, raw: bytes) -> tuple[str, _Entry] | Problem | None:
    """A chained line's entry; None for a line outside the chain; a Problem if malformed."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        if _MARK in raw:
            return Problem(number, "altered", "a chained line that is no longer a JSON object")
        return None
    if "chain" not in obj and "chain_id" not in obj and "seq" not in obj:
        if obj.get("event") in CHAINED_EVENTS:
            return Problem(
                number, "unchained", f"a {obj.get('event')} line without a chain (inserted?)"
            )
        return None
    cid, seq = obj.get("chain_id"), obj.get("seq")
    match = _TAIL.match(raw)
    if (
        match is None
        or not isinstance(cid, str)
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 1
    ):
        return Problem(number, "altered", "chain fields malformed")
    entry = _Entry(
        number, raw, match.group(1) + b"}", _unb64(match.group(2)), seq, obj.get("event")
    )
    return cid, entry


def _ok(mac_key: bytes, prev: bytes, e: _Entry) -> bool:
    return hmac.compare_digest(hmac.digest(mac_key, prev + e.body, "sha256"), e.mac)


def _walk(mac_key: bytes, cid: str, entries: list[_Entry], summary: ChainSummary) -> Problem | None:
    """The first problem of one chain (its entries in file order), or None."""
    prev, expected = _start(mac_key, cid), 1
    seen: dict[int, _Entry] = {}
    for i, e in enumerate(entries):
        if e.seq == expected and _ok(mac_key, prev, e):
            seen[e.seq] = e
            prev, expected = e.mac, expected + 1
            summary.lines += 1
            summary.last_line = e.line
            summary.closed = e.event == CHAIN_CLOSED
            continue
        return _diagnose(mac_key, cid, prev, expected, e, entries[i + 1 :], seen)
    return None


def _diagnose(
    mac_key: bytes,
    cid: str,
    prev: bytes,
    expected: int,
    e: _Entry,
    later: list[_Entry],
    seen: Mapping[int, _Entry],
) -> Problem:
    """What is wrong with *e*, the first line of its chain that does not verify in place."""

    def problem(kind: str, detail: str) -> Problem:
        return Problem(e.line, kind, detail, cid, e.seq)

    if e.seq < expected:
        first = seen.get(e.seq)
        if first is not None and first.raw == e.raw:
            return problem("duplicated", f"a copy of line {first.line}")
        return problem("inserted", f"seq {e.seq} was already used")
    # The line due here, found further on and verifying here.
    due = next((x for x in later if x.seq == expected and _ok(mac_key, prev, x)), None)
    if e.seq == expected:
        if due is not None:
            return problem("inserted", f"does not verify; line {due.line} does")
        hint = " (or not the key that wrote it)" if expected == 1 else ""
        return problem("altered", f"MAC does not verify{hint}")
    # e.seq > expected: lines before it moved away, removed, or it is not genuine.
    if due is not None:
        before = [x for x in later if x.seq == e.seq - 1]
        if any(_ok(mac_key, x.mac, e) for x in before):
            return problem("reordered", f"seq {expected} belongs here; it is at line {due.line}")
        return problem("inserted", f"does not verify; seq {expected} at line {due.line} does")
    if later and later[0].seq == expected + 1:
        return problem("altered", f"seq {expected} expected, and the next line is {expected + 1}")
    missing = f"seq {expected}" if e.seq == expected + 1 else f"seq {expected}-{e.seq - 1}"
    start = " (the start of the chain is missing)" if expected == 1 else ""
    return problem("removed", f"{missing} missing before this line{start}")


def verify_lines(lines: Iterable[bytes], key: bytes) -> Report:
    """Check every chain in *lines* (a log's lines, without newlines); the first problem in
    file order is ``report.problem``."""
    mac_key = _mac_key(key)
    report = Report()
    chains: dict[str, list[_Entry]] = {}
    problems: list[Problem] = []
    for number, raw in enumerate(lines, start=1):
        parsed = _parse(number, raw)
        if parsed is None:
            if raw.strip().startswith(b"{") and raw.strip().endswith(b"}"):
                report.unchained_lines += 1
            else:
                report.ignored_lines += 1
        elif isinstance(parsed, Problem):
            problems.append(parsed)
            break  # later lines cannot hold an earlier problem
        else:
            cid, entry = parsed
            report.chained_lines += 1
            chains.setdefault(cid, []).append(entry)
            if cid not in report.chains:
                report.chains[cid] = ChainSummary(cid, number)
    for cid, entries in chains.items():
        found = _walk(mac_key, cid, entries, report.chains[cid])
        if found is not None:
            problems.append(found)
    if problems:
        report.problem = min(problems, key=lambda p: p.line)
    return report
