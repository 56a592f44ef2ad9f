"""node/frames.py: admission, the ready queue, a frame's phases, expiry, answers and the account
of what computed each answer. Pure: the clock is an argument; arrays are stand-ins."""
import collections
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from robustdice.mesh import wire
from robustdice.node import frames as fr
from robustdice.node.frames import FrameBook, Phase, merge_degraded

NODES = ["n0", "n1", "n2"]
STAGES = ["features.0", "features.3", "classifier.1"]
NEURONS = [10, 20, 40]
TIMEOUT_S = 5.0
ALL = frozenset(NODES)


def book(**kw):
    kw.setdefault("frame_timeout_s", TIMEOUT_S)
    kw.setdefault("max_per_origin", 3)
    kw.setdefault("max_queued_input_bytes", 1000)
    return FrameBook("n0", NODES, STAGES, NEURONS, **kw)


def fid(origin, seq):
    return wire.frame_id(NODES.index(origin), seq)


def local(b, seq, t_ms=None, nbytes=100, now_s=0.0, participants=ALL):
    """Admit and start a local frame; returns its id."""
    frame = fid("n0", seq)
    assert b.admit_local(frame, seq if t_ms is None else t_ms, f"x{seq}", nbytes, b"client", {}, now_s) is None
    b.start(frame, participants)
    return frame


def peer(b, origin, seq, t_ms=None, nbytes=100, now_s=0.0, report=None, participants=ALL):
    return b.admit_peer(fid(origin, seq), origin, seq if t_ms is None else t_ms, participants, f"x{seq}", nbytes,
                        now_s, report)


LOGITS = np.array([[0.5, 3.0, -1.0, 0.25, 2.0, 0.0]], dtype=np.float32)


def gathering(b, stage, participants=ALL):
    """A local frame, taken by the engine, whose slice of `stage` is out; returns its id."""
    frame = local(b, 0, participants=participants)
    b.next_work()
    b.on_slice(frame, stage, None)
    return frame


def run_to_done(b, frame, now_s=1.0):
    """Take `frame` as the next work and finish it (it must be the oldest ready)."""
    f = b.next_work()
    assert f.frame == frame
    return b.on_done(frame, LOGITS, {}, 3.0, now_s)


# ---------------------------------------------------------------- admission

def test_local_frame_is_held_until_started():
    b = book()
    frame = fid("n0", 1)
    assert b.admit_local(frame, 10, "x", 100, b"c", {"top": 5}, 0.0) is None
    assert [f.frame for f in b.held()] == [frame] and b.next_work() is None
    assert b.progress() == {} and b.inputs() == {}
    f = b.start(frame, {"n1"})
    assert f.phase == Phase.QUEUED and f.participants == {"n0", "n1"}
    assert b.progress() == {frame: 0} and b.inputs() == {"n0": frame}
    assert b.next_work().frame == frame


def test_local_frames_beyond_the_per_origin_cap_are_refused_as_busy():
    b = book()
    for seq in range(3):
        local(b, seq)
    problem = b.admit_local(fid("n0", 3), 3, "x", 1, b"c", {}, 0.0)
    assert problem.startswith("node busy") and "3 frames" in problem


def test_a_client_frame_is_refused_as_busy_once_the_oldest_unanswered_has_waited_half_the_timeout():
    b = book(max_per_origin=10)
    first = local(b, 0, now_s=0.0)
    local(b, 1, now_s=1.0)
    assert b.admit_local(fid("n0", 2), 2, "x", 1, b"c", {}, TIMEOUT_S / 2 - 0.01) is None
    problem = b.admit_local(fid("n0", 3), 3, "x", 1, b"c", {}, TIMEOUT_S / 2)
    assert problem.startswith("node busy") and "2500 ms of the 5000 ms frame timeout" in problem
    # answered: the next oldest (admitted at 1.0 s) is the one that counts
    run_to_done(b, first, now_s=TIMEOUT_S / 2)
    assert [f.frame for f in b.take_answers()] == [first]
    assert b.admit_local(fid("n0", 3), 3, "x", 1, b"c", {}, TIMEOUT_S / 2) is None
    assert b.admit_local(fid("n0", 4), 4, "x", 1, b"c", {}, 1.0 + TIMEOUT_S / 2).startswith("node busy")


