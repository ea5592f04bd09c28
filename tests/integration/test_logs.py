"""What the proxy writes to its log: every request audited, no secret or customer data ever.

One module-scoped fixture drives every API (successes and errors) with distinctive plaintext
and AAD, each call with its own kmsRequestId; the tests then scan the server's JSON log.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import edit_config, read_config
from tests.support.proxies import Server, spawn_proxy, stop_server
from tests.support.rigs import RIG_WORKERS, Rig, make_rig
from tests.support.waiting import until
from tests.support.xks_client import Response, XksClient, decrypt_fields, key_meta

WRONG_SECRET = base64.b64encode(secrets.token_bytes(32)).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def marker(label: str) -> tuple[bytes, bytes]:
    """A distinctive value: an ASCII tag (easy to spot in any repr) then random bytes."""
    tag = f"{label}-MARKER-{secrets.token_hex(8)}".encode()
    return tag, tag + secrets.token_bytes(40)


def encodings(data: bytes, tag: bytes) -> dict[str, list[bytes]]:
    """The forms in which *data* could leak: raw, its ASCII tag, base64 (at every byte
    alignment, as when embedded in a larger blob), and hex."""
    shifted = [b64(bytes(k) + data) for k in range(3)]
    return {
        "raw": [data],
        "ascii-tag": [tag],
        "base64": [b64(data).rstrip("=").encode()] + [s[4:-4].encode() for s in shifted],
        "hex": [data.hex().encode(), data.hex().upper().encode()],
    }


@dataclass
class Sent:
    name: str
    request_id: str
    path: str
    response: Response
    authorization: str


@dataclass
class Exchange:
    """Everything the fixture sent, and the markers it used."""

    plaintext: bytes
    plaintext_tag: bytes
    aad: bytes
    aad_tag: bytes
    sent: dict[str, Sent] = field(default_factory=dict)
    last_request_id: str = ""
    log: bytes = b""

    def lines(self) -> list[str]:
        return self.log.decode("utf-8", errors="replace").splitlines()

    def request_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines() if '"xks_request"' in line]


class Driver:
    def __init__(self, client: XksClient, exchange: Exchange) -> None:
        self.client = client
        self.ex = exchange

    def send(
        self,
        name: str,
        api_path: str,
        body: dict[str, Any],
        *,
        secret: str | None = None,
        meta_op: str | None = None,
    ) -> Sent:
        request_id = f"logtest-{name}-{secrets.token_hex(8)}"
        meta = body.setdefault("requestMetadata", {})
        meta["kmsRequestId"] = request_id
        if meta_op is not None:
            meta["kmsOperation"] = meta_op
        raw = json.dumps(body).encode()
        path = self.client.base + api_path
        headers = self.client.signed(path, raw, secret=secret)
        sent = Sent(
            name,
            request_id,
            path,
            self.client.raw("POST", path, raw, headers),
            headers["Authorization"],
        )
        self.ex.sent[name] = sent
        return sent


def key_body(operation: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"requestMetadata": key_meta(operation)}
    body.update(fields)
    return body


def drive(client: XksClient, ex: Exchange) -> None:
    d = Driver(client, ex)
    pt, aad = b64(ex.plaintext), b64(ex.aad)
    gcm = {"encryptionAlgorithm": "AES_GCM"}

    d.send("health", "/health", {"requestMetadata": {"kmsOperation": "KmsHealthCheck"}})
    d.send("metadata", "/keys/foo/metadata", key_body("CreateKey"))
    enc = d.send(
        "encrypt-aad-cdiv",
        "/keys/foo/encrypt",
        key_body(
            "Encrypt",
            plaintext=pt,
            additionalAuthenticatedData=aad,
            ciphertextDataIntegrityValueAlgorithm="SHA_256",
            **gcm,
        ),
    ).response.json
    d.send("encrypt-plain", "/keys/foo/encrypt", key_body("GenerateDataKey", plaintext=pt, **gcm))
    d.send(
        "decrypt",
        "/keys/foo/decrypt",
        key_body("Decrypt", **decrypt_fields(enc, aad), **gcm),
    )
    d.send(
        "bad-signature",
        f"/keys/logtest-badsig-{secrets.token_hex(6)}/encrypt",
        key_body("Encrypt", plaintext=pt, additionalAuthenticatedData=aad, **gcm),
        secret=WRONG_SECRET,
    )
    flipped = bytearray(base64.b64decode(enc["ciphertext"]))
    flipped[0] ^= 1
    d.send(
        "tampered-ciphertext",
        "/keys/foo/decrypt",
        key_body(
            "Decrypt", **decrypt_fields(enc | {"ciphertext": b64(bytes(flipped))}, aad), **gcm
        ),
    )
    d.send(
        "wrong-aad",
        "/keys/foo/decrypt",
        key_body("Decrypt", **decrypt_fields(enc, b64(ex.aad[::-1])), **gcm),
    )
    d.send("missing-plaintext", "/keys/foo/encrypt", key_body("Encrypt", **gcm))
    d.send(
        "missing-algorithm",
        "/keys/foo/encrypt",
        key_body("Encrypt", plaintext=pt, additionalAuthenticatedData=aad),
    )
    d.send(
        "invalid-base64-plaintext",
        "/keys/foo/encrypt",
        key_body("Encrypt", plaintext=pt + "!", **gcm),
    )
    d.send(
        "missing-tag",
        "/keys/foo/decrypt",
        key_body(
            "Decrypt",
            **{k: v for k, v in decrypt_fields(enc, aad).items() if k != "authenticationTag"},
            **gcm,
        ),
    )
    d.send("missing-metadata-field", "/keys/foo/encrypt", {"requestMetadata": {}, "plaintext": pt})
    d.send("unknown-key", "/keys/no-such-key/encrypt", key_body("Encrypt", plaintext=pt, **gcm))
    d.send(
        "wrong-usage",
        "/keys/enc-only/decrypt",
        key_body("Decrypt", **decrypt_fields(enc, aad), **gcm),
    )
    d.send("disabled-key", "/keys/disabled/encrypt", key_body("Encrypt", plaintext=pt, **gcm))
    last = d.send("last", "/health", {"requestMetadata": {"kmsOperation": "KmsHealthCheck"}})
    ex.sent.pop("last")
    ex.last_request_id = last.request_id


# name -> (status, errorName) the exchange must produce; the log must agree with it.
EXPECTED: dict[str, tuple[int, str | None]] = {
    "health": (200, None),
    "metadata": (200, None),
    "encrypt-aad-cdiv": (200, None),
    "encrypt-plain": (200, None),
    "decrypt": (200, None),
    "bad-signature": (401, "AuthenticationFailedException"),
    "tampered-ciphertext": (400, "InvalidCiphertextException"),
    "wrong-aad": (400, "InvalidCiphertextException"),
    "missing-plaintext": (400, "ValidationException"),
    "missing-algorithm": (400, "ValidationException"),
    "invalid-base64-plaintext": (400, "ValidationException"),
    "missing-tag": (400, "ValidationException"),
    "missing-metadata-field": (400, "ValidationException"),
    "unknown-key": (404, "KeyNotFoundException"),
    "wrong-usage": (400, "InvalidKeyUsageException"),
    "disabled-key": (400, "InvalidStateException"),
}


def wait_for(server: Server, needle: str, timeout: float = 10.0) -> bytes:
    """The log once *needle* is in it (bounded wait, so a missing line fails, never hangs)."""
    deadline = time.monotonic() + timeout
    while True:
        data = server.log.read_bytes()
        if needle.encode() in data or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


@pytest.fixture(scope="module")
def exchange(rig: Rig, server: Server) -> Exchange:
    pt_tag, pt = marker("PT")
    aad_tag, aad = marker("AAD")
    ex = Exchange(plaintext=pt, plaintext_tag=pt_tag, aad=aad, aad_tag=aad_tag)
    client = XksClient("127.0.0.1", server.port, rig.prefix, rig.akid, rig.secret, rig.region)
    drive(client, ex)
    ex.log = wait_for(server, ex.last_request_id)
    return ex


# --- the exchange itself behaved as intended (else the scans below prove little) --------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exchange_got_the_expected_answer(exchange: Exchange, name: str) -> None:
    status, error_name = EXPECTED[name]
    resp = exchange.sent[name].response
    assert (resp.status, resp.error_name) == (status, error_name), resp.body


def test_decrypt_returned_the_marker_plaintext(exchange: Exchange) -> None:
    assert base64.b64decode(exchange.sent["decrypt"].response.json["plaintext"]) == (
        exchange.plaintext
    )


# --- nothing secret in the log ------------------------------------------------------------


def signature_of(authorization: str) -> str:
    found = re.search(r"Signature=([0-9a-f]{64})", authorization)
    assert found, authorization
    return found.group(1)


def needles(exchange: Exchange, rig: Rig) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for label, data, tag in (
        ("plaintext", exchange.plaintext, exchange.plaintext_tag),
        ("aad", exchange.aad, exchange.aad_tag),
    ):
        for form, values in encodings(data, tag).items():
            out[f"{label}-{form}"] = values
    prefixes: Any = rig.credentials()["prefixes"]
    out["sigv4-secrets"] = [c["secret"].encode() for creds in prefixes.values() for c in creds] + [
        WRONG_SECRET.encode()
    ]
    out["hsm-pin"] = [(rig.dir / "secrets/hsm-pin").read_text().strip().encode()]
    out["hsm-so-pin"] = [(rig.dir / "secrets/hsm-so-pin").read_text().strip().encode()]
    out["authorization-header"] = [s.authorization.encode() for s in exchange.sent.values()]
    out["signature"] = [signature_of(s.authorization).encode() for s in exchange.sent.values()]
    return out


SECRET_KINDS = [
    f"{label}-{form}"
    for label in ("plaintext", "aad")
    for form in ("raw", "ascii-tag", "base64", "hex")
] + ["sigv4-secrets", "hsm-pin", "hsm-so-pin", "authorization-header", "signature"]


@pytest.mark.parametrize("kind", SECRET_KINDS)
def test_log_never_contains(exchange: Exchange, rig: Rig, kind: str) -> None:
    values = needles(exchange, rig)[kind]
    assert values and all(len(v) >= 16 for v in values), values
    leaked = [v for v in values if v in exchange.log]
    assert not leaked, f"{kind} found in the server log"


# --- every request audited -----------------------------------------------------------------


def test_every_request_line_is_a_json_object(exchange: Exchange) -> None:
    lines = [line for line in exchange.lines() if '"xks_request"' in line]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict)
        assert record["event"] == "xks_request"


def test_every_line_naming_our_requests_is_json(exchange: Exchange) -> None:
    ids = [s.request_id for s in exchange.sent.values()]
    for line in exchange.lines():
        if any(i in line for i in ids):
            assert isinstance(json.loads(line), dict), line


def lines_for(exchange: Exchange, name: str) -> list[dict[str, Any]]:
    """Audit lines naming the request; a 401's id is logged as unverified (not authenticated)."""
    request_id = exchange.sent[name].request_id
    return [
        r
        for r in exchange.request_lines()
        if request_id in (r.get("kms_request_id"), r.get("kms_request_id_unverified"))
    ]


