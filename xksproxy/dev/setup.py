"""``xksproxy dev-setup DIR [--hsms N] [--fault-injection] [--emulate PROFILE[,...]]``: a
SoftHSM rig made from nothing.

Everything lives under DIR: the SoftHSM configuration and tokens, the PINs (files, mode 0600),
the credentials file, ``xksproxy.toml`` and ``kms-xks-config.json``.  Nothing system-wide is
touched.  Running it again on the same DIR with the same options keeps what is there and
creates only what is missing; other options on an existing rig are refused.

One HSM without fault injection is the original layout: ``DIR/softhsm2.conf``, ``DIR/tokens``,
``DIR/secrets/hsm-pin`` and the system's SoftHSM library.  Otherwise each HSM ``softhsm-<i>``
is a SoftHSM instance of its own: a copy of the library (a distinct file is a distinct dlopen()
instance with its own globals, and reads its own ``SOFTHSM2_CONF`` when initialised), its
configuration and tokens in ``DIR/hsms/softhsm-<i>/``, and its own PINs in
``DIR/secrets/softhsm-<i>/``.  With ``--fault-injection`` each HSM's module is its own copy of
the fault-injection module (built here from the sources in :mod:`xksproxy.dev.faultinject`) with an
``xksfault.conf`` beside it naming that HSM's SoftHSM copy and its control file
``DIR/faults/softhsm-<i>`` (made with ``ok``).  The demo key ``foo`` is created with the same
material on every HSM; each HSM gets its own health key.

``--emulate PROFILE`` (one profile for every HSM, or a comma-separated list of one per HSM) makes
each HSM behave as a production HSM does for AES-GCM IVs (docs/vendors.md): it uses the per-HSM
layout, each HSM behind its own copy of the fault-injection module whose ``xksfault.conf`` names
the profile (and a control file only with ``--fault-injection``).  The HSM's table gets that
vendor's ``vendor`` and a comment naming the profile, but no ``gcm_iv``: the proxy's default,
``auto``, must find the IV mode itself.  An existing rig's profiles are read back from its
copies' ``xksfault.conf``; ``--fault-injection`` alone is the same rig as ``--fault-injection
--emulate softhsm``.

The rig listens on 127.0.0.1 (API, and metrics on port 9100) unless ``--host``,
``--metrics-host`` and ``--metrics-port`` say otherwise: the container image's entrypoint
(``docker/entrypoint.sh``) passes ``0.0.0.0`` for both, since a published port reaches a
container on its own network interface, not on loopback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xksproxy.config import Config, api_base, normalize_prefix, prefix_problem
from xksproxy.configfile import load_config
from xksproxy.credentials import (
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
)
from xksproxy.dev import fleet
from xksproxy.dev.faultinject import (
    CONF_NAME,
    FAULT_LIBRARY_NAME,
    PROFILES,
    VENDOR_OF_PROFILE,
    FaultControl,
    FaultModuleBuildError,
    build_fault_module,
    copy_file,
    install_copy,
)
from xksproxy.errors import KeyAdminError, OperatorError
from xksproxy.keys import locks
from xksproxy.keys.create import admin_sessions, create_key_everywhere
from xksproxy.keys.fleet import ensure_health_keys
from xksproxy.keys.store import key_holders

TOKEN_LABEL = "xksproxy"
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
DEMO_KEY = "foo"
MAX_HSMS = 10
SOFTHSM_COPY = "libsofthsm2.so"
LOOPBACK = "127.0.0.1"
METRICS_PORT = 9100
# A listen address written into the TOML as is: an IP literal or a DNS name, nothing to escape.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")

CONFIG_TEMPLATE = """\
# xksproxy rig made by `xksproxy dev-setup`.
# Reference: docs/reference/configuration.md, config/softhsm.toml.
[server]
host = "{host}"
port = {port}
request_deadline_ms = 200
{server_extra}
[sigv4]
region = "{region}"
credentials_file = "{root}credentials.json"

[health]
interval_seconds = 5

