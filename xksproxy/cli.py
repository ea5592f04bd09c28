"""The ``xksproxy`` command line: serve, dev-setup, keys, credentials, kms-config, check.

Every failure is one clear line on stderr and a non-zero exit, never a traceback.  Exit codes:
0 ok, 1 operation failed, 2 bad usage (argparse), 78 invalid configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from xksproxy import __version__
from xksproxy.config import Config, api_base, load_config, normalize_prefix, prefix_problem
from xksproxy.credentials import (
    ACCESS_KEY_ID_RE,
    MAX_LIVE_CREDENTIALS,
    CredentialChangeError,
    generate_credential,
    kms_console_json,
    load_credentials,
    save_credentials,
    without_credential,
)
from xksproxy.errors import ConfigError

if TYPE_CHECKING:
    from xksproxy.supervisor import WorkerLink

EX_FAIL = 1
EX_CONFIG = 78


class CliError(Exception):
    """An operation failed; the message is printed as the single error line."""

    def __init__(self, message: str, code: int = EX_FAIL) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"xksproxy: error: {message} (see --help)\n")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _prefix(raw: str) -> str:
    prefix = normalize_prefix(raw)
    why = prefix_problem(prefix)
    if why:
        raise CliError(f"--prefix {raw!r}: {why}", 2)
    return prefix


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_serve(args: argparse.Namespace) -> int:
    from xksproxy.supervisor import WorkerLink

    # Until the proxy installs its reload handler, SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _config(args)
    if args.workers is not None:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, workers=args.workers)
        )
    for hsm in config.hsms:  # a missing PIN is a configuration error: fail before binding
        hsm.read_pin()
    worker = WorkerLink.from_env()
    if worker is not None:
        # A worker of a supervisor, which set PROMETHEUS_MULTIPROC_DIR and emptied it.
        _configure_log(config, worker.index)
        return _serve_process(config, worker)
    pid_file: Path | None = args.pid_file
    if pid_file is not None:
        _write_pid_file(pid_file)
    try:
        return _serve_supervised(config, pid_file)
    finally:
        _remove_pid_file(pid_file)


def _write_pid_file(path: Path) -> None:
    """This process's PID in *path* (written whole, then renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliError(f"--pid-file {path}: cannot write it: {exc.strerror}", EX_CONFIG) from exc


def _remove_pid_file(path: Path | None) -> None:
    """Remove *path* if it still names this process (another may have taken it over)."""
    if path is None:
        return
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _serve_supervised(config: Config, pid_file: Path | None) -> int:
    from xksproxy.supervisor import metrics_directory

    private_dir = False
    metrics_dir = config.metrics.multiprocess_dir
    if config.server.workers > 1:
        metrics_dir, private_dir = metrics_directory(config)
    if metrics_dir is not None:
        # prometheus-client picks its mode when first imported: set the directory before.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        from xksproxy.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir(metrics_dir)
    _configure_log(config, None)
    if config.server.workers > 1:
        from xksproxy.app import tls_context
        from xksproxy.supervisor import run_supervisor

        tls_context(config)  # an unusable certificate is a config error, not a worker failure
        assert metrics_dir is not None
        return run_supervisor(config, metrics_dir, private_dir)
    return _serve_process(config, None, pid_file)


def _configure_log(config: Config, worker: int | None) -> None:
    from xksproxy import log

    try:
        log.configure(config.logging.level, worker=worker, file=config.logging.file)
    except OSError as exc:
        raise CliError(
            f"logging.file: cannot open {config.logging.file}: {exc.strerror}", EX_CONFIG
        ) from exc


def _serve_process(config: Config, worker: WorkerLink | None, pid_file: Path | None = None) -> int:
    import uvloop

    from xksproxy.app import ListenError, serve  # after PROMETHEUS_MULTIPROC_DIR is set

    try:
        clean = uvloop.run(serve(config, worker=worker))
    except ListenError as exc:
        raise CliError(str(exc)) from exc
    if not clean:
        # Threads stuck inside the HSM's library would keep the interpreter from exiting.
        _remove_pid_file(pid_file)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _worker_count(raw: str) -> int:
    from xksproxy.config import MAX_WORKERS

    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return value


def cmd_dev_setup(args: argparse.Namespace) -> int:
    from xksproxy.devsetup import SetupError, dev_setup, emulation_profiles

    if args.emulate is not None:
        try:  # a list of the wrong length is bad usage, found before anything is made
            emulation_profiles(args.emulate, args.hsms)
        except SetupError as exc:
            raise CliError(str(exc), 2) from exc
    try:
        rig = dev_setup(
            Path(args.dir),
            port=args.port,
            region=args.region,
            prefix=args.prefix,
            module=args.module,
            hsms=args.hsms,
            fault_injection=args.fault_injection,
            emulate=args.emulate,
            host=args.host,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
        )
    except SetupError as exc:
        raise CliError(str(exc)) from exc
    print(f"# rig ready: xksproxy serve -c {rig.config_path}", file=sys.stderr)
    print(f"# KMS console file: {rig.kms_config_path}", file=sys.stderr)
    _print_json(rig.kms_config)
    return 0


