"""The container image's parts, without a container engine (docs/docker.md).

``docker/entrypoint.sh`` runs here on the host, with the virtualenv's ``xksproxy`` first on
PATH, exactly as the image runs it: no configuration makes a SoftHSM rig and serves it, a
configuration named by ``XKSPROXY_CONFIG`` is served as is.  ``docker/healthcheck.py`` is run
against those real proxies, healthy and not.  The Dockerfile is checked for agreement with the
scripts (paths, user, ports) in tests/unit/test_dockerfile.py, never built:
``scripts/docker-build-check`` does that, opt-in.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import xksproxy
from tests.support.configs import Settings, read_config, write_config
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.rigs import DevRig, dev_rig, ports_of, variant
from tests.support.xks_client import XksClient
from xksproxy import __version__
from xksproxy.http.certs import Authority

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
VENV_BIN = Path(sys.executable).parent
MOUNTED_CONFIG = Path("/etc/xksproxy/xksproxy.toml")


def host_env(**extra: str) -> dict[str, str]:
    """This environment without XKSPROXY_* variables, the virtualenv first on PATH, plus *extra*."""
    if not (VENV_BIN / "xksproxy").exists():
        pytest.fail(f"no xksproxy next to {sys.executable}: install the project in its venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XKSPROXY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """The health check as the image runs it (isolated Python), with only *env* of ours."""
    return subprocess.run(
        [sys.executable, "-I", str(HEALTHCHECK)],
        env=host_env(**env),
        capture_output=True,
        text=True,
        timeout=20,
    )


@dataclass
class Served:
    """``docker/entrypoint.sh`` serving on the host: after its exec, the proxy itself."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as ``docker stop`` sends it; the exit status.  Fails if anything started
        here (the shell, the proxy, its workers: one process group) is left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("the proxy did not stop within 20 s of SIGTERM") from None
        deadline = time.monotonic() + 5
        while _group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError("processes were left running after the proxy exited")
            time.sleep(0.05)
        return code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(directory: Path, port: int, env: dict[str, str]) -> Served:
    """Start the entrypoint with no arguments (the image's CMD is ``serve``, the same)."""
    directory.mkdir(parents=True, exist_ok=True)
    out, err = directory / "stdout", directory / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        # A process group of its own, so that stop() sees (and cleans up) all it started.
        proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT)],
            stdout=o,
            stderr=e,
            env=env,
            cwd=directory,
            start_new_session=True,
        )
    served = Served(proc, port, out, err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"the entrypoint exited {proc.returncode}: {err.read_text()} {out.read_text()}"
            )
        if '"listening"' in served.stdout():
            return served
        time.sleep(0.05)
    served.stop()
    raise AssertionError(f"nothing listened on {port}: {err.read_text()}")


def ping(port: int, context: ssl.SSLContext | None = None) -> int:
    scheme = "https" if context else "http"
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(f"{scheme}://127.0.0.1:{port}/ping", timeout=10) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    return Authority.create("xks.example.com", ca=False).write(directory, "server")


@pytest.fixture(scope="module", autouse=True)
def no_mounted_config() -> None:
    # Both scripts serve /etc/xksproxy/xksproxy.toml when it exists, as in the image.
    if MOUNTED_CONFIG.exists():
        pytest.skip(f"{MOUNTED_CONFIG} exists on this machine: the scripts would serve it")


# --- dev-setup --host / --metrics-host / --metrics-port -----------------------------------


@pytest.mark.parametrize(
    ("host", "endpoint"),
    [("0.0.0.0", "http://127.0.0.1"), ("::", "http://[::1]"), ("localhost", "http://localhost")],
)
def test_dev_setup_host_goes_into_the_rig(tmp_path: Path, host: str, endpoint: str) -> None:
    port = free_port()
    proc = xksproxy("dev-setup", str(tmp_path / "rig"), "--host", host, "--port", str(port))
    assert json.loads(proc.stdout)["XksProxyUriEndpoint"] == f"{endpoint}:{port}"
    config = tomllib.loads((tmp_path / "rig" / "xksproxy.toml").read_text())
    assert config["server"]["host"] == host


def test_dev_setup_metrics_host_and_port_go_into_the_rig(tmp_path: Path) -> None:
    metrics_port = free_port()
    args = ("--metrics-host", "0.0.0.0", "--metrics-port", str(metrics_port))
    xksproxy("dev-setup", str(tmp_path / "rig"), *args)
    config = tomllib.loads((tmp_path / "rig" / "xksproxy.toml").read_text())
    assert config["metrics"] == {"host": "0.0.0.0", "port": metrics_port}
    assert config["server"]["host"] == "127.0.0.1"


