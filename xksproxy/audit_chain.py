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
#: The recovery line after writes failed (log.LineSink.try_recover).  Chained: it says which
#: chained line could not be written (``chain_lost``) and the MAC the chain resumes from
#: (``chain_resume``), so that the verifier can tell an announced loss from a removal.
LOG_RECOVERED = "log_writable_again"
#: The security-relevant lines: chained, and written whatever the log level.  A line's MAC is
#: computed and the line written under one lock (log.LineSink), so any thread may log them.
CHAINED_EVENTS = frozenset(
    {
        "xks_request",  # every answered request (authentication failures included)
        "authz_deny",  # secondary authorization denied a request
        "authz_would_deny",  # an audit-only policy would have denied it
        "reload_applied",  # credentials, policies, key lists or TLS files changed (SIGHUP)
        "reload_rejected",  # a reload that was refused
        "tls_client_rejected",  # a client certificate failed mutual TLS
        LOG_RECOVERED,
        CHAIN_STARTED,
        CHAIN_CLOSED,
    }
)
#: Every other event xksproxy writes (operational lines: health, sessions, workers, ...),
#: outside the chain.  tests/unit/test_audit_chain.py checks this list against the sources.
#: The verifier reports any JSON line that is neither chained, nor one of these, nor a
#: library's line (with a ``logger`` field).
UNCHAINED_EVENTS = frozenset(
    {
        "drained",
        "draining",
        "hsm_after_probe_failed",
        "hsm_call_failed",
        "hsm_calls_still_hung_at_exit",
        "hsm_gcm_iv_mode",
        "hsm_gcm_output_unexpected",
        "hsm_health_changed",
        "hsm_key_index_slow",
        "hsm_keys_indexed",
        "hsm_known_answer_unreadable",
        "hsm_open_failed",
        "hsm_pool_grow_failed",
        "hsm_pool_grown",
        "hsm_pool_trimmed",
        "hsm_probe_busy",
        "hsm_recover_failed",
        "hsm_reopen",
        "hsm_reopen_unavailable",
        "hsm_session_broken",
        "hsm_session_close_failed",
        "hsm_session_reopen_failed",
        "http_requests_rejected",
        "key_copy_matches_again",
        "key_copy_mismatch",
        "key_copy_missing",
        "key_object_ignored",
        "key_objects_damaged",
        "listening",
        "log_reopen_failed",
        "max_connections_lowered",
        "no_drain_in_fleet",
        "prefix_without_credentials",
        "requests_shed",
        "session_key_copy_refused",
        "sighup_forwarded",
        "stopping",
        "supervisor_gone",
        "tls_client_name_not_kms",
        "unexpected_error",
        "worker_exited",
        "worker_killed",
        "worker_restart_failed",
        "worker_start_failed",
        "worker_started",
        "worker_unresponsive",
    }
)
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

    def state(self) -> tuple[int, bytes]:
        """Where the chain stands, for :meth:`restore`."""
        return self.seq, self._prev

    def restore(self, state: tuple[int, bytes]) -> None:
        """Take back the lines sealed since :meth:`state` (the recovery line, when writing it
        failed: it is sealed again, as the same line, when it is tried again)."""
        self.seq, self._prev = state

    @property
    def last_mac(self) -> str:
        """The MAC of the last line sealed (base64url): where a chain resumes after a line
        that could not be written (``chain_resume``)."""
        return _b64(self._prev)

    def started_fields(self) -> dict[str, Any]:
        """Fields of the ``audit_chain_started`` line (never the key)."""
        return {"chain_format": FORMAT, "pid": os.getpid()}


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first problem found: where, in which chain, and what kind."""

    line: int  # 0: the file as a whole
    # altered | removed | inserted | duplicated | reordered | unchained | unknown | torn | empty
    kind: str
    detail: str
    chain_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "the log"
        if self.chain_id is not None:
            where += f" (chain {self.chain_id} seq {self.seq})"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Note:
    """Something the verifier tells without failing: a line the proxy announced it could not
    write, a write torn by it, a line that is not JSON."""

    line: int
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}"


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
    notes: list[Note] = field(default_factory=list)

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
    fields: dict[str, Any]


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=")


class _DuplicateField(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateField(name)
        out[name] = value
    return out


#: What a line that claims to be an audit line holds, even when it is not valid JSON.
_CLAIMS = [_MARK, *(f'"{name}"'.encode() for name in sorted(CHAINED_EVENTS))]


class _Other:
    """A line outside the chain: a documented kind (True) or not JSON at all (False)."""

    def __init__(self, json_object: bool, event: Any = None) -> None:
        self.json_object, self.event = json_object, event


def _parse(number: int, raw: bytes) -> tuple[str, _Entry] | Problem | _Other:
    """A chained line's entry; _Other for a line outside the chain; a Problem for a line that
    is neither a valid chained line nor a documented unchained kind."""
    try:
        obj = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateField as exc:
        return Problem(number, "altered", f"the field {str(exc)!r} appears twice")
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        return _Other(False)
    if "chain" not in obj and "chain_id" not in obj and "seq" not in obj:
        event = obj.get("event")
        if event in CHAINED_EVENTS:
            return Problem(number, "unchained", f"a {event} line without a chain (inserted?)")
        if event in UNCHAINED_EVENTS or (isinstance(event, str) and "logger" in obj):
            return _Other(True, event)
        return Problem(
            number, "unknown", f"a JSON line xksproxy does not write (event {str(event)[:60]!r})"
        )
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
        number, raw, match.group(1) + b"}", _unb64(match.group(2)), seq, obj.get("event"), obj
    )
    return cid, entry


def _ok(mac_key: bytes, prev: bytes, e: _Entry) -> bool:
    return hmac.compare_digest(hmac.digest(mac_key, prev + e.body, "sha256"), e.mac)


def _resumes(mac_key: bytes, expected: int, e: _Entry) -> bool:
    """Whether *e* is the proxy's own word that line *expected* of its chain could not be
    written: a recovery line right after it, chained from the lost line's MAC it carries."""
    resume = e.fields.get("chain_resume")
    if e.event != LOG_RECOVERED or e.seq != expected + 1 or e.fields.get("chain_lost") != expected:
        return False
    if not isinstance(resume, str) or not re.fullmatch(r"[A-Za-z0-9_-]{43}", resume):
        return False
    return _ok(mac_key, _unb64(resume.encode()), e)


