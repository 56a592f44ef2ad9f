"""The systemd unit lints clean, runs the node the way the supervisor expects, and sandboxes it
(docs/security-board.md) without taking away what a Jetson needs."""
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "robustdice-node.service"
# Issue 25: at most this by `systemd-analyze security` (0 safe .. 10 exposed; 8.5 before it).
EXPOSURE_BOUND = 3.0
# What CUDA opens on a Jetson (JetPack 4 and 5; the deploy adds JetPack 6's /dev/nvgpu/*).
JETSON_GPU_NODES = {"/dev/nvmap", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvhost-as-gpu"}


def _service_section():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser["Service"]


def _service_lines():
    """[Service] as (key, value) pairs in order: keys such as DeviceAllow= repeat."""
    pairs, section = [], None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


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


def test_sandbox_keeps_what_a_jetson_needs():
    pairs = _service_lines()
    values = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    assert values["DevicePolicy"] == ["closed"]
    allowed = {value.split()[0] for value in values["DeviceAllow"] if "rw" in value.split()[1:]}
    assert JETSON_GPU_NODES <= allowed, JETSON_GPU_NODES - allowed
    assert "yes" not in values.get("PrivateDevices", [])  # it would hide the GPU nodes
    assert "yes" not in values.get("PrivateNetwork", [])  # the mesh is TCP
    # AF_NETLINK: ZeroMQ reads the interfaces on every TCP bind and aborts without it (the handler
    # died at its bind under systemd, benchmarks/deploy_nspawn.py)
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(" ".join(values["RestrictAddressFamilies"]).split())
    assert values["ProtectSystem"] == ["strict"] and values["RuntimeDirectory"] == ["robustdice"]
    assert values["StateDirectory"] == ["robustdice"] and values["StateDirectoryMode"] == ["0700"]
    assert len(values["MemoryMax"]) == 1 and values["MemoryMax"][0] not in ("", "infinity")
    assert values["CapabilityBoundingSet"] == [""]


def _security_exposure(unit: Path):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60)
    if "offline" in result.stderr and ("unrecognized" in result.stderr or "unknown" in result.stderr):
        pytest.skip(f"this systemd-analyze has no --offline (systemd >= 250 has): {result.stderr.strip()}")
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    return float(found.group(1)), result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_exposure_is_bounded():
    exposure, report = _security_exposure(UNIT)
    assert exposure <= EXPOSURE_BOUND, report


def _syscall_set(names, seen=None):
    """System call names, with each @group expanded as this systemd-analyze knows it."""
    seen = set() if seen is None else seen
    out = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
        elif name not in seen:
            seen.add(name)
            listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                                     timeout=60)
            assert listing.returncode == 0, listing.stderr
            members = [line.strip() for line in listing.stdout.splitlines()[1:]
                       if line.strip() and not line.strip().startswith("#")]
            out |= _syscall_set(members, seen)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_system_call_filter_lets_the_node_set_its_own_scheduling():
    """ZeroMQ calls pthread_setschedparam (sched_setscheduler) in every I/O thread and aborts on
    EPERM, and the engine lowers its own priority (setpriority, sched_setscheduler): with
    `~@resources` alone the engine died at its first socket under systemd
    (benchmarks/deploy_nspawn.py). The filter is an allow list built line by line."""
    allowed = set()
    for key, value in _service_lines():
        if key != "SystemCallFilter":
            continue
        if not value:
            allowed = set()
        elif value.startswith("~"):
            allowed -= _syscall_set(value[1:].split())
        else:
            allowed |= _syscall_set(value.split())
    assert {"sched_setscheduler", "setpriority"} <= allowed
    assert "sched_setaffinity" not in allowed and "setrlimit" not in allowed  # the rest of @resources stays out
