"""The audit log's keyed hash chain: made, verified, and every kind of tampering caught.

Chains are built with the log's own renderer, in this process; the end-to-end tests, on a real
proxy's log, are tests/integration/test_audit_chain_e2e.py.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.support.audit_log import (
    Tamper,
    alter,
    alter_seq,
    cid_of,
    duplicate,
    forge,
    forge_unchained,
    relabel,
    remove,
    swap,
)
from tests.support.files import write_secret
from tests.support.paths import ROOT
from xksproxy import log
from xksproxy.audit_chain import (
    CHAINED_EVENTS,
    UNCHAINED_EVENTS,
    AuditChain,
    parse_key,
    verify_lines,
)
from xksproxy.configfile import parse_config
from xksproxy.errors import ConfigError

KEY = secrets.token_bytes(32)


def chain_lines(key: bytes, requests: int, worker: int, chain_id: str | None = None) -> list[bytes]:
    """One process's chain: started, *requests* audit lines, closed; as the log writes them."""
    chain = AuditChain(key, chain_id, encode=log._encode)
    out = [chain.seal({"event": "audit_chain_started", "worker": worker, **chain.started_fields()})]
    for n in range(requests):
        out.append(chain.seal({"event": "xks_request", "worker": worker, "n": n, "status": 200}))
    out.append(chain.seal({"event": "audit_chain_closed", "worker": worker}))
    return [line.encode() for line in out]


def interleaved() -> list[bytes]:
    """Two workers' chains interleaved, with unchained and non-JSON lines among them."""
    a, b = chain_lines(KEY, 6, 0), chain_lines(KEY, 6, 1)
    out: list[bytes] = [b'{"event": "listening", "workers": 2}']
    for x, y in zip(a, b, strict=True):
        out += [x, y]
    out.insert(5, b"Traceback (most recent call last):")
    return out


def test_intact_chains_verify() -> None:
    lines = interleaved()
    report = verify_lines(lines, KEY)
    assert report.problem is None
    assert len(report.chains) == 2 and not report.not_closed
    assert (report.chained_lines, report.unchained_lines, report.ignored_lines) == (16, 1, 1)


def test_chained_line_shape() -> None:
    line = chain_lines(KEY, 1, 0)[1]
    record = json.loads(line)
    assert list(record)[-3:] == ["chain_id", "seq", "chain"]
    assert record["seq"] == 2 and len(base64.urlsafe_b64decode(record["chain"] + "=")) == 32
    assert KEY.hex().encode() not in line and KEY not in line


def test_wrong_key_fails_at_the_first_chained_line() -> None:
    report = verify_lines(chain_lines(KEY, 3, 0), secrets.token_bytes(32))
    assert report.problem is not None
    assert (report.problem.line, report.problem.kind, report.problem.seq) == (1, "altered", 1)
    assert "not the key" in report.problem.detail


def foreign(lines: list[bytes], i: int) -> list[bytes]:
    """Insert a genuine line of a chain from another log (same key)."""
    return [*lines[:i], chain_lines(KEY, 4, 0)[3], *lines[i:]]


# (tampering, line index it is applied at (0-based), first bad line (1-based), kind)
CASES: list[tuple[str, Tamper, int, int, str]] = [
    ("alter-field", alter, 7, 8, "altered"),
    ("alter-seq", alter_seq, 7, 8, "altered"),
    ("remove", remove, 7, 9, "removed"),  # the chain's next line, one up, now follows seq 2
    ("remove-start", remove, 1, 3, "removed"),  # reported at the chain's next line
    ("insert-forged", forge, 7, 8, "inserted"),
    ("insert-unchained", forge_unchained, 7, 8, "unchained"),
    ("swap", swap, 7, 8, "reordered"),
    ("duplicate", duplicate, 7, 9, "duplicated"),
    ("relabel-chain", relabel, 7, 8, "inserted"),  # into the other chain, whose seq 3 is used
    ("foreign-line", foreign, 7, 8, "removed"),
]