[keys]
lock_directory = "{root}locks"  # the key commands' per-key locks (relative to this file)
{metrics}
[[hsms]]
name = "softhsm-1"
vendor = "softhsm"
module = "{module}"
token_label = "{token}"
pin_file = "{root}secrets/hsm-pin"
so_pin_file = "{root}secrets/hsm-so-pin"  # for `keys replicate` only
pool_size = 8
call_timeout_ms = 100

[hsms.env]
SOFTHSM2_CONF = "{root}softhsm2.conf"
"""

HEADER_TEMPLATE = CONFIG_TEMPLATE[: CONFIG_TEMPLATE.index("[[hsms]]")]
HSM_TEMPLATE = """\
[[hsms]]
name = "{name}"
{emulation}vendor = "{vendor}"
module = "{module}"
token_label = "{token}"
pin_file = "{root}secrets/{name}/hsm-pin"
so_pin_file = "{root}secrets/{name}/hsm-so-pin"  # for `keys replicate` only
pool_size = 8
call_timeout_ms = 100
{copies}
[hsms.env]
SOFTHSM2_CONF = "{root}hsms/{name}/softhsm2.conf"
"""


class SetupError(OperatorError):
    """The rig cannot be made; the message says why."""


@dataclass(frozen=True)
class Rig:
    config_path: Path
    kms_config_path: Path
    kms_config: dict[str, Any]
    # A fleet rig (--proxies): each proxy's configuration, and HAProxy's in front of them.
    proxy_configs: tuple[Path, ...] = ()
    haproxy_cfg: Path | None = None


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


def hsm_name(index: int) -> str:
    """The name of the rig's *index*-th HSM (from 1)."""
    return f"softhsm-{index}"


def _ensure_token(directory: Path, conf: Path, secrets_dir: Path) -> None:
    """A SoftHSM configuration, token directory and initialised token in *directory*."""
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
    pin_file, so_file = secrets_dir / "hsm-pin", secrets_dir / "hsm-so-pin"
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


