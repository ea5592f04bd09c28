"""The container image's definition agrees with its scripts (docs/docker.md), read as text:
the Dockerfile's paths, user, ports and signals, .dockerignore, the hashed lock, and the
commands the entrypoint passes to xksproxy.  The scripts themselves, run on the host against
real proxies: tests/integration/test_docker.py."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib

from packaging.requirements import Requirement

from tests.support.paths import ROOT
from xksproxy.cli import build_parser

DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
LOCK = ROOT / "docker" / "requirements.txt"


def test_entrypoint_passes_every_cli_command_to_xksproxy() -> None:
    parser = build_parser()
    commands = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    case = re.search(r"^\s*(dev-setup \|.*)\) exec xksproxy", ENTRYPOINT.read_text(), re.M)
    assert case is not None
    passed = {word.strip() for word in case.group(1).split("|")} - {"-*"}
    assert passed == commands - {"serve"}


# --- the Dockerfile agrees with the scripts --------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def runtime_stage() -> list[tuple[str, str]]:
    found = instructions()
    last_from = max(i for i, (word, _) in enumerate(found) if word == "FROM")
    return found[last_from:]


def only(word: str) -> str:
    found = [args for w, args in runtime_stage() if w == word]
    assert len(found) == 1, (word, found)
    return found[0]


def copied_to(source: str) -> str:
    for word, args in runtime_stage():
        parts = shlex.split(args)
        if word == "COPY" and source in parts:
            return parts[-1]
    raise AssertionError(f"{source} is not copied into the image")


def test_dockerfile_healthcheck_runs_the_healthcheck_script() -> None:
    command = only("HEALTHCHECK").split(" CMD ", 1)[1]
    assert json.loads(command) == [copied_to("docker/healthcheck.py")]
    assert HEALTHCHECK.read_text().startswith("#!/usr/bin/python3 -I\n")


def test_dockerfile_entrypoint_is_tini_then_the_entrypoint_script() -> None:
    assert json.loads(only("ENTRYPOINT")) == [
        "/usr/bin/tini",
        "--",
        copied_to("docker/entrypoint.sh"),
    ]
    assert json.loads(only("CMD")) == ["serve"]


def test_dockerfile_runs_as_the_fixed_non_root_user() -> None:
    assert only("USER") == "10001:10001"
    run = " ".join(args for word, args in runtime_stage() if word == "RUN")
    assert "groupadd --gid 10001 xksproxy" in run
    assert "useradd --uid 10001 --gid 10001" in run
    assert "install -d -o 10001 -g 10001 -m 0700 /var/lib/xksproxy" in run


def test_dockerfile_exposes_the_rigs_ports() -> None:
    assert only("EXPOSE").split() == ["8000", "9100"]
    text = ENTRYPOINT.read_text()
    assert "${XKSPROXY_RIG_PORT:-8000}" in text
    assert "${XKSPROXY_RIG_METRICS_PORT:-9100}" in text


def test_dockerfile_stops_the_proxy_with_sigterm() -> None:
    assert only("STOPSIGNAL") == "SIGTERM"


def test_dockerfile_rig_directory_is_the_scripts_default() -> None:
    env = only("ENV")
    assert "XKSPROXY_RIG_DIR=/var/lib/xksproxy/rig" in env.split()
    assert "${XKSPROXY_RIG_DIR:-/var/lib/xksproxy/rig}" in ENTRYPOINT.read_text()
    assert 'RIG_DIR = "/var/lib/xksproxy/rig"' in HEALTHCHECK.read_text()


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources: set[str] = set()
    for word, args in instructions():
        parts = shlex.split(args)
        if word == "COPY" and not any(p.startswith("--from") for p in parts):
            sources.update(p.split("/")[0] for p in parts[:-1] if not p.startswith("--"))
    assert sources <= admitted, sources - admitted
    assert not any(name.startswith(".rig") for name in admitted)


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[a-z])", LOCK.read_text()):
        head = re.match(r"^([A-Za-z0-9._-]+)==([^ \\\n]+)", block)
        if head:
            assert "--hash=sha256:" in block, head.group(1)
            pins[head.group(1).lower().replace("_", "-")] = head.group(2)
    for dependency in project["dependencies"]:
        req = Requirement(dependency)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in {LOCK.name}"
        assert req.specifier.contains(pins[name]), (name, pins[name], str(req.specifier))