def test_local_frame_beyond_the_queued_byte_cap_is_refused_as_busy():
    b = book(max_per_origin=10)
    local(b, 0, nbytes=600)
    problem = b.admit_local(fid("n0", 1), 1, "x", 401, b"c", {}, 0.0)
    assert problem.startswith("node busy") and "MiB" in problem
    assert b.admit_local(fid("n0", 1), 1, "x", 400, b"c", {}, 0.0) is None


def test_a_peers_started_input_frees_its_bytes_for_new_admissions():
    b = book(max_per_origin=10)
    peer(b, "n1", 0, nbytes=1000)
    assert peer(b, "n2", 0, nbytes=1) == fr.DROP_OVERFLOW
    b.next_work()
    assert peer(b, "n2", 1, nbytes=1000) is None


@pytest.mark.parametrize("ending", ["done", "error"])
def test_a_local_input_counts_until_its_frame_is_answered(ending):
    # The node keeps it to run the frame again after a stall: memory it holds, under the cap.
    b = book(max_per_origin=10)
    frame = local(b, 0, nbytes=1000)
    b.next_work()
    assert peer(b, "n1", 0, nbytes=1) == fr.DROP_OVERFLOW
    if ending == "done":
        b.on_done(frame, LOGITS, {}, 1.0, 1.0)
    else:
        b.on_error(frame, "engine: boom")
    assert peer(b, "n1", 1, nbytes=1000) is None


def test_peer_input_is_queued_and_reported():
    b = book()
    assert peer(b, "n1", 4, now_s=2.0) is None
    f = b.frames[fid("n1", 4)]
    assert (f.phase, f.origin, f.received_s, f.participants, f.local) == (Phase.QUEUED, "n1", 2.0, ALL, False)
    assert b.progress() == {fid("n1", 4): 0} and b.inputs() == {"n1": fid("n1", 4)}


@pytest.mark.parametrize("second", [4, 3], ids=["same", "older"])
def test_peer_input_at_or_below_the_origins_watermark_is_a_replay(second):
    b = book()
    assert peer(b, "n1", 4) is None
    assert peer(b, "n1", second) == fr.DROP_REPLAY
    assert len(b.frames) == 1


def test_replay_after_the_frame_finished_is_still_a_replay():
    # issue 9: the same Input replayed after its frame finished reached the gather book again.
    b = book()
    peer(b, "n1", 4)
    run_to_done(b, fid("n1", 4))
    assert fid("n1", 4) not in b.frames
    assert peer(b, "n1", 4) == fr.DROP_REPLAY


def test_watermarks_are_per_origin():
    b = book()
    assert peer(b, "n1", 4) is None
    assert peer(b, "n2", 1) is None


@pytest.mark.parametrize("progress,inputs,expected", [
    ({}, {"n1": fid("n1", 4)}, fr.DROP_FINISHED),
    ({}, {"n1": fid("n1", 9)}, fr.DROP_FINISHED),
    ({fid("n1", 4): 1}, {"n1": fid("n1", 9)}, None),    # the origin still works on it
    ({}, {"n1": fid("n1", 3)}, None),                   # the origin's report predates the frame
    ({}, {"n2": fid("n2", 9)}, None),
], ids=["finished", "finished_long_ago", "in_progress", "report_older", "other_origin"])
def test_peer_input_the_origin_already_finished_is_dropped(progress, inputs, expected):
    b = book()
    assert peer(b, "n1", 4, report=(progress, inputs)) == expected


