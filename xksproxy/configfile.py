"""Reading xksproxy.toml into the model of :mod:`xksproxy.config`: every key checked once, and
every problem reported together with its key path (``ConfigError.problems``), before any socket
is bound."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from xksproxy.authz import MODES, load_policy, parse_key_list
from xksproxy.config import (
    CREDENTIALS_VAR,
    GCM_IV_MODES,
    HSM_NAME_RE,
    LOG_LEVELS,
    MAX_AAD,
    MAX_DRAIN_SECONDS,
    MAX_POOL_DEFAULT,
    MAX_WORKERS,
    MIN_AAD,
    MIN_PLAINTEXT,
    VENDORS,
    Config,
    HealthConfig,
    HsmConfig,
    KeysConfig,
    LoggingConfig,
    MetricsConfig,
    PrefixConfig,
    ServerConfig,
    SigV4Config,
    TlsConfig,
    normalize_prefix,
    prefix_problem,
    subject_name_problem,
)
from xksproxy.errors import ConfigError
from xksproxy.secretfiles import (
    SecretFileError,
    check_regular_file,
    check_secret_file,
    not_regular,
    read_regular_bytes,
)


def _not_a_file(path: Path) -> str | None:
    """Why *path* is no regular file to read ("does not exist", "is a directory", ...), or
    None if it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return not_regular(mode)