@pytest.mark.parametrize(
    ("tamper", "at", "line", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_tampering_is_caught_at_its_line(tamper: Tamper, at: int, line: int, kind: str) -> None:
    lines = interleaved()
    assert b'"xks_request"' in lines[at] or at == 1
    report = verify_lines(tamper(lines, at), KEY)
    assert report.problem is not None
    assert (report.problem.line, report.problem.kind) == (line, kind), str(report.problem)


def test_truncated_end_is_not_closed() -> None:
    lines = interleaved()[:-3]
    report = verify_lines(lines, KEY)
    assert report.problem is None
    assert len(report.not_closed) == 2


def test_order_between_chains_is_not_protected() -> None:
    """Independent writers: moving a line past lines of other chains only is not detectable."""
    lines = interleaved()
    lines[7], lines[8] = lines[8], lines[7]  # chain a's seq 4 and chain b's seq 4
    assert cid_of(lines[7]) != cid_of(lines[8])
    assert verify_lines(lines, KEY).problem is None


def test_restart_starts_a_new_chain_with_the_same_worker() -> None:
    lines = chain_lines(KEY, 2, 0) + chain_lines(KEY, 2, 0)
    report = verify_lines(lines, KEY)
    assert report.problem is None and len(report.chains) == 2


@pytest.mark.parametrize(
    ("text", "ok"),
    [("ab" * 32, True), (" " + "AB" * 40 + "\n", True), ("ab" * 31, False), ("zz" * 32, False)],
)
def test_key_text(text: str, ok: bool) -> None:
    if ok:
        assert len(parse_key(text)) >= 32
    else:
        with pytest.raises(ValueError, match="hex digits"):
            parse_key(text)


# --- through the real structlog set-up ---------------------------------------------------


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    handlers = logging.getLogger().handlers[:]
    out = io.StringIO()
    log.configure("info", out, worker=3)
    try:
        yield out
    finally:
        log.close_audit_chain()
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = handlers


def test_log_chains_audit_lines_only(logged: io.StringIO) -> None:
    audit = structlog.get_logger("test")
    audit.info("xks_request", status=200, pin="1234")  # before the chain: unchained
    log.start_audit_chain(KEY)
    audit.info("xks_request", status=200, pin="1234")
    audit.info("reload_applied", prefixes=[])
    logging.getLogger("aiohttp").error("a library line")
    log.close_audit_chain()
    lines = logged.getvalue().encode().splitlines()
    records = [json.loads(x) for x in lines]
    assert [("chain" in r, r["event"]) for r in records] == [
        (False, "xks_request"),
        (True, "audit_chain_started"),
        (True, "xks_request"),
        (True, "reload_applied"),
        (False, "a library line"),
        (True, "audit_chain_closed"),
    ]
    assert records[2]["pin"] == "[redacted]" and records[2]["worker"] == 3
    report = verify_lines(lines[1:], KEY)
    assert report.problem is None and not report.not_closed
    assert verify_lines(lines, KEY).problem is not None  # the unchained audit line


def test_every_event_the_proxy_writes_is_chained_or_documented() -> None:
    """The verifier reports JSON lines of events it does not know: every event name the
    sources log must be in CHAINED_EVENTS or UNCHAINED_EVENTS, and no listed name be stale."""
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    found: set[str] = set()
    for path in (ROOT / "xksproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                func, first = node.func, node.args[0]
                logs = (isinstance(func, ast.Attribute) and func.attr in levels) or (
                    isinstance(func, ast.Name) and func.id in ("emit", "event")  # aliases
                )
                values = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
                for v in values if logs else ():
                    if isinstance(v, ast.Constant) and isinstance(v.value, str):
                        found.add(v.value)
            if isinstance(node, ast.Dict):  # lines written without structlog
                for k, v in zip(node.keys, node.values, strict=True):
                    named = isinstance(k, ast.Constant) and k.value == "event"
                    if named and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        found.add(v.value)
    found = {name for name in found if re.fullmatch(r"[a-z][a-z0-9_]+", name)}
    known = CHAINED_EVENTS | UNCHAINED_EVENTS
    assert found - known == set(), "log events the verifier would call unknown"
    assert UNCHAINED_EVENTS - found == set(), "listed events no source writes"
    assert found >= {"authz_deny", "reload_applied", "tls_client_rejected", "hsm_reopen"}


def test_a_log_without_a_chain_is_not_intact() -> None:
    for lines in ([], [b'{"event": "listening", "workers": 2}'], [b"Traceback"]):
        report = verify_lines(lines, KEY)
        assert report.problem is not None and report.problem.kind == "empty", lines


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b'{"event": "xks_request", "status": 200', "altered"),  # forged, not JSON
        (b'{"event": "authz_deny" "key_id": "x"}', "altered"),
        (b'{"event": "xks_request", "event": "listening"}', "altered"),  # duplicate field
        (b'{"event": "listening", "event": "listening"}', "altered"),
        (b'{"event": "key_export", "key_id": "x"}', "unknown"),  # no such event
        (b'{"status": 200}', "unknown"),
        (b'{"event": "reload_applied", "prefixes": []}', "unchained"),
    ],
)
def test_lines_neither_chained_nor_documented_are_reported(line: bytes, kind: str) -> None:
    lines = interleaved()
    lines.insert(3, line)
    report = verify_lines(lines, KEY)
    assert report.problem is not None, line
    assert (report.problem.line, report.problem.kind) == (4, kind)


