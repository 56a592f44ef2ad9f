"""node/metrics.py: a handler's status() and running totals → an immutable snapshot → metric
families, read back through prometheus-client's own text format and parser. Pure: no sockets."""
import dataclasses

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from robustdice.mesh.membership import EventKind, PeerState
from robustdice.node.metrics import (LATENCY_BUCKETS_S, Histogram, MetricsRecorder, SnapshotCollector,
                                     families)

HANDLER_PID, SUPERVISOR_PID, ENGINE_PID = 200, 100, 300


def status(**over):
    """The fields of Handler.status() the metrics read, as a node with two peers shows them."""
    body = {
        "node": "n0", "device": 0, "incarnation": 7, "plan_hash": "ab" * 32, "model": "digits_cnn",
        "method": "robust", "serving": True, "refused": None, "engine_ready": True, "engine_busy_ms": 1500.0,
        "members": {"n1": {"state": "alive", "connected": True, "silent_ms": 40.0},
                    "n2": {"state": "dead", "connected": False, "silent_ms": 2500.0},
                    "n3": {"state": "unknown", "connected": False}},
        "counters": {"bad_input": 3, "client_refused": 2, "self_stalls": 1, "engine_stalls": 4, "recv_again": 5,
                     "slice_bytes_sent": 4096},
        "participants": ["n0", "n1"],
        "frames_done": 11, "frame_errors": 1, "frames_expired": 2, "frames_pruned": 0,
        "frames_in_flight": 3, "frames_queued": 1, "zero_filled_fraction": 0.125,
        "gathers_in_progress": 2, "early_slices": 6,
        "rss_bytes": {str(SUPERVISOR_PID): 10_000, str(HANDLER_PID): 20_000, str(ENGINE_PID): 300_000},
        "power_mw": None, "events": [{"kind": "died", "peer": "n2"}],
    }
    body.update(over)
    return body


def recorder():
    r = MetricsRecorder()
    r.on_answer({"latency_ms": 4.0, "zero_filled_fraction": 0.0, "degraded": False})
    r.on_answer({"latency_ms": 20.0, "zero_filled_fraction": 0.3, "degraded": True})
    r.on_answer({"latency_ms": 3000.0, "zero_filled_fraction": 0.0, "degraded": True})  # a device missing
    r.on_answer({"error": "expired after 10001 ms"})
    r.on_event(EventKind.DIED.value, "n2")
    r.on_event(EventKind.REJOINED.value, "n2")
    r.on_event(EventKind.DIED.value, "n2")
    return r