def test_peer_inputs_beyond_the_peer_window_overflow():
    """A peer admits PEER_WINDOW_FACTOR times the origin's window (it may still hold frames the
    origin finished since its last heartbeat), and no more."""
    b = book()
    window = fr.PEER_WINDOW_FACTOR * b.max_per_origin
    assert window > b.max_per_origin
    for seq in range(window):
        assert peer(b, "n1", seq) is None
    assert peer(b, "n1", window) == fr.DROP_OVERFLOW
    assert peer(b, "n2", 0) is None  # another origin has its own room


def test_peer_input_beyond_the_queued_byte_cap_overflows():
    b = book(max_per_origin=10)
    assert peer(b, "n1", 0, nbytes=900) is None
    assert peer(b, "n2", 0, nbytes=101) == fr.DROP_OVERFLOW
    assert peer(b, "n2", 1, nbytes=100) is None


def test_dropped_peer_input_is_reported_received_but_not_held():
    # what lets the origin's gathers release this node as "absent" instead of waiting for it
    b = book()
    window = fr.PEER_WINDOW_FACTOR * b.max_per_origin
    for seq in range(window):
        peer(b, "n1", seq)
    assert peer(b, "n1", window) == fr.DROP_OVERFLOW
    assert b.inputs()["n1"] >= fid("n1", window) and fid("n1", window) not in b.progress()


def test_restarted_origin_numbers_its_frames_afresh():
    b = book()
    peer(b, "n1", 4)
    run_to_done(b, fid("n1", 4))
    b.origin_restarted("n1")
    assert peer(b, "n1", 0) is None


# ---------------------------------------------------------------- the ready queue

def test_work_is_taken_oldest_first_by_admission_time_then_frame():
    b = book(max_per_origin=10, max_queued_input_bytes=10 ** 6)
    peer(b, "n1", 0, t_ms=30)
    local(b, 0, t_ms=20)
    peer(b, "n2", 0, t_ms=20)
    peer(b, "n1", 1, t_ms=10)
    order = []
    while (f := b.next_work()) is not None:
        order.append(f.frame)
        assert f.phase == Phase.RUNNING and f.engine_state
    assert order == [fid("n1", 1), fid("n0", 0), fid("n2", 0), fid("n1", 0)]


def test_gathered_frame_competes_with_queued_ones_by_age():
    b = book()
    old = local(b, 0, t_ms=1)
    b.next_work()
    b.on_slice(old, 0, None)
    peer(b, "n1", 0, t_ms=5)
    b.on_gathered(old, 0, [], [], "result")
    assert b.next_work().frame == old
    assert b.next_work().frame == fid("n1", 0)


def test_frames_not_ready_are_not_taken():
    b = book()
    frame = local(b, 0)
    b.admit_local(fid("n0", 1), 0, "x", 1, b"c", {}, 0.0)  # held
    assert b.next_work().frame == frame
    assert b.next_work() is None  # running
    b.on_slice(frame, 0, None)
    assert b.next_work() is None  # gathering


# ---------------------------------------------------------------- a frame's phases

def test_slice_moves_a_running_frame_to_gathering_and_is_reported():
    b = book()
    frame = local(b, 0)
    b.next_work()
    f = b.on_slice(frame, 0, None)
    assert (f.phase, f.stage, f.stages_sent) == (Phase.GATHERING, 0, 1)
    assert b.progress() == {frame: 1}


def test_slice_for_a_frame_not_running_is_ignored():
    b = book()
    frame = local(b, 0)
    assert b.on_slice(frame, 0, None) is None  # queued, not running
    assert b.on_slice(fid("n1", 9), 0, None) is None  # unknown


def test_gathered_frame_records_missing_devices_and_upstream_degradation():
    b = book()
    frame = gathering(b, 0, participants={"n1"})
    f = b.on_gathered(frame, 0, b.missing_devices(b.frames[frame], []), [(0, 0b010, 3)], "result")
    assert (f.phase, f.gathered) == (Phase.GATHERED, "result")
    assert f.degraded == {0: (0b110, 3)}  # n2 not counted on, n1 missing upstream


