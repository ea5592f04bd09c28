"""Process hardening: no process of the proxy may dump core (secrets and plaintext in memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT
from tests.support.proxies import Server, spawn_proxy
from tests.support.rigs import make_rig
from tests.support.waiting import until_in


def limit(pid: int, name: str) -> tuple[str, str]:
    """The soft and hard limits called *name* ("Max open files") of *pid*, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[len(name) :].split()[:2]
            return soft, hard
    raise AssertionError(f"no {name!r} for {pid}")


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in found]


def test_the_supervisor_and_every_worker_have_core_dumps_off(server: Server) -> None:
    pids = [server.proc.pid, *children(server.proc.pid)]
    assert len(pids) == 1 + server.workers
    for pid in pids:
        assert limit(pid, "Max core file size") == ("0", "0"), pid


def test_every_command_is_not_dumpable_before_it_reads_a_secret() -> None:
    """A command process (here `xksproxy --version`'s, through main) marks itself not
    dumpable and sets its core limit to 0 before it parses its arguments."""
    probe = (
        "import sys\n"
        "from xksproxy import cli, hardening\n"
        "try:\n"
        "    cli.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import resource\n"
        "print(hardening.dumpable(), resource.getrlimit(resource.RLIMIT_CORE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "False (0, 0)"
    # Without the call the same interpreter is dumpable: the check above can fail.
    plain = subprocess.run(
        [sys.executable, "-c", "from xksproxy import hardening; print(hardening.dumpable())"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert plain.strip() == "True"


def test_the_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Started with a soft limit of 256 (hard 4096), the supervisor and its workers run with
    4096: accept() then fails for want of descriptors only at the hard limit."""
    rig = make_rig(tmp_path / "rig")
    log = tmp_path / "proxy.log"
    proc = spawn_proxy(rig.config, log, open_files=(256, 4096))
    try:
        until_in(log, '"listening"')
        for pid in [proc.pid, *children(proc.pid)]:
            assert limit(pid, "Max open files") == ("4096", "4096"), pid
    finally:
        proc.terminate()
        proc.wait(30)
