"""Every relative link of README.md and docs/**/*.md resolves (scripts/check-links)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT

CHECK_LINKS = ROOT / "scripts" / "check-links"


def check_links(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_LINKS), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_repository_has_no_broken_link() -> None:
    result = check_links()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_a_broken_link_and_a_broken_anchor_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs" / "guide").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "module.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text(
        "# Project\n"
        "\n"
        "[guide](docs/guide/intro.md#2-the-steps) and [code](src/module.py).\n"
        "[gone](docs/missing.md)\n"
    )
    (tmp_path / "docs" / "guide" / "intro.md").write_text(
        "# Intro\n"
        "\n"
        "## 2. The steps\n"
        "\n"
        "[back](../../README.md#project), [here](#2-the-steps), [code](../../src/module.py)\n"
        "[wrong heading](#3-the-end)\n"
        "\n"
        "```sh\n"
        "[not a link](nowhere.md)\n"
        "```\n"
        "`[not a link either](nowhere.md)` and https://example.com/ are not checked.\n"
    )
    result = check_links("--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "README.md:4: docs/missing.md",
        "docs/guide/intro.md:6: #3-the-end",
    ]


def test_links_outside_the_repository_are_broken(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.md").write_text("# Outside\n")
    (repo / "README.md").write_text("[outside](../outside.md)\n")
    result = check_links("--root", str(repo))
    assert result.returncode == 1
    assert result.stdout == "README.md:1: ../outside.md\n"