def test_a_holder_gone_for_the_frame_is_missing_from_every_later_stage():
    """A peer released for good (dead, timed out, never to have the input) is not waited for in
    the frame's later stages, and the answer counts its rows as missing there too."""
    b = book()
    frame = gathering(b, 0)
    f = b.on_gathered(frame, 0, b.missing_devices(b.frames[frame], ["n2"]), [], "r", gone=["n2"])
    assert f.excluded == {"n2"}
    assert b.missing_devices(f, []) == ["n2"]
    b.next_work()
    b.on_slice(frame, 1, 0)
    b.on_gathered(frame, 1, b.missing_devices(f, []), [], "r2")
    assert f.degraded[1][0] == 0b100 and f.excluded == {"n2"}


def test_upstream_records_of_stages_outside_the_plan_are_not_kept():
    b = book()
    frame = gathering(b, 1)
    hostile = [(s, 0b010, 1) for s in range(len(STAGES), len(STAGES) + wire.MAX_PROGRESS + 1)]
    f = b.on_gathered(frame, 1, [], hostile + [(0, 0b010, 3)], "r")
    assert f.degraded == {0: (0b010, 3)}


def test_upstream_zero_fill_is_bounded_by_the_stages_neurons():
    b = book()
    frame = gathering(b, 1)
    f = b.on_gathered(frame, 1, [], [(0, 0b010, 2 ** 40)], "r")
    d = b.degradation(f)
    assert d["zero_filled"]["features.0"] <= 1.0 and d["zero_filled_fraction"] <= 1.0


def test_gathered_for_another_stage_is_ignored():
    b = book()
    frame = gathering(b, 1)
    assert b.on_gathered(frame, 0, [], [], "r") is None
    assert b.frames[frame].phase == Phase.GATHERING


def test_zero_fill_of_the_previous_stage_is_noted_with_the_next_slice():
    b = book()
    frame = gathering(b, 0)
    b.on_gathered(frame, 0, [], [], "r")
    b.next_work()
    b.on_slice(frame, 1, 4)
    assert b.frames[frame].degraded == {0: (0, 4)}


def test_missing_devices_are_the_ones_not_counted_on_or_released():
    b = book()
    frame = local(b, 0, participants={"n2"})
    assert b.missing_devices(b.frames[frame], ["n2"]) == ["n1", "n2"]
    assert b.missing_devices(b.frames[frame], []) == ["n1"]


def test_local_frame_done_is_answered_and_peer_frame_forgotten():
    b = book()
    mine = local(b, 0, t_ms=0)
    peer(b, "n1", 0, t_ms=1)
    f = run_to_done(b, mine)
    assert (f.phase, f.answer["prediction"], f.input, f.engine_state) == (Phase.DONE, [1], None, False)
    assert f.answer["latency_ms"] == 1000.0 and f.answer["compute_ms"] == 3.0   # received at 0 s, done at 1 s
    assert [c for c, _ in f.answer["top5"][0]] == [1, 4, 0, 3, 5]
    assert 0.95 < sum(p for _, p in f.answer["top5"][0]) < 1.0   # a softmax: the sixth class holds the rest
    g = run_to_done(b, fid("n1", 0))
    assert g.phase == Phase.DONE and fid("n1", 0) not in b.frames
    assert b.counters["frames_done"] == 2 and b.progress() == {}


def test_done_for_a_frame_not_running_is_ignored():
    b = book()
    frame = local(b, 0)
    assert b.on_done(frame, LOGITS, {}, 1.0, 1.0) is None
    assert b.frames[frame].phase == Phase.QUEUED


def test_peer_frame_done_frees_its_origins_slot():
    b = book()
    for seq in range(3):
        peer(b, "n1", seq)
    run_to_done(b, fid("n1", 0))
    assert peer(b, "n1", 3) is None


