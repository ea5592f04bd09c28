"""The audit log's keyed hash chain end to end: a real proxy (two workers, each with its own
chain) with the key configured, signed requests, the proxy stopped, its log edited and
``xksproxy audit verify`` run as an operator would.  The chain itself, every kind of tampering
included: tests/unit/test_audit_chain.py.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.support.audit_log import Tamper, duplicate, forge, remove, same_chain, swap
from tests.support.commands import xksproxy
from tests.support.configs import edit_config
from tests.support.files import write_secret
from tests.support.proxies import start_server, stop_server
from tests.support.rigs import Rig, make_rig
from tests.support.xks_client import XksClient
from xksproxy.audit_chain import parse_key


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
    rig = make_rig(directory)
    key_file = directory / "secrets" / "audit-chain-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)

    def chained(data: dict[str, Any]) -> None:
        assert "logging" not in data
        data["logging"] = {"audit_chain_key_file": "secrets/audit-chain-key"}

    edit_config(rig.config, change=chained)
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
        "removed": next(i for i in chained(lines) if i > at and same_chain(lines, at, i)),
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
        ({"audit_chain_key_file": "secrets/nope"}, "logging.audit_chain_key_file: "),
        ({"audit_chain_key_file": "secrets/short"}, "at least 64 hex digits"),
        (
            {"audit_chain_key_file": "secrets/short", "audit_chain_key_env": "X"},
            "set at most one of audit_chain_key_file or audit_chain_key_env",
        ),
    ],
    ids=["missing-file", "short-key", "both"],
)
def test_e2e_serve_refuses_a_bad_key(
    e2e: E2E, tmp_path: Path, setting: dict[str, str], expected: str
) -> None:
    write_secret(e2e.rig.dir / "secrets" / "short", "ab" * 31)
    cfg = e2e.rig.dir / f"bad-{secrets.token_hex(3)}.toml"
    edit_config(e2e.rig.config, change=lambda data: data.update(logging=setting), to=cfg)
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
