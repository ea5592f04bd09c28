"""Bring your own key: ``keys import-params`` and ``keys import`` (docs/byok.md), end to end.

Real SoftHSM tokens made by ``dev-setup`` (2 HSMs, and 1), the real CLI in subprocesses, key
material wrapped by this test with ``cryptography`` and with the ``openssl`` commands of
docs/byok.md, and a running proxy signed by botocore: what software AES-GCM encrypted under the
material the proxy decrypts, and the reverse, so the imported key is the one in use.  Every
refusal: one line, non-zero exit, and not one byte of any token changed.  SoftHSM 2.6 unwraps
RSA-OAEP only with SHA-1: the SHA-256 algorithms must be either refused exactly so, or work.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support.byok import ByokRig, byok_rig, software_kcv, wrap_with_cryptography
from tests.support.configs import edit_config
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.proxies import Server, start_server, stop_server
from tests.support.xks_client import XksClient
from xksproxy.service import decode_cm, encode_cm, hsm_aad

SHA1_ALGORITHMS = ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"]
SHA256_ALGORITHMS = ["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"]
DOC = ROOT / "docs" / "byok.md"
AAD = b"tenant=byok"


@pytest.fixture(scope="module")
def rig2(tmp_path_factory: pytest.TempPathFactory) -> ByokRig:
    return byok_rig(tmp_path_factory.mktemp("byok2") / "rig", 2)


@pytest.fixture(scope="module")
def rig1(tmp_path_factory: pytest.TempPathFactory) -> ByokRig:
    return byok_rig(tmp_path_factory.mktemp("byok1") / "rig", 1)


@pytest.fixture(scope="module")
def proxy(rig2: ByokRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The proxy on the 2-HSM rig.  A test touches a key through it only after its imports:
    the proxy caches what it looked up for ``key_cache_ttl_seconds``."""
    # A port picked now rather than at dev-setup: nothing else has had time to take it.
    port = free_port()
    edit_config(rig2.config, {"server": {"port": port}})
    srv = start_server(rig2.config, port, tmp_path_factory.mktemp("byok-logs") / "proxy.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(rig2: ByokRig, proxy: Server) -> XksClient:
    return XksClient.from_kms(rig2.kms, proxy.port)


@pytest.fixture(scope="module")
def pending(rig2: ByokRig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parameters for key k-bad (RSAES_OAEP_SHA_1), with good wrapped material in them."""
    out = tmp_path_factory.mktemp("pending")
    rig2.params("k-bad", out, "RSAES_OAEP_SHA_1")
    wrap_with_cryptography(out, "RSAES_OAEP_SHA_1", os.urandom(32))
    return out


@pytest.fixture(scope="module")
def pending_aes(rig2: ByokRig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Parameters for key k-bad with RSA_AES_KEY_WRAP_SHA_1."""
    out = tmp_path_factory.mktemp("pending-aes")
    rig2.params("k-bad", out, "RSA_AES_KEY_WRAP_SHA_1")
    return out


# --- wrapping as a customer does, independently of xksproxy -------------------------------


def doc_commands(heading: str) -> str:
    """The shell block under ``### HEADING`` in docs/byok.md, as an operator copies it."""
    match = re.search(rf"^### {heading}\n.*?```sh\n(.*?)```", DOC.read_text(), re.M | re.S)
    assert match, heading
    return match.group(1)


def wrap_with_openssl(out: Path, algorithm: str, material: bytes) -> None:
    """Run docs/byok.md's commands for *algorithm* in *out* (sha1 for sha256 for _SHA_1)."""
    (out / "PlaintextKeyMaterial.bin").write_bytes(material)
    script = doc_commands(algorithm.replace("_SHA_1", "_SHA_256"))
    if algorithm.endswith("_SHA_1"):
        script = script.replace("sha256", "sha1")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=out, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def proxy_decrypts(client: XksClient, key_id: str, material: bytes, version: int) -> bool:
    """Whether the proxy decrypts what software AES-GCM encrypted under *material*, in the
    proxy's format (ciphertextMetadata naming *version*, bound into the AAD)."""
    iv, plaintext, cm = os.urandom(12), os.urandom(48), encode_cm(version)
    sealed = AESGCM(material).encrypt(iv, plaintext, hsm_aad(AAD, cm))
    resp = client.decrypt(
        key_id,
        ciphertext=b64(sealed[:-16]),
        ciphertextMetadata=b64(cm),
        initializationVector=b64(iv),
        authenticationTag=b64(sealed[-16:]),
        additionalAuthenticatedData=b64(AAD),
    )
    if resp.status != 200:
        assert resp.error_name == "InvalidCiphertextException", resp.body
        return False
    assert base64.b64decode(resp.json["plaintext"]) == plaintext
    return True


def proxy_encrypts(client: XksClient, key_id: str, material: bytes) -> int:
    """Encrypt in the proxy, decrypt in software under *material*; the version used."""
    plaintext = os.urandom(40)
    resp = client.encrypt(key_id, plaintext=b64(plaintext), additionalAuthenticatedData=b64(AAD))
    assert resp.status == 200, resp.body
    out = {k: base64.b64decode(v) for k, v in resp.json.items()}
    cm = out["ciphertextMetadata"]
    sealed = out["ciphertext"] + out["authenticationTag"]
    assert AESGCM(material).decrypt(out["initializationVector"], sealed, hsm_aad(AAD, cm)) == (
        plaintext
    )
    return decode_cm(cm)


def on_hsm(rig: ByokRig, hsm: str, body: str, faked: str | None = None) -> Any:
    """Run *body* (Python, with ``session`` logged in to HSM *hsm* alone) in a subprocess and
    return what it prints as JSON: the pytest process never loads SoftHSM."""
    code = (
        "import json, sys\n"
        "from pkcs11 import Attribute as A, ObjectClass\n"
        "from xksproxy.configfile import load_config\n"
        "from xksproxy.keys.sessions import admin_session\n"
        "(hsm,) = [h for h in load_config(sys.argv[1]).hsms if h.name == sys.argv[2]]\n"
        "with admin_session(hsm) as session:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    )
    command = [sys.executable, "-c", code, str(rig.config), hsm]
    if faked is not None:
        command = ["faketime", faked, *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wrapping_objects(rig: ByokRig, hsm: str = "softhsm-1", out: Path | None = None) -> list[str]:
    """The classes of the objects labelled xksproxy-import (of the wrapping key of out's token)."""
    wid = "" if out is None else token_body(out)["wrappingKeyId"]
    found: list[str] = on_hsm(
        rig,
        hsm,
        f"""
        def wid(obj):
            if obj[A.CLASS] == ObjectClass.DATA:
                return json.loads(bytes(obj[A.VALUE]))["wrappingKeyId"]
            return obj[A.ID].hex()
        found = list(session.get_objects({{A.LABEL: "xksproxy-import"}}))
        print(json.dumps(sorted(ObjectClass(o[A.CLASS]).name for o in found
                                if "{wid}" in ("", wid(o)))))
        """,
    )
    return found


def token_body(out: Path) -> dict[str, Any]:
    """The (readable, not secret) body of out/ImportToken.bin."""
    raw = (out / "ImportToken.bin").read_bytes()
    body: dict[str, Any] = json.loads(raw[10 : 10 + int.from_bytes(raw[6:10], "big")])
    return body


def imported(rig: ByokRig, key_id: str, out: Path, *extra: str) -> dict[str, Any]:
    proc = rig.import_(key_id, out, *extra)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# --- import-params --------------------------------------------------------------------------


def test_import_params_writes_the_public_key_and_token(rig2: ByokRig, tmp_path: Path) -> None:
    out = tmp_path / "new" / "params"
    got = rig2.params("k-params", out, "RSAES_OAEP_SHA_1")
    assert got["keyId"] == "k-params" and got["hsm"] == "softhsm-1"
    assert got["wrappingAlgorithm"] == "RSAES_OAEP_SHA_1"
    assert got["wrappingKeySpec"] == "RSA_3072"
    assert got["publicKey"] == str(out / "WrappingPublicKey.bin")
    assert got["importToken"] == str(out / "ImportToken.bin")
    assert (out.stat().st_mode & 0o777) == 0o700
    public = serialization.load_der_public_key((out / "WrappingPublicKey.bin").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    assert (out / "ImportToken.bin").read_bytes().startswith(b"XKSIT1")
    assert wrapping_objects(rig2, out=out) == ["DATA", "PRIVATE_KEY", "PUBLIC_KEY"]
    assert wrapping_objects(rig2, "softhsm-2") == []  # on the first HSM only
    assert "k-params" not in rig2.rig.listing()  # no key until it is imported


def test_the_wrapping_and_token_keys_never_leave_the_hsm(rig2: ByokRig, pending: Path) -> None:
    attrs = on_hsm(
        rig2,
        "softhsm-1",
        """
        private = ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "UNWRAP", "DECRYPT", "SIGN",
                   "DERIVE"]
        secret = [*private, "VERIFY", "ENCRYPT", "WRAP"]
        def flags(obj, names): return {n: bool(obj[getattr(A, n)]) for n in names}
        privs = list(session.get_objects({A.LABEL: "xksproxy-import",
                                          A.CLASS: ObjectClass.PRIVATE_KEY}))
        token_key = list(session.get_objects({A.ID: b"xksproxy-import-token-key"}))
        print(json.dumps({"private": [flags(p, private) for p in privs],
                          "tokenKey": [dict(flags(k, secret), label=k[A.LABEL])
                                       for k in token_key]}))
        """,
    )
    assert attrs["private"], attrs
    for private in attrs["private"]:
        assert private == {
            "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
            "UNWRAP": True, "DECRYPT": False, "SIGN": False, "DERIVE": False,
        }  # fmt: skip
    assert attrs["tokenKey"] == [
        {
            "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
            "UNWRAP": False, "DECRYPT": False, "SIGN": True, "VERIFY": True,
            "ENCRYPT": False, "WRAP": False, "DERIVE": False, "label": "",
        }
    ]  # fmt: skip


@pytest.mark.parametrize("algorithm", SHA256_ALGORITHMS)
def test_sha256_is_refused_cleanly_or_works(
    rig2: ByokRig, client: XksClient, tmp_path: Path, algorithm: str
) -> None:
    """SoftHSM 2.6 refuses RSA-OAEP with SHA-256: then nothing may be left behind.  An HSM
    that accepts it must import and serve the key like the SHA-1 algorithms."""
    key_id = f"k-{algorithm.lower()}"
    out = tmp_path / "params"
    before = rig2.state()
    proc = rig2.run_params(key_id, out, algorithm)
    if proc.returncode != 0:
        line = rig2.refused(proc, before, f"HSM softhsm-1 cannot unwrap {algorithm}")
        assert line == (
            f"xksproxy: error: HSM softhsm-1 cannot unwrap {algorithm}: it refused RSA-OAEP with "
            "SHA-256 (CKR_ARGUMENTS_BAD; SoftHSM 2.6 supports SHA-1 only); use "
            "RSAES_OAEP_SHA_1 or RSA_AES_KEY_WRAP_SHA_1 with this HSM"
        )
        assert not out.exists()
        return
    material = os.urandom(32)
    wrap_with_cryptography(out, algorithm, material)
    assert imported(rig2, key_id, out)["kcv"]["softhsm-2"] == software_kcv(material)
    assert proxy_decrypts(client, key_id, material, 1)
    assert proxy_encrypts(client, key_id, material) == 1


def test_a_4096_bit_wrapping_key(rig1: ByokRig, tmp_path: Path) -> None:
    got = rig1.params("k-4096", tmp_path, "RSA_AES_KEY_WRAP_SHA_1", "RSA_4096")
    assert got["wrappingKeySpec"] == "RSA_4096"
    public = serialization.load_der_public_key((tmp_path / "WrappingPublicKey.bin").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 4096
    material = os.urandom(32)
    wrap_with_cryptography(tmp_path, "RSA_AES_KEY_WRAP_SHA_1", material)
    out = imported(rig1, "k-4096", tmp_path)
    assert out["kcv"] == {"softhsm-1": software_kcv(material)}
    assert out["transport"] is None  # one HSM: nothing carried


# --- import: new keys, every algorithm, both wrapping tools ---------------------------------


@pytest.mark.parametrize(
    ("algorithm", "tool"),
    [
        ("RSAES_OAEP_SHA_1", "cryptography"),
        ("RSA_AES_KEY_WRAP_SHA_1", "cryptography"),
        ("RSAES_OAEP_SHA_1", "openssl"),
        ("RSA_AES_KEY_WRAP_SHA_1", "openssl"),
    ],
)
def test_imported_key_is_the_one_the_proxy_uses(
    rig2: ByokRig, client: XksClient, tmp_path: Path, algorithm: str, tool: str
) -> None:
    key_id = f"k-{tool}-{algorithm.lower()}"
    rig2.params(key_id, tmp_path, algorithm)
    material = os.urandom(32)
    wrap = wrap_with_openssl if tool == "openssl" else wrap_with_cryptography
    wrap(tmp_path, algorithm, material)
    out = imported(rig2, key_id, tmp_path)
    assert out["keyId"] == key_id and out["version"] == 1 and out["origin"] == "imported"
    assert out["keyUsage"] == ["ENCRYPT", "DECRYPT"] and out["keyStatus"] == "ENABLED"
    assert out["kcv"] == {"softhsm-1": software_kcv(material), "softhsm-2": software_kcv(material)}
    assert out["transport"].startswith("RSA-3072 OAEP")
    entry = rig2.rig.listing()[key_id]
    assert entry["consistent"] and entry["versions"] == [1]
    assert proxy_decrypts(client, key_id, material, 1)
    assert proxy_encrypts(client, key_id, material) == 1
    assert not proxy_decrypts(client, key_id, os.urandom(32), 1)  # another key does not
    assert wrapping_objects(rig2, out=tmp_path) == []  # the wrapping key has done its job


def test_the_doc_kcv_command_matches_the_printed_kcv(rig1: ByokRig, tmp_path: Path) -> None:
    rig1.params("k-doc-kcv", tmp_path, "RSAES_OAEP_SHA_1")
    wrap_with_openssl(tmp_path, "RSAES_OAEP_SHA_1", os.urandom(32))
    out = imported(rig1, "k-doc-kcv", tmp_path)
    block = re.search(r"six hex digits\):\n\n```sh\n(.*?)```", DOC.read_text(), re.S)
    assert block
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out["kcv"]["softhsm-1"] == "E:" + proc.stdout.decode()


def test_the_stored_copies_have_the_usage_given_and_the_key_attributes(
    rig2: ByokRig, tmp_path: Path
) -> None:
    rig2.params("k-stored", tmp_path, "RSA_AES_KEY_WRAP_SHA_1")
    material = os.urandom(32)
    wrap_with_cryptography(tmp_path, "RSA_AES_KEY_WRAP_SHA_1", material)
    out = imported(rig2, "k-stored", tmp_path, "--usage", "encrypt")
    assert out["keyUsage"] == ["ENCRYPT"]
    assert set(out["kcv"].values()) == {software_kcv(material)}
    body = """
        names = ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED",
                 "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "VERIFY", "DERIVE"]
        keys = list(session.get_objects({A.LABEL: "k-stored", A.CLASS: ObjectClass.SECRET_KEY}))
        from xksproxy.hsm.keystore import read_meta_blocking
        meta = read_meta_blocking(session, "k-stored")
        def flags(k): return {n: bool(k[getattr(A, n)]) for n in names} | {"id": k[A.ID].decode()}
        print(json.dumps({"keys": [flags(k) for k in keys],
                          "origin": {v: m.origin for v, m in meta.versions.items()}}))
    """
    for hsm in ("softhsm-1", "softhsm-2"):
        seen = on_hsm(rig2, hsm, body)
        assert seen["origin"] == {"1": "imported"}
        assert seen["keys"] == [
            {
                "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": True,
                "WRAP_WITH_TRUSTED": True, "ENCRYPT": True, "DECRYPT": False, "WRAP": False,
                "UNWRAP": False, "SIGN": False, "VERIFY": False, "DERIVE": False, "id": "xks-v1",
            }
        ]  # fmt: skip


# --- import: new versions -------------------------------------------------------------------


def test_a_new_version_of_an_imported_key(rig2: ByokRig, client: XksClient, tmp_path: Path) -> None:
    materials = {1: os.urandom(32), 2: os.urandom(32)}
    for version, algorithm in ((1, "RSAES_OAEP_SHA_1"), (2, "RSA_AES_KEY_WRAP_SHA_1")):
        out = tmp_path / str(version)
        rig2.params("k-versions", out, algorithm)
        wrap_with_cryptography(out, algorithm, materials[version])
        got = imported(rig2, "k-versions", out)
        assert got["version"] == version
        assert set(got["kcv"].values()) == {software_kcv(materials[version])}
    assert rig2.rig.listing()["k-versions"]["versions"] == [1, 2]
    assert proxy_encrypts(client, "k-versions", materials[2]) == 2
    assert proxy_decrypts(client, "k-versions", materials[1], 1)  # older ciphertexts
    assert proxy_decrypts(client, "k-versions", materials[2], 2)
    assert not proxy_decrypts(client, "k-versions", materials[1], 2)
    view = rig2.ok("keys", "show", "k-versions", "--json")
    assert [(v["version"], v["origin"]) for v in view["versions"]] == [
        (2, "imported"),
        (1, "imported"),
    ]


def test_the_same_material_again_is_no_new_version(rig2: ByokRig, tmp_path: Path) -> None:
    """Two versions with one check value would be a rotation that rotates nothing."""
    material = os.urandom(32)
    first, again = tmp_path / "1", tmp_path / "2"
    rig2.params("k-same", first, "RSAES_OAEP_SHA_1")
    wrap_with_cryptography(first, "RSAES_OAEP_SHA_1", material)
    assert imported(rig2, "k-same", first)["version"] == 1
    rig2.params("k-same", again, "RSAES_OAEP_SHA_1")
    wrap_with_cryptography(again, "RSAES_OAEP_SHA_1", material)
    before = rig2.state()
    kcv = software_kcv(material)
    rig2.refused(
        rig2.import_("k-same", again), before, f"already version 1 of 'k-same' (check value {kcv})"
    )
    wrap_with_cryptography(again, "RSAES_OAEP_SHA_1", os.urandom(32))  # the token is still good
    assert imported(rig2, "k-same", again)["version"] == 2


def test_a_new_version_of_a_generated_key_keeps_its_usage(
    rig2: ByokRig, client: XksClient, tmp_path: Path
) -> None:
    rig2.rig.create("k-gen", "--usage", "encrypt")
    rig2.params("k-gen", tmp_path, "RSAES_OAEP_SHA_1")
    material = os.urandom(32)
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_1", material)
    before = rig2.state()
    rig2.refused(rig2.import_("k-gen", tmp_path, "--usage", "decrypt"), before, "leave out --usage")
    out = imported(rig2, "k-gen", tmp_path)
    assert out["version"] == 2 and out["keyUsage"] == ["ENCRYPT"]
    assert proxy_encrypts(client, "k-gen", material) == 2
    view = rig2.ok("keys", "show", "k-gen", "--json")
    assert [v["origin"] for v in view["versions"]] == ["imported", "generated"]


# --- refusals: nothing changes --------------------------------------------------------------


def _import_files(
    rig: ByokRig, key_id: str, material: Path, token: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return rig.run(
        "keys", "import", key_id, "--wrapped-key-material", str(material),
        "--import-token", str(token), *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("key_id", "needle"),
    [
        ("bad/id", "key ids are"),
        ("", "key ids are"),
        ("xksproxy-health", "health key"),
        ("xksproxy-import", "import wrapping keys"),
    ],
)
@pytest.mark.parametrize("command", ["import-params", "import"])
def test_bad_key_ids_are_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path, key_id: str, needle: str, command: str
) -> None:
    before = rig2.state()
    if command == "import-params":
        proc = rig2.run_params(key_id, tmp_path / "out")
    else:
        proc = rig2.import_(key_id, pending)
    rig2.refused(proc, before, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--wrapping-algorithm", "RSAES_PKCS1_V1_5", "--wrapping-key-spec", "RSA_3072"],
        ["--wrapping-algorithm", "RSAES_OAEP_SHA_1", "--wrapping-key-spec", "RSA_2048"],
        ["--wrapping-key-spec", "RSA_3072"],
    ],
)
def test_bad_algorithm_or_spec_is_a_usage_error(
    rig2: ByokRig, tmp_path: Path, args: list[str]
) -> None:
    before = rig2.state()
    proc = rig2.run("keys", "import-params", "k-x", *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "see --help" in proc.stderr
    assert rig2.state() == before and not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused(rig2: ByokRig, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    before = rig2.state()
    proc = rig2.run_params("k-x", tmp_path / "file")
    rig2.refused(proc, before, "not a directory")


def test_an_expired_token_is_refused(rig2: ByokRig, pending: Path) -> None:
    before = rig2.state()
    line = rig2.refused(
        rig2.import_("k-bad", pending, faked="+25 hours"),
        before,
        "the import token expired at",
        "run keys import-params again",
    )
    assert re.search(r"expired at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ;", line)


def test_a_token_for_another_key_is_refused(rig2: ByokRig, pending: Path) -> None:
    before = rig2.state()
    line = rig2.refused(rig2.import_("k-other", pending), before)
    assert line.endswith("the import token was issued for key 'k-bad', not 'k-other'")


@pytest.mark.parametrize("where", ["magic", "body", "mac", "truncated", "empty", "extended"])
def test_an_altered_token_is_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path, where: str
) -> None:
    raw = bytearray((pending / "ImportToken.bin").read_bytes())
    if where == "truncated":
        raw = raw[:-1]
    elif where == "empty":
        raw = bytearray()
    elif where == "extended":
        raw += b"\0"
    else:
        index = {"magic": 0, "body": 30, "mac": len(raw) - 1}[where]
        raw[index] ^= 0x01
    (tmp_path / "token").write_bytes(bytes(raw))
    before = rig2.state()
    proc = _import_files(rig2, "k-bad", pending / "EncryptedKeyMaterial.bin", tmp_path / "token")
    line = rig2.refused(proc, before)
    assert line.endswith("the import token is not valid (altered, or issued by another HSM)")


def test_a_token_from_another_rig_is_refused(
    rig1: ByokRig, rig2: ByokRig, pending: Path, tmp_path: Path
) -> None:
    rig1.params("k-bad", tmp_path, "RSAES_OAEP_SHA_1")
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_1", os.urandom(32))
    before = rig2.state()
    rig2.refused(rig2.import_("k-bad", tmp_path), before, "the import token is not valid")


def test_a_used_token_is_refused(rig2: ByokRig, tmp_path: Path) -> None:
    rig2.params("k-once", tmp_path, "RSAES_OAEP_SHA_1")
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_1", os.urandom(32))
    imported(rig2, "k-once", tmp_path)
    before = rig2.state()
    line = rig2.refused(rig2.import_("k-once", tmp_path), before)
    assert line.endswith("this import token was already used: it made version 1 of 'k-once'")
    assert rig2.rig.listing()["k-once"]["versions"] == [1]


def test_material_for_another_wrapping_key_is_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path
) -> None:
    rig2.params("k-bad", tmp_path, "RSAES_OAEP_SHA_1")  # a second wrapping key for k-bad
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_1", os.urandom(32))
    before = rig2.state()
    proc = _import_files(
        rig2, "k-bad", tmp_path / "EncryptedKeyMaterial.bin", pending / "ImportToken.bin"
    )
    rig2.refused(
        proc,
        before,
        "the key material could not be unwrapped (CKR_GENERAL_ERROR): it was not wrapped "
        "with this import token's WrappingPublicKey.bin using RSAES_OAEP_SHA_1",
    )


def test_material_wrapped_with_another_algorithm_is_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path
) -> None:
    (tmp_path / "WrappingPublicKey.bin").write_bytes(
        (pending / "WrappingPublicKey.bin").read_bytes()
    )
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_256", os.urandom(32))  # token says SHA_1
    before = rig2.state()
    proc = _import_files(
        rig2, "k-bad", tmp_path / "EncryptedKeyMaterial.bin", pending / "ImportToken.bin"
    )
    rig2.refused(proc, before, "the key material could not be unwrapped")


@pytest.mark.parametrize("size", [16, 24, 31, 48])
@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
def test_material_of_the_wrong_length_is_refused(
    request: pytest.FixtureRequest, rig2: ByokRig, tmp_path: Path, size: int, algorithm: str
) -> None:
    """RSAES_OAEP hides the length in the RSA block: the HSM measures it.  RSA_AES_KEY_WRAP
    shows it in the file's size, except 25-31 bytes, which RFC 5649 pads to 32."""
    out: Path = request.getfixturevalue(
        "pending" if algorithm.startswith("RSAES") else "pending_aes"
    )
    (tmp_path / "WrappingPublicKey.bin").write_bytes((out / "WrappingPublicKey.bin").read_bytes())
    wrap_with_cryptography(tmp_path, algorithm, os.urandom(size))
    before = rig2.state()
    material = tmp_path / "EncryptedKeyMaterial.bin"
    proc = _import_files(rig2, "k-bad", material, out / "ImportToken.bin")
    rig2.refused(proc, before, "32 bytes")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "the wrapped key material is 0 bytes; RSAES_OAEP_SHA_1 with RSA_3072"),
        (os.urandom(100), "is 100 bytes"),
        (os.urandom(384), "could not be unwrapped"),
        (bytes(384), "could not be unwrapped"),
    ],
    ids=["empty", "short", "random", "zeros"],
)
def test_garbage_material_is_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path, content: bytes, needle: str
) -> None:
    (tmp_path / "garbage").write_bytes(content)
    before = rig2.state()
    proc = _import_files(rig2, "k-bad", tmp_path / "garbage", pending / "ImportToken.bin")
    rig2.refused(proc, before, needle)


