"""The audit log's keyed hash chain: made, verified, and every kind of tampering caught.

Unit tests build chains with the log's own renderer; the end-to-end tests run a real proxy
(two workers, each with its own chain) with the key configured, send signed requests, stop it,
edit its log and run ``xksproxy audit verify`` as an operator would.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import (
    ROOT,
    Rig,
    free_port,
    make_rig,
    start_server,
    stop_server,
    write_secret,
    xksproxy,
)
from tests.xks_client import XksClient
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


def seq_of(line: bytes) -> int:
    seq: int = json.loads(line)["seq"]
    return seq


def cid_of(line: bytes) -> str:
    cid: str = json.loads(line)["chain_id"]
    return cid


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
        k for k in range(i + 1, len(lines)) if lines[k].startswith(b"{") and _same(lines, i, k)
    )
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def _same(lines: list[bytes], i: int, k: int) -> bool:
    return b'"chain_id"' in lines[k] and cid_of(lines[k]) == cid_of(lines[i])


def duplicate(lines: list[bytes], i: int) -> list[bytes]:
    return [*lines[: i + 1], lines[i], *lines[i + 1 :]]


def relabel(lines: list[bytes], i: int) -> list[bytes]:
    """Move line i into the other worker's chain by editing its chain_id."""
    other = next(cid_of(x) for x in lines if b'"chain_id"' in x and cid_of(x) != cid_of(lines[i]))
    out = list(lines)
    out[i] = out[i].replace(cid_of(lines[i]).encode(), other.encode())
    return out


def foreign(lines: list[bytes], i: int) -> list[bytes]:
    """Insert a genuine line of a chain from another log (same key)."""
    return [*lines[:i], chain_lines(KEY, 4, 0)[3], *lines[i:]]


Tamper = Callable[[list[bytes], int], list[bytes]]

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


# --- end to end: a real proxy, its log, `xksproxy audit verify` ----------------------------


class E2E:
    def __init__(self, rig: Rig, log_path: Path, key_file: Path) -> None:
        self.rig, self.log, self.key_file = rig, log_path, key_file

    def lines(self) -> list[bytes]:
        return self.log.read_bytes().splitlines()

    def verify(self, lines: list[bytes] | None, tmp: Path, *extra: str) -> tuple[int, str]:
        path = self.log
        if lines is not None:
            path = tmp / f"edited-{secrets.token_hex(4)}.log"
            path.write_bytes(b"\n".join(lines) + b"\n")
        proc = xksproxy("audit", "verify", str(path), *extra, check=False)
        return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> E2E:
    directory = tmp_path_factory.mktemp("audit-rig")
    rig = make_rig(directory, free_port())
    key_file = directory / "secrets" / "audit-chain-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    text = rig.config.read_text()
    assert "[logging]" not in text
    rig.config.write_text(text + '\n[logging]\naudit_chain_key_file = "secrets/audit-chain-key"\n')
    log_path = directory / "proxy.log"
    server = start_server(rig.config, rig.port, log_path)
    try:
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        pt = base64.b64encode(b"audit chain test").decode()
        for _ in range(6):  # new connections: both workers take some
            assert client.health().status == 200
            enc = client.encrypt("foo", plaintext=pt)
            assert enc.status == 200
            assert client.encrypt("no-such-key", plaintext=pt).status == 404
    finally:
        stop_server(server)
    assert server.proc.returncode == 0
    return E2E(rig, log_path, key_file)


def chained(lines: list[bytes], event: bytes = b'"xks_request"') -> list[int]:
    return [i for i, x in enumerate(lines) if event in x and b'"chain"' in x]


def test_e2e_intact_log_verifies(e2e: E2E, tmp_path: Path) -> None:
    lines = e2e.lines()
    assert len(chained(lines)) >= 18
    assert len(chained(lines, b'"audit_chain_started"')) == 2  # one chain per worker
    assert len(chained(lines, b'"audit_chain_closed"')) == 2  # both stopped in order
    code, out = e2e.verify(None, tmp_path, "--key-file", str(e2e.key_file))
    assert code == 0, out
    assert "intact" in out and "2 chains" in out and "warning" not in out
    code, out = e2e.verify(None, tmp_path, "-c", str(e2e.rig.config), "--require-closed")
    assert code == 0, out


