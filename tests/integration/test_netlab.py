"""Membership and frames across a real network (issue 10): 4 nodes in 4 network namespaces
joined by a bridge (node/lab/netlab.py), a camera streaming to n0, and one fault per test.
benchmarks/chaos.py runs the long ones (60 s of loss, a 14 s cut) and prints the table."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.node.client import CameraStream  # noqa: E402
from robustdice.node.client_cli import partition_of  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.node.lab.netlab import NetnsLab  # noqa: E402
from robustdice.node.lab.phases import divergent_answers, silent_divergence  # noqa: E402
from robustdice.partitioner.zoo.data import evaluation_split  # noqa: E402

WHY = NetnsLab.unavailable()
pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(240),
              pytest.mark.skipif(WHY is not None, reason=f"no network lab here: {WHY} "
                                 "(make test installs nftables when it can)")]

# Below what 4 nodes serve on a slow day of this shared 2-core machine (one origin: 17 frames/s
# at 1 in flight), so that queueing never hides how long a fault or a heal costs.
RATE_FPS = 10.0


@pytest.fixture(scope="module")
def digits():
    images, _, _ = evaluation_split("digits_cnn")
    return images.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def expected(digits_plan, digits):
    """The no-failure logits of every evaluation sample."""
    from robustdice.partitioner.core.runtime import Cluster
    import torch
    return Cluster(digits_plan).simulate(torch.from_numpy(digits)).numpy()[:, None, :]


@pytest.fixture(scope="module")
def shared_lab_cluster(digits_plan):
    """One lab and one cluster for the module's faults (a start costs ~20 s of CPU here)."""
    lab = NetnsLab(4, tag="rdt")
    with lab, LocalCluster(digits_plan, hosts=lab.hosts, prefix=lab.prefix, log_level="WARNING") as cluster:
        nh.start_cluster(cluster)
        yield lab, cluster


def all_hear_all(views) -> bool:
    return all(not v.get("unreachable") and all(m["state"] == "alive" and m["connected"]
                                                for m in v["members"].values()) for v in views)


@pytest.fixture
def lab_cluster(shared_lab_cluster):
    """The shared lab, whole again: each test starts where a fresh cluster would (every node
    alive and connected to every other) and leaves no fault behind, even when it fails. What a
    test checks is its own: events and answers after its own fault, frames by their ids."""
    lab, cluster = shared_lab_cluster
    cluster.wait_until(all_hear_all, 60, "every node to hear every other before the fault")
    try:
        yield lab, cluster
    finally:
        lab.heal()
        for d in range(lab.nodes):
            lab.link(d, up=True)
            cluster.resume(d)


def stream_around(cluster, images, fault, heal, before_s=2.0, after_s=4.0, node="n0"):
    """Stream before, during and after a fault; returns (records, fault time, heal time, views)."""
    stream = CameraStream(cluster.config, node, cluster.key_path, images, RATE_FPS)
    stream.start()
    nh.wait_for(lambda: sum(r["meta"] is not None for r in stream.records) >= before_s * RATE_FPS / 2, 30,
                "frames before the fault")
    fault_s = time.time()
    fault()
    heal_s = time.time()
    heal()
    healed_s = time.time()
    nh.wait_for(lambda: sum(r["sent_s"] > healed_s + after_s for r in stream.records) > 0, 60, "frames after the heal")
    stream.stop.set()
    stream.join(60)
    views = cluster.status(timeout_s=10.0, request={"zero_log": True})
    return stream.records, fault_s, heal_s, healed_s, views


def latencies(records):
    return [r["meta"]["latency_ms"] for r in records if r["meta"] and "latency_ms" in r["meta"]]


def check_heal(records, healed_s, views, cluster, expected, within_s=1.0):
    """Every frame answered; the first after the heal at normal latency; frames run on every
    node again within `within_s`, and none after that is zero-filled; no answer that claims to
    be whole differs from the no-failure model."""
    assert all(r["meta"] is not None and "error" not in r["meta"] for r in records), \
        [r["meta"] for r in records if not r["meta"] or "error" in r["meta"]][:3]
    before = [r for r in records if r["sent_s"] < records[0]["sent_s"] + 1.5]
    p50_before = float(np.median(latencies(before)))
    after = [r for r in records if r["sent_s"] >= healed_s]
    # A stale wait (a gather that counts on a peer the heal has not brought back yet) costs the
    # sync timeout, 1000 ms; a quarter of it above the usual is noise, not such a wait (make test's
    # other worker shares the cores: p50 62 ms and a first frame at 142 ms were seen).
    bound_ms = max(2 * p50_before, p50_before + cluster.config.sync_timeout_ms / 4)
    assert after[0]["meta"]["latency_ms"] <= bound_ms, (after[0]["meta"], p50_before)
    whole = [r for r in after if len(r["meta"]["participants"]) == 4]
    assert whole and whole[0]["sent_s"] - healed_s <= within_s, whole[:1]
    later = [r for r in after if r["sent_s"] >= whole[0]["sent_s"]]
    assert all(r["meta"]["zero_filled_fraction"] == 0 for r in later), [r["meta"] for r in later
                                                                       if r["meta"]["zero_filled_fraction"]][:2]
    assert silent_divergence(records, expected) == []
    # Stricter: no node that computed an answer zero-filled more of its frame than the answer
    # says, whether the answer used those rows or not. Measured, not required: a participant may
    # zero-fill its own copy of a stage whose next rows the origin holds itself (and so never
    # receives), which changes no answer; chaos.py reports the figure.
    divergent_answers(records, views, cluster.plan)


