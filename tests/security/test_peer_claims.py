"""Issue 25, item 8, fuzz finding: a peer that heartbeats "ready, I hear everyone" but never
computes the frames it takes part in cost each frame about a second (saying it never got the
input: the gather waited out the sync timeout) or ten seconds and an "expired" answer (saying it
was busy with the frame: every heartbeat moved the deadline on). A busy claim now counts only
while the peer delivers slices here; a holder released at the sync timeout is suspected: its
other gathers, and those of new frames, stop waiting for it at once, until it delivers again.
Pure book, injected clock (mesh/gather.py)."""
import numpy as np
import pytest

from robustdice.mesh import gather as g
from robustdice.mesh.gather import GatherBook
from robustdice.mesh.membership import PeerState, Report

T = 1.0                    # sync timeout, seconds
N = 4                      # neurons of the stage
HOLDERS = {"me": [0, 1], "liar": [2, 3]}


class Peers:
    """The lookup GatherBook.poll takes: every peer alive, with the reports set here."""

    def __init__(self):
        self.reports = {}

    def __call__(self, peer):
        return PeerState.ALIVE, self.reports.get(peer)


def begin(book, frame, now_s, holders=None):
    holders = {"liar": HOLDERS["liar"]} if holders is None else holders
    assert book.begin(frame, 0, "me", np.array(HOLDERS["me"]), holders, N, now_s) == []


def rows(ids):
    return np.ones((len(ids), 2), np.float32)


def released_by(book, peers, until_s, step_s=0.1, start_s=0.0):
    """Poll every `step_s` (the liar heartbeating each time) until something finishes."""
    now = start_s
    while now <= until_s:
        for peer in list(peers.reports):
            peers.reports[peer] = Report(now, True, peers.reports[peer].hears, peers.reports[peer].progress,
                                         peers.reports[peer].inputs)
            book.peer_changed(peer)
        done = book.poll(now, peers)
        if done:
            return now, done
        now = round(now + step_s, 6)
    return None, []


def test_a_peer_claiming_to_be_busy_without_delivering_is_released_at_the_sync_timeout():
    """It took the frame timeout (10 s) before: every fresh "busy" heartbeat moved the deadline."""
    book = GatherBook("me", T * 1000)
    peers = Peers()
    begin(book, 7, 0.0)
    peers.reports["liar"] = Report(0.0, True, {}, {7: 0}, {"me": 7})   # "busy with frame 7, stage 0"
    when, (result,) = released_by(book, peers, until_s=12.0)
    assert when == pytest.approx(T) and result.released == {"liar": g.RELEASED_TIMEOUT}
    assert book.suspects(when) == {"liar"} and book.take_caught() == ["liar"]


def test_a_peer_claiming_it_never_got_the_input_pays_one_timeout_not_one_per_frame():
    """Every frame waited the sync timeout before: now the first does, the frames behind it are
    released as soon as the peer is suspected."""
    book = GatherBook("me", T * 1000)
    peers = Peers()
    for frame in (1, 2, 3):
        begin(book, frame, 0.1 * frame)
    peers.reports["liar"] = Report(0.0, True, {"me": (0, 0)}, {}, {})    # hears us, no input
    when, done = released_by(book, peers, until_s=5.0, step_s=0.05)
    done += book.poll(when, peers)
    assert when == pytest.approx(0.1 + T)
    assert {r.frame: r.released["liar"] for r in done} == {1: g.RELEASED_TIMEOUT, 2: g.RELEASED_SUSPECTED,
                                                           3: g.RELEASED_SUSPECTED}
    begin(book, 4, when)
    (r,) = book.poll(when, peers)
    assert r.released == {"liar": g.RELEASED_SUSPECTED} and r.elapsed_ms == 0


def test_a_busy_peer_that_delivers_older_work_is_waited_for():
    """A live peer with a queue: its slices of older frames keep coming, so its claim stands."""
    book = GatherBook("me", T * 1000)
    peers = Peers()
    begin(book, 100, 0.0)
    peers.reports["liar"] = Report(0.0, True, {}, {100: 0}, {"me": 100})
    now = 0.0
    for frame in range(1, 30):   # 2.9 s of older frames, one delivered every 0.1 s
        now = round(now + 0.1, 6)
        begin(book, frame, now)
        assert book.add_slice("liar", frame, 0, np.array(HOLDERS["liar"], np.int32), rows([2, 3]), now) is None
        peers.reports["liar"] = Report(now, True, {}, {100: 0}, {"me": 100})
        book.peer_changed("liar")
        assert [r.frame for r in book.poll(now, peers)] == [frame]
    assert book.active_keys() == [(100, 0)] and book.suspects(now) == frozenset()


def test_suspicion_ends_with_a_delivery_and_otherwise_lapses_and_doubles():
    book = GatherBook("me", T * 1000)
    peers = Peers()
    begin(book, 1, 0.0)
    book.poll(T, peers)
    base = g.SUSPECT_SYNC_TIMEOUTS * T
    assert book.suspects(T + base - 0.01) == {"liar"} and book.suspects(T + base) == frozenset()
    begin(book, 2, 10.0)          # caught again without a delivery in between: twice as long
    book.poll(10.0 + T, peers)
    assert book.suspects(10.0 + T + 2 * base - 0.01) == {"liar"}
    # a late slice of a real frame is a delivery: no longer suspected
    assert book.add_slice("liar", 2, 0, np.array(HOLDERS["liar"], np.int32), rows([2, 3]), 12.0) == g.LATE
    assert book.suspects(12.0) == frozenset()
    # ... and a replay of it does not count twice
    assert book.add_slice("liar", 2, 0, np.array(HOLDERS["liar"], np.int32), rows([2, 3]), 12.1) == g.STALE


def test_a_peer_back_from_the_dead_is_no_longer_suspected_but_a_repeat_costs_more():
    book = GatherBook("me", T * 1000)
    peers = Peers()
    begin(book, 1, 0.0)
    book.poll(T, peers)
    book.rejoined("liar")
    assert book.suspects(T) == frozenset()
    begin(book, 2, 2.0)
    book.poll(2.0 + T, peers)
    assert book.suspects(2.0 + T + 2 * g.SUSPECT_SYNC_TIMEOUTS * T - 0.01) == {"liar"}
