"""``xksproxy dev-setup DIR``: a SoftHSM-backed rig made from nothing, idempotently.

Everything lives under DIR: the SoftHSM configuration and token, the PINs (files, mode 0600),
the credentials file, ``xksproxy.toml`` and ``kms-xks-config.json``.  Nothing system-wide is
touched.  Running it again on the same DIR keeps what is there and creates only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xksproxy.config import api_base, load_config, normalize_prefix, prefix_problem
from xksproxy.credentials import (
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
)
from xksproxy.keys.lifecycle import KeyAdminError, admin_session, create_key, ensure_health_key

TOKEN_LABEL = "xksproxy"
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
DEMO_KEY = "foo"

CONFIG_TEMPLATE = """\
# xksproxy rig made by `xksproxy dev-setup`. Reference: README.md, config/softhsm.toml.
[server]
host = "127.0.0.1"
port = {port}
request_deadline_ms = 200

[sigv4]
region = "{region}"
credentials_file = "credentials.json"

[health]
interval_seconds = 5

[[hsms]]
name = "softhsm-1"
vendor = "softhsm"
module = "{module}"
token_label = "{token}"
pin_file = "secrets/hsm-pin"
pool_size = 8
call_timeout_ms = 150

[hsms.env]
SOFTHSM2_CONF = "softhsm2.conf"
"""


class SetupError(Exception):
    """The rig cannot be made; the message says why."""


@dataclass(frozen=True)
class Rig:
    config_path: Path
    kms_config_path: Path
    kms_config: dict[str, Any]


def find_softhsm() -> str:
    for candidate in SOFTHSM_MODULES:
        if os.path.isfile(candidate):
            return candidate
    raise SetupError("SoftHSM2 is not installed (apt-get install softhsm2), or pass --module")


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def _ensure_token(directory: Path, conf: Path) -> None:
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
    pin_file, so_file = directory / "secrets/hsm-pin", directory / "secrets/hsm-so-pin"
    if not pin_file.exists():
        _write_secret(so_file, secrets.token_hex(16))
        _write_secret(pin_file, secrets.token_hex(16))
    if any(tokens.iterdir()):
        return
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SetupError("softhsm2-util not found (apt-get install softhsm2)")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    so_pin, pin = so_file.read_text().strip(), pin_file.read_text().strip()
    proc = subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin", so_pin, "--pin", pin],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SetupError(f"softhsm2-util --init-token failed: {proc.stderr.strip()}")


def dev_setup(directory: Path, *, port: int, region: str, prefix: str, module: str | None) -> Rig:
    """Make (or complete) the rig in *directory*."""
    prefix = normalize_prefix(prefix)
    why = prefix_problem(prefix) if prefix else "must not be empty for the rig"
    if why:
        raise SetupError(f"--prefix {prefix!r}: {why}")
    directory = directory.expanduser().absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    config_path = directory / "xksproxy.toml"
    if not config_path.exists():
        _ensure_token(directory, conf)
        config_path.write_text(
            CONFIG_TEMPLATE.format(
                port=port, region=region, module=module or find_softhsm(), token=TOKEN_LABEL
            )
        )
    else:
        _ensure_token(directory, conf)
    config = load_config(config_path)
    creds = load_credentials(config.sigv4.credentials_file)
    if not creds.get(prefix):
        creds[prefix] = (generate_credential(),)
        save_credentials(config.sigv4.credentials_file, creds)
    hsm = config.hsms[0]
    try:
        with admin_session(hsm) as session:
            ensure_health_key(session, hsm.health_key)
            with contextlib.suppress(KeyAdminError):  # the demo key exists already
                create_key(session, DEMO_KEY, "encrypt,decrypt", hsm.health_key)
    except KeyAdminError as exc:
        raise SetupError(str(exc)) from exc
    kms = kms_console_json(api_base(prefix), creds[prefix][0])
    kms["XksProxyUriEndpoint"] = f"http://{config.server.host}:{config.server.port}"
    kms["Region"] = config.sigv4.region
    kms_path = directory / "kms-xks-config.json"
    text = json.dumps(kms, indent=2) + "\n"
    if not kms_path.exists() or kms_path.read_text() != text:
        fd = os.open(kms_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return Rig(config_path, kms_path, kms)
