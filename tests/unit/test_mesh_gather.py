"""mesh/gather.py: when a gather completes, when it stops waiting for a holder (`holder_verdict`),
which slices it uses and how it counts the others. The clock is injected; nothing sleeps."""
import warnings

import numpy as np
import pytest

from robustdice.mesh import gather as g
from robustdice.mesh.errors import MeshError
from robustdice.mesh.gather import GatherBook
from robustdice.mesh.mesh import ROUTINE_DROPS
from robustdice.mesh.membership import PeerState, Report

FRAME, STAGE, ORIGIN = 5, 2, "o"
N = 6
T = 1.0  # sync timeout, seconds
HOLDERS = {"me": [0, 1], "a": [2, 3], "b": [4, 5, 0]}


def rows(ids, value=None, dtype=np.float32, width=2):
    ids = np.asarray(ids)
    if value is None:
        return (ids[:, None] * 10 + np.arange(width)[None, :]).astype(dtype)
    return np.full((len(ids), width), value, dtype)


class Peers:
    """The lookup GatherBook.poll takes: peer -> (state, latest report); alive and silent by default."""

    def __init__(self, **states):
        self.states = dict(states)
        self.reports = {}

    def __call__(self, peer):
        return self.states.get(peer, PeerState.ALIVE), self.reports.get(peer)


def book_with(holders=HOLDERS, local_ids=(0, 1), now_s=0.0, frame=FRAME, stage=STAGE, **kw):
    kw.setdefault("max_stage", 4)
    book = GatherBook("me", T * 1000, **kw)
    assert book.begin(frame, stage, ORIGIN, np.array(local_ids), holders, N, now_s) == []
    return book


def answer(book, sender, now_s=0.1, frame=FRAME, stage=STAGE, value=None, ids=None):
    ids = HOLDERS[sender] if ids is None else ids
    return book.add_slice(sender, frame, stage, np.array(ids, np.int32), rows(ids, value), now_s)


# ---------------------------------------------------------------- completion

def test_completes_when_every_holder_answered():
    book = book_with()
    peers = Peers()
    assert answer(book, "a") is None
    assert book.poll(0.1, peers) == []
    assert answer(book, "b", 0.25) is None
    (r,) = book.poll(0.25, peers)
    assert (r.frame, r.stage, r.uncovered, r.released, r.timed_out) == (FRAME, STAGE, 0, {}, False)
    assert r.contributors == {"me", "a", "b"}
    assert [p.sender for p in r.pieces] == ["a", "b"]  # arrival order
    assert r.elapsed_ms == pytest.approx(250)
    assert book.active_keys() == []


def test_completes_when_every_neuron_has_a_copy_though_a_holder_is_silent():
    book = book_with({"a": [2, 3, 4, 5], "b": [4, 5]})
    answer_ids = [2, 3, 4, 5]
    book.add_slice("a", FRAME, STAGE, np.array(answer_ids, np.int32), rows(answer_ids), 0.1)
    (r,) = book.poll(0.1, Peers())
    assert r.uncovered == 0 and r.released == {} and r.contributors == {"me", "a"}


def test_a_dead_holder_whose_rows_all_came_from_others_is_not_reported_released():
    # released holders count as missing devices in the answer: a replicated one is not missing
    book = book_with({"a": [2, 3, 4, 5], "b": [4, 5]})
    answer(book, "a", ids=[2, 3, 4, 5])
    (r,) = book.poll(0.1, Peers(b=PeerState.DEAD))
    assert r.released == {} and r.uncovered == 0
    assert answer(book, "b", 0.2, ids=[4, 5]) == g.LATE_REPLICA


def test_pieces_are_the_received_arrays_not_copies():
    book = book_with({"a": [2, 3, 4, 5]})
    ids, array = np.array([2, 3, 4, 5], np.int32), rows([2, 3, 4, 5])
    book.add_slice("a", FRAME, STAGE, ids, array, 0.1, degraded=((1, 0b100, 7),))
    (r,) = book.poll(0.1, Peers())
    (piece,) = r.pieces
    assert piece.array is array and piece.neuron_ids is ids and piece.degraded == ((1, 0b100, 7),)


