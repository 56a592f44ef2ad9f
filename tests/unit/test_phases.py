"""The phase analysis of a stream (node/lab/phases.py): it produces the headline figures of `make
demo` and the cluster benchmark, so each rule is pinned here on made-up frames."""
import pytest

from robustdice.node.lab.phases import FrameRecord, classify, counted_from, divergent_answers, report, summarise

KILL, DETECTED, RESTART, COUNTED = 10.0, 10.5, 20.0, 21.0
WINDOWS = [("detecting", KILL, DETECTED), ("rejoining", RESTART, COUNTED), ("rejoined", COUNTED, float("inf"))]


def frame(i, sent, answered, prediction=1, label=1, latency=None, zero=0.0):
    f = FrameRecord(i, i, label, sent)
    if answered is not None:
        f.answer({"prediction": [prediction], "latency_ms": latency if latency is not None else (answered - sent) * 1000,
                  "zero_filled_fraction": zero, "zero_filled": {}, "participants": ["n0"]}, answered)
    return f


@pytest.mark.parametrize("sent, answered, phase", [
    (1.0, 1.1, "before"),            # answered before the fault
    (9.9, 10.2, "detecting"),        # in flight across the kill
    (10.2, 10.4, "detecting"),       # submitted and answered while undetected
    (10.4, 10.6, "detecting"),       # answered after detection but submitted before it
    (10.6, 10.7, "failed"),          # after detection, before the restart
    (19.9, 20.1, "rejoining"),       # in flight across the restart
    (20.5, 20.6, "rejoining"),       # before every node counts the device again
    (21.0, 21.1, "rejoined"),        # from the moment every node counts it
    (10.6, None, "rejoining"),       # never answered: still in flight when the device came back
])
def test_classify_puts_each_frame_in_its_phase(sent, answered, phase):
    f = frame(0, sent, answered)
    classify([f], WINDOWS)
    assert f.phase == phase


def test_classify_without_faults_is_all_before():
    frames = [frame(i, i, i + 0.1) for i in range(3)]
    classify(frames, [])
    assert {f.phase for f in frames} == {"before"}


def test_summarise_gives_accuracy_percentiles_fps_and_zero_fill_per_phase():
    frames = [frame(i, i * 0.1, i * 0.1 + 0.05, prediction=1, label=1 if i % 4 else 0, latency=10 + i, zero=0.25)
              for i in range(8)]
    frames.append(frame(8, 0.9, None))  # unanswered: not counted
    classify(frames, [])
    s = summarise(frames)
    assert list(s) == ["before"]
    b = s["before"]
    assert b["frames"] == 8
    assert b["accuracy"] == pytest.approx(6 / 8)
    assert b["latency_ms_p50"] == pytest.approx(13.5) and b["latency_ms_p99"] == pytest.approx(16.93)
    assert b["fps"] == pytest.approx(8 / 0.75)
    assert b["zero_filled_fraction"] == pytest.approx(0.25)


def test_summarise_skips_empty_phases_and_keeps_their_order():
    frames = [frame(0, 21.0, 21.1), frame(1, 1.0, 1.1), frame(2, 10.6, 10.7)]
    classify(frames, WINDOWS)
    assert list(summarise(frames)) == ["before", "failed", "rejoined"]


def test_counted_from_finds_when_a_node_stopped_or_started_counting_on_a_peer():
    view = {"events": [{"kind": "participants", "participants": ["n0", "n1"], "wall_s": 5.0},
                       {"kind": "died", "peer": "n1", "wall_s": 10.4},
                       {"kind": "participants", "participants": ["n0"], "wall_s": 10.3},
                       {"kind": "participants", "participants": ["n0", "n1"], "wall_s": 20.8}]}
    assert counted_from(view, "n1", KILL, False) == 10.3
    assert counted_from(view, "n1", RESTART, True) == 20.8
    assert counted_from(view, "n1", 21.0, True) is None


def test_report_windows_come_from_the_nodes_events():
    views = [{"node": "n0", "events": [{"kind": "died", "peer": "n1", "wall_s": 10.4},
                                       {"kind": "participants", "participants": ["n0"], "wall_s": 10.5}]},
             {"node": "n1", "unreachable": True}]
    frames = [frame(0, 1.0, 1.1), frame(1, 10.2, 10.45), frame(2, 10.6, 10.7)]
    r = report(["n0", "n1"], frames, [{"kind": "kill", "device": 1, "frame": 1, "wall_s": KILL}], views)
    assert [f["phase"] for f in r["frames"]] == ["before", "detecting", "failed"]
    assert r["detections"][0]["detected_after_ms"] == pytest.approx(400.0)
    assert r["frames_answered"] == 3 and r["frames_failed"] == 0


class _Stage:
    def __init__(self, name, neurons):
        self.name, self.neurons = name, neurons


class _Plan:
    stages = [_Stage("a", 10), _Stage("b", 4)]
    rocoin = None   # a split plan: served as its stages (serving_stages.py)


def test_divergent_answers_flags_an_answer_that_claims_less_zero_fill_than_a_node_had():
    views = [{"zero_log": [[7, 0, 3], [8, 1, 2]]}, {"zero_log": [[7, 0, 5]]}]
    honest = {"frame": 7, "meta": {"zero_filled": {"a": 0.5, "b": 0.0}}}
    understated = {"frame": 8, "meta": {"zero_filled": {"a": 0.0, "b": 0.25}}}
    assert divergent_answers([honest, understated], views, _Plan()) == [(8, "b", 1, 2)]
    assert divergent_answers([{"frame": 7, "meta": {"error": "x"}}], views, _Plan()) == []


def test_divergent_answers_count_only_the_nodes_that_computed_the_answer():
    """A node outside the answer's participants (cut off mid-frame) zero-filled its copy of the
    frame; nothing it computed reached the answer. A participant's zero-fill still counts."""
    views = [{"node": "n0", "zero_log": [[7, 1, 1]]}, {"node": "n3", "zero_log": [[7, 0, 9], [7, 1, 4]]}]
    answer = {"frame": 7, "meta": {"zero_filled": {"a": 0.0, "b": 0.25}, "participants": ["n0", "n1"]}}
    assert divergent_answers([answer], views, _Plan()) == []
    answer["meta"]["participants"] = ["n0", "n3"]
    assert divergent_answers([answer], views, _Plan()) == [(7, "a", 0, 9), (7, "b", 1, 4)]
    understated = {"frame": 7, "meta": {"zero_filled": {"a": 0.0, "b": 0.0}, "participants": ["n0", "n1"]}}
    assert divergent_answers([understated], views, _Plan()) == [(7, "b", 0, 1)]
