"""The systemd unit lints clean and runs the node the way the supervisor expects."""
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "robustdice-node.service"


def _service_section():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser["Service"]


def test_unit_asks_for_readiness_watchdog_and_restart():
    service = _service_section()
    assert service["Type"] == "notify"          # the supervisor sends READY=1
    assert int(service["WatchdogSec"]) > 0      # and WATCHDOG=1 at half of it
    assert service["Restart"] == "on-failure"   # a dead child makes the node exit non-zero
    assert "robustdice-node --peers" in service["ExecStart"]
    assert int(service["TimeoutStopSec"]) >= 5  # the node's own stop budget


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists: point it at this venv's robustdice-node.
    node = Path(sys.executable).with_name("robustdice-node")
    assert node.exists(), "robustdice-node console script missing from the venv"
    text = UNIT.read_text().replace("/opt/robustdice/.venv/bin/robustdice-node", str(node))
    text = text.replace("User=robustdice\n", "User=root\n").replace("Group=robustdice\n", "Group=root\n")
    unit = tmp_path / "robustdice-node.service"
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines()
                if "robustdice-node.service" in line and "Documentation" not in line]
    assert result.returncode == 0 and not problems, result.stderr
