"""The frozen model of xksproxy's TOML configuration file: its tables, their defaults and
limits, and the small rules about prefixes and names that other modules share.

:mod:`xksproxy.configfile` reads a file into this model, checking everything once and reporting
every problem with its key path before any socket is bound.  Secrets never live in the TOML:
the HSM PIN comes from an environment variable or a file, the SigV4 credentials from the
credentials file (see :mod:`xksproxy.credentials`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xksproxy.audit_chain import ChainKeyError, parse_key
from xksproxy.authz import KeyList, Policy
from xksproxy.errors import ConfigError
from xksproxy.secretfiles import (
    SecretFileError,
    read_secret_text,
)

PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
HSM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
API_SUFFIX = "/kms/xks/v1"
MAX_URI_PATH = 128  # docs/spec-notes.md §1: XksProxyUriPath is at most 128 characters
MIN_PLAINTEXT = 4300  # the spec's minimum supported plaintext/ciphertext size
MIN_AAD = 8192  # the spec's minimum supported AAD size
MAX_AAD = 65535  # the AAD length is a u16 in the AAD construction (§2.2)
CREDENTIALS_VAR = "${CREDENTIALS_DIRECTORY}"
VENDORS = ("generic", "softhsm", "luna", "nshield", "cloudhsm", "utimaco", "protectserver")
#: Where an HSM's AES-GCM encryption IV comes from (xksproxy/hsm/gcm.py, docs/vendors.md).
GCM_IV_MODES = ("auto", "caller", "hsm-written", "hsm-appended")
LOG_LEVELS = ("debug", "info", "warning", "error")


MAX_WORKERS = 64
MAX_DRAIN_SECONDS = 600  # server.drain_seconds
MAX_POOL_DEFAULT = 32  # default max_pool_size (unless pool_size is larger)
DEFAULT_IN_FLIGHT = 64  # the least automatic max_in_flight


def default_workers() -> int:
    """One worker per CPU this process may run on (Python runs one core per process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def normalize_prefix(prefix: str) -> str:
    """``/example/xks/`` -> ``example/xks``: prefixes are written without slashes at the ends."""
    return prefix.strip().strip("/")


def prefix_problem(prefix: str) -> str | None:
    """Why *prefix* (already normalized) is not a valid URI path prefix, or None."""
    if prefix and not PREFIX_RE.match(prefix):
        return "must be segments of A-Z a-z 0-9 _ - separated by '/'"
    if len("/" + prefix + API_SUFFIX if prefix else API_SUFFIX) > MAX_URI_PATH:
        return f"the URI path /{prefix}{API_SUFFIX} would exceed {MAX_URI_PATH} characters"
    return None


def api_base(prefix: str) -> str:
    """The URI path under which a prefix's APIs live, e.g. ``/example/xks/kms/xks/v1``."""
    return f"/{prefix}{API_SUFFIX}" if prefix else API_SUFFIX


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    # Mutual TLS (docs/spec-notes.md §3.4): both set, or neither.  A client must present a
    # certificate chained to a CA in client_ca_file whose name is exactly client_subject_name.
    client_ca_file: Path | None = None
    client_subject_name: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    request_deadline_ms: int = 200
    max_body_bytes: int = 262144
    max_plaintext_bytes: int = 65536
    max_aad_bytes: int = MAX_AAD
    fleet_size: int = 1
    # On SIGTERM: /ping says 503 and every response closes its connection for this long,
    # while requests are still served, so that a load balancer stops sending first.
    drain_seconds: float = 0.0
    tls: TlsConfig | None = None
    # Load shedding (http/overload.py): 429 at once while the event loop runs this late, or
    # while this many requests are in flight in a worker.
    shed_lag_ms: int = 50
    max_in_flight: int = 0  # 0: automatic (in_flight_limit)
    # A keep-alive connection idle this long is closed (aiohttp's default is about an hour).
    idle_timeout_seconds: float = 60.0
    # A request's headers must arrive within this from its first byte (http/connections.py).
    header_timeout_seconds: float = 10.0
    handshake_timeout_seconds: float = 10.0  # a TLS handshake (asyncio's default: 60 s)
    max_connections: int = 4096  # per worker, at once; one more is closed at once
    # A worker whose event loop sends no heartbeat this long is killed and replaced.
    worker_heartbeat_timeout_seconds: float = 10.0
    # Processes sharing the port (SO_REUSEPORT), each with its own HSM sessions.
    workers: int = field(default_factory=lambda: default_workers())


@dataclass(frozen=True)
class SigV4Config:
    region: str = "us-east-1"
    max_skew_seconds: int = 300
    credentials_file: Path = Path("credentials.json")
    # A reload that would leave no credential at all (every request then 404s or 401s) is
    # refused unless this is true.
    allow_no_credentials: bool = False


@dataclass(frozen=True)
class HealthConfig:
    interval_seconds: float = 10.0
    degraded_latency_ms: int = 50
    degraded_after: int = 2  # consecutive slow probes before ACTIVE -> DEGRADED
    recover_after: int = 2  # consecutive good probes before a DEGRADED/UNAVAILABLE HSM is ACTIVE
    # An HSM UNAVAILABLE this long (with no call stuck in it) is reopened: module, login and
    # sessions, as after a device error, and again with backoff until it is back.
    reopen_unavailable_after_seconds: float = 30.0
    proxy_vendor: str = "xksproxy"
    proxy_model: str = "xksproxy"
    ekm_vendor: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9100
    multiprocess_dir: Path | None = None  # PROMETHEUS_MULTIPROC_DIR for workers (metrics.py)


@dataclass(frozen=True)
class KeysConfig:
    """The key commands (``xksproxy keys ...``; xksproxy/keys/locks.py)."""

    # One lock file per key id: commands that change a key wait for each other there.
    lock_directory: Path = Path("/run/lock/xksproxy")
    lock_wait_seconds: float = 120.0  # then the command gives up and changes nothing


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    # Lines go to this file (appended, reopened on SIGHUP: logrotate) instead of stdout.
    file: Path | None = None
    # The audit hash chain's key (docs/audit.md): hex in a file or an environment variable,
    # read when the proxy starts; no chain when neither is set.
    audit_chain_key_file: Path | None = None
    audit_chain_key_env: str | None = None

    @property
    def audit_chain(self) -> bool:
        return self.audit_chain_key_file is not None or self.audit_chain_key_env is not None

    def read_chain_key(self) -> bytes | None:
        """The audit chain key, read now; None if none is configured; ConfigError if unusable."""
        if self.audit_chain_key_env is not None:
            where = f"logging.audit_chain_key_env: ${self.audit_chain_key_env}"
            text = os.environ.get(self.audit_chain_key_env)
            if text is None:
                raise ConfigError([f"{where} is not set"])
        elif self.audit_chain_key_file is not None:
            where = f"logging.audit_chain_key_file: {self.audit_chain_key_file}"
            try:
                text = read_secret_text(self.audit_chain_key_file)
            except FileNotFoundError:
                raise ConfigError([f"{where}: cannot read: does not exist"]) from None
            except SecretFileError as exc:
                raise ConfigError([f"logging.audit_chain_key_file: {exc}"]) from None
        else:
            return None
        try:
            return parse_key(text)
        except ChainKeyError as exc:
            raise ConfigError([f"{where}: the key {exc}"]) from None


@dataclass(frozen=True)
class HsmConfig:
    name: str
    module: Path
    token_label: str | None
    pin_env: str | None
    pin_file: Path | None
    vendor: str = "generic"
    pool_size: int = 8
    # The pool grows under load up to this many sessions (xksproxy/hsm/pool.py).
    max_pool_size: int = 32
    call_timeout_ms: int = 100
    health_key: str = "xksproxy-health"
    key_cache_ttl_seconds: float = 10.0
    # Use session copies (C_CopyObject, CKA_TOKEN false) of keys; None: only for SoftHSM.
    session_key_copies: bool | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    token_serial: str | None = None
    # The security officer's PIN: only `keys replicate` reads it, to mark the transport key
    # trusted on the source HSM (xksproxy/keys/replicate.py).  The proxy never logs in as SO.
    so_pin_env: str | None = None
    so_pin_file: Path | None = None
    # Where the GCM IV of an Encrypt comes from: "auto" probes the token at start (hsm/gcm.py).
    gcm_iv: str = "auto"

    @property
    def use_session_copies(self) -> bool:
        """Whether keys are used through session copies (default: for SoftHSM only, where a
        token key's file is re-read on every use; see docs/architecture.md §3,
        "Performance")."""
        if self.session_key_copies is None:
            return self.vendor == "softhsm"
        return self.session_key_copies

    @property
    def token_desc(self) -> str:
        """How the token is found, for messages."""
        if self.token_serial is not None:
            return f"token with serial {self.token_serial!r}"
        return f"token {self.token_label!r}"

    def read_pin(self) -> str:
        """The user PIN, read now from its environment variable or file."""
        pin = self._read_secret("pin", self.pin_env, self.pin_file)
        assert pin is not None
        return pin

    def read_so_pin(self) -> str | None:
        """The security officer's PIN, read now; None if none is configured."""
        return self._read_secret("so_pin", self.so_pin_env, self.so_pin_file)

    def _read_secret(self, kind: str, env: str | None, file: Path | None) -> str | None:
        if env is not None:
            value = os.environ.get(env)
            if value is None:
                raise ConfigError([f"hsms.{self.name}.{kind}_env: ${env} is not set"])
            return value
        if file is None:
            return None
        try:
            return read_secret_text(file).strip()
        except FileNotFoundError:
            raise ConfigError(
                [f"hsms.{self.name}.{kind}_file: cannot read {file}: does not exist"]
            ) from None
        except SecretFileError as exc:
            raise ConfigError([f"hsms.{self.name}.{kind}_file: {exc}"]) from None


@dataclass(frozen=True)
class PrefixConfig:
    enabled: bool = True
    # Secondary authorization (docs/authz.md): the policy is read and compiled at load, so a
    # bad policy file fails the start (exit 78) or a SIGHUP reload (the old policy is kept).
    policy_file: Path | None = None
    policy_mode: str = "enforce"
    policy: Policy | None = None
    # The external key ids this prefix serves (wildcards); None: every key in the HSMs.
    keys: KeyList | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    sigv4: SigV4Config
    health: HealthConfig
    logging: LoggingConfig
    metrics: MetricsConfig
    hsms: tuple[HsmConfig, ...]
    prefixes: Mapping[str, PrefixConfig]
    keys: KeysConfig = KeysConfig()

    def prefix(self, name: str) -> PrefixConfig:
        """Settings for a prefix; a prefix with credentials but no table gets the defaults."""
        return self.prefixes.get(name, PrefixConfig())

    @property
    def in_flight_limit(self) -> int:
        """Requests one worker takes at a time: ``max_in_flight``, or when that is 0, 64 or
        twice the largest ``max_pool_size`` if more (a request beyond the sessions waits for
        one; far beyond, it would only wait out its deadline)."""
        if self.server.max_in_flight:
            return self.server.max_in_flight
        return max(DEFAULT_IN_FLIGHT, 2 * max((h.max_pool_size for h in self.hsms), default=0))


SUBJECT_NAME_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)


def subject_name_problem(name: str) -> str | None:
    """Why *name* cannot be a required client certificate name, or None."""
    if not SUBJECT_NAME_RE.match(name):
        return (
            "must be a DNS name in lower case without wildcards, as KMS presents it: "
            "cks.kms.<region>.amazonaws.com"
        )
    return None


def kms_client_name(region: str) -> str:
    """The name on the client certificate KMS presents in *region* (docs/spec-notes.md §3.4)."""
    return f"cks.kms.{region}.amazonaws.com"
