"""The real deploy on booted machines (issue 30 item 4): two Debian containers with systemd as
PID 1, the play run against them over ssh with `become`, and the service checked under systemd.

    python benchmarks/deploy_nspawn.py --json [--cache /var/cache/robustdice-nspawn] [--keep]
                                       [--out benchmarks/results/deploy_nspawn.json]

Needs root, `debootstrap` and `systemd-nspawn` (apt-get install debootstrap systemd-container),
ssh and iproute2. Not CI: it takes minutes and changes the machine while it runs (a bridge, two
containers, cgroups), all of which it removes at the end.

What it does, each step timed:
  base tree  `debootstrap --variant=minbase` of Debian bookworm with systemd, python3-venv, sudo
             and openssh-server, cached under --cache (5-6 min once; a rerun copies it).
  boards     two copies of it, n0 and n1, each as a board comes: its own hostname, ssh host keys,
             a static address on one bridge (10.231.77.10 and .11; the controller is .1) and an
             admin user `deploy` with passwordless sudo, reached by an ssh key made for the run.
             Boards are offline: pip on them reads the controller's wheel cache and package
             indexes, bind-mounted read-only (--pip-dir, by default what this machine's pip reads).
  boot       `systemd-nspawn --boot` of each; booted means `systemctl is-system-running --wait`
             answered over ssh (running, or degraded with the failed units listed).
  plan       on the controller, as docs/deploy.md says: `robustdice keys`, `sign --new-key`,
             `partition --model digits_cnn --devices 2`, `sign --plan`, peers.yaml, `inventory`.
  play       `ansible-playbook deploy/site.yml` over ssh as `deploy`, with become (sudo): the
             user, the venv (torch from the cache), the wheel, the unit, sysctl, systemctl; then
             a second run, which must change nothing and restart nothing (same MainPID).
Checks, each with ok and what it saw:
  active     `systemctl is-active` / `is-enabled robustdice-node` on both; the unit's user,
             the live sandbox score (`systemd-analyze security`), the sysctl the play applied,
             and what the journal says about the unit at warning level.
  mesh       `robustdice status` from the controller: both nodes count on both (participants).
  frame      3 digits submitted to n1 are answered by both nodes, equal to the plain model.
  restart    `systemctl kill -s KILL robustdice-node` on n1: systemd restarts it (NRestarts + 1,
             a new MainPID, active again: kill_to_active_s), the mesh re-forms (kill_to_mesh_s)
             and a frame is answered by both again.
  reboot     `systemctl reboot` of n0: the node comes up at boot with nobody asking (enabled,
             ordered after network-online.target, finds itself by its address without --id), and
             the mesh answers a frame again (boot_to_mesh_s).
The last stdout line is the JSON object (with --json). Where booting cannot work, the file says
why (the error) and the checks are left out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import write_result

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUITE = "bookworm"
# What a board needs to be deployed to: systemd as init, Python with venv for the play's
# virtualenv, sudo for become, ssh for Ansible; iproute2 and procps for looking at it.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "sudo", "openssh-server",
            "iproute2", "procps")
BRIDGE = "rdnsbr"
SUBNET = "10.231.77"            # the bridge is .1 (the controller), board d is .10 + d
NODES = ("n0", "n1")
ADMIN = "deploy"                # the boards' admin account, which the play runs as (become: sudo)
CGROUP = "robustdice-nspawn"    # each container's cgroup (systemd is not PID 1 here: no machined)
PIP_DIRS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more")


def say(text: str) -> None:
    print(text, flush=True)


def run(argv, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


# ---------------------------------------------------------------- the base tree
def base_tree(cache: Path, mirror: str) -> dict:
    """The debootstrapped tree, made once and kept under `cache` (keyed by its package list)."""
    tree, stamp = cache / SUITE, cache / f"{SUITE}.packages"
    wanted = ",".join(PACKAGES)
    if tree.is_dir() and stamp.exists() and stamp.read_text().strip() == wanted:
        say(f"base tree: cached at {tree}")
        return {"path": str(tree), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{SUITE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    say(f"base tree: debootstrap {SUITE} into {tree} (several minutes)")
    start = time.monotonic()
    run(["debootstrap", "--variant=minbase", f"--include={wanted}", SUITE, tmp, mirror], timeout=1800)
    tmp.rename(tree)
    stamp.write_text(wanted + "\n")
    return {"path": str(tree), "cached": False, "debootstrap_s": round(time.monotonic() - start, 1)}


# ---------------------------------------------------------------- boards
class Board:
    """One container: its tree, its address, its systemd-nspawn process."""

    def __init__(self, device: int, work: Path, key: Path, pip_dirs: list[str]) -> None:
        self.id, self.device = NODES[device], device
        self.machine = f"rdns-{self.id}"
        self.tree = work / "boards" / self.id
        self.host = f"{SUBNET}.{10 + device}"
        self.key, self.pip_dirs = key, pip_dirs
        self.console = work / f"{self.id}.console.log"
        self.proc: subprocess.Popen | None = None
        self.cgroups = [Path(h) / CGROUP / self.id for h in self._hierarchies()]

    @staticmethod
    def _hierarchies() -> list[str]:
        # cgroup v1 or hybrid: systemd's named hierarchy (and the unified one, in hybrid);
        # cgroup v2 alone: the one tree.
        found = [h for h in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified") if os.path.isdir(h)]
        return found or ["/sys/fs/cgroup"]

    def prepare(self, base: Path) -> None:
        """A fresh copy of the base tree, set up as a board comes: hostname, host keys, address,
        an admin user with sudo and the controller's ssh key, pip pointed at the mounted cache."""
        shutil.rmtree(self.tree, ignore_errors=True)
        self.tree.parent.mkdir(parents=True, exist_ok=True)
        run(["cp", "-a", "--reflink=auto", base, self.tree], timeout=600)
        etc = self.tree / "etc"
        (etc / "hostname").write_text(self.machine + "\n")
        with open(etc / "hosts", "a") as hosts:
            hosts.write(f"127.0.1.1 {self.machine}\n")
        (etc / "machine-id").write_text("")  # systemd makes one at boot: two boards, two ids
        for old in etc.glob("ssh/ssh_host_*"):
            old.unlink()
        run(["ssh-keygen", "-A", "-f", self.tree])
        (etc / "systemd/network").mkdir(parents=True, exist_ok=True)
        # Before Debian's 80-container-host0.network (DHCP): a static address on the bridge.
        (etc / "systemd/network/10-robustdice-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.host}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        run(["systemctl", f"--root={self.tree}", "enable", "systemd-networkd.service"])
        run(["chroot", self.tree, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", ADMIN])
        sudoers = etc / "sudoers.d" / ADMIN
        sudoers.write_text(f"{ADMIN} ALL=(ALL) NOPASSWD:ALL\n")
        sudoers.chmod(0o440)
        ssh_dir = self.tree / "home" / ADMIN / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        run(["chroot", self.tree, "chown", "-R", f"{ADMIN}:{ADMIN}", f"/home/{ADMIN}/.ssh"])
        # Offline boards: the controller's wheels and indexes, read-only, in place of PyPI.
        lines = ["[global]", "# deploy_nspawn.py: the controller's pip cache, bind-mounted read-only"]
        indexes = [f"file:///srv/pip/{i}/simple" for i, d in enumerate(self.pip_dirs) if os.path.isdir(f"{d}/simple")]
        links = [f"/srv/pip/{i}" for i, d in enumerate(self.pip_dirs) if not os.path.isdir(f"{d}/simple")]
        if indexes:
            lines.append(f"index-url = {indexes[0]}")
            if indexes[1:]:
                lines.append("extra-index-url = " + " ".join(indexes[1:]))
        else:
            lines.append("no-index = true")
        if links:
            lines.append("find-links = " + " ".join(links))
        (etc / "pip.conf").write_text("\n".join(lines) + "\n")

    def boot(self) -> None:
        argv = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", f"--machine={self.machine}",
                f"--directory={self.tree}", f"--network-bridge={BRIDGE}", "--console=pipe"]
        argv += [f"--bind-ro={d}:/srv/pip/{i}" for i, d in enumerate(self.pip_dirs)]
        # nspawn --keep-unit runs the container in the cgroup it was started in: without one of
        # its own, both containers' systemd would share the root's. The shell enters it, then
        # becomes nspawn.
        enter = 'for cg in $RDNS_CGROUPS; do mkdir -p "$cg" && echo $$ > "$cg/cgroup.procs" || exit 1; done; exec "$@"'
        env = dict(os.environ, RDNS_CGROUPS=" ".join(map(str, self.cgroups)))
        with open(self.console, "ab") as log:
            self.proc = subprocess.Popen(["sh", "-c", enter, "sh", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def ssh(self, command: str, timeout: float = 60, check: bool = True, sudo: bool = False):
        argv = ["ssh", "-i", self.key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3",
                f"{ADMIN}@{self.host}", ("sudo " if sudo else "") + command]
        return run(argv, timeout=timeout, check=check)

    def wait_booted(self, timeout_s: float) -> dict:
        """Until ssh answers and systemd says the boot is over; the state and any failed units."""
        start = time.monotonic()

        def ssh_up():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn for {self.id} exited {self.proc.returncode}: "
                                   f"{self.console.read_text()[-2000:]}")
            try:
                return self.ssh("true", timeout=10, check=False).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        wait_for(ssh_up, timeout_s, f"ssh on {self.id}")
        state = self.ssh("systemctl is-system-running --wait", timeout=timeout_s, check=False).stdout.strip()
        failed = self.ssh("systemctl list-units --failed --plain --no-legend", check=False).stdout.split("\n")
        return {"state": state, "failed_units": [f.split()[0] for f in failed if f.strip()],
                "boot_s": round(time.monotonic() - start, 1)}

    def unit(self) -> dict[str, str]:
        out = self.ssh("systemctl show robustdice-node -p ActiveState -p SubState -p MainPID -p NRestarts "
                       "-p Result -p User -p UnitFileState", check=False).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> int | None:
        """Power the container off (SIGTERM to nspawn halts it); kill it if it will not go."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def remove_cgroups(self) -> None:
        for cg in self.cgroups:
            if cg.exists():
                for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    d.rmdir()
                cg.rmdir()
            try:
                cg.parent.rmdir()  # the shared parent, once the last board is gone
            except OSError:
                pass


def bridge(up: bool) -> None:
    if up:
        run(["ip", "link", "del", BRIDGE], check=False)
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
    else:
        run(["ip", "link", "del", BRIDGE], check=False)


# ---------------------------------------------------------------- the controller
def controller(work: Path) -> dict:
    """Keys, a signed digits_cnn plan over 2 devices, peers.yaml and the inventory, made with
    the CLI as docs/deploy.md says."""
    ctl = work / "controller"
    ctl.mkdir(parents=True)
    rd = str(BIN / "robustdice")
    import yaml
    fragment = yaml.safe_load(run([rd, "keys", "--out", "keys", "--ids", ",".join(NODES)], cwd=ctl).stdout)
    printed = run([rd, "sign", "--new-key", "operator"], cwd=ctl).stdout
    operator = re.search(r"operator_public_key:\s*(\S+)", printed)
    if operator is None:
        raise RuntimeError(f"robustdice sign --new-key printed no operator_public_key: {printed}")
    start = time.monotonic()
    # The plain command first, as the issue names it; at 2 devices its default budget (half of
    # NMR's memory) may admit no default plan, and then the next budget up that has one.
    argv = [rd, "partition", "--model", "digits_cnn", "--devices", "2", "--out", "plan", "--no-progress"]
    refused = None
    for extra in ([], ["--memory", "0.75"]):
        made = run(argv + extra, cwd=ctl, timeout=900, check=False)
        if made.returncode == 0:
            break
        refused = refused or made.stderr.strip().splitlines()[-1]
        say(f"  partition {' '.join(extra) or '(defaults)'} refused: {made.stderr.strip()[-300:]}")
    else:
        raise RuntimeError(f"robustdice partition failed: {made.stderr.strip()[-2000:]}")
    partition_s = time.monotonic() - start
    run([rd, "sign", "--plan", "plan", "--key", "operator/operator.key_secret"], cwd=ctl)
    for device, peer in enumerate(fragment["peers"]):
        peer["host"] = f"{SUBNET}.{10 + device}"
    peers = {"version": 1, "plan": "plan/", "operator_public_key": operator.group(1).strip('"'), **fragment}
    (ctl / "peers.yaml").write_text(yaml.safe_dump(peers, sort_keys=False))
    run([rd, "inventory", "--peers", "peers.yaml", "--out", "inventory", "--user", ADMIN], cwd=ctl)
    method = json.loads((ctl / "plan" / "plan.json").read_text()).get("method")
    return {"dir": ctl, "partition_s": round(partition_s, 1), "method": method,
            "partition_args": " ".join(made.args[1:]), "defaults_refused": refused}


def play(work: Path, key: Path, tag: str) -> dict:
    inventory = work / "controller" / "inventory" / "inventory.yaml"
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="False",
               # the controller's `python3 -m pip wheel` (the play's first task) is this venv's
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    argv = [BIN / "ansible-playbook", "-i", inventory, REPO / "deploy" / "site.yml",
            "-e", f"ansible_ssh_private_key_file={key}",
            "-e", "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'",
            "-e", f"robustdice_wheel_dir={work / 'dist'}"]
    start = time.monotonic()
    proc = run(argv, timeout=1800, check=False, env=env)
    seconds = time.monotonic() - start
    (work / f"play-{tag}.log").write_text(proc.stdout + proc.stderr)
    recap = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+)\s*:\s*(ok=.*)$", line)
        if m:
            recap[m.group(1)] = dict(kv.split("=") for kv in m.group(2).split())
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("fatal:", "failed:"))]
    return {"rc": proc.returncode, "seconds": round(seconds, 1), "recap": recap, "errors": failed[:10],
            "tail": proc.stdout[-3000:] if proc.returncode else None}


# ---------------------------------------------------------------- the checks
def mesh_formed(config, key_path: Path):
    from robustdice.node.client import status_all
    views = status_all(config, key_path, 1.0)
    if all(not v.get("unreachable") and sorted(v.get("participants", [])) == list(NODES) for v in views):
        return views
    return None


def submit_frame(config, key_path: Path, node: str = "n1") -> dict:
    """3 digits to `node`: who computed them, what was filled, and whether they equal the plain model."""
    import torch
    from robustdice.node.client import NodeClient
    from robustdice.partitioner.zoo.data import evaluation_split
    from robustdice.partitioner.zoo.models import build_model
    images, labels, _ = evaluation_split("digits_cnn")
    x = images[:3].numpy().astype(np.float32)
    with torch.inference_mode():
        reference = build_model("digits_cnn", weights="DEFAULT").eval()(torch.from_numpy(x)).numpy()
    start = time.monotonic()
    with NodeClient(config, node, key_path) as client:
        reply = client.submit(x, timeout_s=60.0)
    logits = reply.arrays[0]
    equal = bool(np.allclose(logits, reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max())))
    return {"ok": equal and sorted(reply.meta.get("participants", [])) == list(NODES)
            and reply.meta.get("zero_filled_fraction") == 0.0,
            "node": node, "participants": reply.meta.get("participants"),
            "zero_filled_fraction": reply.meta.get("zero_filled_fraction"),
            "predictions": [int(i) for i in logits.argmax(1)], "labels": [int(i) for i in labels[:3]],
            "equal_to_plain_model": equal, "answer_s": round(time.monotonic() - start, 2)}


def check_active(board: Board) -> dict:
    active = board.ssh("systemctl is-active robustdice-node", check=False).stdout.strip()
    enabled = board.ssh("systemctl is-enabled robustdice-node", check=False).stdout.strip()
    unit = board.unit()
    security = board.ssh("systemd-analyze security robustdice-node --no-pager", check=False, sudo=True)
    score = re.search(r"Overall exposure level for robustdice-node\.service: (\d+\.\d+)", security.stdout)
    # On the interface the mesh uses: a container has no net.ipv4.neigh.default (the play's first
    # try here failed on it, 60-robustdice.conf says why).
    sysctl = board.ssh(f"cat /proc/sys/net/ipv4/neigh/$(ip -o -4 addr show to {board.host}/32 | cut -d' ' -f2)"
                       f"/retrans_time_ms", check=False).stdout.strip()
    journal = board.ssh("journalctl -b --no-pager -o cat -p warning -u robustdice-node", check=False, sudo=True)
    pid1 = board.ssh("journalctl -b --no-pager -o cat _PID=1 | grep -i robustdice-node | grep -iv "
                     "'started\\|starting\\|stopped\\|stopping\\|consumed\\|deactivated\\|scheduled restart' | sort -u",
                     check=False, sudo=True)
    return {"ok": active == "active" and enabled == "enabled" and sysctl.isdigit() and abs(int(sysctl) - 250) <= 10,
            "is_active": active, "is_enabled": enabled,
            "user": unit.get("User"), "main_pid": unit.get("MainPID"), "n_restarts": unit.get("NRestarts"),
            "security_exposure": float(score.group(1)) if score else None,
            "mesh_interface_retrans_time_ms": sysctl,
            "journal_warnings": [line for line in journal.stdout.splitlines() if line.strip()][:20],
            "systemd_on_the_unit": [line for line in pid1.stdout.splitlines() if line.strip()][:20]}


def check_restart(board: Board, config, key_path: Path) -> dict:
    before = board.unit()
    start = time.monotonic()
    board.ssh("systemctl kill -s KILL robustdice-node", sudo=True)

    def restarted():
        u = board.unit()
        return u if (u.get("ActiveState") == "active" and u.get("MainPID") not in ("0", before.get("MainPID"))
                     and int(u.get("NRestarts", 0)) > int(before.get("NRestarts", 0))) else None
    after = wait_for(restarted, 300, f"systemd to restart robustdice-node on {board.id}")
    active_s = time.monotonic() - start
    views = wait_for(lambda: mesh_formed(config, key_path), 120, "the mesh to re-form")
    mesh_s = time.monotonic() - start
    frame = submit_frame(config, key_path)
    seen = [e for v in views if v["node"] != board.id for e in v.get("events", []) if e.get("peer") == board.id]
    return {"ok": frame["ok"], "node": board.id, "main_pid_before": before.get("MainPID"),
            "main_pid_after": after.get("MainPID"), "n_restarts_before": before.get("NRestarts"),
            "n_restarts_after": after.get("NRestarts"), "kill_to_active_s": round(active_s, 1),
            "kill_to_mesh_s": round(mesh_s, 1), "peer_saw": [e.get("kind") for e in seen][-6:], "frame_after": frame}


def check_reboot(board: Board, config, key_path: Path, boot_timeout_s: float) -> dict:
    board.ssh("systemctl reboot", check=False, sudo=True, timeout=30)
    # A reboot ends systemd-nspawn (exit 133: reboot asked); booting it again is the power button.
    code = board.proc.wait(timeout=120)
    start = time.monotonic()
    board.boot()
    booted = board.wait_booted(boot_timeout_s)
    wait_for(lambda: board.unit().get("ActiveState") == "active", 300, f"robustdice-node active on {board.id}")
    active_s = time.monotonic() - start
    wait_for(lambda: mesh_formed(config, key_path), 120, "the mesh after the reboot")
    mesh_s = time.monotonic() - start
    frame = submit_frame(config, key_path)
    unit = board.unit()
    return {"ok": frame["ok"] and unit.get("ActiveState") == "active", "node": board.id, "nspawn_exit": code,
            "boot": booted, "boot_to_active_s": round(active_s, 1), "boot_to_mesh_s": round(mesh_s, 1),
            "n_restarts_after_boot": unit.get("NRestarts"), "frame_after": frame}


# ---------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/var/cache/robustdice-nspawn"),
                   help="where the debootstrapped tree is kept between runs")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/robustdice-nspawn"),
                   help="the boards' trees, the controller's files and the logs of this run")
    p.add_argument("--mirror", default="http://deb.debian.org/debian")
    p.add_argument("--pip-dir", action="append", default=None,
                   help=f"a folder of wheels or a PEP 503 index (with simple/) that the boards' pip reads, "
                        f"bind-mounted read-only; repeat for more (default: {' '.join(PIP_DIRS)})")
    p.add_argument("--boot-timeout", type=float, default=180.0)
    p.add_argument("--no-reboot", action="store_true", help="skip the reboot check")
    p.add_argument("--keep", action="store_true", help="leave the boards running and their trees in --work")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deploy_nspawn.json"))
    args = p.parse_args()
    pip_dirs = [d for d in (args.pip_dir or PIP_DIRS) if os.path.isdir(d)]

    result: dict = {"suite": SUITE, "packages": list(PACKAGES), "nodes": list(NODES), "model": "digits_cnn",
                    "host": {"pid1": Path("/proc/1/comm").read_text().strip(),
                             "cgroup": "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers")
                             else "hybrid (v1 controllers, v2 unified)" if os.path.isdir("/sys/fs/cgroup/unified")
                             else "v1",
                             "kernel": os.uname().release, "pip_dirs": pip_dirs},
                    "steps": {}, "checks": {}}
    missing = [c for c in ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen", "ip") if shutil.which(c) is None]
    if os.geteuid() != 0 or missing:
        result["error"] = "needs root" if os.geteuid() != 0 else f"missing: {' '.join(missing)} " \
                          f"(apt-get install debootstrap systemd-container openssh-client iproute2)"
        say(result["error"])
        write_result(result, args.out, args.json)
        return 2

    boards: list[Board] = []
    try:
        result["steps"]["base_tree"] = base_tree(args.cache, args.mirror)
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        key = args.work / "controller_ssh_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy_nspawn", "-f", key])
        start = time.monotonic()
        boards = [Board(d, args.work, key, pip_dirs) for d in range(len(NODES))]
        for b in boards:
            say(f"board {b.id}: copying the tree to {b.tree}")
            b.prepare(Path(result["steps"]["base_tree"]["path"]))
        result["steps"]["prepare_s"] = round(time.monotonic() - start, 1)

        bridge(True)
        for b in boards:
            b.boot()
        boot = {}
        try:
            for b in boards:
                say(f"board {b.id}: booting ({b.host})")
                boot[b.id] = b.wait_booted(args.boot_timeout)
                say(f"  {boot[b.id]}")
        except Exception as exc:
            result["steps"]["boot"] = {"ok": False, "error": str(exc),
                                       "console": {b.id: b.console.read_text()[-3000:] for b in boards
                                                   if b.console.exists()}}
            raise
        version = boards[0].ssh("systemctl --version").stdout.splitlines()[0]
        result["steps"]["boot"] = {"ok": True, "systemd": version, **boot}

        say("controller: keys, plan (digits_cnn over 2 devices), signature, peers.yaml, inventory")
        ctl = controller(args.work)
        result["steps"]["plan"] = {k: ctl[k] for k in ("method", "partition_args", "partition_s", "defaults_refused")}

        say("play: ansible-playbook deploy/site.yml over ssh with become (first run)")
        first = play(args.work, key, "first")
        result["steps"]["play_first"] = first
        say(f"  rc {first['rc']} in {first['seconds']} s: {first['recap']}")
        if first["rc"] != 0:
            raise RuntimeError(f"the play failed: {first['errors'] or first['tail']}")

        from robustdice.mesh.config import load_peers
        config = load_peers(ctl["dir"] / "peers.yaml")
        key_path = ctl["dir"] / "keys" / "client.key_secret"

        say("check: systemctl is-active / is-enabled robustdice-node")
        checks = result["checks"]
        checks["active"] = {b.id: check_active(b) for b in boards}
        checks["active"]["ok"] = all(v["ok"] for v in checks["active"].values())
        say(f"  {json.dumps(checks['active'])[:600]}")

        say("check: both nodes count on both (robustdice status)")
        start = time.monotonic()
        try:
            views = wait_for(lambda: mesh_formed(config, key_path), 180, "both nodes to count on both")
            checks["mesh"] = {"ok": True, "formed_after_play_s": round(time.monotonic() - start, 1),
                              "views": {v["node"]: {"participants": v["participants"], "serving": v.get("serving"),
                                                    "incarnation": v.get("incarnation"),
                                                    "members": {k: m.get("state") for k, m in v["members"].items()}}
                                        for v in views}}
        except TimeoutError as exc:
            checks["mesh"] = {"ok": False, "error": str(exc)}
        say(f"  {checks['mesh']}")

        say("check: a frame submitted to n1")
        checks["frame"] = submit_frame(config, key_path)
        say(f"  {checks['frame']}")

        # The second run after the checks: a restart it caused would show as a new MainPID.
        say("play: the second run (must change nothing, restart nothing)")
        pids = {b.id: b.unit().get("MainPID") for b in boards}
        second = play(args.work, key, "second")
        after = {b.id: b.unit().get("MainPID") for b in boards}
        second["main_pid_unchanged"] = pids == after
        second["ok"] = second["rc"] == 0 and second["main_pid_unchanged"] and all(
            r.get("changed") == "0" for r in second["recap"].values())
        result["steps"]["play_second"] = second
        say(f"  rc {second['rc']} in {second['seconds']} s: {second['recap']}, MainPID {pids} -> {after}")

        say("check: systemctl kill -s KILL robustdice-node on n1")
        checks["restart"] = check_restart(boards[1], config, key_path)
        say(f"  {checks['restart']}")

        if not args.no_reboot:
            say("check: reboot n0; the node must start at boot and rejoin")
            checks["reboot"] = check_reboot(boards[0], config, key_path, args.boot_timeout)
            say(f"  {checks['reboot']}")
    except Exception as exc:  # noqa: BLE001 - whatever broke is a result too: written to the file
        result["error"] = f"{type(exc).__name__}: {exc}"
        say(f"error: {result['error']}")
    finally:
        for b in boards:
            if b.proc is not None and b.proc.poll() is None:
                try:
                    log = b.ssh("journalctl -b --no-pager -o short-monotonic -u robustdice-node", check=False,
                                sudo=True, timeout=30).stdout
                    (args.work / f"{b.id}.node-journal.log").write_text(log)
                except (OSError, subprocess.SubprocessError) as exc:
                    say(f"board {b.id}: no journal ({exc})")
        if not args.keep:
            for b in boards:
                say(f"board {b.id}: powering off")
                b.stop()
                b.remove_cgroups()
            bridge(False)
            run(["rm", "-rf", args.work / "boards"], timeout=900, check=False)
    result["ok"] = "error" not in result and all(c.get("ok") for c in result["checks"].values())
    write_result(result, args.out, args.json)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
