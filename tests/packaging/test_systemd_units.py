"""The systemd units in packaging/ (and the one `slmops agent install` writes) pass `systemd-analyze verify`.

`systemd-analyze verify` exits 0 even for an unknown key or a bad value; it only prints them. So a unit passes
when verify prints nothing, except, on systemd older than 254, that it ignores RestartSteps= and
RestartMaxDelaySec= (the growing restart delay, a newer feature; older systemd restarts after a fixed RestartSec=).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.cli import run
from slmops.cli.agent import render_agent_unit
from tests.packaging._env import REPO

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt: systemd)")
UNITS = REPO / "packaging" / "systemd"
NEWER_KEYS = ("RestartSteps", "RestartMaxDelaySec")
# an executable that exists here, for ExecStart= (verify checks that the command is executable)
EXE = str(Path(sys.executable).with_name("slmops"))


def _systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"systemd (\d+)", out)
    assert found is not None, out
    return int(found.group(1))


def _verify(tmp_path: Path, name: str, text: str) -> list[str]:
    """What `systemd-analyze verify` says about ``text`` as unit ``name``, less the known notes of old versions."""
    assert SYSTEMD_ANALYZE is not None
    unit = tmp_path / name
    unit.write_text(text)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if _systemd_version() < 254:
        lines = [line for line in lines if not any(f"Unknown key '{key}'" in line for key in NEWER_KEYS)]
    assert done.returncode == 0 or lines, done
    return lines


@pytest.mark.parametrize("name", ["slmops-server.service", "slmops-agent.service"])
def test_the_packaged_units_verify_clean(tmp_path: Path, name: str) -> None:
    text = (UNITS / name).read_text().replace("/opt/slmops/bin/slmops", EXE)

    assert _verify(tmp_path, name, text) == []


@pytest.mark.parametrize("name", ["slmops-server.service", "slmops-agent.service"])
def test_the_units_are_hardened_and_restart_with_a_backoff(name: str) -> None:
    text = (UNITS / name).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(("#", " ")))

    assert settings["Restart"] == "on-failure"
    assert settings["RestartSec"] and settings["RestartSteps"] and settings["RestartMaxDelaySec"]
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert settings[key] == value, key
    assert settings["StateDirectory"] in ("slmops", "slmops-agent")


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    # the check above can fail: verify reports a bad value and an unknown key although it exits 0
    text = render_agent_unit(EXE).replace("ProtectSystem=strict", "ProtectSystem=stricter") + "Bogus=1\n"

    lines = _verify(tmp_path, "slmops-agent.service", text)

    assert any("protect system" in line.lower() for line in lines), lines
    assert any("Bogus" in line for line in lines), lines


def test_the_unit_agent_install_writes_verifies_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    argv = ["agent", "install", "--server", "http://cp.example:8080", "--enroll-token", "T0K3N"]
    assert run([*argv, "--label", "site=berlin-3", "--root", str(root), "--exe", EXE]) == 0

    written = (root / "etc/systemd/system/slmops-agent.service").read_text()

    assert _verify(tmp_path, "slmops-agent.service", written) == []