def test_a_torn_last_line_is_reported_where_it_is() -> None:
    lines = interleaved()
    lines.append(lines[-1][:40])
    report = verify_lines(lines, KEY, complete=False)
    assert report.problem is not None
    assert (report.problem.line, report.problem.kind) == (len(lines), "torn")
    assert "cut off after 40 bytes" in report.problem.detail
    assert verify_lines(interleaved(), KEY, complete=False).problem is None  # a whole line


def test_a_lost_line_said_by_the_recovery_line_is_a_note_not_a_removal() -> None:
    chain = AuditChain(KEY, encode=log._encode)
    lines = [chain.seal({"event": "audit_chain_started"}).encode()]
    lines.append(chain.seal({"event": "xks_request", "status": 200}).encode()[:30])  # torn
    recovered = {"event": "log_writable_again", "chain_lost": chain.seq}
    lines.append(chain.seal({**recovered, "chain_resume": chain.last_mac}).encode())
    lines.append(chain.seal({"event": "audit_chain_closed"}).encode())
    report = verify_lines(lines, KEY)
    assert report.problem is None and not report.not_closed
    assert [n.line for n in report.notes] == [2, 3]
    assert "torn" in report.notes[0].text and "seq 2 was not written" in report.notes[1].text
    # A recovery line cannot be made up: without the key its MAC does not verify.
    forged = AuditChain(secrets.token_bytes(32), chain.chain_id, encode=log._encode)
    forged.seq = 2
    fake = forged.seal({**recovered, "chain_lost": 2, "chain_resume": chain.last_mac})
    report = verify_lines([lines[0], fake.encode()], KEY)
    assert report.problem is not None and report.problem.line == 2


# --- configuration ------------------------------------------------------------------------


def base_config(tmp_path: Path, **logging_table: Any) -> dict[str, Any]:
    module = tmp_path / "lib.so"
    module.write_bytes(b"")
    hsm = {"name": "a", "module": str(module), "token_label": "t", "pin_env": "PIN"}
    return {"hsms": [hsm], "logging": logging_table}


def problems(data: dict[str, Any], tmp_path: Path) -> list[str]:
    try:
        cfg = parse_config(data, tmp_path / "x.toml")
        cfg.logging.read_chain_key()
    except ConfigError as exc:
        return exc.problems
    return []


def test_config_key_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "audit.key"
    write_secret(key, KEY.hex() + "\n")
    assert problems(base_config(tmp_path, audit_chain_key_file="audit.key"), tmp_path) == []
    cfg = parse_config(base_config(tmp_path, audit_chain_key_file="audit.key"), tmp_path / "x.toml")
    assert cfg.logging.read_chain_key() == KEY
    monkeypatch.setenv("AUDIT_KEY", KEY.hex())
    cfg = parse_config(base_config(tmp_path, audit_chain_key_env="AUDIT_KEY"), tmp_path / "x.toml")
    assert cfg.logging.read_chain_key() == KEY
    assert parse_config(base_config(tmp_path), tmp_path / "x.toml").logging.read_chain_key() is None


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"audit_chain_key_file": "k", "audit_chain_key_env": "K"},
            "logging: set at most one of audit_chain_key_file or audit_chain_key_env",
        ),
        ({"audit_chain_key_file": "missing.key"}, "logging.audit_chain_key_file: "),
        ({"audit_chain_key_file": "short.key"}, "at least 64 hex digits"),
        ({"audit_chain_key_env": "NO_SUCH_AUDIT_KEY_VAR"}, "$NO_SUCH_AUDIT_KEY_VAR is not set"),
        ({"audit_chain_key": "00" * 32}, "logging.audit_chain_key: unknown setting"),
    ],
    ids=["both", "missing-file", "short", "unset-env", "key-in-toml"],
)
def test_config_key_problems(tmp_path: Path, table: dict[str, Any], expected: str) -> None:
    write_secret(tmp_path / "short.key", "ab" * 16)
    found = problems(base_config(tmp_path, **table), tmp_path)
    assert any(expected in p for p in found), found