class _Reader:
    """Typed access to a TOML table that records problems instead of stopping at the first."""

    def __init__(self, problems: list[str], base: Path) -> None:
        self.problems = problems
        self.base = base

    def table(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problems.append(f"{path}: must be a table")
            return {}
        return value

    def unknown(self, data: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in sorted(set(data) - known):
            self.problems.append(f"{path}.{key}: unknown setting" if path else f"{key}: unknown")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        kind: type,
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        if key not in data:
            return default
        value = data[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.problems.append(f"{path}.{key}: must be a {kind.__name__}")
            return default
        if check is not None:
            why = check(value)
            if why:
                self.problems.append(f"{path}.{key}: {why}")
                return default
        return value

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def secret_path(self, value: str, where: str) -> Path:
        """A secret's file: as :meth:`path`, and a leading ``${CREDENTIALS_DIRECTORY}`` is the
        directory of systemd's ``LoadCredential=`` for the unit that runs the command, so one
        configuration serves the proxy's unit and the key-command timers' units alike."""
        if value.startswith(CREDENTIALS_VAR + "/"):
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                self.problems.append(
                    f"{where}: uses {CREDENTIALS_VAR} but $CREDENTIALS_DIRECTORY is not set "
                    "(set by systemd for a unit with LoadCredential=)"
                )
                return Path(value)
            return Path(directory) / value[len(CREDENTIALS_VAR) + 1 :]
        return self.path(value)


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _server(r: _Reader, data: Mapping[str, Any]) -> ServerConfig:
    t = r.table(data, "server", "server")
    d = ServerConfig()
    r.unknown(t, set(ServerConfig.__dataclass_fields__), "server")
    cfg = ServerConfig(
        host=r.get(t, "host", "server", str, d.host, _nonempty),
        port=r.get(t, "port", "server", int, d.port, _between(1, 65535)),
        request_deadline_ms=r.get(
            t, "request_deadline_ms", "server", int, d.request_deadline_ms, _between(10, 240)
        ),
        max_body_bytes=r.get(
            t, "max_body_bytes", "server", int, d.max_body_bytes, _between(32768, 16 << 20)
        ),
        max_plaintext_bytes=r.get(
            t,
            "max_plaintext_bytes",
            "server",
            int,
            d.max_plaintext_bytes,
            _between(MIN_PLAINTEXT, 4 << 20),
        ),
        max_aad_bytes=r.get(
            t, "max_aad_bytes", "server", int, d.max_aad_bytes, _between(MIN_AAD, MAX_AAD)
        ),
        fleet_size=r.get(t, "fleet_size", "server", int, d.fleet_size, _between(1, 1000)),
        drain_seconds=r.get(
            t, "drain_seconds", "server", float, d.drain_seconds, _between(0, MAX_DRAIN_SECONDS)
        ),
        tls=_tls(r, t),
        workers=r.get(t, "workers", "server", int, d.workers, _between(1, MAX_WORKERS)),
        shed_lag_ms=r.get(t, "shed_lag_ms", "server", int, d.shed_lag_ms, _between(5, 1000)),
        idle_timeout_seconds=r.get(
            t, "idle_timeout_seconds", "server", float, d.idle_timeout_seconds, _between(1, 3600)
        ),
        header_timeout_seconds=r.get(
            t, "header_timeout_seconds", "server", float, d.header_timeout_seconds, _between(1, 300)
        ),
        handshake_timeout_seconds=r.get(
            t,
            "handshake_timeout_seconds",
            "server",
            float,
            d.handshake_timeout_seconds,
            _between(1, 300),
        ),
        max_connections=r.get(
            t, "max_connections", "server", int, d.max_connections, _between(1, 1_000_000)
        ),
        worker_heartbeat_timeout_seconds=r.get(
            t,
            "worker_heartbeat_timeout_seconds",
            "server",
            float,
            d.worker_heartbeat_timeout_seconds,
            _between(2, 600),
        ),
        max_in_flight=r.get(
            t, "max_in_flight", "server", int, d.max_in_flight, _between(0, 100_000)
        ),
    )
    # The body must be able to carry the largest accepted plaintext and AAD in base64, plus
    # requestMetadata (ARNs of up to 2048 characters): otherwise supported input would get 413.
    needed = 4 * ((cfg.max_plaintext_bytes + 2) // 3) + 4 * ((cfg.max_aad_bytes + 2) // 3) + 16384
    if cfg.max_body_bytes < needed:
        r.problems.append(
            f"server.max_body_bytes: must be at least {needed} to carry max_plaintext_bytes and "
            "max_aad_bytes in base64 plus request metadata"
        )
    return cfg


def _tls(r: _Reader, server: Mapping[str, Any]) -> TlsConfig | None:
    if "tls" not in server:
        return None
    t = r.table(server, "tls", "server.tls")
    r.unknown(t, set(TlsConfig.__dataclass_fields__), "server.tls")
    files = []
    for key in ("cert_file", "key_file"):
        value = r.get(t, key, "server.tls", str, "", None)
        if not value:
            r.problems.append(f"server.tls.{key}: required (PEM file)")
        else:
            try:
                if key == "key_file":
                    check_secret_file(r.path(value))
                else:
                    check_regular_file(r.path(value))
            except SecretFileError as exc:
                r.problems.append(f"server.tls.{key}: {exc}")
        files.append(r.path(value) if value else Path())
    ca = r.get(t, "client_ca_file", "server.tls", str, None)
    if ca is not None:
        try:
            check_regular_file(r.path(ca))
        except SecretFileError as exc:
            r.problems.append(f"server.tls.client_ca_file: {exc}")
    name = r.get(t, "client_subject_name", "server.tls", str, None, subject_name_problem)
    if (ca is None) != ("client_subject_name" not in t):
        r.problems.append(
            "server.tls: client_ca_file and client_subject_name go together (mutual TLS): "
            "set both, or neither"
        )
    return TlsConfig(files[0], files[1], None if ca is None else r.path(ca), name)


def _sigv4(r: _Reader, data: Mapping[str, Any]) -> SigV4Config:
    t = r.table(data, "sigv4", "sigv4")
    r.unknown(t, set(SigV4Config.__dataclass_fields__), "sigv4")
    d = SigV4Config()
    region_ok = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
    return SigV4Config(
        region=r.get(
            t,
            "region",
            "sigv4",
            str,
            d.region,
            lambda v: None if region_ok.match(v) else "must be an AWS Region name like us-east-1",
        ),
        max_skew_seconds=r.get(
            t, "max_skew_seconds", "sigv4", int, d.max_skew_seconds, _between(1, 900)
        ),
        credentials_file=r.path(
            r.get(t, "credentials_file", "sigv4", str, str(d.credentials_file), _nonempty)
        ),
        allow_no_credentials=r.get(
            t, "allow_no_credentials", "sigv4", bool, d.allow_no_credentials
        ),
    )


def _health(r: _Reader, data: Mapping[str, Any]) -> HealthConfig:
    t = r.table(data, "health", "health")
    r.unknown(t, set(HealthConfig.__dataclass_fields__), "health")
    d = HealthConfig()
    return HealthConfig(
        # A cached health result may be at most 60 s old (docs/spec-notes.md §1.5).
        interval_seconds=r.get(
            t, "interval_seconds", "health", float, d.interval_seconds, _between(0.5, 50)
        ),
        degraded_latency_ms=r.get(
            t, "degraded_latency_ms", "health", int, d.degraded_latency_ms, _between(1, 10000)
        ),
        degraded_after=r.get(t, "degraded_after", "health", int, d.degraded_after, _between(1, 20)),
        recover_after=r.get(t, "recover_after", "health", int, d.recover_after, _between(1, 20)),
        reopen_unavailable_after_seconds=r.get(
            t,
            "reopen_unavailable_after_seconds",
            "health",
            float,
            d.reopen_unavailable_after_seconds,
            _between(1, 3600),
        ),
        proxy_vendor=r.get(t, "proxy_vendor", "health", str, d.proxy_vendor, _nonempty),
        proxy_model=r.get(t, "proxy_model", "health", str, d.proxy_model, _nonempty),
        ekm_vendor=r.get(t, "ekm_vendor", "health", str, d.ekm_vendor),
    )


def _hsm(r: _Reader, t: Mapping[str, Any], path: str) -> HsmConfig | None:
    known = set(HsmConfig.__dataclass_fields__) | {"pin", "so_pin"}  # each its own message
    r.unknown(t, known, path)
    before = len(r.problems)
    name = r.get(t, "name", path, str, "", None)
    if not HSM_NAME_RE.match(name):
        r.problems.append(f"{path}.name: required; letters, digits, '.', '_', '-', 1-64 chars")
    module = r.get(t, "module", path, str, "", None)
    if not module:
        r.problems.append(f"{path}.module: required (path of the PKCS#11 library)")
    elif (why := _not_a_file(r.path(module))) is not None:
        r.problems.append(f"{path}.module: {r.path(module)} {why}")
    label = r.get(t, "token_label", path, str, None, _nonempty)
    serial = r.get(t, "token_serial", path, str, None, _nonempty)
    if (label is None) == (serial is None):
        r.problems.append(f"{path}.token_label: set exactly one of token_label or token_serial")
    pin_env = r.get(t, "pin_env", path, str, None, _nonempty)
    pin_file = r.get(t, "pin_file", path, str, None, _nonempty)
    if (pin_env is None) == (pin_file is None):
        r.problems.append(f"{path}: set exactly one of pin_env or pin_file (never the PIN itself)")
    so_pin_env = r.get(t, "so_pin_env", path, str, None, _nonempty)
    so_pin_file = r.get(t, "so_pin_file", path, str, None, _nonempty)
    if so_pin_env is not None and so_pin_file is not None:
        r.problems.append(f"{path}: set at most one of so_pin_env or so_pin_file")
    for secret in ("pin", "so_pin"):
        if secret in t:
            r.problems.append(f"{path}.{secret}: PINs are never written in the configuration")
    env = r.get(t, "env", path, dict, {}, None)
    if not all(isinstance(v, str) for v in env.values()):
        r.problems.append(f"{path}.env: values must be strings")
        env = {}
    d_pool, d_timeout, d_ttl = 8, 100, 10.0
    pool_size = r.get(t, "pool_size", path, int, d_pool, _between(1, 256))
    # Default: room to grow to 32 sessions (a 5 ms HSM at 1,800 requests/s over 2 workers
    # needs about 18), or none beyond a larger pool_size.
    max_pool_size = r.get(
        t, "max_pool_size", path, int, max(MAX_POOL_DEFAULT, pool_size), _between(1, 1024)
    )
    if max_pool_size < pool_size:
        r.problems.append(
            f"{path}.max_pool_size: must be at least pool_size ({max_pool_size} < {pool_size})"
        )
    cfg = HsmConfig(
        name=name,
        module=r.path(module) if module else Path(),
        token_label=label,
        token_serial=serial,
        pin_env=pin_env,
        pin_file=r.secret_path(pin_file, f"{path}.pin_file") if pin_file else None,
        so_pin_env=so_pin_env,
        so_pin_file=r.secret_path(so_pin_file, f"{path}.so_pin_file") if so_pin_file else None,
        vendor=r.get(t, "vendor", path, str, "generic", _one_of(VENDORS)),
        pool_size=pool_size,
        max_pool_size=max_pool_size,
        call_timeout_ms=r.get(t, "call_timeout_ms", path, int, d_timeout, _between(5, 10000)),
        health_key=r.get(t, "health_key", path, str, "xksproxy-health", _nonempty),
        key_cache_ttl_seconds=r.get(
            t, "key_cache_ttl_seconds", path, float, d_ttl, _between(0.1, 3600)
        ),
        session_key_copies=r.get(t, "session_key_copies", path, bool, None),
        gcm_iv=r.get(t, "gcm_iv", path, str, "auto", _one_of(GCM_IV_MODES)),
        env={k: (str(r.path(v)) if k.endswith("_CONF") else v) for k, v in env.items()},
    )
    return cfg if len(r.problems) == before else None


def _prefixes(r: _Reader, data: Mapping[str, Any]) -> dict[str, PrefixConfig]:
    t = r.table(data, "prefixes", "prefixes")
    out: dict[str, PrefixConfig] = {}
    for raw, table in t.items():
        path = f'prefixes."{raw}"'
        name = normalize_prefix(raw)
        why = prefix_problem(name)
        if why:
            r.problems.append(f"{path}: {why}")
            continue
        if name in out:
            r.problems.append(f"{path}: names prefix {name!r} again (tables would be merged)")
            continue
        if not isinstance(table, dict):
            r.problems.append(f"{path}: must be a table")
            continue
        r.unknown(table, {"enabled", "policy_file", "policy_mode", "keys"}, path)
        mode = r.get(table, "policy_mode", path, str, "enforce", _one_of(MODES))
        raw_file = r.get(table, "policy_file", path, str, None, _nonempty)
        policy_file = r.path(raw_file) if raw_file else None
        policy = None
        if policy_file is None and "policy_mode" in table:
            r.problems.append(f"{path}.policy_mode: has no effect without policy_file")
        elif policy_file is not None:
            try:
                policy = load_policy(policy_file, mode, f"{path}.policy_file")
            except ConfigError as exc:
                r.problems.extend(exc.problems)
        out[name] = PrefixConfig(
            enabled=r.get(table, "enabled", path, bool, True),
            policy_file=policy_file,
            policy_mode=mode,
            policy=policy,
            keys=None
            if "keys" not in table
            else parse_key_list(table["keys"], f"{path}.keys", r.problems),
        )
    return out


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    """Validate parsed TOML *data*; raise ConfigError listing every problem."""
    problems: list[str] = []
    r = _Reader(problems, path.parent)
    r.unknown(
        data, {"server", "sigv4", "health", "logging", "metrics", "hsms", "prefixes", "keys"}, ""
    )
    server = _server(r, data)
    sigv4 = _sigv4(r, data)
    health = _health(r, data)
    lt = r.table(data, "logging", "logging")
    r.unknown(lt, set(LoggingConfig.__dataclass_fields__), "logging")
    key_env = r.get(lt, "audit_chain_key_env", "logging", str, None, _nonempty)
    key_file = r.get(lt, "audit_chain_key_file", "logging", str, None, _nonempty)
    if key_env is not None and key_file is not None:
        r.problems.append("logging: set at most one of audit_chain_key_file or audit_chain_key_env")
    log_file = r.get(lt, "file", "logging", str, None, _nonempty)
    if log_file is not None and r.path(log_file).is_dir():
        r.problems.append(f"logging.file: {r.path(log_file)} is a directory, not a file")
    logging = LoggingConfig(
        level=r.get(lt, "level", "logging", str, "info", _one_of(LOG_LEVELS)),
        file=r.path(log_file) if log_file is not None else None,
        audit_chain_key_file=(
            r.secret_path(key_file, "logging.audit_chain_key_file") if key_file else None
        ),
        audit_chain_key_env=key_env,
    )
    mt = r.table(data, "metrics", "metrics")
    r.unknown(mt, set(MetricsConfig.__dataclass_fields__), "metrics")
    md = MetricsConfig()
    mp_dir = r.get(mt, "multiprocess_dir", "metrics", str, None, _nonempty)
    metrics = MetricsConfig(
        enabled=r.get(mt, "enabled", "metrics", bool, md.enabled),
        host=r.get(mt, "host", "metrics", str, md.host, _nonempty),
        port=r.get(mt, "port", "metrics", int, md.port, _between(1, 65535)),
        multiprocess_dir=r.path(mp_dir) if mp_dir else None,
    )
    kt = r.table(data, "keys", "keys")
    r.unknown(kt, set(KeysConfig.__dataclass_fields__), "keys")
    kd = KeysConfig()
    lock_dir = r.get(kt, "lock_directory", "keys", str, None, _nonempty)
    keys = KeysConfig(
        lock_directory=r.path(lock_dir) if lock_dir else kd.lock_directory,
        lock_wait_seconds=r.get(
            kt, "lock_wait_seconds", "keys", float, kd.lock_wait_seconds, _between(0, 86400)
        ),
    )
    raw_hsms = data.get("hsms", [])
    hsms: list[HsmConfig] = []
    if not isinstance(raw_hsms, list) or not raw_hsms:
        problems.append("hsms: at least one [[hsms]] table is required")
    elif len(raw_hsms) > 10:
        problems.append("hsms: at most 10 HSMs (ekmFleetDetails holds 1-10 entries)")
    else:
        for i, t in enumerate(raw_hsms):
            if not isinstance(t, dict):
                problems.append(f"hsms[{i}]: must be a table")
                continue
            hsm = _hsm(r, t, f"hsms[{i}]")
            if hsm is not None:
                hsms.append(hsm)
        names = [h.name for h in hsms]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"hsms: the name {dup!r} is used more than once")
        if len(hsms) > 1:
            for h in hsms:
                if h.call_timeout_ms >= server.request_deadline_ms:
                    problems.append(
                        f"hsms.{h.name}.call_timeout_ms: must be below server.request_deadline_ms"
                        " so a failed call can be retried on another HSM in time"
                    )
        by_module: dict[Path, HsmConfig] = {}
        for h in hsms:
            first = by_module.setdefault(h.module, h)
            if dict(first.env) != dict(h.env):
                # One module is loaded once per process, with one environment.
                problems.append(
                    f"hsms: {first.name!r} and {h.name!r} share module {h.module} but not "
                    "[hsms.env]; give each its own copy of the module or the same env"
                )
    prefixes = _prefixes(r, data)
    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        server=server,
        sigv4=sigv4,
        health=health,
        logging=logging,
        metrics=metrics,
        hsms=tuple(hsms),
        prefixes=prefixes,
        keys=keys,
    )


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at *path*."""
    p = Path(path).expanduser().absolute()
    try:
        data = tomllib.loads(read_regular_bytes(p).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{p}: cannot read: No such file or directory"]) from None
    except SecretFileError as exc:
        raise ConfigError([str(exc)]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from exc
    return parse_config(data, p)