AUDITED = [
    name
    for name in EXPECTED
    if name != "missing-metadata-field"  # it has no kmsRequestId
]


def test_unauthenticated_request_id_is_marked_unverified(exchange: Exchange) -> None:
    (record,) = lines_for(exchange, "bad-signature")
    assert "kms_request_id" not in record
    assert record["kms_request_id_unverified"] == exchange.sent["bad-signature"].request_id


@pytest.mark.parametrize("name", AUDITED)
def test_request_is_audited_with_its_request_id(exchange: Exchange, name: str) -> None:
    records = lines_for(exchange, name)
    assert len(records) == 1, records
    resp = exchange.sent[name].response
    assert records[0]["status"] == resp.status
    assert records[0].get("error_name") == resp.error_name


def records_for_path(exchange: Exchange, name: str) -> list[dict[str, Any]]:
    return [r for r in exchange.request_lines() if r.get("path") == exchange.sent[name].path]


def test_rejected_signature_is_audited(exchange: Exchange) -> None:
    records = records_for_path(exchange, "bad-signature")
    assert len(records) == 1, records
    assert records[0]["status"] == 401
    assert records[0]["error_name"] == "AuthenticationFailedException"


def test_request_without_metadata_is_audited(exchange: Exchange) -> None:
    # Its path is shared with other calls: find it by its error message.
    records = [
        r
        for r in records_for_path(exchange, "missing-metadata-field")
        if r.get("error_name") == "ValidationException" and "requestMetadata" in str(r)
    ]
    assert records