def test_a_gather_with_nothing_to_wait_for_completes_at_the_first_poll():
    book = book_with({}, local_ids=range(N))
    (r,) = book.poll(0.0, Peers())
    assert r.uncovered == 0 and r.pieces == () and r.contributors == {"me"}


def test_a_holder_listed_for_no_neurons_is_answered_by_an_empty_slice():
    book = book_with({"a": [2, 3, 4, 5], "c": []})
    answer(book, "a", ids=[2, 3, 4, 5])
    assert book.add_slice("c", FRAME, STAGE, np.zeros(0, np.int32), np.zeros((0, 2), np.float32), 0.1) is None
    (r,) = book.poll(0.1, Peers())
    assert r.contributors == {"me", "a"}  # an empty slice contributes nothing


def test_several_gathers_at_once_finish_independently():
    book = GatherBook("me", T * 1000)
    for stage in (0, 1):
        book.begin(1, stage, ORIGIN, np.array([0]), {"a": [1]}, 2, 0.0)
    book.add_slice("a", 1, 1, np.array([1], np.int32), rows([1]), 0.1)
    (r,) = book.poll(0.1, Peers())
    assert (r.frame, r.stage) == (1, 1) and book.active_keys() == [(1, 0)]


# ---------------------------------------------------------------- holder_verdict

def report(received_s=0.5, ready=True, progress=None, inputs=None, hears=None):
    return Report(received_s, ready, hears or {}, progress or {}, inputs or {})


@pytest.mark.parametrize("state,rep,now_s,expected", [
    (PeerState.DEAD, None, 0.0, g.RELEASED_DEAD),
    (PeerState.REFUSED, None, 0.0, g.RELEASED_DEAD),
    (PeerState.UNKNOWN, None, 0.0, g.RELEASED_DEAD),
    (PeerState.DEAD, report(progress={FRAME: 0}), 0.0, g.RELEASED_DEAD),
    (PeerState.ALIVE, report(ready=False, progress={FRAME: 0}), 0.0, g.RELEASED_STALLED),
    (PeerState.UNREACHABLE, report(ready=False), 0.0, g.RELEASED_UNREACHABLE),
    (PeerState.ALIVE, report(progress={FRAME: STAGE + 1}), 0.0, g.RELEASED_LOST),
    (PeerState.ALIVE, report(progress={FRAME: STAGE + 5}), 0.0, g.RELEASED_LOST),
    (PeerState.ALIVE, report(progress={FRAME: STAGE}), 0.0, None),
    (PeerState.ALIVE, report(progress={FRAME: 0}), 0.0, None),
    (PeerState.ALIVE, report(inputs={ORIGIN: FRAME}), 0.0, g.RELEASED_ABSENT),
    (PeerState.ALIVE, report(inputs={ORIGIN: FRAME + 1}), 0.0, g.RELEASED_ABSENT),
    (PeerState.ALIVE, report(inputs={ORIGIN: FRAME - 1}), 0.0, None),
    (PeerState.ALIVE, report(inputs={"other": FRAME + 1}), 0.0, None),
    (PeerState.ALIVE, report(progress={FRAME + 1: 3}, inputs={ORIGIN: FRAME - 1}), 0.0, None),
    (PeerState.ALIVE, None, 0.0, None),
    (PeerState.UNREACHABLE, None, 0.0, g.RELEASED_UNREACHABLE),
    (PeerState.ALIVE, None, 1.0, g.RELEASED_TIMEOUT),
    (PeerState.UNREACHABLE, None, 1.0, g.RELEASED_UNREACHABLE),
    (PeerState.ALIVE, report(received_s=-5.0, progress={FRAME: 0}), 1.0, g.RELEASED_TIMEOUT),
], ids=["dead", "refused", "unknown", "dead_though_busy", "stalled", "stalled_unreachable", "lost", "lost_far_ahead",
        "at_this_stage", "input_held", "absent", "absent_newer_input", "input_not_yet_here", "other_origin",
        "other_frames_only", "silent", "unreachable", "silent_at_deadline", "unreachable_at_deadline",
        "old_report_at_deadline"])