def _walk(
    mac_key: bytes, cid: str, entries: list[_Entry], summary: ChainSummary, notes: list[Note]
) -> Problem | None:
    """The first problem of one chain (its entries in file order), or None."""
    prev, expected = _start(mac_key, cid), 1
    seen: dict[int, _Entry] = {}
    for i, e in enumerate(entries):
        verified = e.seq == expected and _ok(mac_key, prev, e)
        if not verified and _resumes(mac_key, expected, e):
            notes.append(
                Note(
                    e.line,
                    f"chain {cid} seq {expected} was not written: the log could not be "
                    "written (a full disk?), and the proxy says so here; that request was "
                    "refused (InternalException), so no answer left unaudited",
                )
            )
            verified = True
        if verified:
            seen[e.seq] = e
            prev, expected = e.mac, e.seq + 1
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


def verify_lines(lines: Iterable[bytes], key: bytes, *, complete: bool = True) -> Report:
    """Check every chain in *lines* (a log's lines, without newlines; *complete*: whether the
    last one ended with a newline); the first problem in file order is ``report.problem``.

    Besides the chains' own checks, every line must be a valid chained line or a documented
    kind outside the chain (:data:`UNCHAINED_EVENTS`, a library's line, a line that is not
    JSON such as a traceback), and a line that claims to be an audit line must be valid JSON.
    A write torn by a failed write is a note when the proxy's recovery line follows it, and a
    problem at the end of the file.  A log without any chain is a problem: a proxy with a chain
    key starts one before it serves."""
    mac_key = _mac_key(key)
    report = Report()
    chains: dict[str, list[_Entry]] = {}
    problems: list[Problem] = []
    listed = list(lines)
    kinds: list[Any] = []
    for number, raw in enumerate(listed, start=1):
        parsed = _parse(number, raw)
        kinds.append(parsed)
        if isinstance(parsed, _Other):
            if parsed.json_object:
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
    for index, parsed in enumerate(kinds):
        if not isinstance(parsed, _Other) or parsed.json_object:
            continue
        number, raw = index + 1, listed[index]
        after = kinds[index + 1] if index + 1 < len(kinds) else None
        if isinstance(after, tuple) and after[1].event == LOG_RECOVERED:
            report.notes.append(Note(number, "torn: a write cut short when the log failed"))
        elif index == len(listed) - 1 and not complete and raw:
            problems.append(
                Problem(
                    number,
                    "torn",
                    f"the last line is cut off after {len(raw)} bytes: a write that did not "
                    "complete (a full disk, a crash), and nothing was written after it",
                )
            )
        elif any(claim in raw for claim in _CLAIMS):
            problems.append(
                Problem(number, "altered", "a line that claims to be an audit line is not JSON")
            )
        elif raw.strip():
            report.notes.append(Note(number, "not JSON (a traceback?): not part of the chain"))
    for cid, entries in chains.items():
        found = _walk(mac_key, cid, entries, report.chains[cid], report.notes)
        if found is not None:
            problems.append(found)
    if not report.chains and not problems:
        problems.append(
            Problem(
                0,
                "empty",
                "no audit chain: a proxy with a chain key starts one (audit_chain_started) "
                "before it serves, so this is not its log, or the log was emptied",
            )
        )
    if problems:
        report.problem = min(problems, key=lambda p: p.line)
    report.notes.sort(key=lambda n: n.line)
    return report
