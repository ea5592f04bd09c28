"""SigV4 credentials per URI path prefix, kept in a JSON file of their own (mode 0600).

The file is the list of logical key stores: a prefix exists when it has a credential.  It is
rewritten atomically by ``xksproxy credentials add/remove`` and re-read by a running proxy on
SIGHUP, so credentials rotate without a restart (docs/spec-notes.md §3.3).

Format::

    {"version": 1,
     "prefixes": {"example/xks": [{"access_key_id": "...", "secret": "...",
                                   "created": "2026-11-28T13:00:00Z"}]}}
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xksproxy.config import normalize_prefix, prefix_problem
from xksproxy.errors import ConfigError, OperatorError
from xksproxy.secretfiles import SecretFileError, read_secret_bytes

ACCESS_KEY_ID_RE = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9/+=]{43,64}$")
MAX_LIVE_CREDENTIALS = 10


@dataclass(frozen=True)
class Credential:
    access_key_id: str
    secret: str
    created: str

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"Credential(access_key_id={self.access_key_id!r}, created={self.created!r})"


Credentials = dict[str, tuple[Credential, ...]]


def generate_credential(now: datetime | None = None) -> Credential:
    """A fresh random credential: 24-char base32 key id, 256-bit base64 secret."""
    akid = base64.b32encode(secrets.token_bytes(15)).decode()
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Credential(akid, secret, created)


def _parse(data: Any, where: str) -> Credentials:
    problems: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("prefixes"), dict):
        raise ConfigError([f"{where}: must be an object with a 'prefixes' object"])
    out: Credentials = {}
    seen: dict[str, str] = {}
    for raw, items in data["prefixes"].items():
        prefix = normalize_prefix(raw)
        path = f'{where}: prefixes."{raw}"'
        why = prefix_problem(prefix)
        if why:
            problems.append(f"{path}: {why}")
            continue
        if not isinstance(items, list):
            problems.append(f"{path}: must be a list of credentials")
            continue
        creds = []
        for i, item in enumerate(items):
            p = f"{path}[{i}]"
            if not isinstance(item, dict):
                problems.append(f"{p}: must be an object")
                continue
            akid, secret = item.get("access_key_id"), item.get("secret")
            if not isinstance(akid, str) or not ACCESS_KEY_ID_RE.match(akid):
                problems.append(f"{p}.access_key_id: must be 20-30 characters of A-Z and 2-7")
                continue
            if not isinstance(secret, str) or not SECRET_RE.match(secret):
                problems.append(f"{p}.secret: must be 43-64 characters of A-Z a-z 0-9 / + =")
                continue
            if akid in seen:
                problems.append(f"{p}.access_key_id: {akid} is also used by prefix {seen[akid]!r}")
                continue
            seen[akid] = prefix
            creds.append(Credential(akid, secret, str(item.get("created", ""))))
        if len(creds) > MAX_LIVE_CREDENTIALS:
            problems.append(f"{path}: at most {MAX_LIVE_CREDENTIALS} live credentials")
        out[prefix] = tuple(creds)
    if problems:
        raise ConfigError(problems)
    return out


def load_credentials(path: Path) -> Credentials:
    """Read and validate the credentials file; a missing file means no prefixes."""
    try:
        raw = read_secret_bytes(path)
    except FileNotFoundError:
        return {}
    except SecretFileError as exc:
        raise ConfigError([str(exc)]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}"]) from exc
    return _parse(data, str(path))


def save_credentials(path: Path, creds: Credentials) -> None:
    """Write the file atomically (temp file + rename) with mode 0600."""
    data = {
        "version": 1,
        "prefixes": {
            prefix: [
                {"access_key_id": c.access_key_id, "secret": c.secret, "created": c.created}
                for c in items
            ]
            for prefix, items in sorted(creds.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CredentialChangeError(OperatorError):
    """A change to the credentials that is refused; the message says why."""


def without_credential(
    creds: Credentials, prefix: str, access_key_id: str, *, allow_last: bool = False
) -> Credentials:
    """*creds* less *access_key_id* of *prefix* (a prefix left with none is dropped).  The
    prefix's last credential is kept unless *allow_last*: KMS would be locked out."""
    existing = creds.get(prefix)
    if existing is None:
        raise CredentialChangeError(f"prefix {prefix!r} has no credentials")
    kept = tuple(c for c in existing if c.access_key_id != access_key_id)
    if len(kept) == len(existing):
        raise CredentialChangeError(f"prefix {prefix!r} has no credential {access_key_id}")
    if not kept and not allow_last:
        raise CredentialChangeError(
            "refusing to remove the prefix's last credential (KMS would be locked out); "
            "add the new one first, or pass --allow-last"
        )
    out = {p: c for p, c in creds.items() if p != prefix}
    if kept:
        out[prefix] = kept
    return out


def kms_console_json(uri_path: str, cred: Credential) -> dict[str, Any]:
    """The JSON file the KMS console imports for an external key store (docs/spec-notes.md §3.3)."""
    return {
        "XksProxyUriPath": uri_path,
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": cred.access_key_id,
            "RawSecretAccessKey": cred.secret,
        },
    }