def test_engine_error_answers_a_local_frame_and_forgets_a_peer_frame():
    b = book(max_per_origin=10)
    mine = local(b, 0, nbytes=500)
    peer(b, "n1", 0, nbytes=500)
    assert b.on_error(mine, "engine: boom").answer == {"error": "engine: boom"}
    assert b.on_error(fid("n1", 0), "engine: boom").phase == Phase.DONE
    assert fid("n1", 0) not in b.frames and b.counters["frame_errors"] == 2
    assert peer(b, "n2", 0, nbytes=1000) is None  # both inputs' bytes were freed
    assert b.on_error(fid("n2", 99), "x") is None


# ---------------------------------------------------------------- expiry

def test_frames_older_than_the_frame_timeout_expire():
    b = book()
    mine = local(b, 0, now_s=0.0)
    peer(b, "n1", 0, now_s=1.0)
    assert b.expire(TIMEOUT_S) == []
    (f,) = b.expire(TIMEOUT_S + 0.001)
    assert f.frame == mine and "expired" in f.answer["error"]
    (g,) = b.expire(TIMEOUT_S + 1.001)
    assert g.frame == fid("n1", 0) and g.frame not in b.frames
    assert b.counters["frames_expired"] == 2


def test_held_frame_expires_too():
    b = book()
    b.admit_local(fid("n0", 0), 0, "x", 10, b"c", {}, 0.0)
    (f,) = b.expire(TIMEOUT_S + 1)
    assert f.phase == Phase.DONE and "error" in f.answer and b.held() == []


def test_peers_frames_received_before_our_own_stall_expire():
    # issue 10: a node back from a stall waited on inputs its peers had finished long ago.
    b = book()
    peer(b, "n1", 0, now_s=1.0)
    peer(b, "n2", 0, now_s=3.0)
    (f,), rerun = b.after_stall(2.0, 3.5)
    assert f.frame == fid("n1", 0) and rerun == []
    assert fid("n2", 0) in b.frames and b.counters["frames_expired"] == 1


def test_own_frames_sent_out_before_a_stall_run_again_under_new_ids():
    # A stalled origin's peers went on without it; the client still waits, the input is here.
    b = book(max_per_origin=4)
    gathering_frame = local(b, 0, now_s=1.0)
    queued = local(b, 1, now_s=1.0)                                 # sent out, the engine not at it yet
    assert b.next_work().frame == gathering_frame
    b.on_slice(gathering_frame, 1, None)
    held = fid("n0", 2)
    assert b.admit_local(held, 2, "x2", 100, b"client", {}, 1.0) is None
    after = local(b, 3, now_s=3.0)
    expired, rerun = b.after_stall(2.0, 3.5)
    assert expired == [] and sorted(f.frame for f in rerun) == [gathering_frame, queued]
    old_keys = {f.frame: (f.t_ms, f.received_s) for f in rerun}
    for new_seq, f in zip((10, 11), rerun):
        old = f.frame
        b.rerun(f, fid("n0", new_seq))
        assert old not in b.frames and b.frames[fid("n0", new_seq)] is f
        assert (f.t_ms, f.received_s) == old_keys[old]              # its place in the order, its age
        assert f.phase == Phase.HELD and f.participants == frozenset() and f.stages_sent == 0
        assert not f.engine_state and f.gathered is None and f.degraded == {} and f.input is not None
    assert b.counters["frames_rerun"] == 2 and b.counters["frames_expired"] == 0
    assert b._queued_bytes == 400                                    # the four local inputs, held all along
    assert set(b.progress()) == {after}                              # peers stop hearing of the old ids
    assert {f.frame for f in b.held()} == {held, fid("n0", 10), fid("n0", 11)}
    for f in b.held():
        b.start(f.frame, ALL)
    order = [b.next_work().frame for _ in range(4)]
    assert order == [fid("n0", 10), fid("n0", 11), held, after]      # oldest first by t_ms, as before
    assert list(b._answer_order) == [fid("n0", 10), fid("n0", 11), held, after]   # the clients' order


