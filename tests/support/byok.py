"""Key material from outside (BYOK): wrapped as a customer does, independently of xksproxy,
and a several-HSM rig to import it into."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from tests.support.commands import assert_one_line_failure, snapshot
from tests.support.paths import ROOT
from tests.support.rigs import MultiRig, make_multi_rig


@dataclass
class ByokRig:
    rig: MultiRig
    kms: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.rig.config

    def run(self, *args: str, faked: str | None = None) -> subprocess.CompletedProcess[str]:
        """``xksproxy ARGS -c CONFIG`` (not checked), under ``faketime FAKED`` if given."""
        command = [sys.executable, "-m", "xksproxy", *args, "-c", str(self.config)]
        if faked is not None:
            command = ["faketime", faked, *command]
        return subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
        )

    def ok(self, *args: str) -> Any:
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def run_params(
        self, key_id: str, out: Path, algorithm: str = "RSAES_OAEP_SHA_1", spec: str = "RSA_3072"
    ) -> subprocess.CompletedProcess[str]:
        """``keys import-params`` (not checked)."""
        return self.run(
            "keys", "import-params", key_id, "--wrapping-algorithm", algorithm,
            "--wrapping-key-spec", spec, "--out", str(out),
        )  # fmt: skip

    def params(self, key_id: str, out: Path, algorithm: str, spec: str = "RSA_3072") -> Any:
        proc = self.run_params(key_id, out, algorithm, spec)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def import_(
        self, key_id: str, out: Path, *extra: str, faked: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``keys import`` of out/EncryptedKeyMaterial.bin with out/ImportToken.bin."""
        return self.run(
            "keys", "import", key_id, "--wrapped-key-material",
            str(out / "EncryptedKeyMaterial.bin"), "--import-token", str(out / "ImportToken.bin"),
            *extra, faked=faked,
        )  # fmt: skip

    def state(self) -> dict[str, tuple[int, bytes]]:
        """Every byte of every HSM's token (SoftHSM keeps one file per object), but for the
        counter SoftHSM bumps on every create and destroy (``generation``): a refusal that
        made objects and destroyed them again has changed nothing."""
        return {
            path: (mode, b"" if path.endswith("/generation") else data)
            for path, (mode, data) in snapshot(self.rig.dir / "hsms").items()
        }

    def refused(self, proc: subprocess.CompletedProcess[str], before: Any, *needles: str) -> str:
        line = assert_one_line_failure(proc)
        for needle in needles:
            assert needle in line, line
        assert self.state() == before
        return line


def byok_rig(directory: Path, hsms: int, *options: str) -> ByokRig:
    rig = make_multi_rig(directory, hsms, *options)
    kms = json.loads((directory / "kms-xks-config.json").read_text())
    return ByokRig(rig, kms)


def wrap_with_cryptography(out: Path, algorithm: str, material: bytes) -> None:
    """out/EncryptedKeyMaterial.bin: *material* wrapped for out/WrappingPublicKey.bin."""
    public = serialization.load_der_public_key((out / "WrappingPublicKey.bin").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA256() if algorithm.endswith("SHA_256") else hashes.SHA1()
    oaep = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        wrapped = public.encrypt(material, oaep)
    else:
        aes = os.urandom(32)
        wrapped = public.encrypt(aes, oaep) + aes_key_wrap_with_padding(aes, material)
    (out / "EncryptedKeyMaterial.bin").write_bytes(wrapped)


def software_kcv(material: bytes) -> str:
    enc = Cipher(algorithms.AES(material), modes.ECB()).encryptor()
    return "E:" + (enc.update(bytes(16)) + enc.finalize())[:3].hex()