def host_problem(host: str) -> str | None:
    """Why *host* cannot be a listen address of the rig, or None."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.match(host):
            return "must be an IP address or a host name"
    return None


def emulation_profiles(profiles: Sequence[str], hsms: int) -> tuple[str, ...]:
    """The profile of each of *hsms* HSMs: *profiles* is one for all of them or one per HSM.
    SetupError if a profile is unknown or the list is neither one nor *hsms* long."""
    given = ",".join(profiles)
    unknown = [p for p in profiles if p not in PROFILES]
    if not profiles or unknown:
        what = f"unknown profile {unknown[0]!r}" if unknown else "no profile"
        raise SetupError(f"--emulate {given!r}: {what} (profiles: {', '.join(PROFILES)})")
    if len(profiles) == 1:
        return tuple(profiles) * hsms
    if len(profiles) != hsms:
        count = len(profiles)
        raise SetupError(
            f"--emulate {given!r}: {count} profiles for 1 HSM: give one (or --hsms {count})"
            if hsms == 1
            else f"--emulate {given!r}: {count} profiles for {hsms} HSMs: give one for all of "
            f"them, or exactly {hsms}, one per HSM"
        )
    return tuple(profiles)


def _metrics_table(host: str, port: int) -> str:
    # The default (no table: 127.0.0.1:9100) keeps the rig's file as it always was.
    if (host, port) == (LOOPBACK, METRICS_PORT):
        return ""
    return f'\n[metrics]\nhost = "{host}"\nport = {port}\n'


def _endpoint(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a listener on *host*."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:  # listening everywhere: loopback is one of them
        address = ipaddress.ip_address("::1" if address.version == 6 else LOOPBACK)
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


@dataclass(frozen=True)
class _Kind:
    """What a rig is made of: the options that made it."""

    hsms: int
    fault: bool
    # The emulated profile of each HSM; None: no HSM behind the fault-injection module.
    profiles: tuple[str | None, ...] | None

    @classmethod
    def of_options(cls, hsms: int, fault: bool, emulate: tuple[str, ...] | None) -> _Kind:
        # --fault-injection alone puts each HSM behind a pass-through copy: "softhsm".
        return cls(hsms, fault, emulate or (("softhsm",) * hsms if fault else None))

    def describe(self) -> str:
        text = f"{self.hsms} HSM" + ("s" if self.hsms > 1 else "")
        if self.fault:
            text += " with fault injection"
        profiles = self.profiles or ()
        if profiles and not (self.fault and set(profiles) == {"softhsm"}):
            names = [p or "-" for p in profiles]  # "-": an HSM not behind the module
            text += " emulating " + (names[0] if len(set(names)) == 1 else ",".join(names))
        return text


def _conf_settings(conf: Path) -> dict[str, str]:
    """The ``name = value`` settings of an ``xksfault.conf`` (empty if it cannot be read)."""
    try:
        lines = conf.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    settings = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[name.strip()] = value.strip()
    return settings


def _existing_layout(config_path: Path) -> _Kind | None:
    """What the rig configured in *config_path* is made of; None if unreadable (load_config
    then reports why)."""
    try:
        data = tomllib.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    hsms = data.get("hsms")
    if not isinstance(hsms, list):
        return None
    fault = False
    profiles: list[str | None] = []
    for table in hsms:
        module = Path(str(table.get("module", ""))) if isinstance(table, dict) else Path()
        if not module.is_absolute():
            module = config_path.parent / module
        # A copy made by dev-setup lives in hsms/ with its xksfault.conf; a shim set up by hand
        # (through XKS_FAULT_* in [hsms.env]) on the one-HSM layout does not change the layout.
        conf = module.parent / CONF_NAME
        ours = module.parent.parent == config_path.parent / "hsms"
        if module.name != FAULT_LIBRARY_NAME or not (ours or conf.exists()):
            profiles.append(None)
            continue
        settings = _conf_settings(conf) if conf.exists() else {"control": ""}
        # The copy's profile (none written: a pass-through copy); its control file, if any,
        # is what --fault-injection added.
        profiles.append(settings.get("profile", "softhsm"))
        fault |= "control" in settings
    shimmed = any(p is not None for p in profiles)
    return _Kind(len(hsms), fault, tuple(profiles) if shimmed else None)


def _ensure_hsm(
    directory: Path, name: str, softhsm: Path, shim: Path | None, profile: str, fault: bool
) -> None:
    """HSM *name*'s own SoftHSM instance under *directory*, and its copy of the fault-injection
    module (*shim*, if any) emulating *profile*, with a control file if *fault*."""
    home = directory / "hsms" / name
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    real = home / SOFTHSM_COPY
    copy_file(softhsm, real)
    _ensure_token(home, home / "softhsm2.conf", directory / "secrets" / name)
    if shim is not None:
        control = None
        if fault:
            control = FaultControl(directory / "faults" / name)
            if not control.path.exists():
                control.ok()
        install_copy(
            shim,
            home,
            real_module=real,
            control=control.path if control else None,
            profile=profile,
            # A clock on the token, as Luna and nShield have; no file: this host's time.
            token_clock=directory / "faults" / f"{name}.clock" if fault else None,
        )


@dataclass(frozen=True)
class _Listen:
    host: str
    port: int
    metrics_host: str
    metrics_port: int


def _hsm_table(name: str, library: str, profile: str | None, root: str) -> str:
    """HSM *name*'s table; *profile*: the profile it emulates (None: not emulated)."""
    vendor = VENDOR_OF_PROFILE[profile] if profile is not None else "softhsm"
    emulation = copies = ""
    if profile is not None:
        emulation = (
            f"# emulates the AES-GCM IVs of {profile!r} (`dev-setup --emulate`, docs/vendors.md):\n"
            "# SoftHSM behind the fault-injection module; no gcm_iv: the proxy finds the mode\n"
        )
    if vendor != "softhsm":
        # The token is SoftHSM whatever the vendor says: keep the session copies of keys that
        # vendor = "softhsm" has by default (docs/reference/configuration.md).
        copies = "session_key_copies = true  # the token is SoftHSM's\n"
    return HSM_TEMPLATE.format(
        name=name,
        module=f"{root}hsms/{name}/{library}",
        root=root,
        token=TOKEN_LABEL,
        vendor=vendor,
        emulation=emulation,
        copies=copies,
    )