def test_only_a_local_frame_with_its_input_runs_again():
    b = book()
    peer(b, "n1", 0, now_s=1.0)
    with pytest.raises(ValueError, match="only a local frame"):
        b.rerun(b.frames[fid("n1", 0)], fid("n0", 5))


def test_expired_frame_tells_whether_the_engine_holds_its_state():
    b = book()
    running = local(b, 0, now_s=0.0)
    b.next_work()
    queued = local(b, 1, now_s=0.0)
    states = {f.frame: f.engine_state for f in b.expire(10.0)}
    assert states == {running: True, queued: False}


def test_expired_frame_ignores_the_engines_late_results():
    b = book()
    frame = local(b, 0)
    b.next_work()
    b.expire(10.0)
    assert b.on_slice(frame, 0, None) is None
    assert b.on_done(frame, LOGITS, {}, 1.0, 10.0) is None
    assert "expired" in b.frames[frame].answer["error"]


def test_done_frames_do_not_expire():
    b = book()
    frame = local(b, 0)
    run_to_done(b, frame)
    assert b.expire(100.0) == [] and b.frames[frame].answer["prediction"] == [1]


def test_prune_origin_expires_the_frames_it_finished():
    b = book(max_per_origin=10)
    for seq in range(4):
        peer(b, "n1", seq)
    peer(b, "n2", 0)
    progress = {fid("n1", 1): 2}
    out = b.prune_origin("n1", progress, {"n1": fid("n1", 2)})
    assert sorted(f.frame for f in out) == [fid("n1", 0), fid("n1", 2)]
    assert sorted(b.frames) == sorted([fid("n1", 1), fid("n1", 3), fid("n2", 0)])
    assert b.counters["frames_pruned"] == 2


# ---------------------------------------------------------------- answers and reports

def test_answers_are_taken_in_submission_order():
    b = book()
    first = local(b, 0, t_ms=5)
    second = local(b, 1, t_ms=1)  # admitted later, but older by t_ms: computed first
    run_to_done(b, second)
    assert b.take_answers() == []  # the first submitted has no answer yet
    run_to_done(b, first)
    assert [f.frame for f in b.take_answers()] == [first, second]
    assert b.frames == {} and b.take_answers() == []


def test_error_answers_are_taken_in_order_too():
    b = book()
    first = local(b, 0)
    second = local(b, 1)
    b.on_error(first, "engine: boom")
    run_to_done(b, second)
    taken = b.take_answers()
    assert [(f.frame, "error" in f.answer) for f in taken] == [(first, True), (second, False)]


def test_taken_answers_free_the_local_slots():
    b = book()
    frames = [local(b, seq) for seq in range(3)]
    for frame in frames:
        run_to_done(b, frame)
    b.take_answers()
    assert b.admit_local(fid("n0", 3), 3, "x", 1, b"c", {}, 0.0) is None


def test_progress_lists_held_work_only():
    b = book()
    b.admit_local(fid("n0", 0), 0, "x", 1, b"c", {}, 0.0)  # held: not reported
    done = local(b, 1, t_ms=0)
    run_to_done(b, done)   # done, waiting to be answered: not reported
    gathering = local(b, 2, t_ms=1)
    b.next_work()
    b.on_slice(gathering, 2, None)
    peer(b, "n1", 0, t_ms=2)
    assert b.progress() == {gathering: 3, fid("n1", 0): 0}


def test_a_frame_that_ran_alone_is_answered_as_missing_every_other_device_at_every_stage():
    b = book()
    frame = local(b, 0, participants={"n0"})
    f = run_to_done(b, frame)
    assert f.answer["participants"] == ["n0"] and f.answer["degraded"]
    assert all(nodes == ["n1", "n2"] for nodes in f.answer["failed_by_stage"].values())
    assert len(f.answer["failed_by_stage"]) == len(b.stage_names)


