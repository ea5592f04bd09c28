"""Process hardening: no process of the proxy may dump core (secrets and plaintext in memory)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, Server, free_port, make_rig


def core_limit(pid: int) -> tuple[str, str]:
    """The soft and hard core-file size limits of *pid*, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError(f"no core limit for {pid}")


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in found]


def test_the_supervisor_and_every_worker_have_core_dumps_off(server: Server) -> None:
    pids = [server.proc.pid, *children(server.proc.pid)]
    assert len(pids) == 1 + server.workers
    for pid in pids:
        assert core_limit(pid) == ("0", "0"), pid


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


def open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files limit for {pid}")


def test_the_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Started with a soft limit of 256 (hard 4096), the supervisor and its workers run with
    4096: accept() then fails for want of descriptors only at the hard limit."""
    import resource

    rig = make_rig(tmp_path / "rig", free_port())

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xksproxy", "serve", "-c", str(rig.config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=low_soft_limit,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while '"listening"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for pid in [proc.pid, *children(proc.pid)]:
            assert open_files_limit(pid) == ("4096", "4096"), pid
    finally:
        proc.terminate()
        proc.wait(30)
