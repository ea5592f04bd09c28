"""Shared fixtures: a real SoftHSM rig made by the CLI, and a real proxy process serving it.

The test process itself never loads SoftHSM here (a PKCS#11 module is initialised once per
process, with one SOFTHSM2_CONF): the rig is made with ``xksproxy`` subprocesses, and the proxy
runs as ``python -m xksproxy serve``, so these tests drive exactly what an operator runs.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.xks_client import XksClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_module(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` in a subprocess (which may load PKCS#11 modules freely)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed: {proc.stderr}")
    return proc


def xksproxy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI as an operator would."""
    return run_module("xksproxy", *args, check=check)


def hsm_tool(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Look at one HSM of a rig alone (tests/hsm_tool.py)."""
    return run_module("tests.hsm_tool", *args, check=check)


RIG_WORKERS = 2


@dataclass
class Rig:
    dir: Path
    config: Path
    port: int
    region: str
    prefix: str
    akid: str
    secret: str
    akid2: str
    secret2: str
    other_prefix: str
    other_akid: str
    other_secret: str
    metrics_port: int

    def credentials(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.dir / "credentials.json").read_text())
        return data


# Keys the suite relies on, made once: id -> usage (and "disabled" is disabled after creation).
RIG_KEYS = {"enc-only": "encrypt", "dec-only": "decrypt", "no-usage": "none", "disabled": None}


def make_rig(directory: Path, port: int, emulate: str | None = None) -> Rig:
    """The suite's rig; *emulate*: the HSM behaves as that vendor profile (dev-setup --emulate)."""
    extra = () if emulate is None else ("--emulate", emulate)
    out = xksproxy("dev-setup", str(directory), "--port", str(port), *extra).stdout
    kms = json.loads(out)
    cfg = directory / "xksproxy.toml"
    for key, usage in RIG_KEYS.items():
        xksproxy("keys", "create", key, "-c", str(cfg), "--usage", usage or "encrypt,decrypt")
    xksproxy("keys", "disable", "disabled", "-c", str(cfg))
    second = json.loads(
        xksproxy("credentials", "add", "-c", str(cfg), "--prefix", "example/xks").stdout
    )
    other = json.loads(
        xksproxy("credentials", "add", "-c", str(cfg), "--prefix", "tenant-b").stdout
    )
    xksproxy("credentials", "add", "-c", str(cfg), "--prefix", "off")
    metrics_port = free_port()
    # Two workers whatever the machine: the shared server exercises the supervisor, SO_REUSEPORT
    # and multiprocess metrics in every test that uses it.
    text = cfg.read_text()
    assert "\n[server]\n" in text
    cfg.write_text(text.replace("\n[server]\n", f"\n[server]\nworkers = {RIG_WORKERS}\n", 1))
    with cfg.open("a") as f:
        f.write('\n[prefixes."off"]\nenabled = false\n')
        f.write(f"\n[metrics]\nport = {metrics_port}\n")
    cred = kms["XksProxyAuthenticationCredential"]
    return Rig(
        dir=directory,
        config=cfg,
        port=port,
        region=kms["Region"],
        prefix="example/xks",
        akid=cred["AccessKeyId"],
        secret=cred["RawSecretAccessKey"],
        akid2=second["XksProxyAuthenticationCredential"]["AccessKeyId"],
        secret2=second["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        other_prefix="tenant-b",
        other_akid=other["XksProxyAuthenticationCredential"]["AccessKeyId"],
        other_secret=other["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        metrics_port=metrics_port,
    )


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    workers: int = 1

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def sighup(self) -> None:
        """Reload, and wait until every worker says it applied (or rejected) the reload."""
        before = self.log_text().count('"reload_')
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log_text().count('"reload_') < before + self.workers:
            if time.monotonic() > deadline:
                raise AssertionError("the proxy did not log a reload")
            time.sleep(0.02)


def workers_of(config: Path) -> int:
    """The worker processes a configuration asks for (default: the CPUs we may use)."""
    workers: int = tomllib.loads(config.read_text()).get("server", {}).get("workers", 0)
    return workers or len(os.sched_getaffinity(0))


def spawn_proxy(
    config: Path,
    stdout: Path,
    *,
    stderr: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """`serve -c config`, its output to *stdout* (and *stderr*, or with it); *open_files*: the
    soft and hard open-file limits it starts with.  Not waited for: see :func:`until_in`."""

    def limits() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    with stdout.open("wb") as out, (stderr or stdout).open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT if stderr is None else err,
            cwd=ROOT,
            preexec_fn=limits,
        )


def until(cond: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll *cond* until it is true; AssertionError naming *what* after *timeout* seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def until_in(path: Path, needle: str, timeout: float = 30) -> None:
    """Wait until the text of *path* holds *needle* (a proxy's log: '"listening"')."""
    until(lambda: path.exists() and needle in path.read_text(errors="replace"), needle, timeout)


def write_secret(path: Path, text: str) -> Path:
    """Write a file the proxy reads as a secret: readable by its owner only, as it requires."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


def start_server(config: Path, port: int, log: Path) -> Server:
    with log.open("wb") as logf:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited {proc.returncode}: {log.read_text()}")
        # "listening" once every worker listens (and can take a reload).
        if '"listening"' in log.read_text(errors="replace"):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return Server(proc, port, log, workers_of(config))
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"proxy did not listen on {port}: {log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return make_rig(tmp_path_factory.mktemp("rig"), free_port())


@pytest.fixture(scope="session")
def server(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(rig.config, rig.port, tmp_path_factory.mktemp("logs") / "proxy.log")
    yield srv
    stop_server(srv)


@pytest.fixture
def client(rig: Rig, server: Server) -> XksClient:
    return XksClient("127.0.0.1", server.port, rig.prefix, rig.akid, rig.secret, rig.region)