def test_holder_verdict(state, rep, now_s, expected):
    reason, _ = g.holder_verdict(FRAME, STAGE, ORIGIN, state, rep, 1.0, T, now_s)
    assert reason == expected


@pytest.mark.parametrize("hears,expected", [
    ({}, g.RELEASED_ABSENT),                       # it cannot hear the origin: the input never reaches it
    ({ORIGIN: (1, 20)}, None),                     # it hears the origin: the input is on its way
])
def test_a_holder_that_cannot_hear_the_origin_will_never_have_the_frame(hears, expected):
    rep = report(received_s=0.5, hears=hears, inputs={ORIGIN: FRAME - 1})
    args = (FRAME, STAGE, ORIGIN, PeerState.ALIVE, rep, 1.0, T, 0.6)
    assert g.holder_verdict(*args, holder="b", self_id=ORIGIN, started_s=0.2)[0] == expected
    # Only the origin judges so, and only from a report sent after the gather began: an older one,
    # or another node's copy, may predate the holder hearing the origin.
    assert g.holder_verdict(*args, holder="b", self_id="c", started_s=0.2)[0] is None
    assert g.holder_verdict(*args, holder="b", self_id=ORIGIN, started_s=0.55)[0] is None
    # The origin itself needs no input: it is judged by its progress alone.
    assert g.holder_verdict(FRAME, STAGE, ORIGIN, PeerState.ALIVE, report(), 1.0, T, 0.0, holder=ORIGIN,
                            self_id="c")[0] is None


def test_releases_for_the_whole_frame_are_all_but_a_lost_slice():
    assert g.FOR_THE_FRAME == {g.RELEASED_DEAD, g.RELEASED_STALLED, g.RELEASED_ABSENT, g.RELEASED_TIMEOUT,
                               g.RELEASED_UNREACHABLE, g.RELEASED_SUSPECTED}


def test_holder_busy_with_the_frame_moves_its_deadline_to_report_plus_timeout():
    reason, deadline = g.holder_verdict(FRAME, STAGE, ORIGIN, PeerState.ALIVE, report(0.8, progress={FRAME: 1}),
                                        1.0, T, 1.2)
    assert (reason, deadline) == (None, pytest.approx(1.8))


def test_holder_deadline_never_moves_earlier():
    reason, deadline = g.holder_verdict(FRAME, STAGE, ORIGIN, PeerState.ALIVE, report(-0.5, progress={FRAME: 1}),
                                        1.0, T, 0.2)
    assert (reason, deadline) == (None, 1.0)


@pytest.mark.parametrize("state,rep,released", [
    (PeerState.DEAD, None, "dead"),
    (PeerState.ALIVE, report(0.0, ready=False), "stalled"),
    (PeerState.ALIVE, report(0.0, progress={FRAME: STAGE + 1}), "lost"),
    (PeerState.ALIVE, report(0.0, inputs={ORIGIN: FRAME}), "absent"),
])
def test_book_releases_a_holder_that_cannot_answer_at_once(state, rep, released):
    book = book_with()
    answer(book, "a")
    peers = Peers(b=state)
    peers.reports["b"] = rep
    (r,) = book.poll(0.1, peers)
    assert r.released == {"b": released} and not r.timed_out
    assert r.uncovered == 2 and r.contributors == {"me", "a"}  # 4 and 5 had no other copy


def test_silent_holder_is_released_at_the_sync_timeout():
    book = book_with()
    answer(book, "a")
    peers = Peers()
    assert book.poll(0.999, peers) == []
    assert book.next_deadline_s() == pytest.approx(1.0)
    (r,) = book.poll(1.0, peers)
    assert r.released == {"b": "timeout"} and r.timed_out and r.uncovered == 2