def test_a_bad_usage_is_refused(rig2: ByokRig, pending: Path) -> None:
    before = rig2.state()
    rig2.refused(rig2.import_("k-bad", pending, "--usage", "sign"), before, "usage must be one of")


@pytest.mark.parametrize("missing", ["material", "token"])
def test_missing_files_are_refused(
    rig2: ByokRig, pending: Path, tmp_path: Path, missing: str
) -> None:
    material, token = pending / "EncryptedKeyMaterial.bin", pending / "ImportToken.bin"
    if missing == "material":
        material = tmp_path / "nowhere.bin"
    else:
        token = tmp_path / "nowhere.bin"
    before = rig2.state()
    line = rig2.refused(_import_files(rig2, "k-bad", material, token), before)
    assert f"{tmp_path / 'nowhere.bin'}: No such file or directory" in line


def test_a_key_pending_deletion_is_refused(rig2: ByokRig, tmp_path: Path) -> None:
    rig2.rig.create("k-doomed")
    rig2.params("k-doomed", tmp_path / "early", "RSAES_OAEP_SHA_1")  # before the schedule
    wrap_with_cryptography(tmp_path / "early", "RSAES_OAEP_SHA_1", os.urandom(32))
    rig2.ok("keys", "schedule-deletion", "k-doomed", "--days", "7")
    before = rig2.state()
    proc = rig2.run_params("k-doomed", tmp_path / "late")
    rig2.refused(proc, before, "pending deletion: cancel the deletion first")
    assert not (tmp_path / "late").exists()
    rig2.refused(rig2.import_("k-doomed", tmp_path / "early"), before, "cancel the deletion first")