def test_a_2_2_split_heals_at_once_and_both_halves_say_what_computed_them(lab_cluster, digits, expected):
    lab, cluster = lab_cluster
    split_seen = []

    def split():
        lab.split([[0, 1], [2, 3]])
        # `robustdice status` shows the split (both halves answer it from the root namespace).
        halves = [["n0", "n1"], ["n2", "n3"]]
        split_seen.extend(nh.wait_for(lambda: (lambda g: g if g == halves else None)(
            partition_of(cluster.status(timeout_s=2.0))), 10, "the status to show the split"))
        time.sleep(1.5)

    records, fault_s, heal_s, healed_s, views = stream_around(cluster, digits, split, lab.heal)
    during = [r for r in records if fault_s + 1.0 < r["sent_s"] < heal_s]
    assert during and all(r["meta"]["participants"] == ["n0", "n1"] for r in during), [r["meta"] for r in during][:2]
    assert all(r["meta"]["degraded"] and r["meta"]["zero_filled_fraction"] > 0 for r in during)
    assert split_seen == [["n0", "n1"], ["n2", "n3"]], split_seen
    check_heal(records, healed_s, views, cluster, expected)


def test_a_node_back_from_sigstop_costs_no_stale_waits(lab_cluster, digits, expected):
    lab, cluster = lab_cluster
    records, _, _, healed_s, views = stream_around(
        cluster, digits, lambda: (cluster.pause(3), time.sleep(2.0)), lambda: cluster.resume(3))
    check_heal(records, healed_s, views, cluster, expected)


def test_a_cut_link_heals_within_a_second_both_ways(lab_cluster, digits, expected):
    """After 6 s without its cable (TCP connections torn down by ZMTP heartbeats and
    TCP_USER_TIMEOUT, not left to backoff), n3 hears its peers and they hear it within 1 s."""
    lab, cluster = lab_cluster
    records, _, _, healed_s, views = stream_around(
        cluster, digits, lambda: (lab.link(3, up=False), time.sleep(6.0)), lambda: lab.link(3, up=True))
    peers_hear = [e["wall_s"] for v in views[:3] for e in v["events"]
                  if e["peer"] == "n3" and e["kind"] in ("rejoined", "reachable") and e["wall_s"] >= healed_s]
    n3_hears = [e["wall_s"] for e in views[3]["events"]
                if e["kind"] in ("rejoined", "reachable") and e["wall_s"] >= healed_s]
    assert len(peers_hear) == 3 and max(peers_hear) - healed_s <= 1.0, peers_hear
    assert len(n3_hears) == 3 and max(n3_hears) - healed_s <= 1.0, n3_hears
    # Frames count on n3 again once both sides hear each other and say so: a heartbeat or two more.
    check_heal(records, healed_s, views, cluster, expected, within_s=1.5)


def test_a_one_way_link_costs_at_most_one_sync_timeout_and_kills_nobody(lab_cluster, digits, expected):
    """n0 -> n3 dropped: n3 still reaches n0, but no longer hears it, and says so in its
    heartbeats; n0 stops counting on n3 without declaring it dead."""
    lab, cluster = lab_cluster
    sync_ms = cluster.config.sync_timeout_ms
    records, fault_s, heal_s, healed_s, views = stream_around(
        cluster, digits, lambda: (lab.one_way(0, 3), time.sleep(4.0)), lab.heal)
    assert max(latencies(records)) <= sync_ms * 1.5, max(latencies(records))
    # Frames admitted before n0 learnt of the cut counted on n3 and waited out the sync timeout;
    # later frames queued behind them. Once the last of them was answered and the queue it left
    # had a second to drain, frames run without n3 at normal latency.
    waited = [r["answered_s"] for r in records if fault_s <= r["sent_s"] < heal_s and "n3" in r["meta"]["participants"]]
    released_s = max(waited, default=fault_s)
    assert released_s - fault_s <= (cluster.config.peer_timeout_ms + 1.5 * sync_ms) / 1000, released_s - fault_s
    settled = [r for r in records if released_s + 1.0 < r["sent_s"] < heal_s]
    assert settled and all("n3" not in r["meta"]["participants"] for r in settled)
    # None waits out a sync timeout for n3 (a frame still counting on it would take >= sync_ms);
    # half of it was too tight beside another cluster's test on the other worker (450-550 ms of
    # queueing on 2 cores with 8 nodes running).
    assert max(latencies(settled)) < sync_ms, latencies(settled)
    assert not [e for v in views for e in v["events"] if e["kind"] == "died" and e["wall_s"] >= records[0]["sent_s"]]
    check_heal(records, healed_s, views, cluster, expected)