def test_unreachable_holder_is_released_at_once():
    """Others hear it, we do not: its slices cannot reach us, waiting would only cost time."""
    book = book_with()
    answer(book, "a")
    (r,) = book.poll(0.1, Peers(b=PeerState.UNREACHABLE))
    assert r.released == {"b": "unreachable"} and not r.timed_out


def busy_b(received_s, stages_sent, delivering=True):
    """A gather that a has answered, and b's report saying it is busy with the frame; b delivers
    the slice of an older frame here when it reports (a busy live peer computes older work)."""
    book = book_with()
    answer(book, "a")
    if delivering:
        book.begin(FRAME - 1, STAGE, ORIGIN, np.array([0, 1]), {"b": HOLDERS["b"]}, N, 0.0)
        assert answer(book, "b", received_s, frame=FRAME - 1) is None
    peers = Peers()
    peers.reports["b"] = report(received_s, progress={FRAME: stages_sent})
    book.peer_changed("b")
    return book, peers


def test_busy_holder_is_waited_for_past_the_sync_timeout():
    book, peers = busy_b(0.8, STAGE)  # computing this stage of the frame
    assert [r.frame for r in book.poll(0.8, peers)] == [FRAME - 1]
    assert book.poll(1.0, peers) == []  # the first deadline passed: still busy, still waited for
    assert book.next_deadline_s() == pytest.approx(1.8)
    assert book.poll(1.79, peers) == []
    (r,) = book.poll(1.8, peers)
    assert r.released == {"b": "timeout"}


def test_busy_holder_answering_late_is_used():
    book, peers = busy_b(0.9, 0)
    assert [r.frame for r in book.poll(0.9, peers)] == [FRAME - 1]
    assert book.poll(1.5, peers) == []
    assert answer(book, "b", 1.6) is None
    (r,) = book.poll(1.6, peers)
    assert r.released == {} and r.uncovered == 0


def test_peer_changed_rejudges_a_waiting_gather():
    book = book_with()
    answer(book, "a")
    peers = Peers()
    assert book.poll(0.2, peers) == []
    peers.reports["b"] = report(0.3, inputs={ORIGIN: FRAME})  # b finished or dropped the frame
    book.peer_changed("b")
    (r,) = book.poll(0.3, peers)
    assert r.released == {"b": "absent"}


def test_released_holder_whose_slice_comes_before_the_end_is_used():
    book = book_with()
    peers = Peers(a=PeerState.DEAD)
    assert book.poll(0.1, peers) == []  # a released, b still awaited
    assert answer(book, "a", 0.2) is None
    assert answer(book, "b", 0.3) is None
    (r,) = book.poll(0.3, Peers())
    assert r.released == {} and r.uncovered == 0 and r.contributors == {"me", "a", "b"}


# ---------------------------------------------------------------- strict slice checks

BAD = [
    ("a", [2], None, "subset of its ids"),
    ("a", [2, 3, 4], None, "more than its ids"),
    ("a", [3, 2], None, "its ids in another order"),
    ("a", [2, 2], None, "a held id repeated"),
    ("a", [3, 3], None, "the other held id repeated"),
    ("a", [2, 9], None, "id outside range"),
    ("a", [2, -1], None, "negative id"),
    ("a", [4, 5], None, "another holder's ids"),
    ("zz", [2, 3], None, "not a holder"),
    ("me", [0, 1], None, "our own id"),
    ("a", [2, 3], np.zeros((3, 2), np.float32), "rows unlike ids"),
    ("a", [2, 3], np.zeros((1, 2), np.float32), "fewer rows than ids"),
]


