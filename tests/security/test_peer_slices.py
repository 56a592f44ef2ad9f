"""Issue 25, item 8, fuzz finding: slices for a frame this node had not admitted yet were kept
(for ten seconds) and used when the frame came; frame ids are predictable, so a peer could place
its rows before it could have computed them. A slice of a frame not admitted is now kept for one
sync timeout only, dropped when the frame comes without its sender among the participants, and
one sender's flood of them evicts only its own. Pure book, injected clock (mesh/gather.py)."""
import numpy as np

from robustdice.mesh import gather as g
from robustdice.mesh.gather import GatherBook
from robustdice.mesh.membership import PeerState

T = 1.0     # sync timeout, seconds
N = 4
IDS = {"me": [0, 1], "b": [2, 3], "liar": [2, 3]}
FRAME = 9


def lookup(peer):
    return PeerState.ALIVE, None


def send(book, sender, now_s, frame=FRAME, value=1.0):
    return book.add_slice(sender, frame, 0, np.array(IDS[sender], np.int32), np.full((2, 2), value, np.float32), now_s)


def begin(book, now_s, holders=("b",)):
    return book.begin(FRAME, 0, "o", np.array(IDS["me"]), {h: IDS[h] for h in holders}, N, now_s)


def test_a_slice_placed_ahead_of_its_frame_is_dropped_when_the_frame_does_not_come_in_time():
    book = GatherBook("me", T * 1000, senders=2)
    assert send(book, "liar", 0.0, value=3e38) is None          # kept, for now
    assert book.expire_unadmitted(T - 0.01) == 0 and book.early_count == 1
    assert book.expire_unadmitted(T) == 1 and (book.early_count, book.early_bytes) == (0, 0)
    assert book.expire_early(T) == 0
    book.admit(FRAME, {"me", "liar"}, 2.0)
    assert begin(book, 2.1, holders=("liar",)) == []
    assert book.poll(2.1, lookup) == [], "the slice placed 2 s ahead was used"


def test_a_slice_of_a_non_participant_is_dropped_when_the_frame_is_admitted_and_after():
    book = GatherBook("me", T * 1000, senders=2)
    assert send(book, "liar", 0.0) is None and send(book, "b", 0.0) is None
    assert book.admit(FRAME, {"me", "b"}, 0.2) == [("liar", g.NOT_PARTICIPANT)]
    assert book.early_count == 1
    assert send(book, "liar", 0.3) == g.NOT_PARTICIPANT and book.early_count == 1
    assert begin(book, 0.4) == []
    (r,) = book.poll(0.4, lookup)
    assert [p.sender for p in r.pieces] == ["b"]


def test_a_participants_slice_kept_from_before_admission_is_used():
    """The skew between a peer's slice and the origin's input, on two connections: routine."""
    book = GatherBook("me", T * 1000, senders=2)
    assert send(book, "b", 0.0) is None
    assert book.admit(FRAME, {"me", "b"}, 0.5) == []
    assert book.expire_unadmitted(5.0) == 0 and book.expire_early(5.0) == 0   # admitted: kept longer
    assert begin(book, 5.0) == []
    (r,) = book.poll(5.0, lookup)
    assert [p.sender for p in r.pieces] == ["b"] and r.uncovered == 0


def test_one_senders_flood_of_early_slices_evicts_only_its_own():
    book = GatherBook("me", T * 1000, senders=2, max_early_slices=8)
    assert send(book, "b", 0.0) is None
    evicted = [send(book, "liar", 0.01 * i, frame=1000 + i) for i in range(100)]
    assert evicted.count(g.EARLY_EVICTED) == 96 and book.early_count == 5
    book.admit(FRAME, {"me", "b"}, 0.5)
    assert begin(book, 0.5) == []
    (r,) = book.poll(0.5, lookup)
    assert [p.sender for p in r.pieces] == ["b"], "the honest peer's early slice was pushed out"