def test_dev_setup_by_default_listens_on_loopback_with_no_metrics_table(tmp_path: Path) -> None:
    xksproxy("dev-setup", str(tmp_path / "rig"), "--port", str(free_port()))
    config = tomllib.loads((tmp_path / "rig" / "xksproxy.toml").read_text())
    assert config["server"]["host"] == "127.0.0.1"
    assert "metrics" not in config


@pytest.mark.parametrize("option", ["--host", "--metrics-host"])
@pytest.mark.parametrize("host", ['a"b', "", "two words", "-dash", "x" * 254])
def test_dev_setup_bad_host_fails_in_one_line_before_making_anything(
    tmp_path: Path, option: str, host: str
) -> None:
    proc = xksproxy("dev-setup", str(tmp_path / "rig"), f"{option}={host}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert option in proc.stderr
    assert not (tmp_path / "rig").exists()


def test_dev_setup_in_a_place_it_cannot_create_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = xksproxy("dev-setup", str(tmp_path / "file" / "rig"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("xksproxy: error: cannot create"), proc.stderr
    assert "Traceback" not in proc.stderr


# --- the entrypoint with no configuration: a rig ---------------------------------------------


@dataclass
class RigServed:
    served: Served
    rig: Path
    metrics_port: int
    env: dict[str, str]


@pytest.fixture(scope="module")
def rig_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RigServed]:
    home = tmp_path_factory.mktemp("entrypoint-rig")
    port, metrics_port = free_port(), free_port()
    env = host_env(
        XKSPROXY_RIG_DIR=str(home / "rig"),
        XKSPROXY_RIG_HOST="127.0.0.1",  # the image's default is 0.0.0.0; tests stay local
        XKSPROXY_RIG_PORT=str(port),
        XKSPROXY_RIG_METRICS_PORT=str(metrics_port),
        XKSPROXY_WORKERS="2",
    )
    served = serve(home / "run", port, env)
    yield RigServed(served, home / "rig", metrics_port, env)
    served.stop()


def console_json(served: Served) -> dict[str, Any]:
    """The JSON dev-setup printed first on stdout (the proxy's log lines follow it)."""
    obj, _ = json.JSONDecoder().raw_decode(served.stdout())
    assert isinstance(obj, dict)
    return obj


def test_entrypoint_without_a_config_prints_the_rigs_kms_console_json(
    rig_served: RigServed,
) -> None:
    printed = console_json(rig_served.served)
    assert printed == json.loads((rig_served.rig / "kms-xks-config.json").read_text())
    assert printed["XksProxyUriEndpoint"] == f"http://127.0.0.1:{rig_served.served.port}"


def test_entrypoint_says_on_stderr_that_it_serves_a_rig(rig_served: RigServed) -> None:
    err = rig_served.served.err.read_text()
    assert f"serving a SoftHSM rig in {rig_served.rig}" in err


def test_entrypoint_rig_listens_where_the_environment_says(rig_served: RigServed) -> None:
    config = tomllib.loads((rig_served.rig / "xksproxy.toml").read_text())
    assert config["server"]["host"] == "127.0.0.1"
    assert config["server"]["port"] == rig_served.served.port
    assert config["metrics"] == {"host": "127.0.0.1", "port": rig_served.metrics_port}


def test_entrypoint_rig_answers_ping(rig_served: RigServed) -> None:
    assert ping(rig_served.served.port) == 200


def test_entrypoint_rig_serves_requests_signed_with_the_printed_credential(
    rig_served: RigServed,
) -> None:
    cred = console_json(rig_served.served)["XksProxyAuthenticationCredential"]
    client = XksClient(
        "127.0.0.1",
        rig_served.served.port,
        "example/xks",
        cred["AccessKeyId"],
        cred["RawSecretAccessKey"],
    )
    enc = client.encrypt("foo", plaintext="aGVsbG8=")
    assert enc.status == 200, enc.body
    fields = {k: enc.json[k] for k in ("ciphertext", "ciphertextMetadata")}
    fields.update({k: enc.json[k] for k in ("initializationVector", "authenticationTag")})
    dec = client.decrypt("foo", **fields)
    assert (dec.status, dec.json) == (200, {"plaintext": "aGVsbG8="})


def test_entrypoint_execs_the_proxy_so_signals_reach_it(rig_served: RigServed) -> None:
    argv = Path(f"/proc/{rig_served.served.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in argv
    assert str(rig_served.rig / "xksproxy.toml").encode() in argv
    assert str(ENTRYPOINT).encode() not in argv  # not the shell: it was replaced
    assert Path(argv[0].decode()).name.startswith("python")


def test_entrypoint_passes_xksproxy_workers_on(rig_served: RigServed) -> None:
    assert rig_served.served.stdout().count('"worker_started"') == 2


def test_healthcheck_finds_the_rig_and_passes(rig_served: RigServed) -> None:
    proc = healthcheck(XKSPROXY_RIG_DIR=str(rig_served.rig))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == f"ok: GET http://127.0.0.1:{rig_served.served.port}/ping: 200\n"


def test_healthcheck_ignores_proxy_variables(rig_served: RigServed) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    proc = healthcheck(
        XKSPROXY_RIG_DIR=str(rig_served.rig),
        HTTP_PROXY=nowhere,
        http_proxy=nowhere,
        HTTPS_PROXY=nowhere,
        https_proxy=nowhere,
    )
    assert proc.returncode == 0, proc.stdout


def test_healthcheck_fails_on_a_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}/ping"
    proc = healthcheck(XKSPROXY_HEALTHCHECK_URL=url)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"unhealthy: GET {url}: "), proc.stdout


def test_healthcheck_fails_without_a_configuration(tmp_path: Path) -> None:
    proc = healthcheck(XKSPROXY_RIG_DIR=str(tmp_path / "no-rig"))
    assert proc.returncode == 1
    assert "cannot read the configuration" in proc.stdout


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/ping"])
def test_healthcheck_asks_only_http_urls(url: str) -> None:
    proc = healthcheck(XKSPROXY_HEALTHCHECK_URL=url)
    assert proc.returncode == 1
    assert "only http:// and https://" in proc.stdout


def mutual_tls_config(directory: Path, metrics: dict[str, Any]) -> Path:
    """A configuration with mutual TLS on, as the health check reads it (files never opened;
    nothing listens on its API port)."""
    tls = {
        "cert_file": "c.pem",
        "key_file": "k.pem",
        "client_ca_file": "ca.pem",
        "client_subject_name": "cks.kms.us-east-1.amazonaws.com",
    }
    data = {"server": {"port": free_port(), "tls": tls}, "metrics": metrics}
    return write_config(directory / "mtls.toml", data)


def test_healthcheck_under_mutual_tls_reads_the_metrics(
    rig_served: RigServed, tmp_path: Path
) -> None:
    config = mutual_tls_config(tmp_path, {"port": rig_served.metrics_port})
    proc = healthcheck(XKSPROXY_CONFIG=str(config))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == f"ok: GET http://127.0.0.1:{rig_served.metrics_port}/metrics: 200\n"


def test_healthcheck_under_mutual_tls_without_metrics_says_what_to_set(tmp_path: Path) -> None:
    proc = healthcheck(XKSPROXY_CONFIG=str(mutual_tls_config(tmp_path, {"enabled": False})))
    assert proc.returncode == 1
    assert "set XKSPROXY_HEALTHCHECK_URL" in proc.stdout


# --- the entrypoint with a configuration ---------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> DevRig:
    return dev_rig(tmp_path_factory.mktemp("mounted") / "rig")


def served_variant(
    rig: DevRig, name: str, settings: Settings | None = None
) -> tuple[Path, int, int]:
    """A copy of the rig's configuration on new ports (credentials and token shared): its
    path, port and metrics port."""
    config = variant(rig.config, name, settings)
    return (config, *ports_of(config))


@dataclass
class ConfigServed:
    served: Served
    config: Path
    metrics_port: int
    rig_dir: Path
    cert: Path | None = None


@pytest.fixture(scope="module")
def tls_served(rig: DevRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServed]:
    home = tmp_path_factory.mktemp("entrypoint-tls")
    cert, key = make_self_signed(home)
    tls = {"cert_file": str(cert), "key_file": str(key)}
    config, port, metrics_port = served_variant(rig, "tls", {"server": {"tls": tls}})
    env = host_env(XKSPROXY_CONFIG=str(config), XKSPROXY_RIG_DIR=str(home / "rig"))
    served = serve(home / "run", port, env)
    yield ConfigServed(served, config, metrics_port, home / "rig", cert)
    served.stop()


def test_entrypoint_serves_the_configuration_it_is_given(tls_served: ConfigServed) -> None:
    context = ssl.create_default_context(cafile=tls_served.cert)
    context.check_hostname = False  # the certificate names xks.example.com
    assert ping(tls_served.served.port, context) == 200


def test_entrypoint_with_a_configuration_makes_no_rig(tls_served: ConfigServed) -> None:
    assert not tls_served.rig_dir.exists()
    assert "rig" not in tls_served.served.err.read_text()


def test_healthcheck_passes_over_tls_with_a_self_signed_certificate(
    tls_served: ConfigServed,
) -> None:
    proc = healthcheck(XKSPROXY_CONFIG=str(tls_served.config))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == f"ok: GET https://127.0.0.1:{tls_served.served.port}/ping: 200\n"


def test_healthcheck_url_overrides_the_configuration(tls_served: ConfigServed) -> None:
    url = f"https://127.0.0.1:{tls_served.served.port}/ping"
    proc = healthcheck(XKSPROXY_CONFIG="/nonexistent.toml", XKSPROXY_HEALTHCHECK_URL=url)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture(scope="module")
def no_hsm_served(rig: DevRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfigServed]:
    """The proxy with its one HSM unavailable (no such token): it listens and /ping says 503."""
    home = tmp_path_factory.mktemp("entrypoint-no-hsm")
    assert [h["token_label"] for h in read_config(rig.config)["hsms"]] == ["xksproxy"]
    no_token = {"hsms": {"token_label": "no-such-token"}}
    config, port, metrics_port = served_variant(rig, "no-hsm", no_token)
    served = serve(home / "run", port, host_env(XKSPROXY_CONFIG=str(config)))
    yield ConfigServed(served, config, metrics_port, home / "rig")
    served.stop()


def test_healthcheck_fails_while_no_hsm_can_serve(no_hsm_served: ConfigServed) -> None:
    assert ping(no_hsm_served.served.port) == 503
    proc = healthcheck(XKSPROXY_CONFIG=str(no_hsm_served.config))
    assert proc.returncode == 1
    assert proc.stdout == (
        f"unhealthy: GET http://127.0.0.1:{no_hsm_served.served.port}/ping: "
        "503 Service Unavailable\n"
    )


def test_healthcheck_under_mutual_tls_fails_while_no_hsm_can_serve(
    no_hsm_served: ConfigServed, tmp_path: Path
) -> None:
    config = mutual_tls_config(tmp_path, {"port": no_hsm_served.metrics_port})
    proc = healthcheck(XKSPROXY_CONFIG=str(config))
    assert proc.returncode == 1
    assert proc.stdout.endswith("no HSM is ACTIVE or DEGRADED in xks_hsm_state\n"), proc.stdout


def test_entrypoint_proxy_stops_on_sigterm_with_status_0(rig: DevRig, tmp_path: Path) -> None:
    config, port, _ = served_variant(rig, "stop")
    served = serve(tmp_path / "run", port, host_env(XKSPROXY_CONFIG=str(config)))
    assert ping(port) == 200
    assert served.stop() == 0
    assert port_is_closed(port)


def test_entrypoint_with_a_missing_configuration_exits_78_and_makes_no_rig(
    tmp_path: Path,
) -> None:
    env = host_env(
        XKSPROXY_CONFIG=str(tmp_path / "missing.toml"), XKSPROXY_RIG_DIR=str(tmp_path / "rig")
    )
    proc = entrypoint(env=env)
    assert proc.returncode == 78
    assert "missing.toml" in proc.stderr
    assert not (tmp_path / "rig").exists()


def test_entrypoint_that_cannot_make_a_rig_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = entrypoint(env=host_env(XKSPROXY_RIG_DIR=str(tmp_path / "file" / "rig")))
    assert proc.returncode == 1
    assert "needs a directory writable by" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the entrypoint's other commands ---------------------------------------------------------


def test_entrypoint_runs_xksproxy_commands() -> None:
    proc = entrypoint("--version", env=host_env())
    assert (proc.returncode, proc.stdout) == (0, f"xksproxy {__version__}\n")


def test_entrypoint_runs_kms_config_on_a_rig(rig: DevRig) -> None:
    config = str(rig.dir / "xksproxy.toml")
    proc = entrypoint("kms-config", "-c", config, "--prefix", "example/xks", env=host_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["XksProxyUriPath"] == "/example/xks/kms/xks/v1"


def test_entrypoint_runs_anything_else_as_is() -> None:
    proc = entrypoint("echo", "hello", env=host_env())
    assert (proc.returncode, proc.stdout) == (0, "hello\n")