@pytest.mark.parametrize("sender,ids,array,why", BAD, ids=[b[3] for b in BAD])
def test_a_slice_not_exactly_the_holders_ids_is_bad_and_not_an_answer(sender, ids, array, why):
    book = book_with()
    array = rows(ids) if array is None else array
    assert book.add_slice(sender, FRAME, STAGE, np.array(ids, np.int32), array, 0.1) == g.BAD_SLICE
    answer(book, "b")
    peers = Peers()
    assert book.poll(0.5, peers) == []  # a is still awaited: the bad slice was not its answer
    (r,) = book.poll(1.0, peers)
    assert r.released == {"a": "timeout"} and [p.sender for p in r.pieces] == ["b"]


def test_repeated_held_id_is_not_a_complete_answer():
    # issue 9: ids repeating one held id used to count as a complete answer, the rest zero-filled.
    book = book_with({"a": [2, 3, 4, 5]})
    assert book.add_slice("a", FRAME, STAGE, np.array([2, 2, 2, 2], np.int32), rows([2, 2, 2, 2]), 0.1) == "bad_slice"
    assert book.poll(0.1, Peers()) == []


def test_a_good_answer_after_a_bad_one_is_used():
    book = book_with({"a": [2, 3, 4, 5]})
    book.add_slice("a", FRAME, STAGE, np.array([2, 2], np.int32), rows([2, 2]), 0.1)
    assert answer(book, "a", ids=[2, 3, 4, 5]) is None
    (r,) = book.poll(0.1, Peers())
    assert r.uncovered == 0


@pytest.mark.parametrize("array,why", [
    (np.zeros((2, 3), np.float32), "trailing shape"),
    (np.zeros((2, 2), np.float64), "dtype"),
    (np.zeros((2,), np.float32), "no trailing axis"),
])
def test_slice_unlike_the_pieces_already_used_is_bad(array, why):
    book = book_with()
    answer(book, "b")
    assert book.add_slice("a", FRAME, STAGE, np.array([2, 3], np.int32), array, 0.1) == g.BAD_SLICE, why


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_payload_is_dropped_and_not_an_answer(dtype, bad):
    book = book_with({"a": [2, 3, 4, 5]})
    array = rows([2, 3, 4, 5], dtype=dtype)
    array[2, 1] = bad
    assert book.add_slice("a", FRAME, STAGE, np.array([2, 3, 4, 5], np.int32), array, 0.1) == g.NOT_FINITE
    assert book.poll(0.1, Peers()) == []


def test_opposite_infinities_are_not_finite_without_a_numpy_warning():
    book = book_with({"a": [2, 3, 4, 5]})
    array = rows([2, 3, 4, 5])
    array[0, 0], array[1, 0] = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert book.add_slice("a", FRAME, STAGE, np.array([2, 3, 4, 5], np.int32), array, 0.1) == g.NOT_FINITE


def test_non_finite_early_slice_is_not_buffered():
    book = GatherBook("me", T * 1000)
    assert book.add_slice("a", 9, 0, np.array([2], np.int32), rows([2], np.nan), 0.0) == g.NOT_FINITE
    assert book.early_count == 0


def test_integer_payloads_are_always_finite():
    book = book_with({"a": [2, 3, 4, 5]})
    ids = np.array([2, 3, 4, 5], np.int32)
    assert book.add_slice("a", FRAME, STAGE, ids, np.full((4, 2), 2 ** 31 - 1, np.int32), 0.1) is None


@pytest.mark.parametrize("stage,max_stage,expected", [
    (3, 4, None), (4, 4, g.BAD_STAGE), (2 ** 31 - 1, 4, g.BAD_STAGE), (0, 0, g.BAD_STAGE), (10 ** 6, None, None),
])
def test_stage_past_the_plan_is_bad_stage(stage, max_stage, expected):
    book = GatherBook("me", T * 1000, max_stage=max_stage)
    assert book.add_slice("a", 1, stage, np.array([0], np.int32), rows([0]), 0.0) == expected
    assert book.early_count == (0 if expected else 1)