def test_stats_count_frames_and_latency():
    b = book()
    frame = local(b, 0)
    run_to_done(b, frame)
    local(b, 1)
    s = b.stats()
    assert (s["frames_done"], s["frames_in_flight"], s["frames_queued"]) == (1, 1, 1)
    assert s["latency_ms_p50"] == 1000.0 and s["zero_filled_fraction"] == 0.0


# ---------------------------------------------------------------- degradation

def test_merge_degraded_unites_masks_and_keeps_the_most_zero_fill():
    into = {1: (0b001, 5)}
    merge_degraded(into, [(1, 0b100, 2), (2, 0b010, 7), (2, 0b001, 9), (0, 0, 0)])
    assert into == {1: (0b101, 5), 2: (0b011, 9)}


def test_degradation_of_a_whole_answer():
    b = book()
    frame = local(b, 0)
    d = b.degradation(b.frames[frame])
    assert d == {"participants": NODES, "counted_on": NODES, "failed_by_stage": {},
                 "zero_filled": {s: 0.0 for s in STAGES}, "zero_filled_fraction": 0.0, "degraded": False}


def test_degradation_reports_every_device_missing_anywhere_and_the_most_zero_fill():
    b = book()
    frame = local(b, 0)
    f = b.frames[frame]
    merge_degraded(f.degraded, [(0, 0b100, 5), (2, 0b010, 4), (2, 0, 10)])
    d = b.degradation(f)
    assert d["participants"] == ["n0"]          # n1 and n2 were missing somewhere
    assert d["counted_on"] == NODES
    assert d["failed_by_stage"] == {"features.0": ["n2"], "classifier.1": ["n1"]}
    assert d["zero_filled"] == {"features.0": 0.5, "features.3": 0.0, "classifier.1": 0.25}
    assert d["zero_filled_fraction"] == pytest.approx(15 / 70) and d["degraded"]


def test_zero_fill_alone_makes_an_answer_degraded():
    b = book()
    frame = local(b, 0)
    b.frames[frame].degraded[1] = (0, 2)
    d = b.degradation(b.frames[frame])
    assert d["degraded"] and d["participants"] == NODES


def test_devices_not_counted_on_are_not_participants():
    b = book()
    frame = local(b, 0, participants={"n2"})
    d = b.degradation(b.frames[frame])
    assert (d["participants"], d["counted_on"]) == (["n0", "n2"], ["n0", "n2"])


# ---------------------------------------------------------------- any sequence of events

PEER_REPORTS = st.one_of(st.none(), st.tuples(st.dictionaries(st.integers(0, 8), st.integers(0, 3), max_size=2),
                                              st.integers(-1, 8)))
EVENTS = st.one_of(
    st.tuples(st.just("local"), st.integers(0, 50), st.integers(1, 400)),
    st.tuples(st.just("start")),
    st.tuples(st.just("peer"), st.sampled_from(["n1", "n2"]), st.integers(0, 8), st.integers(0, 50),
              st.integers(1, 400), PEER_REPORTS),
    st.tuples(st.just("work")), st.tuples(st.just("work")),
    st.tuples(st.just("slice"), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 5))),
    st.tuples(st.just("gathered")),
    st.tuples(st.just("done")),
    st.tuples(st.just("error")),
    st.tuples(st.just("expire"), st.floats(0, 3), st.booleans()),
    st.tuples(st.just("prune"), st.sampled_from(["n1", "n2"]), st.integers(-1, 8)),
    st.tuples(st.just("answers")),
)