def _config_text(
    listen: _Listen,
    region: str,
    hsms: int,
    shim: bool,
    emulate: Sequence[str | None] | None,
    *,
    root: str = "",
    server_extra: str = "",
) -> str:
    """A rig's configuration.  *root*: the way from the file's directory to the rig's ("" for
    DIR/xksproxy.toml, "../" for a fleet's DIR/proxy-K/xksproxy.toml); *server_extra*: lines
    added to [server]."""
    library = FAULT_LIBRARY_NAME if shim else SOFTHSM_COPY
    profiles: Sequence[str | None] = emulate or (None,) * hsms
    tables = [
        _hsm_table(hsm_name(i), library, profile, root)
        for i, profile in enumerate(profiles, start=1)
    ]
    header = HEADER_TEMPLATE.format(
        host=listen.host,
        port=listen.port,
        region=region,
        metrics=_metrics_table(listen.metrics_host, listen.metrics_port),
        root=root,
        server_extra=server_extra,
    )
    return header + "\n".join(tables)


def one_hsm_config_text(
    listen: _Listen, region: str, module: str, *, root: str = "", server_extra: str = ""
) -> str:
    """The configuration of the original one-HSM layout (the system's SoftHSM library)."""
    return CONFIG_TEMPLATE.format(
        host=listen.host,
        port=listen.port,
        region=region,
        metrics=_metrics_table(listen.metrics_host, listen.metrics_port),
        module=module,
        token=TOKEN_LABEL,
        root=root,
        server_extra=server_extra,
    )


def _layout(
    directory: Path,
    listen: _Listen,
    region: str,
    module: str | None,
    kind: _Kind,
    emulate: tuple[str, ...] | None,
) -> Path:
    """Create (or complete) the HSMs and the configuration; the configuration's path."""
    config_path = directory / "xksproxy.toml"
    exists = config_path.exists()
    if exists:
        found = _existing_layout(config_path)
        if found is not None and found != kind:
            raise SetupError(
                f"{directory} is a rig with {found.describe()}, not {kind.describe()}: "
                "use another directory (or the same options)"
            )
    if kind.profiles is None and kind.hsms == 1:
        _ensure_token(directory, directory / "softhsm2.conf", directory / "secrets")
        if not exists:
            config_path.write_text(_rig_config_text(kind, emulate, module, listen, region))
        return config_path
    softhsm = Path(module or find_softhsm())
    shim = None
    if kind.profiles is not None:
        try:
            shim = build_fault_module(directory / "build")
        except FaultModuleBuildError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise SetupError(
                f"cannot build the fault-injection module: {lines[0]} {lines[-1]}"
                if len(lines) > 1
                else f"cannot build the fault-injection module: {exc}"
            ) from exc
    for i, profile in enumerate(kind.profiles or ("softhsm",) * kind.hsms, start=1):
        _ensure_hsm(directory, hsm_name(i), softhsm, shim, profile or "softhsm", kind.fault)
    if not exists:
        config_path.write_text(_rig_config_text(kind, emulate, module, listen, region))
    return config_path


def _rig_config_text(
    kind: _Kind,
    emulate: Sequence[str] | None,
    module: str | None,
    listen: _Listen,
    region: str,
    *,
    root: str = "",
    server_extra: str = "",
) -> str:
    """The configuration of a rig made of *kind*, listening as *listen* says."""
    if kind.profiles is None and kind.hsms == 1:
        return one_hsm_config_text(
            listen, region, module or find_softhsm(), root=root, server_extra=server_extra
        )
    shim = kind.profiles is not None
    return _config_text(
        listen, region, kind.hsms, shim, emulate, root=root, server_extra=server_extra
    )


def _ensure_keys(config: Config) -> None:
    """Each HSM's health key, and the demo key with the same material on every HSM."""
    locks.use(config.keys)
    with admin_sessions(config.hsms) as sessions:
        ensure_health_keys(sessions)
        holders = key_holders(sessions, DEMO_KEY)
        if not holders:
            reserved = {h.health_key for h in config.hsms}
            create_key_everywhere(sessions, DEMO_KEY, "encrypt,decrypt", reserved)
        elif len(holders) != len(sessions):
            raise SetupError(
                f"the demo key {DEMO_KEY!r} exists on {', '.join(holders)} only; its copies "
                "cannot be made afterwards: make the rig again in a new directory"
            )


