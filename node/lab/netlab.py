"""A network lab on one Linux machine: one network namespace per node, joined by a bridge, and
the faults a real network has (for chaos tests and benchmarks; needs root, iproute2, nftables).

    lab = NetnsLab(4)            # hosts 10.77.0.10 .. 10.77.0.13; the root namespace is 10.77.0.1
    with lab:
        cluster = LocalCluster(plan, hosts=lab.hosts, prefix=lab.prefix)
        lab.link(2, up=False)    # node 2's cable out: it hears nobody, nobody hears it
        lab.split([[0, 1], [2, 3]])
        lab.loss(0, 1, 5)        # 5 % of packets between nodes 0 and 1 lost, both ways
        lab.one_way(0, 1)        # 0 -> 1 dropped, 1 -> 0 passes
        lab.rate(3, 100)         # node 3's link at 100 Mbit/s (tc tbf)
        lab.heal()               # every drop rule gone (links stay as set)

Drops are nftables rules in the nodes' own namespaces (this kernel has no netem; tc has no
drop actions here). Clients run in the root namespace and reach the nodes through the bridge.
Everything the lab made is removed on exit, and leftovers of an earlier lab with the same tag
are removed on entry.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional, Sequence

from ..errors import NodeError


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


# Address resolution retried every 250 ms instead of Linux's 1 s: after a cable is out for
# longer than an ARP entry lives, the first SYN of a reconnect waits for the next ARP probe, so
# this, not ZeroMQ, bounded how soon a healed link carried traffic (1.0-1.1 s, measured by
# benchmarks/chaos.py's cut). The Ansible role sets the same on the boards
# (deploy/roles/robustdice_node/files/60-robustdice.conf); the lab models what is deployed.
NEIGH_RETRANS_MS = 250


class NetnsLab:
    TABLE = "rdlab"

    def __init__(self, nodes: int, tag: str = "rdl", subnet: str = "10.77.0") -> None:
        if not 1 <= nodes <= 40:
            raise NodeError(f"a lab of {nodes} nodes: 1 to 40")
        self.nodes, self.tag, self.subnet = nodes, tag, subnet
        self.bridge = f"{tag}br"

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why this machine cannot run a lab, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "nft", "tc"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install iproute2 nftables)"
        probe = f"rdprobe{os.getpid()}"
        made = _run("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        try:
            nft = _run("ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe", check=False)
            if nft.returncode != 0:
                return f"nftables does not work here: {nft.stderr.strip()}"
        finally:
            _run("ip", "netns", "del", probe, check=False)
        return None

    # ------------------------------------------------------------ names
    def netns(self, d: int) -> str:
        return f"{self.tag}-n{d}"

    def veth(self, d: int) -> str:
        return f"{self.tag}v{d}"     # the root side; inside the namespace it is eth0

    def host(self, d: int) -> str:
        return f"{self.subnet}.{10 + d}"

    @property
    def hosts(self) -> List[str]:
        return [self.host(d) for d in range(self.nodes)]

    def prefix(self, d: int) -> List[str]:
        """The command prefix that runs a program as node d (in its namespace)."""
        return ["ip", "netns", "exec", self.netns(d)]

    def _in(self, d: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", self.netns(d), *argv, check=check)

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "NetnsLab":
        self.down()
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            _run("sysctl", "-qw", f"net.ipv4.neigh.{self.bridge}.retrans_time_ms={NEIGH_RETRANS_MS}")
            for d in range(self.nodes):
                ns = self.netns(d)
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", self.veth(d), "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "link", "set", self.veth(d), "master", self.bridge)
                _run("ip", "link", "set", self.veth(d), "up")
                self._in(d, "ip", "addr", "add", f"{self.host(d)}/24", "dev", "eth0")
                self._in(d, "ip", "link", "set", "eth0", "up")
                self._in(d, "sysctl", "-qw", f"net.ipv4.neigh.eth0.retrans_time_ms={NEIGH_RETRANS_MS}")
                self._in(d, "ip", "link", "set", "lo", "up")
                self._in(d, "nft", "add", "table", "inet", self.TABLE)
                for chain, hook in (("out", "output"), ("in", "input")):
                    self._in(d, "nft", "add", "chain", "inet", self.TABLE, chain,
                             f"{{ type filter hook {hook} priority 0; }}")
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def down(self) -> None:
        """Remove every namespace, veth and bridge of this tag (idempotent)."""
        for d in range(self.nodes):
            _run("ip", "netns", "del", self.netns(d), check=False)   # takes its end of the veth along
            _run("ip", "link", "del", self.veth(d), check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    # ------------------------------------------------------------ faults
    def link(self, d: int, up: bool) -> None:
        """Node d's cable in or out (its veth on the bridge side)."""
        _run("ip", "link", "set", self.veth(d), "up" if up else "down")

    def _drop(self, d: int, chain: str, peer: int, percent: Optional[float] = None) -> None:
        field = "daddr" if chain == "out" else "saddr"
        rule = ["ip", field, self.host(peer)]
        if percent is not None:
            rule += ["numgen", "random", "mod", "1000", "<", str(int(round(percent * 10)))]
        self._in(d, "nft", "add", "rule", "inet", self.TABLE, chain, *rule, "drop")

    def split(self, groups: Sequence[Sequence[int]]) -> None:
        """No packet between nodes of different groups."""
        group_of = {d: k for k, g in enumerate(groups) for d in g}
        for d in range(self.nodes):
            for peer in range(self.nodes):
                if peer != d and group_of.get(d) != group_of.get(peer):
                    self._drop(d, "out", peer)

    def loss(self, a: int, b: int, percent: float) -> None:
        """`percent` of the packets between a and b lost, each way independently."""
        self._drop(a, "out", b, percent)
        self._drop(b, "out", a, percent)

    def one_way(self, src: int, dst: int) -> None:
        """Packets from src to dst lost; dst to src pass."""
        self._drop(src, "out", dst)

    def rate(self, d: int, mbit: float) -> None:
        """Node d's egress limited to `mbit` Mbit/s (tc tbf on its eth0)."""
        self._in(d, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit",
                 "burst", "64kb", "latency", "50ms")

    def heal(self) -> None:
        """Remove every drop rule and rate limit (links stay as `link` set them)."""
        for d in range(self.nodes):
            for chain in ("out", "in"):
                self._in(d, "nft", "flush", "chain", "inet", self.TABLE, chain)
            self._in(d, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