def apply_event(b, event, now, pick, sequence):
    """Apply one event to `b` as the handler would; `pick` chooses among candidate frames,
    `sequence` numbers local frames."""
    kind = event[0]
    in_phase = lambda phase: [f for f in b.frames.values() if f.phase == phase]  # noqa: E731
    seq = lambda origin, s: wire.frame_id(NODES.index(origin), s)  # noqa: E731
    if kind == "local":
        b.admit_local(seq("n0", next(sequence)), event[1], "x", event[2], b"c", {}, now)
    elif kind == "start":
        for f in b.held():
            b.start(f.frame, ALL)
    elif kind == "peer":
        _, origin, s, t_ms, nbytes, rep = event
        report = None if rep is None else ({seq(origin, k): v for k, v in rep[0].items()},
                                           {origin: seq(origin, rep[1]) if rep[1] >= 0 else -1})
        assert b.admit_peer(seq(origin, s), origin, t_ms, ALL, "x", nbytes, now, report) in (
            None, fr.DROP_REPLAY, fr.DROP_FINISHED, fr.DROP_OVERFLOW)
    elif kind == "work":
        ready = [f.key for f in b.frames.values() if f.phase in fr.READY_PHASES]
        work = b.take_work()
        assert (work is None) == (not ready) and (work is None or work[0].key == min(ready))  # oldest first
        if work is not None:
            f, x, gathered = work
            assert (x is None) != (gathered is None)
            assert f.gathered is None and (f.input is None) == (not f.local)  # the engine holds them now
    elif kind == "slice" and in_phase(Phase.RUNNING):
        b.on_slice(pick(in_phase(Phase.RUNNING)).frame, event[1], event[2])
    elif kind == "gathered" and in_phase(Phase.GATHERING):
        f = pick(in_phase(Phase.GATHERING))
        b.on_gathered(f.frame, f.stage, b.missing_devices(f, ["n2"]), [(0, 0b10, 1)], "result")
    elif kind == "done" and in_phase(Phase.RUNNING):
        b.on_done(pick(in_phase(Phase.RUNNING)).frame, LOGITS, {2: 1}, 1.0, now)
    elif kind == "error" and b.frames:
        b.on_error(pick(list(b.frames.values())).frame, "engine: boom")
    elif kind == "prune":
        _, origin, s = event
        b.prune_origin(origin, {}, {origin: seq(origin, s) if s >= 0 else -1})
    elif kind == "answers":
        answers = b.take_answers()
        assert all(f.answer is not None and f.frame not in b.frames for f in answers)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENTS, min_size=5, max_size=60), st.data())
def test_any_sequence_of_events_keeps_the_books_straight(events, data):
    b = book()
    now, sequence = 0.0, itertools.count()
    pick = lambda frames: data.draw(st.sampled_from(frames))  # noqa: E731
    for event in events:
        if event[0] == "expire":
            now += event[1]
            if event[2]:   # back from a stall: the handler runs the local frames returned again
                for f in b.after_stall(now - 0.5, now)[1]:
                    b.rerun(f, wire.frame_id(0, next(sequence)))
            b.expire(now)
        else:
            apply_event(b, event, now, pick, sequence)
        # the admission caps hold, and the book's own accounting matches what it holds
        per_origin = collections.Counter(f.origin for f in b.frames.values())
        assert per_origin["n0"] <= b.max_per_origin
        assert all(n <= fr.PEER_WINDOW_FACTOR * b.max_per_origin for n in per_origin.values())
        assert all(b._per_origin[o] == per_origin[o] for o in set(per_origin) | set(b._per_origin))
        # inputs held: peers' until the engine takes them, local ones until answered (to run again)
        held_bytes = sum(f.input_bytes for f in b.frames.values()
                         if f.phase in (Phase.HELD, Phase.QUEUED) or (f.local and f.phase != Phase.DONE))
        assert b._queued_bytes == held_bytes <= b.max_queued_input_bytes
        # every local frame keeps its place in the clients' answer order, under its current id
        assert all(f.frame in b._answer_order for f in b.frames.values() if f.local)
        for f in b.frames.values():  # only local frames wait, done, for their answer; they all have one
            assert (f.answer is not None) == (f.phase == Phase.DONE) and (f.local or f.phase != Phase.DONE)
        assert set(b.progress()) == {f.frame for f in b.frames.values() if f.phase not in (Phase.HELD, Phase.DONE)}