def test_a_key_missing_on_an_hsm_is_refused(rig2: ByokRig, tmp_path: Path) -> None:
    proc = xks_only(rig2, "softhsm-1", "keys", "create", "k-half")
    assert proc.returncode == 0, proc.stderr
    before = rig2.state()
    proc = rig2.run_params("k-half", tmp_path / "o")
    rig2.refused(proc, before, "cannot import into 'k-half': it is missing on softhsm-2")


def xks_only(rig: ByokRig, hsm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return rig.rig.run(*args, config=rig.rig.only(hsm))


def test_a_key_with_usage_none_gets_no_new_version(rig2: ByokRig, tmp_path: Path) -> None:
    rig2.rig.create("k-unusable", "--usage", "none")
    before = rig2.state()
    proc = rig2.run_params("k-unusable", tmp_path / "o")
    rig2.refused(proc, before, "usage none")


# --- expired wrapping keys ------------------------------------------------------------------


def test_purge_destroys_only_expired_wrapping_keys(rig1: ByokRig, tmp_path: Path) -> None:
    def purge(faked: str | None = None) -> int:
        proc = rig1.run("keys", "purge-due", faked=faked)
        assert proc.returncode == 0, proc.stderr
        count: int = json.loads(proc.stdout)["expiredWrappingKeys"]["softhsm-1"]
        return count

    purge("+25 hours")  # whatever other tests left
    rig1.params("k-purge", tmp_path / "old", "RSAES_OAEP_SHA_1")
    assert purge() == 0
    assert wrapping_objects(rig1) == ["DATA", "PRIVATE_KEY", "PUBLIC_KEY"]
    assert purge("+25 hours") == 1
    assert wrapping_objects(rig1) == []
    wrap_with_cryptography(tmp_path / "old", "RSAES_OAEP_SHA_1", os.urandom(32))
    before = rig1.state()
    rig1.refused(rig1.import_("k-purge", tmp_path / "old"), before, "no longer exists")


# --- a failing HSM --------------------------------------------------------------------------


def test_a_failing_hsm_leaves_nothing_and_the_token_still_works(tmp_path: Path) -> None:
    rig = byok_rig(tmp_path / "rig", 2, "--fault-injection")
    rig.params("k-fault", tmp_path, "RSAES_OAEP_SHA_1")
    material = os.urandom(32)
    wrap_with_cryptography(tmp_path, "RSAES_OAEP_SHA_1", material)
    second = rig.rig.control("softhsm-2")
    # Its key-encryption key: after the first HSM has stored its copy, which must go again.
    second.error("CKR_DEVICE_ERROR", ["C_DeriveKey"])
    before = rig.state()
    try:
        line = rig.refused(
            rig.import_("k-fault", tmp_path),
            before,
            "importing 'k-fault' failed: HSM softhsm-2: storing 'k-fault' failed "
            "(CKR_DEVICE_ERROR); nothing was left on any HSM",
        )
    finally:
        second.ok()
    assert wrapping_objects(rig, out=tmp_path) == ["DATA", "PRIVATE_KEY", "PUBLIC_KEY"], line
    out = imported(rig, "k-fault", tmp_path)  # the same token again
    assert out["kcv"] == {"softhsm-1": software_kcv(material), "softhsm-2": software_kcv(material)}
