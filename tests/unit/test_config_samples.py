"""Every sample in config/ loads and validates, and says what its HSM needs (IV, login).

The vendors' PKCS#11 libraries are not on this machine: each sample is loaded with its module
path(s) pointing at a stand-in file, and its secrets' sources provided.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import edit_config
from tests.support.files import write_secret
from tests.support.paths import ROOT
from xksproxy.configfile import load_config
from xksproxy.errors import ConfigError

SAMPLES = sorted((ROOT / "config").glob("*.toml"))
VENDOR_OF = {"softhsm": "softhsm", "luna": "luna", "cloudhsm": "cloudhsm", "nshield": "nshield"}
# The gcm_iv each sample's HSMs load with (docs/vendors.md): CloudHSM has one documented behaviour
# and pins it; Luna depends on FIPS policy and firmware, nShield is unconfirmed: both probe.
GCM_IV_OF = {"softhsm": "auto", "luna": "auto", "cloudhsm": "hsm-written", "nshield": "auto"}
PEMS = ("fullchain.pem", "privkey.pem")  # the samples' TLS files


def stand_in(sample: Path, tmp_path: Path) -> Path:
    """*sample* in *tmp_path* with its modules and TLS files replaced by stand-in files (read as
    data and written back: comments aside, the same configuration)."""
    module = tmp_path / "libvendor-pkcs11.so"
    module.write_bytes(b"\x7fELF")
    (tmp_path / "fullchain.pem").write_text("stand-in")
    write_secret(tmp_path / "privkey.pem", "stand-in")
    moved = {f"/etc/xksproxy/tls/{name}": str(tmp_path / name) for name in PEMS}
    moved["/etc/xksproxy/credentials.json"] = str(tmp_path / "credentials.json")

    def relocate(data: dict[str, Any]) -> None:
        for hsm in data["hsms"]:
            hsm["module"] = str(module)
        tls = data.get("server", {}).get("tls", {})
        for key, value in tls.items():
            tls[key] = moved.get(value, value)
        sigv4 = data.get("sigv4", {})
        if "credentials_file" in sigv4:
            sigv4["credentials_file"] = moved.get(
                sigv4["credentials_file"], sigv4["credentials_file"]
            )

    return edit_config(sample, change=relocate, to=tmp_path / sample.name)


def test_there_is_a_sample_per_vendor() -> None:
    assert {p.stem for p in SAMPLES} >= set(VENDOR_OF)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_loads(sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    for var in re.findall(r'pin_env = "([A-Z0-9_]+)"', sample.read_text()):
        monkeypatch.setenv(var, "0123456789")
    cfg = load_config(stand_in(sample, tmp_path))
    assert cfg.hsms
    for hsm in cfg.hsms:
        assert hsm.vendor == VENDOR_OF[sample.stem]
        assert hsm.gcm_iv == GCM_IV_OF[sample.stem]
        if hsm.pin_file is not None and "CREDENTIALS_DIRECTORY" in sample.read_text():
            assert hsm.pin_file.parent == creds
    if len(cfg.hsms) > 1:
        assert all(h.call_timeout_ms < cfg.server.request_deadline_ms for h in cfg.hsms)


@pytest.mark.parametrize(
    "sample", [p for p in SAMPLES if p.stem != "softhsm"], ids=lambda p: p.stem
)
def test_production_samples_note_iv_and_login(sample: Path) -> None:
    comments = "\n".join(line for line in sample.read_text().splitlines() if line.startswith("#"))
    assert "IV handling:" in comments
    assert "Login:" in comments
    assert "not been run against" in comments  # say what was and was not tried
    assert "docs/vendors.md" in comments
    assert "not supported" not in comments.lower()  # HSM-generated IVs are, since gcm_iv


@pytest.mark.parametrize(
    "sample", [p for p in SAMPLES if p.stem != "softhsm"], ids=lambda p: p.stem
)
def test_production_samples_commented_gcm_iv_lines_load(
    sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample's commented-out ``# gcm_iv = "..."`` lines, uncommented, still load."""
    text = sample.read_text()
    commented = re.findall(r'(?m)^# (gcm_iv = "([a-z-]+)")', text)
    for line, _ in commented:
        text = text.replace(f"# {line}", line)
    path = tmp_path / "uncommented" / sample.name
    path.parent.mkdir()
    path.write_text(text)
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    for var in re.findall(r'pin_env = "([A-Z0-9_]+)"', text):
        monkeypatch.setenv(var, "0123456789")
    cfg = load_config(stand_in(path, tmp_path))
    expected = {mode for _, mode in commented} or {GCM_IV_OF[sample.stem]}
    assert {h.gcm_iv for h in cfg.hsms} == expected


def test_docs_vendors_names_every_mode_and_links_only_to_files_here() -> None:
    page = ROOT / "docs" / "vendors.md"
    text = page.read_text()
    for mode in ("auto", "caller", "hsm-written", "hsm-appended"):
        assert f"`{mode}`" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert not target.startswith(("http:", "https:", "/")), target
        assert (page.parent / target).resolve().is_file(), target


def test_credentials_directory_needs_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    sample = ROOT / "config" / "luna.toml"
    with pytest.raises(ConfigError) as err:
        load_config(stand_in(sample, tmp_path))
    assert any(
        "pin_file: uses ${CREDENTIALS_DIRECTORY} but $CREDENTIALS_DIRECTORY is not set" in p
        for p in err.value.problems
    ), err.value.problems