def _hsm_count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 1 <= value <= 10:
        raise argparse.ArgumentTypeError("must be between 1 and 10")
    return value


def _emulated_profiles(raw: str) -> tuple[str, ...]:
    """``--emulate``: one profile, or a comma-separated list of one per HSM."""
    from xksproxy.faultinject import PROFILES

    profiles = tuple(p.strip() for p in raw.split(","))
    for profile in profiles:
        if profile not in PROFILES:
            raise argparse.ArgumentTypeError(
                f"unknown profile {profile!r} (profiles: {', '.join(PROFILES)})"
            )
    return profiles


def _with_sessions(config: Config, fn: Callable[[Any], Any]) -> Any:
    """Run *fn* on a logged-in session per configured HSM: [(HsmConfig, Session), ...]."""
    from xksproxy.keys import locks
    from xksproxy.keys.lifecycle import KeyAdminError
    from xksproxy.keys.replication import admin_sessions

    locks.use(config.keys)
    try:
        with admin_sessions(config.hsms) as sessions:
            return fn(sessions)
    except KeyAdminError as exc:
        raise CliError(str(exc)) from exc


def cmd_keys_create(args: argparse.Namespace) -> int:
    from xksproxy.keys.replication import create_key_everywhere

    config = _config(args)
    reserved = {h.health_key for h in config.hsms}
    created = _with_sessions(
        config, lambda s: create_key_everywhere(s, args.key_id, args.usage, reserved)
    )
    for line in created.cleared:
        print(f"# first: {line}", file=sys.stderr)
    info = created.info
    _print_json(
        {
            "keyId": info.key_id,
            "keyUsage": list(info.usages),
            "keyStatus": info.status.value,
            "version": info.current_version,
            "kcv": created.kcv,
            "transport": created.transport,
        }
    )
    return 0


def _usage_text(usages: Sequence[str]) -> str:
    return ",".join(u.lower() for u in usages) or "none"


def cmd_keys_list(args: argparse.Namespace) -> int:
    from xksproxy.keys.fleet import list_everywhere

    config = _config(args)
    keys = _with_sessions(config, list_everywhere)
    if args.json:
        _print_json([_key_json(k) for k in keys])
        return 0
    many = len(config.hsms) > 1
    head = f"{'KEY ID':<40} {'STATUS':<16} {'USAGE':<16} VERSIONS"
    print(f"{head:<84} {'KCV':<9} COPIES" if many else head)
    for k in keys:
        ref = k.reference
        row = (
            f"{k.key_id:<40} {ref.status:<16} {_usage_text(ref.usages):<16} "
            f"{','.join(map(str, ref.versions)):<9}"
        )
        if many:
            flags = [p.split(":")[0].replace(" ", "-") for p in k.problems]
            row += f" {ref.current_kcv or '-':<9} {','.join(flags) or 'ok'}"
        print(row.rstrip())
    for k in keys:
        for problem in k.problems:
            print(f"# {k.key_id}: {problem}")
    return 0


def _key_json(k: Any) -> dict[str, Any]:
    ref = k.reference
    return {
        "keyId": k.key_id,
        "keyStatus": ref.status,
        "keyUsage": list(ref.usages),
        "versions": list(ref.versions),
        "kcv": {hsm: c.current_kcv if c else None for hsm, c in k.copies.items()},
        "hsms": {
            hsm: None
            if c is None
            else {
                "keyStatus": c.status,
                "keyUsage": list(c.usages),
                "versions": list(c.versions),
                "unrecorded": list(c.pending),  # never encrypt: keys repair
                "kcv": {str(v): kcv for v, kcv in c.kcv.items()},
            }
            for hsm, c in k.copies.items()
        },
        "consistent": not k.problems,
        "problems": list(k.problems),
    }


def cmd_keys_init_health(args: argparse.Namespace) -> int:
    from xksproxy.keys.fleet import ensure_health_keys

    config = _config(args)
    made = _with_sessions(config, ensure_health_keys)
    for hsm in config.hsms:
        where = f" on {hsm.name}" if len(config.hsms) > 1 else ""
        state = "created" if made[hsm.name] else "already exists"
        print(f"health key {hsm.health_key!r}{where} {state}")
    return 0


