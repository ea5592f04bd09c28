"""Key policies as the authorization tests write them, and a minimal configuration of one
prefix (its HSM a stand-in file: nothing is ever loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.configs import write_config

ACCT = "123456789012"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCT}:key/a1b2c3d4-5678-90ab-cdef-EXAMPLE11111"
ENCRYPTOR = f"arn:aws:iam::{ACCT}:role/encryptor"
DECRYPTOR = f"arn:aws:iam::{ACCT}:role/decryptor"


def allow(**kw: Any) -> dict[str, Any]:
    st = {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}
    st.update(kw)
    return st


def deny(**kw: Any) -> dict[str, Any]:
    return allow(Effect="Deny", **kw)


def pol(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def prefix_config(directory: Path, prefix: dict[str, Any]) -> Path:
    """DIRECTORY/xksproxy.toml: one stand-in HSM and prefix "t" with the settings *prefix*."""
    (directory / "libfake-pkcs11.so").write_bytes(b"\x7fELF")
    hsm = {"name": "h", "module": "libfake-pkcs11.so", "token_label": "t", "pin_env": "PIN"}
    return write_config(directory / "xksproxy.toml", {"hsms": [hsm], "prefixes": {"t": prefix}})