def test_second_answer_from_the_same_holder_is_a_duplicate_and_the_first_stays():
    book = book_with()
    assert answer(book, "a", value=1.0) is None
    assert answer(book, "a", value=2.0) == g.DUPLICATE
    answer(book, "b")
    (r,) = book.poll(0.1, Peers())
    assert [(p.sender, float(p.array[0, 0])) for p in r.pieces[:1]] == [("a", 1.0)] and len(r.pieces) == 2


# ---------------------------------------------------------------- late slices

def test_slice_of_a_released_holder_after_the_end_is_late():
    book = book_with()
    answer(book, "a")
    book.poll(1.0, Peers())
    assert answer(book, "b", 1.1) == g.LATE


def test_replica_after_every_neuron_had_a_copy_is_late_replica():
    book = book_with({"a": [2, 3, 4, 5], "b": [4, 5]})
    answer(book, "a", ids=[2, 3, 4, 5])
    book.poll(0.1, Peers())
    assert answer(book, "b", 0.2, ids=[4, 5]) == g.LATE_REPLICA


@pytest.mark.parametrize("sender", ["a", "zz"])
def test_replay_of_a_used_slice_or_a_stranger_after_the_end_is_stale(sender):
    book = book_with()
    answer(book, "a")
    answer(book, "b")
    book.poll(0.1, Peers())
    assert book.add_slice(sender, FRAME, STAGE, np.array([2, 3], np.int32), rows([2, 3]), 0.2) == g.STALE


def test_finished_memory_is_bounded():
    book = book_with(finished_memory=2)
    book.poll(0.0, Peers(a=PeerState.DEAD, b=PeerState.DEAD))
    for frame in (6, 7):
        book.begin(frame, 0, ORIGIN, np.arange(N), {}, N, 0.0)
    assert len(book.poll(0.0, Peers())) == 2
    # (5, 2) fell out of the memory: a slice for it is taken for an early one
    assert answer(book, "a", 0.1) is None and book.early_count == 1


def test_abandon_forgets_the_frame_and_its_late_slices_count_as_late():
    book = book_with()
    book.begin(FRAME, STAGE + 1, ORIGIN, np.array([0, 1]), HOLDERS, N, 0.0)
    book.begin(FRAME + 1, STAGE, ORIGIN, np.array([0, 1]), HOLDERS, N, 0.0)
    book.add_slice("a", FRAME, 0, np.array([2, 3], np.int32), rows([2, 3]), 0.0)  # an early one of the frame
    assert book.abandon(FRAME) == 2
    assert book.active_keys() == [(FRAME + 1, STAGE)] and book.early_count == 0 and book.early_bytes == 0
    assert answer(book, "a") == g.LATE
    assert book.poll(5.0, Peers()) and book.active_keys() == []  # only frame 6 finishes (at its timeout)
    with pytest.raises(MeshError):
        book.begin(FRAME, STAGE, ORIGIN, np.array([0, 1]), HOLDERS, N, 6.0)


def test_a_frame_its_origin_finished_drops_its_later_slices_as_finished_not_late():
    """Routine under load (a node behind prunes what its origin finished): not a `late` warning."""
    book = book_with()
    assert book.abandon(FRAME, finished=True) == 1
    assert answer(book, "a") == g.FINISHED
    assert answer(book, "b", stage=STAGE + 1) == g.FINISHED and book.early_count == 0
    book.abandon(FRAME + 1)  # expired here: still `late`
    assert answer(book, "a", frame=FRAME + 1) == g.LATE


def test_slices_of_an_abandoned_frames_later_stages_are_not_buffered():
    book = book_with()
    book.abandon(FRAME)
    assert answer(book, "a", stage=STAGE + 1) is not None
    assert book.early_count == 0


# ---------------------------------------------------------------- early slices

def test_early_slice_is_buffered_and_used_when_the_gather_begins():
    book = GatherBook("me", T * 1000)
    assert book.add_slice("a", 9, 0, np.array([2, 3], np.int32), rows([2, 3]), 0.0) is None
    assert book.early_count == 1 and book.early_bytes == rows([2, 3]).nbytes + 8
    assert book.begin(9, 0, ORIGIN, np.array([0, 1]), {"a": [2, 3]}, 4, 0.1) == []
    (r,) = book.poll(0.1, Peers())
    assert r.uncovered == 0 and [p.sender for p in r.pieces] == ["a"]
    assert book.early_count == 0 and book.early_bytes == 0