def _keys_status(status: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from xksproxy.keys.fleet import set_status_everywhere

        config = _config(args)
        _print_change(
            _with_sessions(config, lambda s: set_status_everywhere(s, args.key_id, status))
        )
        return 0

    return run


def _print_change(change: Any) -> None:
    """What a metadata change (keys.fleet.MetaChange) left, as JSON."""
    from xksproxy.hsm.objects import format_time

    if change.missing:
        print(f"# key {change.key_id!r} is missing on {', '.join(change.missing)}", file=sys.stderr)
    meta = change.meta
    out: dict[str, Any] = {"keyId": change.key_id, "keyStatus": meta.status}
    if meta.deletion is not None:
        out["deletionDate"] = format_time(meta.deletion.delete_after)
    out["rotationPeriodInDays"] = meta.rotation_days
    out["hsms"] = list(change.applied)
    out["missingOn"] = list(change.missing)
    _print_json(out)


def cmd_credentials_add(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    path = config.sigv4.credentials_file
    creds = load_credentials(path)
    existing = creds.get(prefix, ())
    if len(existing) >= MAX_LIVE_CREDENTIALS:
        raise CliError(f"prefix {prefix!r} already has {MAX_LIVE_CREDENTIALS} credentials")
    cred = generate_credential()
    creds[prefix] = (*existing, cred)
    save_credentials(path, creds)
    if not existing:
        print(f"# created prefix {prefix!r} (a new logical key store)", file=sys.stderr)
    print("# send SIGHUP to running proxies so they accept it", file=sys.stderr)
    _print_json(kms_console_json(api_base(prefix), cred))
    return 0


def cmd_credentials_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    if not ACCESS_KEY_ID_RE.match(args.access_key_id):
        raise CliError("--access-key-id must be 20-30 characters of A-Z and 2-7", 2)
    path = config.sigv4.credentials_file
    try:
        creds = without_credential(
            load_credentials(path), prefix, args.access_key_id, allow_last=args.allow_last
        )
    except CredentialChangeError as exc:
        raise CliError(str(exc)) from None
    save_credentials(path, creds)
    print(
        f"removed {args.access_key_id} from prefix {prefix!r}; reload running proxies with SIGHUP",
        file=sys.stderr,
    )
    return 0


def _chain_key(args: argparse.Namespace) -> bytes:
    """The audit chain key for ``audit verify``: --key-file, --key-env or -c's [logging]."""
    from xksproxy.config import LoggingConfig

    if args.config is not None:
        logging = _config(args).logging
        if not logging.audit_chain:
            raise ConfigError(["logging: neither audit_chain_key_file nor audit_chain_key_env"])
    else:
        key_file = Path(args.key_file).expanduser().absolute() if args.key_file else None
        logging = LoggingConfig(audit_chain_key_file=key_file, audit_chain_key_env=args.key_env)
    key = logging.read_chain_key()
    assert key is not None
    return key


NOTES_SHOWN = 20  # notes audit verify prints (then how many more)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check every audit chain in a log; report the first removed, inserted or altered line."""
    from xksproxy.audit_chain import verify_lines

    key = _chain_key(args)
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}", 2) from exc
    lines = data.split(b"\n")
    complete = lines[-1] == b""  # the last line ended with a newline (or the file is empty)
    if complete:
        lines.pop()
    report = verify_lines(lines, key, complete=complete)
    counts = (
        f"{report.chained_lines} chained lines in {len(report.chains)} chains, "
        f"{report.unchained_lines} other JSON lines, {report.ignored_lines} non-JSON lines"
    )
    for note in report.notes[:NOTES_SHOWN]:
        print(f"xksproxy: audit: note: {note}", file=sys.stderr)
    if len(report.notes) > NOTES_SHOWN:
        print(f"xksproxy: audit: note: {len(report.notes) - NOTES_SHOWN} more", file=sys.stderr)
    if report.problem is not None:
        print(f"xksproxy: audit: {args.file}: {report.problem}", file=sys.stderr)
        return EX_FAIL
    open_chains = report.not_closed
    for c in open_chains:
        print(
            f"xksproxy: audit: warning: chain {c.chain_id} (lines {c.first_line}-{c.last_line}) "
            "is not closed: its process was killed or still runs, or the end was cut off",
            file=sys.stderr,
        )
    if open_chains and args.require_closed:
        return EX_FAIL
    print(f"{args.file}: intact: {counts}")
    return 0


def cmd_kms_config(args: argparse.Namespace) -> int:
    config = _config(args)
    prefix = _prefix(args.prefix)
    creds = load_credentials(config.sigv4.credentials_file).get(prefix)
    if not creds:
        raise CliError(f"prefix {prefix!r} has no credentials (xksproxy credentials add)")
    _print_json(kms_console_json(api_base(prefix), creds[-1]))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from xksproxy.app import close_proxy, open_proxy, probe_timeout

    config = _config(args)
    load_credentials(config.sigv4.credentials_file)
    for hsm in config.hsms:
        hsm.read_pin()

    async def run() -> list[str]:
        proxy = await open_proxy(config)
        failures = []
        try:
            for hsm in proxy.hsms:
                rec = await proxy.service.board.probe_once(hsm, probe_timeout(config))
                line = f"hsm {hsm.name} ({hsm.model}): {rec.state.value} - {rec.detail}"
                print(line)
                print(f"hsm {hsm.name} gcm_iv: {hsm.gcm_detail}")
                if rec.state.value == "UNAVAILABLE":
                    failures.append(line)
                    continue
                problems = await hsm.key_problems()
                for key_id, why in problems.items():
                    print(f"hsm {hsm.name} key {key_id}: {'; '.join(why)}")
                if problems:
                    failures.append(
                        f"hsm {hsm.name}: {len(problems)} key(s) need keys repair (or a person)"
                    )
        finally:
            await close_proxy(proxy)
        return failures

    from xksproxy import log

    log.configure("critical", sys.stderr)  # the result lines below say what went wrong
    failures = asyncio.run(run())
    if failures:
        raise CliError(f"{len(failures)} problem(s): " + "; ".join(failures))
    print(f"config {config.path}: ok")
    return 0


# --- key custody commands: versions and deletion ---


def _now() -> datetime:
    from xksproxy.hsm.objects import now_utc

    return now_utc()


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import rotate_everywhere

    config = _config(args)
    done = _with_sessions(config, lambda s: rotate_everywhere(s, args.key_id, _now()))
    for line in done.repaired:
        print(f"# first, from an interrupted command: {line}", file=sys.stderr)
    print(
        f"# running proxies encrypt with version {done.version} within "
        f"{_ttl_text(config)}; older versions still decrypt",
        file=sys.stderr,
    )
    _print_json(
        {
            "keyId": done.key_id,
            "version": done.version,
            "kcv": done.created.kcv,
            "transport": done.created.transport,
        }
    )
    return 0


def _ttl_text(config: Config) -> str:
    ttl = max(h.key_cache_ttl_seconds for h in config.hsms)
    return f"{ttl:g} s (key_cache_ttl_seconds)"


def cmd_keys_show(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import describe, read_copies

    config = _config(args)
    copies = _with_sessions(config, lambda s: read_copies(s, args.key_id))
    view = describe(args.key_id, copies)
    if args.json:
        _print_json(view)
        return 0
    for line in _show_lines(view):
        print(line.rstrip())
    return 0


def _show_lines(view: dict[str, Any]) -> list[str]:
    hsms = list(view["hsms"])
    lines = [
        f"key {view['keyId']}: {view['keyStatus']}, usage {_usage_text(view['keyUsage'])}, "
        f"current version {view['currentVersion']}"
    ]
    if view["rotationPeriodInDays"] is None:
        lines.append("rotation: none (xksproxy keys rotation-period)")
    else:
        lines.append(
            f"rotation: every {view['rotationPeriodInDays']} days, next {view['nextRotation']}"
        )
    if view["deletionDate"] is not None:
        lines.append(f"deletion: pending, purged by keys purge-due from {view['deletionDate']}")
    head = f"{'VERSION':<8} {'CREATED':<21} {'ORIGIN':<10} {'STATE':<13}"
    lines.append(head + " " + " ".join(f"{h:<12}" for h in hsms))
    for v in view["versions"]:
        row = (
            f"{v['version']:<8} {v['created'] or '-':<21} {v['origin'] or '-':<10} {v['state']:<13}"
        )
        lines.append(row + " " + " ".join(f"{v['kcv'].get(h) or '-':<12}" for h in hsms))
    lines += [f"# {problem}" for problem in view["problems"]]
    return lines


def cmd_keys_repair(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import repair

    config = _config(args)
    done = _with_sessions(config, lambda s: repair(s, args.key_id))
    _print_json({"keyId": args.key_id, "repaired": done})
    if not done:
        print(f"# nothing unfinished in {args.key_id!r}", file=sys.stderr)
    return 0


def cmd_keys_rotation_period(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import set_rotation_period

    days = None if args.off else args.days
    config = _config(args)
    _print_change(_with_sessions(config, lambda s: set_rotation_period(s, args.key_id, days)))
    return 0


def cmd_keys_rotate_due(args: argparse.Namespace) -> int:
    from xksproxy.keys.versions import rotate_due

    result = _with_sessions(_config(args), lambda s: rotate_due(s, _now(), args.dry_run))
    done = {k: f"to version {v}" for k, v in result.rotated.items()}
    return _finish_due_run(
        args.dry_run,
        ("rotated", "would rotate"),
        (result.rotated, done),
        result.not_due,
        (result.failed, "rotation failed", "rotated"),
        {"skipped": result.skipped, "failed": result.failed},
    )


def _finish_due_run(
    dry_run: bool,
    verbs: tuple[str, str],
    done: tuple[dict[str, Any], dict[str, str]],
    not_due: dict[str, datetime],
    failed: tuple[dict[str, str], str, str],
    extra: dict[str, Any],
) -> int:
    """Report a rotate-due or purge-due run: a line per key acted on (or due, in a dry run)
    and per failure on stderr, the JSON on stdout; exit 1 if any key failed."""
    from xksproxy.hsm.objects import format_time

    (acted, described), (failures, failure_text, failed_verb) = done, failed
    for key_id, text in described.items():
        print(f"{key_id}: {verbs[dry_run]} {text}", file=sys.stderr)
    for key_id, why in failures.items():
        print(f"{key_id}: {failure_text}: {why}", file=sys.stderr)
    report = {"due" if dry_run else verbs[0]: acted}
    report["notDue"] = {k: format_time(t) for k, t in not_due.items()}
    _print_json({**report, **extra})
    if failures:
        raise CliError(f"{len(failures)} key(s) could not be {failed_verb}; run it again")
    return 0


def cmd_keys_schedule_deletion(args: argparse.Namespace) -> int:
    from xksproxy.hsm.objects import format_time
    from xksproxy.keys.deletion import schedule_deletion

    config = _config(args)
    change = _with_sessions(config, lambda s: schedule_deletion(s, args.key_id, args.days, _now()))
    assert change.meta.deletion is not None
    after = format_time(change.meta.deletion.delete_after)
    print(
        f"# {args.key_id!r} cannot be used from now on (by running proxies within "
        f"{_ttl_text(config)}); keys cancel-deletion undoes that until keys purge-due "
        f"destroys every version, on or after {after}",
        file=sys.stderr,
    )
    _print_change(change)
    return 0


def cmd_keys_cancel_deletion(args: argparse.Namespace) -> int:
    from xksproxy.keys.deletion import cancel_deletion

    config = _config(args)
    change = _with_sessions(config, lambda s: cancel_deletion(s, args.key_id))
    print(f"# {args.key_id!r} is DISABLED: xksproxy keys enable to use it again", file=sys.stderr)
    _print_change(change)
    return 0


def cmd_keys_purge_due(args: argparse.Namespace) -> int:
    from xksproxy.keys.deletion import purge_due

    result = _with_sessions(
        _config(args), lambda s: purge_due(s, _now(), args.dry_run, args.clock_checked)
    )
    done = {k: f"on {', '.join(hsms)}" for k, hsms in result.purged.items()}
    return _finish_due_run(
        args.dry_run,
        ("purged", "would purge"),
        (result.purged, done),
        result.not_due,
        (result.refused, "not purged", "purged"),
        {"refused": result.refused, "expiredWrappingKeys": result.wrapping_keys},
    )


def _days(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of days: {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high} days")
        return value

    return parse


# --- key custody commands: bring your own key (import-params, import) ---

# The choices of import-params (xksproxy/keys/wrapping.py ALGORITHMS and SPECS; a test checks).
WRAPPING_ALGORITHMS = (
    "RSAES_OAEP_SHA_256",
    "RSAES_OAEP_SHA_1",
    "RSA_AES_KEY_WRAP_SHA_256",
    "RSA_AES_KEY_WRAP_SHA_1",
)
WRAPPING_KEY_SPECS = ("RSA_3072", "RSA_4096")


def cmd_keys_import_params(args: argparse.Namespace) -> int:
    from xksproxy.hsm.objects import format_time
    from xksproxy.keys.byok import import_params

    config = _config(args)
    reserved = {h.health_key for h in config.hsms}
    out = _with_sessions(
        config,
        lambda s: import_params(
            s,
            args.key_id,
            args.wrapping_algorithm,
            args.wrapping_key_spec,
            Path(args.out),
            reserved,
            _now(),
        ),
    )
    expires = format_time(out.expires)
    print(
        f"# wrap 32 bytes of key material with {out.public_key.name} ({out.algorithm}), then "
        f"run keys import {out.key_id} before {expires} (docs/byok.md)",
        file=sys.stderr,
    )
    _print_json(
        {
            "keyId": out.key_id,
            "wrappingAlgorithm": out.algorithm,
            "wrappingKeySpec": out.spec,
            "publicKey": str(out.public_key),
            "importToken": str(out.token),
            "expires": expires,
            "hsm": out.hsm,
        }
    )
    return 0


def _read_input(option: str, path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise CliError(f"{option} {path}: more than {limit} bytes, so not what it should be")
    return data


def cmd_keys_import(args: argparse.Namespace) -> int:
    from xksproxy.keys.byok import import_key

    config = _config(args)
    reserved = {h.health_key for h in config.hsms}
    material = _read_input("--wrapped-key-material", args.wrapped_key_material, 65536)
    token = _read_input("--import-token", args.import_token, 65536)
    done = _with_sessions(
        config,
        lambda s: import_key(s, args.key_id, material, token, args.usage, reserved, _now()),
    )
    if done.already:
        print(
            f"# this import token already made version {done.version} (an earlier run was "
            "cut short after it): nothing new was imported",
            file=sys.stderr,
        )
    if not done.wrapping_key_destroyed:
        print(
            "# the wrapping key could not be destroyed: keys purge-due removes it once the "
            "import token has expired",
            file=sys.stderr,
        )
    if done.version > 1 and not done.already:
        print(
            f"# running proxies encrypt with version {done.version} within "
            f"{_ttl_text(config)}; older versions still decrypt",
            file=sys.stderr,
        )
    info = done.created.info
    _print_json(
        {
            "keyId": info.key_id,
            "version": done.version,
            "origin": "imported",
            "keyUsage": list(info.usages),
            "keyStatus": info.status.value,
            "kcv": done.created.kcv,
            "transport": done.created.transport,
        }
    )
    return 0


# --- key custody commands: replicate ---


def cmd_keys_replicate(args: argparse.Namespace) -> int:
    from xksproxy.keys import locks
    from xksproxy.keys.copy import replicate
    from xksproxy.keys.lifecycle import KeyAdminError

    config = _config(args)
    locks.use(config.keys)
    try:
        report = replicate(
            config.hsms, args.source, args.target, args.key_ids, progress=args.progress
        )
    except KeyAdminError as exc:
        raise CliError(str(exc)) from exc
    _print_json(report.to_json())
    for key in report.keys:
        for problem in key.problems:
            print(f"# {key.key_id}: {problem}", file=sys.stderr)
    for note in report.notes:
        print(f"# {note}", file=sys.stderr)
    if not report.ok:
        raise CliError(f"not every key was replicated: {report.summary()}")
    print(f"# replicated {report.summary()}", file=sys.stderr)
    return 0


# kmsOperation -> the API whose required requestMetadata fields `policy test` checks.
_OPERATION_API = {
    "CreateKey": "metadata",
    "DescribeKey": "metadata",
    "Encrypt": "encrypt",
    "GenerateDataKey": "encrypt",
    "GenerateDataKeyWithoutPlaintext": "encrypt",
    "ReEncrypt": "encrypt",
    "Decrypt": "decrypt",
    "CreateCustomKeyStore": "health",
    "ConnectCustomKeyStore": "health",
    "UpdateCustomKeyStore": "health",
    "KmsHealthCheck": "health",
}


def cmd_policy_test(args: argparse.Namespace) -> int:
    """Simulate a prefix's policy on a request body: exit 0 allow, 1 deny (docs/authz.md)."""
    from xksproxy.authz import HEALTH_EXEMPT, NO_POLICY, NOT_LISTED, Admission
    from xksproxy.errors import ValidationError
    from xksproxy.http.paths import KEY_ID_RE
    from xksproxy.models import parse_body, parse_metadata

    config = _config(args)
    prefix = _prefix(args.prefix)
    if not KEY_ID_RE.fullmatch(args.key_id):  # the key ids the API's paths take
        raise CliError(f"--key-id {args.key_id!r}: 1-128 characters of A-Z a-z 0-9 . _ -", 2)
    if prefix not in config.prefixes:
        raise CliError(f'--prefix {prefix!r}: {config.path} has no [prefixes."{prefix}"]', 2)
    try:
        body = Path(args.request).read_bytes()
    except OSError as exc:
        raise CliError(f"--request {args.request}: cannot read: {exc.strerror}", 2) from exc
    try:
        data = parse_body(body)
        op = data.get("requestMetadata", {}).get("kmsOperation")
        api = args.api or (
            _OPERATION_API.get(op, "metadata") if isinstance(op, str) else "metadata"
        )
        meta = parse_metadata(data, api)
    except (ValidationError, AttributeError) as exc:
        why = exc.message if isinstance(exc, ValidationError) else "requestMetadata is no object"
        raise CliError(f"--request {args.request}: {why}", 2) from exc
    policy = config.prefixes[prefix].policy
    decision = Admission(config.prefixes[prefix].keys, policy).admit(args.key_id, meta, api=api)
    lines = {
        "prefix": prefix,
        "key id": args.key_id,
        "api": api,
        "operation": meta.kms_operation,
        "principal": meta.aws_principal_arn,
    }
    verdict = "allow" if decision.decision == "allow" else "deny"
    statement, mode = decision.statement, "-"
    if decision is NOT_LISTED:
        statement = statement[:-1] + ": KeyNotFoundException)"
    elif policy is not None and decision not in (HEALTH_EXEMPT, NO_POLICY):
        mode = policy.mode
        if decision.decision == "would_deny":
            mode += " (the proxy would allow it and log authz_would_deny)"
    print(f"decision: {verdict}")
    print(f"statement: {statement}")
    print(f"mode: {mode}")
    for name, value in lines.items():
        print(f"{name}: {value}")
    return 0 if verdict == "allow" else EX_FAIL


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xksproxy", description="AWS KMS external key store (XKS) proxy")
    p.add_argument("--version", action="version", version=f"xksproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", required=True, help="path of xksproxy.toml")
        return sp

    s = with_config(sub.add_parser("serve", help="run the proxy"))
    s.add_argument(
        "--workers",
        type=_worker_count,
        help="worker processes sharing the port (overrides [server] workers)",
    )
    s.add_argument(
        "--pid-file",
        type=Path,
        metavar="PATH",
        help="write the serving process's PID here (for kill -HUP); removed at exit",
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("dev-setup", help="make a SoftHSM-backed rig in DIR")
    s.add_argument("dir")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the rig's API listens on (default 127.0.0.1; 0.0.0.0 in a container)",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the rig's /metrics listener (default 127.0.0.1)",
    )
    s.add_argument("--metrics-port", type=int, default=9100)
    s.add_argument("--region", default="us-east-1")
    s.add_argument("--prefix", default="example/xks")
    s.add_argument("--module", help="SoftHSM2 library path (found automatically)")
    s.add_argument(
        "--hsms",
        type=_hsm_count,
        default=1,
        metavar="N",
        help="number of HSMs, 1-10 (default 1); each is its own SoftHSM instance",
    )
    s.add_argument(
        "--fault-injection",
        action="store_true",
        help="put each HSM behind its own copy of the fault-injection module",
    )
    from xksproxy.faultinject import PROFILES

    s.add_argument(
        "--emulate",
        type=_emulated_profiles,
        metavar="PROFILE[,PROFILE...]",
        help="make each HSM handle AES-GCM IVs as a production HSM does (docs/vendors.md), "
        "behind its own copy of the fault-injection module: one profile for every HSM, or "
        f"one per HSM ({', '.join(PROFILES)})",
    )
    s.set_defaults(func=cmd_dev_setup)

    keys = sub.add_parser("keys", help="external keys, on every configured HSM")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    s = with_config(ksub.add_parser("create", help="create a new AES-256 key on every HSM"))
    s.add_argument("key_id")
    s.add_argument(
        "--usage",
        default="encrypt,decrypt",
        help="encrypt,decrypt (default) | encrypt | decrypt | none",
    )
    s.set_defaults(func=cmd_keys_create)
    s = with_config(ksub.add_parser("list", help="list external keys"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_list)
    s = with_config(
        ksub.add_parser("init-health", help="create the dedicated health (known-answer) key")
    )
    s.set_defaults(func=cmd_keys_init_health)
    for name, status in (("disable", "DISABLED"), ("enable", "ENABLED")):
        s = with_config(ksub.add_parser(name, help=f"mark a key {status}"))
        s.add_argument("key_id")
        s.set_defaults(func=_keys_status(status))
    # --- parsers: versions and deletion ---
    s = with_config(ksub.add_parser("rotate", help="add a new version (new material) everywhere"))
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_rotate)
    s = with_config(
        ksub.add_parser(
            "repair",
            help="finish or remove what an interrupted rotate or import left (unrecorded versions)",
        )
    )
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_repair)
    s = with_config(ksub.add_parser("show", help="a key's versions, KCVs, state and rotation"))
    s.add_argument("key_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_show)
    s = with_config(
        ksub.add_parser("rotation-period", help="rotate a key every N days (keys rotate-due)")
    )
    s.add_argument("key_id")
    period = s.add_mutually_exclusive_group(required=True)
    period.add_argument("--days", type=_days(90, 2560), help="90-2560, as KMS allows")
    period.add_argument("--off", action="store_true", help="no automatic rotation")
    s.set_defaults(func=cmd_keys_rotation_period)
    s = with_config(
        ksub.add_parser("rotate-due", help="rotate every key whose rotation period has passed")
    )
    s.add_argument("--dry-run", action="store_true", help="list what is due, change nothing")
    s.set_defaults(func=cmd_keys_rotate_due)
    s = with_config(
        ksub.add_parser("schedule-deletion", help="make a key unusable; purgeable after N days")
    )
    s.add_argument("key_id")
    s.add_argument("--days", type=_days(7, 30), default=30, help="7-30 (default 30)")
    s.set_defaults(func=cmd_keys_schedule_deletion)
    s = with_config(ksub.add_parser("cancel-deletion", help="end a pending deletion (DISABLED)"))
    s.add_argument("key_id")
    s.set_defaults(func=cmd_keys_cancel_deletion)
    s = with_config(
        ksub.add_parser("purge-due", help="destroy keys whose deletion date has passed")
    )
    s.add_argument("--dry-run", action="store_true", help="list what is due, change nothing")
    s.add_argument(
        "--clock-checked",
        action="store_true",
        help="purge although the clock moved back, or more than 3 days, since the last run",
    )
    s.set_defaults(func=cmd_keys_purge_due)
    # --- parsers: bring your own key ---
    s = with_config(
        ksub.add_parser(
            "import-params", help="a wrapping public key and import token for your key material"
        )
    )
    s.add_argument("key_id")
    s.add_argument("--wrapping-algorithm", required=True, choices=WRAPPING_ALGORITHMS)
    s.add_argument("--wrapping-key-spec", required=True, choices=WRAPPING_KEY_SPECS)
    s.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where to write WrappingPublicKey.bin and ImportToken.bin (made 0700 if missing)",
    )
    s.set_defaults(func=cmd_keys_import_params)
    s = with_config(
        ksub.add_parser("import", help="import wrapped key material: a new key or a new version")
    )
    s.add_argument("key_id")
    s.add_argument("--wrapped-key-material", required=True, metavar="FILE")
    s.add_argument("--import-token", required=True, metavar="FILE")
    s.add_argument(
        "--usage",
        help="a new key's usage: encrypt,decrypt (default) | encrypt | decrypt | none; "
        "a new version keeps the key's usage",
    )
    s.set_defaults(func=cmd_keys_import)
    # --- parsers: replicate ---
    s = with_config(
        ksub.add_parser(
            "replicate",
            help="copy keys with all their versions and state from one HSM to another",
        )
    )
    s.add_argument("--from", dest="source", required=True, metavar="HSM", help="copy from")
    s.add_argument("--to", dest="target", required=True, metavar="HSM", help="copy to")
    s.add_argument("key_ids", nargs="*", metavar="KEY_ID", help="default: every key")
    s.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    s.set_defaults(func=cmd_keys_replicate)

    creds = sub.add_parser("credentials", help="SigV4 credentials per URI path prefix")
    csub = creds.add_subparsers(dest="credentials_command", required=True, parser_class=_Parser)
    s = with_config(csub.add_parser("add", help="add a credential (creates the prefix)"))
    s.add_argument("--prefix", required=True)
    s.set_defaults(func=cmd_credentials_add)
    s = with_config(csub.add_parser("remove", help="remove a credential"))
    s.add_argument("--prefix", required=True)
    s.add_argument("--access-key-id", required=True)
    s.add_argument(
        "--allow-last", action="store_true", help="allow removing the prefix's last credential"
    )
    s.set_defaults(func=cmd_credentials_remove)

    policy = sub.add_parser("policy", help="secondary authorization policies (docs/authz.md)")
    psub = policy.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    s = with_config(
        psub.add_parser(
            "test", help="decide a request body under a prefix's policy (exit 0 allow, 1 deny)"
        )
    )
    s.add_argument("--prefix", required=True)
    s.add_argument("--key-id", required=True, help="the external key id of the request's URI")
    s.add_argument("--request", required=True, help="a request body (JSON with requestMetadata)")
    s.add_argument(
        "--api",
        choices=["metadata", "encrypt", "decrypt", "health"],
        help="the API the request goes to (default: the one its kmsOperation belongs to)",
    )
    s.set_defaults(func=cmd_policy_test)

    s = with_config(sub.add_parser("kms-config", help="print the KMS console JSON for a prefix"))
    s.add_argument("--prefix", required=True)
    s.set_defaults(func=cmd_kms_config)

    audit = sub.add_parser("audit", help="the tamper-evident audit log (docs/audit.md)")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    s = asub.add_parser("verify", help="verify every audit chain of a log; first problem, exit 1")
    s.add_argument("file", metavar="FILE", help="the log (- for stdin); rotated parts in order")
    key = s.add_mutually_exclusive_group(required=True)
    key.add_argument("-c", "--config", help="take the key from this config's [logging]")
    key.add_argument("--key-file", metavar="FILE", help="the key, hex, in this file")
    key.add_argument("--key-env", metavar="VAR", help="the key, hex, in this environment variable")
    s.add_argument(
        "--require-closed",
        action="store_true",
        help="exit 1 when a chain has no audit_chain_closed line (a cut-off end)",
    )
    s.set_defaults(func=cmd_audit_verify)

    s = with_config(sub.add_parser("check", help="validate config, open HSMs, run the KAT"))
    s.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from xksproxy.hardening import forbid_core_dumps, raise_open_file_limit

    # Before anything reads a secret: a core dump would hold it (xksproxy/hardening.py).
    not_done = forbid_core_dumps()
    if (why := raise_open_file_limit()) is not None:
        not_done.append(why)
    args = build_parser().parse_args(argv)
    if not_done:
        print(
            f"xksproxy: warning: process limits not set: {'; '.join(not_done)}",
            file=sys.stderr,
        )
    if args.command != "serve":
        from xksproxy import log

        # Warnings of the modules a command uses (a key object ignored, say) go to stderr as
        # JSON lines: stdout carries the command's own output (JSON that scripts parse).
        log.configure("warning", sys.stderr)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"xksproxy: config: {problem}", file=sys.stderr)
        return EX_CONFIG
    except CliError as exc:
        print(f"xksproxy: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code