def test_e2e_key_never_in_the_log(e2e: E2E) -> None:
    key = parse_key(e2e.key_file.read_text())
    data = e2e.log.read_bytes()
    for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode()):
        assert form.encode() not in data
    assert key not in data


def test_e2e_wrong_key(e2e: E2E, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRONG_AUDIT_KEY", secrets.token_hex(32))
    code, out = e2e.verify(None, tmp_path, "--key-env", "WRONG_AUDIT_KEY")
    first = chained(e2e.lines(), b'"audit_chain_started"')[0] + 1
    assert code == 1 and f"line {first} " in out and "altered" in out, out


E2E_EDITS: list[tuple[str, Tamper, str]] = [
    ("alter", lambda ls, i: [x.replace(b'"status": 404', b'"status": 200') for x in ls], "altered"),
    ("remove", remove, "removed"),
    ("insert-forged", forge, "inserted"),
    ("duplicate", duplicate, "duplicated"),
    ("swap", swap, "reordered"),
]


@pytest.mark.parametrize(
    ("tamper", "kind"), [e[1:] for e in E2E_EDITS], ids=[e[0] for e in E2E_EDITS]
)
def test_e2e_edited_log_fails_at_the_first_bad_line(
    e2e: E2E, tmp_path: Path, tamper: Tamper, kind: str
) -> None:
    lines = e2e.lines()
    at = next(i for i in chained(lines) if b'"status": 404' in lines[i])
    edited = tamper(lines, at)
    # The first line that differs from the original, in its chain, is where the problem is.
    expected = {
        "altered": at + 1,
        "removed": next(i for i in chained(lines) if i > at and _same(lines, at, i)),
        "inserted": at + 1,
        "duplicated": at + 2,
        "reordered": at + 1,
    }[kind]
    code, out = e2e.verify(edited, tmp_path, "--key-file", str(e2e.key_file))
    assert code == 1, out
    assert f"line {expected} " in out and f": {kind}: " in out, out
    record = json.loads(lines[at])
    assert f"chain {record['chain_id']}" in out


def test_e2e_truncated_log_warns_not_closed(e2e: E2E, tmp_path: Path) -> None:
    lines = e2e.lines()
    cut = lines[: chained(lines)[-1]]
    code, out = e2e.verify(cut, tmp_path, "--key-file", str(e2e.key_file))
    assert code == 0 and "not closed" in out, out
    code, out = e2e.verify(cut, tmp_path, "--key-file", str(e2e.key_file), "--require-closed")
    assert code == 1 and "not closed" in out, out


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('audit_chain_key_file = "secrets/nope"', "logging.audit_chain_key_file: "),
        ('audit_chain_key_file = "secrets/short"', "at least 64 hex digits"),
        (
            'audit_chain_key_file = "secrets/short"\naudit_chain_key_env = "X"',
            "set at most one of audit_chain_key_file or audit_chain_key_env",
        ),
    ],
    ids=["missing-file", "short-key", "both"],
)
def test_e2e_serve_refuses_a_bad_key(e2e: E2E, tmp_path: Path, setting: str, expected: str) -> None:
    write_secret(e2e.rig.dir / "secrets" / "short", "ab" * 31)
    text = e2e.rig.config.read_text()
    head = text[: text.index("\n[logging]\n")]
    cfg = e2e.rig.dir / f"bad-{secrets.token_hex(3)}.toml"
    cfg.write_text(head + f"\n[logging]\n{setting}\n")
    proc = xksproxy("serve", "-c", str(cfg), check=False)
    assert proc.returncode == 78, proc.stderr
    assert expected in proc.stderr, proc.stderr


def test_e2e_verify_usage(e2e: E2E, tmp_path: Path) -> None:
    assert xksproxy("audit", "verify", str(e2e.log), check=False).returncode == 2
    proc = xksproxy(
        "audit", "verify", str(tmp_path / "nope.log"), "--key-file", str(e2e.key_file), check=False
    )
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    proc = xksproxy("audit", "verify", str(e2e.log), "--key-file", str(tmp_path / "k"), check=False)
    assert proc.returncode == 78 and str(tmp_path / "k") in proc.stderr