def scrape(snapshot, now_s):
    """The families as a scraper reads them: rendered by prometheus-client, parsed back."""
    class One:
        def collect(self):
            return families(snapshot, now_s)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def value(found, family, sample=None, **labels):
    samples = [s for s in found[family].samples if s.name == (sample or family)
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(samples) == 1, (family, sample, labels, found[family].samples)
    return samples[0].value


def test_snapshot_maps_to_the_status_figures():
    snap = recorder().snapshot(status(), 50.0, HANDLER_PID, SUPERVISOR_PID)
    found, text = scrape(snap, 50.75)
    assert all(name.startswith("robustdice_") for name in found), sorted(found)
    assert value(found, "robustdice_node_info", node="n0", device="0", model="digits_cnn", plan_hash="ab" * 6) == 1
    assert value(found, "robustdice_metrics_age_seconds") == pytest.approx(0.75)
    assert value(found, "robustdice_serving") == 1 and value(found, "robustdice_refused") == 0
    assert value(found, "robustdice_engine_busy_seconds", "robustdice_engine_busy_seconds_total") == 1.5
    for name, n in [("frames_done", 11), ("frame_errors", 1), ("frames_expired", 2), ("frames_pruned", 0)]:
        assert value(found, f"robustdice_{name}", f"robustdice_{name}_total") == n
    assert value(found, "robustdice_frames_in_flight") == 3 and value(found, "robustdice_frames_queued") == 1
    assert value(found, "robustdice_gathers_in_progress") == 2 and value(found, "robustdice_early_slices") == 6
    assert value(found, "robustdice_participants") == 2
    assert value(found, "robustdice_zero_filled_fraction_recent") == 0.125


def test_answers_by_outcome_and_their_histograms():
    found, _ = scrape(recorder().snapshot(status(), 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    answers = {o: value(found, "robustdice_answers", "robustdice_answers_total", outcome=o)
               for o in ("exact", "degraded", "error")}
    assert answers == {"exact": 1, "degraded": 2, "error": 1}
    lat = "robustdice_answer_latency_seconds"
    buckets = {s.labels["le"]: s.value for s in found[lat].samples if s.name == lat + "_bucket"}
    assert len(buckets) == len(LATENCY_BUCKETS_S) + 1
    # 4 ms, 20 ms and 3 s (errors have no latency); buckets are cumulative
    assert (buckets["0.005"], buckets["0.01"], buckets["0.025"], buckets["2.5"], buckets["5.0"], buckets["+Inf"]) \
        == (1, 1, 2, 2, 3, 3)
    assert value(found, lat, lat + "_count") == 3
    assert value(found, lat, lat + "_sum") == pytest.approx(3.024)
    zf = "robustdice_answer_zero_filled_fraction"
    zb = {s.labels["le"]: s.value for s in found[zf].samples if s.name == zf + "_bucket"}
    assert (zb["0.0"], zb["0.2"], zb["0.5"], zb["+Inf"]) == (2, 2, 3, 3)   # le=0: nothing zero-filled


def test_membership_state_and_events_per_peer():
    found, _ = scrape(recorder().snapshot(status(), 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    for peer, state in [("n1", "alive"), ("n2", "dead"), ("n3", "unknown")]:
        shown = {s.value: value(found, "robustdice_peer_state", peer=peer, state=s.value) for s in PeerState}
        assert shown == {s.value: int(s.value == state) for s in PeerState}, (peer, shown)
    assert value(found, "robustdice_peer_connected", peer="n1") == 1
    assert value(found, "robustdice_peer_connected", peer="n2") == 0
    assert value(found, "robustdice_peer_silent_seconds", peer="n2") == 2.5
    assert not [s for s in found["robustdice_peer_silent_seconds"].samples if s.labels["peer"] == "n3"]
    events = "robustdice_membership_events"
    assert value(found, events, events + "_total", peer="n2", kind="died") == 2
    assert value(found, events, events + "_total", peer="n2", kind="rejoined") == 1
    # every peer and kind is there from the start, so that rate() sees the first death
    assert value(found, events, events + "_total", peer="n1", kind="died") == 0
    assert len(found[events].samples) == 3 * len(EventKind)


def test_drops_by_reason_and_the_counters_that_are_not_drops():
    found, _ = scrape(recorder().snapshot(status(), 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    drops = {s.labels["reason"]: s.value for s in found["robustdice_dropped"].samples
             if s.name == "robustdice_dropped_total"}
    assert drops == {"bad_input": 3, "client_refused": 2}
    assert value(found, "robustdice_self_stalls", "robustdice_self_stalls_total") == 1
    assert value(found, "robustdice_engine_stalls", "robustdice_engine_stalls_total") == 4
    assert value(found, "robustdice_recv_again", "robustdice_recv_again_total") == 5
    assert value(found, "robustdice_slice_bytes_sent", "robustdice_slice_bytes_sent_total") == 4096


def test_memory_by_process_and_power_only_where_read():
    found, _ = scrape(recorder().snapshot(status(), 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    rss = {s.labels["process"]: s.value for s in found["robustdice_resident_memory_bytes"].samples}
    assert rss == {"supervisor": 10_000, "handler": 20_000, "engine": 300_000}
    assert "robustdice_power_watts" not in found    # off a Jetson: absent, never a made-up 0
    assert value(found, "robustdice_power_available") == 0
    found, _ = scrape(recorder().snapshot(status(power_mw=7250.0), 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    assert value(found, "robustdice_power_watts") == 7.25 and value(found, "robustdice_power_available") == 1


def test_a_snapshot_does_not_change_with_the_live_state():
    live, r = status(), recorder()
    snap = r.snapshot(live, 0.0, HANDLER_PID, SUPERVISOR_PID)
    before, _ = scrape(snap, 0.0)
    live["counters"]["bad_input"] += 100
    live["members"]["n1"]["state"] = "dead"
    r.on_answer({"latency_ms": 1.0, "zero_filled_fraction": 0.0, "degraded": False})
    r.on_event(EventKind.DIED.value, "n1")
    after, _ = scrape(snap, 0.0)
    assert [f.samples for f in before.values()] == [f.samples for f in after.values()]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.serving = False
    # the next snapshot shows the change
    again, _ = scrape(r.snapshot(live, 0.0, HANDLER_PID, SUPERVISOR_PID), 0.0)
    assert value(again, "robustdice_peer_state", peer="n1", state="dead") == 1
    assert value(again, "robustdice_dropped", "robustdice_dropped_total", reason="bad_input") == 103


def test_histogram_bounds_are_inclusive_like_le():
    h = Histogram((0.0, 1.0))
    for v in (0.0, 0.5, 1.0, 1.5):
        h.observe(v)
    data = h.frozen()
    assert data.counts == (1, 2, 1) and data.count == 4 and data.total == 3.0
    h.observe(0.0)
    assert data.counts == (1, 2, 1)   # frozen: a copy


def test_collector_serves_nothing_before_the_first_snapshot():
    collector = SnapshotCollector()
    assert list(collector.collect()) == []
    collector.snapshot = recorder().snapshot(status(), 0.0, HANDLER_PID, SUPERVISOR_PID)
    assert "robustdice_serving" in {f.name for f in collector.collect()}


def test_every_metric_the_dashboard_queries_is_one_the_node_exports():
    """deploy/grafana/robustdice.json: every robustdice_* series in every panel's query is a sample
    name some node exports (here: a node that reads its power, so that energy is exported too)."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/robustdice.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    queried = {m for e in exprs for m in re.findall(r"\brobustdice_[a-z_]+", e)}
    snap = recorder().snapshot(status(power_mw=5000.0, energy_j=12.5), 10.0, HANDLER_PID, SUPERVISOR_PID)
    found, _ = scrape(snap, 10.0)
    exported = {s.name for f in found.values() for s in f.samples}
    assert len(queried) >= 12, queried
    assert queried <= exported, f"queried but never exported: {sorted(queried - exported)}"
    assert {"robustdice_energy_joules_total", "robustdice_answers_total", "robustdice_dropped_total",
            "robustdice_answer_latency_seconds_bucket", "robustdice_peer_connected"} <= queried