def test_bad_early_slice_is_reported_when_the_gather_begins():
    book = GatherBook("me", T * 1000)
    book.add_slice("a", 9, 0, np.array([3, 3], np.int32), rows([3, 3]), 0.0)
    book.add_slice("zz", 9, 0, np.array([3], np.int32), rows([3]), 0.0)
    rejected = book.begin(9, 0, ORIGIN, np.array([0]), {"a": [1, 3]}, 4, 0.1)
    assert sorted(rejected) == [("a", "bad_slice"), ("zz", "bad_slice")]
    assert book.early_count == 0


def test_an_early_slice_of_a_participant_released_from_the_frame_is_not_waited_not_bad():
    # Under overload a node keeps a participant's early slices (issue 26); if it has released that
    # participant from the frame by the time the stage begins, the slice is routine, not hostile.
    book = GatherBook("me", T * 1000)
    book.admit(9, {"me", "a", "b"}, 0.0)
    book.add_slice("b", 9, 1, np.array([2, 3], np.int32), rows([2, 3]), 0.0)
    book.add_slice("a", 9, 1, np.array([3], np.int32), rows([3]), 0.0)
    assert sorted(book.begin(9, 1, ORIGIN, np.array([0]), {"a": [1, 3]}, 4, 0.1)) == [
        ("a", "bad_slice"), ("b", g.NOT_WAITED)]
    assert g.NOT_WAITED in ROUTINE_DROPS and g.BAD_SLICE not in ROUTINE_DROPS


def test_early_duplicate_is_a_duplicate():
    book = GatherBook("me", T * 1000)
    book.add_slice("a", 9, 0, np.array([2], np.int32), rows([2]), 0.0)
    assert book.add_slice("a", 9, 0, np.array([2], np.int32), rows([2]), 0.0) == g.DUPLICATE
    assert book.early_count == 1


def test_early_window_is_bounded_by_count_oldest_out_first():
    book = GatherBook("me", T * 1000, max_early_slices=3)
    for frame in range(3):
        assert book.add_slice("a", frame, 0, np.array([0], np.int32), rows([0]), 0.0) is None
    assert book.add_slice("a", 3, 0, np.array([0], np.int32), rows([0]), 0.0) == g.EARLY_EVICTED
    assert book.early_count == 3
    book.begin(0, 0, ORIGIN, np.array([1]), {"a": [0]}, 2, 0.1)  # frame 0's slice was the one pushed out
    assert book.poll(0.1, Peers()) == [] and book.early_count == 3


def test_early_window_is_bounded_by_bytes():
    one = rows([0]).nbytes + 4
    book = GatherBook("me", T * 1000, max_early_bytes=2 * one)
    book.add_slice("a", 0, 0, np.array([0], np.int32), rows([0]), 0.0)
    book.add_slice("a", 1, 0, np.array([0], np.int32), rows([0]), 0.0)
    assert book.add_slice("a", 2, 0, np.array([0], np.int32), rows([0]), 0.0) == g.EARLY_EVICTED
    assert (book.early_count, book.early_bytes) == (2, 2 * one)


