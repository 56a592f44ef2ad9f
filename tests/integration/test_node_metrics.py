"""Prometheus metrics over HTTP: scraped from live robustdice-node processes (metrics_port in
peers.yaml) and parsed with prometheus-client's own parser."""
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh import wire  # noqa: E402
from robustdice.node.client import NodeClient  # noqa: E402
from robustdice.node.errors import NodeError  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster, free_ports  # noqa: E402
from robustdice.node.metrics import METRICS_REFRESH_S  # noqa: E402
from robustdice.partitioner.zoo.models import input_shape  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(180)]

# A change shows within a metrics refresh plus a peer timeout; generous on a loaded 2-core machine.
SHOWS_WITHIN_S = 20.0


def scrape(url: str) -> dict:
    """{(sample name, sorted labels): value} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(found: dict, name: str, **labels):
    return found.get((name, tuple(sorted(labels.items()))))


def scraped_when(url: str, predicate, what: str) -> dict:
    """Scrape until `predicate(found)` holds (the node refreshes its figures once a second)."""
    last = {}

    def check():
        last["found"] = scrape(url)
        return last["found"] if predicate(last["found"]) else None
    try:
        return nh.wait_for(check, SHOWS_WITHIN_S, what, interval_s=METRICS_REFRESH_S / 4)
    except AssertionError as exc:
        shown = {k: v for k, v in last.get("found", {}).items() if "peer" in dict(k[1]) or "frames" in k[0]}
        raise AssertionError(f"{exc}; last scrape: {shown}") from None


@pytest.mark.slow
def test_scraped_metrics_show_frames_and_membership_move(tmp_path_factory):
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 2, "lop")
    x = np.zeros((1,) + tuple(input_shape("digits_cnn")), dtype=np.float32)
    with LocalCluster(plan, metrics=True) as cluster:
        nh.start_cluster(cluster)
        url = cluster.metrics_url(0)

        def n1_is(state):
            return lambda found: get(found, "robustdice_peer_state", peer="n1", state=state) == 1

        before = scraped_when(url, n1_is("alive"), "n0's metrics to show n1 alive")
        assert get(before, "robustdice_node_info", node="n0", device="0", model="digits_cnn", method="lop",
                   plan_hash=cluster.plan.plan_hash[:12]) == 1
        assert get(before, "robustdice_serving") == 1
        assert get(before, "robustdice_peer_state", peer="n1", state="dead") == 0
        assert get(before, "robustdice_membership_events_total", peer="n1", kind="died") == 0
        rss = {p: get(before, "robustdice_resident_memory_bytes", process=p)
               for p in ("supervisor", "handler", "engine")}
        assert all(v and v > 1e6 for v in rss.values()), rss
        assert get(before, "robustdice_power_available") == 0 and get(before, "robustdice_power_watts") is None
        done = get(before, "robustdice_frames_done_total")

        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            for _ in range(3):
                reply = client.submit(x, timeout_s=60.0)
                assert isinstance(reply, wire.Result) and "error" not in reply.meta, reply.meta
        after = scraped_when(url, lambda f: get(f, "robustdice_answers_total", outcome="exact") == 3,
                             "three exact answers in n0's metrics")
        assert get(after, "robustdice_frames_done_total") == done + 3
        assert get(after, "robustdice_answer_latency_seconds_count") == 3
        assert get(after, "robustdice_answer_latency_seconds_sum") > 0
        assert get(after, "robustdice_answer_zero_filled_fraction_bucket", le="0.0") == 3
        assert get(after, "robustdice_engine_busy_seconds_total") > get(before, "robustdice_engine_busy_seconds_total")
        # n1 computed its slices of the same three frames: its own metrics count them
        scraped_when(cluster.metrics_url(1), lambda f: (get(f, "robustdice_frames_done_total") or 0) >= 3,
                     "n1's metrics to count its slices of the three frames")

        cluster.kill(1)
        dead = scraped_when(url, n1_is("dead"), "n0's metrics to show n1 dead")
        assert get(dead, "robustdice_peer_state", peer="n1", state="alive") == 0
        assert get(dead, "robustdice_peer_connected", peer="n1") == 0
        assert get(dead, "robustdice_membership_events_total", peer="n1", kind="died") == 1
        assert get(dead, "robustdice_participants") == 1

        cluster.start_node(1)
        back = scraped_when(url, n1_is("alive"), "n0's metrics to show n1 alive again")
        assert get(back, "robustdice_membership_events_total", peer="n1", kind="rejoined") == 1
        assert get(back, "robustdice_membership_events_total", peer="n1", kind="died") == 1
        # the restarted node serves its own metrics again on the same port
        assert get(scraped_when(cluster.metrics_url(1), lambda f: get(f, "robustdice_serving") == 1,
                                "the restarted n1 to serve metrics"), "robustdice_node_info", node="n1", device="1",
                   model="digits_cnn", method="lop", plan_hash=cluster.plan.plan_hash[:12]) == 1


def test_metrics_port_in_use_is_an_error_naming_the_field():
    from robustdice.node.metrics import MetricsServer
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NodeError, match=rf"peers\[1\]\.metrics_port: cannot serve metrics on 127\.0\.0\.1:{port}"):
            MetricsServer("127.0.0.1", port, field="peers[1].metrics_port")


def test_metrics_server_serves_the_published_snapshot_and_closes():
    from robustdice.node.metrics import MetricsRecorder, MetricsServer
    port = free_ports(1)[0]
    server = MetricsServer("127.0.0.1", port, field="peers[0].metrics_port")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert not [k for k in scrape(url) if k[0].startswith("robustdice_")]   # nothing before a snapshot
        status = {"node": "n0", "device": 0, "model": "m", "method": "lop", "plan_hash": "f" * 64,
                  "serving": True, "frames_done": 5, "members": {}, "counters": {}, "rss_bytes": {}}
        server.publish(MetricsRecorder().snapshot(status, 0.0, 1, 2))
        assert get(scrape(url), "robustdice_frames_done_total") == 5
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