AuditCheck = Callable[[dict[str, Any]], bool]


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("encrypt-plain", lambda r: r.get("kms_operation") == "GenerateDataKey"),
        ("metadata", lambda r: r.get("api") == "metadata" and r.get("key_id") == "foo"),
        ("health", lambda r: r.get("api") == "health"),
        ("decrypt", lambda r: isinstance(r.get("latency_ms"), int | float)),
        ("unknown-key", lambda r: r.get("key_id") == "no-such-key"),
    ],
    ids=["operation", "api-and-key", "health-api", "latency", "key-id"],
)
def test_audit_line_carries_request_context(
    exchange: Exchange, name: str, check: AuditCheck
) -> None:
    records = lines_for(exchange, name)
    assert records and check(records[0]), records


def test_no_log_level_silences_the_audit_trail(tmp_path: Path) -> None:
    """With [logging] level = "error" the proxy writes no info or warning line of its own, and
    still one xks_request line per request (before, a warning level wrote none) and its other
    audit lines (a reload here)."""
    rig = make_rig(tmp_path / "rig")
    assert "logging" not in read_config(rig.config)
    edit_config(rig.config, {"logging": {"level": "error"}})
    log = tmp_path / "proxy.log"
    proc = spawn_proxy(rig.config, log)  # no "listening" line at this level: wait for /ping
    srv = Server(proc, rig.port, log, RIG_WORKERS)
    try:
        client = XksClient("127.0.0.1", rig.port, rig.prefix, rig.akid, rig.secret, rig.region)
        until(lambda: ping_ok(rig.port), "/ping answers")
        time.sleep(1)  # every worker listening
        assert client.health().status == 200
        assert client.encrypt("nope", plaintext=b64(b"x")).status == 404
        records = [json.loads(line) for line in srv.log_text().splitlines() if line.startswith("{")]
        requests = [r for r in records if r.get("event") == "xks_request"]
        assert [r["status"] for r in requests] == [200, 404]
        srv.sighup()  # waits for each worker's reload line
        records = [json.loads(line) for line in srv.log_text().splitlines() if line.startswith("{")]
        assert [r["event"] for r in records].count("reload_applied") == RIG_WORKERS
        audit = {"xks_request", "reload_applied"}
        assert {r["level"] for r in records if r.get("event") not in audit} <= {"error"}
    finally:
        stop_server(srv)


def ping_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