def test_raised_bounds_keep_admitted_frames_slices_and_never_those_nobody_asked_for():
    # issue 26: under overload a node behind its peers evicted live peers' slices of its own
    # frames (Lite0, 4 origins x 16 in flight) and zero-filled them with nothing failed.
    one = rows([0]).nbytes + 4
    book = GatherBook("me", T * 1000, max_early_bytes=2 * one, max_early_slices=2)
    book.set_early_bounds(8, 8 * one)
    book.set_early_bounds(1, one)   # bounds only rise
    for frame in range(6):
        book.admit(frame, {"me", "a"}, 0.0)
        assert book.add_slice("a", frame, 0, np.array([0], np.int32), rows([0]), 0.0) is None
    assert (book.early_count, book.early_bytes) == (6, 6 * one)
    # frames not admitted keep the bounds the book was made with
    assert book.add_slice("a", 10, 0, np.array([0], np.int32), rows([0]), 0.0) is None
    assert book.add_slice("a", 11, 0, np.array([0], np.int32), rows([0]), 0.0) is None
    assert book.add_slice("a", 12, 0, np.array([0], np.int32), rows([0]), 0.0) == g.EARLY_EVICTED
    assert book.early_count == 8
    for frame in range(6):   # every admitted frame's slice is still there when its gather begins
        book.begin(frame, 0, ORIGIN, np.array([1]), {"a": [0]}, 2, 0.1)
    assert len(book.poll(0.1, Peers())) == 6


def test_early_slice_bigger_than_the_window_is_not_kept():
    book = GatherBook("me", T * 1000, max_early_bytes=100)
    big = rows(range(20))
    assert book.add_slice("a", 0, 0, np.arange(20, dtype=np.int32), big, 0.0) == g.EARLY_EVICTED
    assert (book.early_count, book.early_bytes) == (0, 0)


def test_early_slices_expire_after_their_ttl():
    # issue 9: early slices never expired; 192 MiB stayed pinned until later traffic pushed it out.
    book = GatherBook("me", T * 1000, early_ttl_s=10.0)
    book.admit(0, {"me", "a"}, 0.0)
    book.admit(1, {"me", "b"}, 0.0)
    book.add_slice("a", 0, 0, np.array([0], np.int32), rows([0]), 0.0)
    book.add_slice("b", 1, 0, np.array([0], np.int32), rows([0]), 4.0)
    assert book.expire_early(9.99) == 0 and book.early_count == 2
    assert book.expire_early(10.0) == 1 and book.early_count == 1
    assert book.expire_early(14.0) == 1 and (book.early_count, book.early_bytes) == (0, 0)
    book.begin(0, 0, ORIGIN, np.array([1]), {"a": [0]}, 2, 14.0)
    assert book.poll(14.0, Peers()) == []  # the expired slice is not used


# ---------------------------------------------------------------- misuse

@pytest.mark.parametrize("local_ids,n_ids", [([0, 7], 4), ([-1], 4), ([0], -1), ([0], 2.0), ([0], "4")],
                         ids=["id_past_n", "negative_id", "negative_n", "float_n", "string_n"])
def test_begin_rejects_a_bad_local_slice(local_ids, n_ids):
    with pytest.raises(MeshError):
        GatherBook("me", T * 1000).begin(0, 0, ORIGIN, np.array(local_ids), {}, n_ids, 0.0)


def test_begin_twice_or_after_the_end_raises():
    book = book_with()
    with pytest.raises(MeshError):
        book.begin(FRAME, STAGE, ORIGIN, np.array([0]), {}, N, 0.0)
    book.poll(0.0, Peers(a=PeerState.DEAD, b=PeerState.DEAD))
    with pytest.raises(MeshError):
        book.begin(FRAME, STAGE, ORIGIN, np.array([0]), {}, N, 0.0)


def test_begin_rejects_holder_ids_outside_the_stage():
    book = GatherBook("me", T * 1000)
    with pytest.raises(MeshError):
        book.begin(0, 0, ORIGIN, np.array([0]), {"a": [1, N]}, N, 0.0)
    book.add_slice("a", 0, 0, np.array([1, N], np.int32), rows([1, N]), 0.0)  # must not raise either


def test_drop_reasons_are_distinct_counter_names():
    reasons = [g.STALE, g.LATE, g.LATE_REPLICA, g.FINISHED, g.BAD_SLICE, g.NOT_FINITE, g.DUPLICATE, g.EARLY_EVICTED,
               g.EARLY_EXPIRED, g.BAD_STAGE]
    assert len(set(reasons)) == len(reasons)