def dev_setup(
    directory: Path,
    *,
    port: int,
    region: str,
    prefix: str,
    module: str | None,
    hsms: int = 1,
    fault_injection: bool = False,
    emulate: Sequence[str] | None = None,
    host: str = LOOPBACK,
    metrics_host: str = LOOPBACK,
    metrics_port: int = METRICS_PORT,
    proxies: int | None = None,
) -> Rig:
    """Make (or complete) the rig in *directory*.  The listen addresses and ports go into a new
    rig's configuration; an existing rig keeps its own.  *emulate*: the profile(s) of
    :func:`emulation_profiles` (None: plain SoftHSM).  *proxies*: a fleet of that many
    proxies behind HAProxy on *port* (:mod:`xksproxy.dev.fleet`)."""
    prefix = normalize_prefix(prefix)
    why = prefix_problem(prefix) if prefix else "must not be empty for the rig"
    if why:
        raise SetupError(f"--prefix {prefix!r}: {why}")
    if not 1 <= hsms <= MAX_HSMS:
        raise SetupError(f"--hsms {hsms}: must be between 1 and {MAX_HSMS}")
    profiles = emulation_profiles(emulate, hsms) if emulate is not None else None
    for option, value in (("--host", host), ("--metrics-host", metrics_host)):
        why = host_problem(value)
        if why:
            raise SetupError(f"{option} {value!r}: {why}")
    directory = directory.expanduser().absolute()
    ports = None
    listen = _Listen(host, port, metrics_host, metrics_port)
    if proxies is not None:
        ports = fleet.fleet_ports(port, metrics_port, proxies)
        fleet.find_haproxy()  # before anything is made
        listen = _Listen(host, ports.api[0], metrics_host, ports.metrics[0])
    _check_fleet_options(directory, proxies)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a read-only root (a container run with --read-only), say
        raise SetupError(f"cannot create {directory}: {exc.strerror}") from exc
    kind = _Kind.of_options(hsms, fault_injection, profiles)
    config_path = _layout(directory, listen, region, module, kind, profiles)
    config = load_config(config_path)
    creds = load_credentials(config.sigv4.credentials_file)
    if not creds.get(prefix):
        creds[prefix] = (generate_credential(),)
        save_credentials(config.sigv4.credentials_file, creds)
    try:
        _ensure_keys(config)
    except KeyAdminError as exc:
        raise SetupError(str(exc)) from exc
    proxy_configs: list[Path] = []
    if ports is not None:

        def member(api: int, metrics: int, extra: str) -> str:
            at = _Listen(host, api, metrics_host, metrics)
            return _rig_config_text(
                kind, profiles, module, at, region, root="../", server_extra=extra
            )

        proxy_configs = fleet.write_fleet(directory, ports, host, member)
    kms = kms_console_json(api_base(prefix), creds[prefix][0])
    served_on = port if ports is not None else config.server.port
    kms["XksProxyUriEndpoint"] = _endpoint(config.server.host, served_on)
    kms["Region"] = config.sigv4.region
    kms_path = directory / "kms-xks-config.json"
    text = json.dumps(kms, indent=2) + "\n"
    if not kms_path.exists() or kms_path.read_text() != text:
        fd = os.open(kms_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    haproxy = directory / "haproxy.cfg" if ports is not None else None
    return Rig(config_path, kms_path, kms, tuple(proxy_configs), haproxy)


def _check_fleet_options(directory: Path, proxies: int | None) -> None:
    """SetupError if *directory* holds a rig made with other --proxies (or none)."""
    found = fleet.existing_proxies(directory)
    if found is not None and found != proxies:
        raise SetupError(
            f"{directory} is a fleet rig of {found} proxies: give --proxies {found} "
            "(or use another directory)"
        )
    if found is None and proxies is not None and (directory / "xksproxy.toml").exists():
        raise SetupError(
            f"{directory} is a rig without --proxies: make the fleet in another directory"
        )
