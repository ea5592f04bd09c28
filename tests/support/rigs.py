"""The rig factory: every rig a test uses is made by :func:`dev_rig`.

It runs ``xksproxy dev-setup`` (SoftHSM tokens, credentials, keys: what an operator gets) with a
free port for the API and another for ``/metrics``, so that no rig ever holds a port some other
rig or a serving ``make run`` uses, and changes the configuration that dev-setup wrote as data
(:mod:`tests.support.configs`), never as text.  The suite's rig (:func:`make_rig`) and the
several-HSM rig (:func:`make_multi_rig`) are made by it, and :func:`variant` copies a rig's
configuration onto fresh ports.  Tests of dev-setup's own options run the command themselves.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.commands import hsm_tool, xksproxy
from tests.support.configs import Settings, edit_config, merge, read_config, write_config
from tests.support.faultlib import FaultControl
from tests.support.ports import free_ports

# Two workers whatever the machine: the shared server exercises the supervisor, SO_REUSEPORT
# and multiprocess metrics in every test that uses it.
RIG_WORKERS = 2

# Keys the suite relies on, made once: id -> usage (and "disabled" is disabled after creation).
RIG_KEYS = {"enc-only": "encrypt", "dec-only": "decrypt", "no-usage": "none", "disabled": None}


@dataclass
class DevRig:
    """What ``dev-setup`` made: the rig's directory, the KMS console JSON it printed, the ports
    it was given, and its options (ports aside: running it again with them changes nothing)."""

    dir: Path
    kms: dict[str, Any]
    port: int
    metrics_port: int
    options: tuple[str, ...]

    @property
    def config(self) -> Path:
        return self.dir / "xksproxy.toml"


def dev_rig(directory: Path, *options: str, settings: Settings | None = None) -> DevRig:
    """``xksproxy dev-setup DIRECTORY OPTIONS --port P --metrics-port M`` with free ports P and
    M, then *settings* merged into the configuration it wrote (see
    :func:`tests.support.configs.merge`)."""
    assert not {"--port", "--metrics-port"} & set(options), "the factory picks the ports"
    port, metrics_port = free_ports(2)
    ports = ("--port", str(port), "--metrics-port", str(metrics_port))
    proc = xksproxy("dev-setup", str(directory), *options, *ports, check=False)
    assert proc.returncode == 0, proc.stderr
    rig = DevRig(directory, json.loads(proc.stdout), port, metrics_port, options)
    if settings:
        edit_config(rig.config, settings)
    return rig


def variant(
    config: Path, name: str, settings: Settings | None = None, *, new_ports: bool = True
) -> Path:
    """NAME.toml beside *config* (so that its relative paths resolve alike): *config* with
    *settings* merged in, and, unless *new_ports* is false, a free port for the API and
    another for /metrics."""
    fresh: dict[str, Any] = {}
    if new_ports:
        port, metrics_port = free_ports(2)
        fresh = {"server": {"port": port}, "metrics": {"port": metrics_port}}
    data = merge(merge(read_config(config), fresh), settings or {})
    return write_config(config.parent / f"{name}.toml", data)


def ports_of(config: Path) -> tuple[int, int]:
    """The API and /metrics ports a configuration names."""
    data = read_config(config)
    return int(data["server"]["port"]), int(data["metrics"]["port"])


# ---- the suite's rig ---------------------------------------------------------------------------


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

    def variant(
        self, name: str, settings: Settings | None = None, *, new_ports: bool = True
    ) -> Path:
        """See :func:`variant`."""
        return variant(self.config, name, settings, new_ports=new_ports)


def make_rig(
    directory: Path, *, emulate: str | None = None, settings: Settings | None = None
) -> Rig:
    """The suite's rig: one HSM (behaving as vendor profile *emulate*: dev-setup --emulate),
    the keys of RIG_KEYS, a second credential of prefix example/xks, prefix tenant-b, prefix
    "off" disabled, RIG_WORKERS workers; then *settings* merged into its configuration."""
    dev = dev_rig(directory, *(() if emulate is None else ("--emulate", emulate)))
    cfg = str(dev.config)
    for key, usage in RIG_KEYS.items():
        xksproxy("keys", "create", key, "-c", cfg, "--usage", usage or "encrypt,decrypt")
    xksproxy("keys", "disable", "disabled", "-c", cfg)
    second = json.loads(xksproxy("credentials", "add", "-c", cfg, "--prefix", "example/xks").stdout)
    other = json.loads(xksproxy("credentials", "add", "-c", cfg, "--prefix", "tenant-b").stdout)
    xksproxy("credentials", "add", "-c", cfg, "--prefix", "off")
    edit_config(
        dev.config, {"server": {"workers": RIG_WORKERS}, "prefixes": {"off": {"enabled": False}}}
    )
    if settings:
        edit_config(dev.config, settings)
    cred = dev.kms["XksProxyAuthenticationCredential"]
    return Rig(
        dir=directory,
        config=dev.config,
        port=dev.port,
        region=dev.kms["Region"],
        prefix="example/xks",
        akid=cred["AccessKeyId"],
        secret=cred["RawSecretAccessKey"],
        akid2=second["XksProxyAuthenticationCredential"]["AccessKeyId"],
        secret2=second["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        other_prefix="tenant-b",
        other_akid=other["XksProxyAuthenticationCredential"]["AccessKeyId"],
        other_secret=other["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        metrics_port=dev.metrics_port,
    )


# ---- several HSMs ------------------------------------------------------------------------------


@dataclass
class MultiRig:
    """A rig of several HSMs (``dev-setup --hsms N``), each its own SoftHSM instance."""

    dir: Path
    names: list[str]
    port: int
    metrics_port: int
    kms: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.dir / "xksproxy.toml"

    def run(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``xksproxy ARGS -c CONFIG``, not checked."""
        return xksproxy(*args, "-c", str(config or self.config), check=False)

    def listing(self) -> dict[str, dict[str, Any]]:
        proc = self.run("keys", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        return {k["keyId"]: k for k in json.loads(proc.stdout)}

    def create(self, key_id: str, *args: str) -> dict[str, Any]:
        proc = self.run("keys", "create", key_id, *args)
        assert proc.returncode == 0, proc.stderr
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def control(self, name: str) -> FaultControl:
        return FaultControl(self.dir / "faults" / name)

    def all_healthy(self) -> Iterator[MultiRig]:
        """A fixture's body: every HSM healthy before and after the test."""
        for name in self.names:
            self.control(name).ok()
        yield self
        for name in self.names:
            self.control(name).ok()

    def only(self, name: str) -> Path:
        """A configuration with only HSM *name* of this rig (to act on it alone)."""

        def keep(data: dict[str, Any]) -> None:
            data["hsms"] = [t for t in data["hsms"] if t["name"] == name]

        return edit_config(self.config, change=keep, to=self.dir / f"only-{name}.toml")


def make_multi_rig(
    directory: Path, hsms: int, *options: str, settings: Settings | None = None
) -> MultiRig:
    """A rig of *hsms* HSMs made by dev-setup with *options* (and free ports)."""
    dev = dev_rig(directory, "--hsms", str(hsms), *options, settings=settings)
    names = [f"softhsm-{i}" for i in range(1, hsms + 1)]
    return MultiRig(directory, names, dev.port, dev.metrics_port, dev.kms)


def objects_everywhere(rig: MultiRig, label: str) -> dict[str, list[str]]:
    """The classes of the objects labelled *label* on each HSM of *rig*, each seen alone."""
    return {n: json.loads(hsm_tool("objects", str(rig.config), n, label).stdout) for n in rig.names}
