import numpy as np
import pytest

from robustdice.mesh.errors import MeshError
from robustdice.mesh.gather import GatherBook, SliceData

N = 6
TRAIL = (2,)


def rows(ids, value=None):
    ids = np.asarray(ids)
    base = ids[:, None] * 10 + np.arange(2)[None, :] if value is None else np.full((len(ids), 2), value)
    return base.astype(np.float32)


def book_with(holders, local_ids=(0, 1), deadline_s=1.0, **kw):
    book = GatherBook("me", **kw)
    book.begin(5, 2, SliceData(np.array(local_ids), rows(local_ids)), holders, N, 0.0, deadline_s)
    return book


HOLDERS = {"me": [0, 1], "a": [2, 3], "b": [4, 5, 0]}


def test_completes_when_every_neuron_has_a_copy_even_if_a_holder_is_silent():
    book = book_with(HOLDERS)
    alive = frozenset({"a", "b"})
    assert book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3])) is None
    assert book.poll(0.1, alive) == []
    assert book.add_slice("b", 5, 2, np.array([4, 5, 0]), rows([4, 5, 0])) is None
    (r,) = book.poll(0.2, alive)
    np.testing.assert_array_equal(r.array, rows(range(N)))
    assert not r.zero_mask.any() and r.contributors == {"me", "a", "b"} and not r.timed_out
    assert r.elapsed_ms == pytest.approx(200)


def test_completes_when_every_live_holder_answered():
    book = book_with(HOLDERS)
    book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3]))
    assert book.poll(0.1, frozenset({"a", "b"})) == []
    (r,) = book.poll(0.1, frozenset({"a"}))  # b died: do not wait for it
    assert r.zero_mask.tolist() == [False, False, False, False, True, True]
    assert not r.timed_out and r.contributors == {"me", "a"}
    assert (r.array[4:] == 0).all()


def test_dead_holder_is_never_waited_for_from_the_start():
    book = book_with(HOLDERS)
    (r,) = book.poll(0.0, frozenset())
    assert r.zero_mask[2:].all() and not r.timed_out and r.elapsed_ms == 0


def test_deadline():
    book = book_with(HOLDERS, deadline_s=0.2)
    book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3]))
    alive = frozenset({"a", "b"})
    assert book.poll(0.199, alive) == [] and book.next_deadline_s() == 0.2
    (r,) = book.poll(0.2, alive)
    assert r.timed_out and r.zero_mask.tolist() == [False] * 4 + [True] * 2


def test_replicas_first_copy_wins():
    holders = {"a": [2, 3, 4], "b": [3, 4, 5]}
    book = book_with(holders)
    alive = frozenset({"a", "b"})
    book.add_slice("b", 5, 2, np.array([3, 4, 5]), rows([3, 4, 5], 7.0))
    book.add_slice("a", 5, 2, np.array([2, 3, 4]), rows([2, 3, 4], 9.0))
    (r,) = book.poll(0.1, alive)
    assert r.array[:, 0].tolist() == [0, 10, 9, 7, 7, 7]
    # local copy came first of all for neuron 0 and 1
    book2 = book_with({"a": [0, 2, 3, 4, 5]})
    book2.add_slice("a", 5, 2, np.array([0, 2, 3, 4, 5]), rows([0, 2, 3, 4, 5], 3.0))
    (r2,) = book2.poll(0.1, frozenset({"a"}))
    assert r2.array[0].tolist() == [0.0, 1.0] and r2.array[2, 0] == 3.0


@pytest.mark.parametrize("sender,ids,array,why", [
    ("a", [2, 9], None, "id outside range"),
    ("a", [2, -1], None, "negative id"),
    ("a", [2, 4], None, "not held by a"),
    ("zz", [2, 3], None, "not a holder"),
    ("a", [2, 3], np.zeros((2, 3), np.float32), "trailing shape"),
    ("a", [2, 3], np.zeros((2, 2), np.float64), "dtype"),
    ("a", [2, 3], np.zeros((3, 2), np.float32), "count"),
])
def test_bad_slices_are_dropped(sender, ids, array, why):
    book = book_with(HOLDERS)
    array = rows(ids) if array is None else array
    assert book.add_slice(sender, 5, 2, np.array(ids), array) == "bad_slice", why
    assert book.poll(0.1, frozenset({"a", "b"})) == []  # nothing was counted as an answer


def test_duplicate_answer_from_same_sender():
    book = book_with(HOLDERS)
    assert book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3])) is None
    assert book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3], 1.0)) == "duplicate"


def test_early_slices_are_buffered_and_used():
    book = GatherBook("me")
    assert book.add_slice("a", 9, 0, np.array([2, 3]), rows([2, 3])) is None
    assert book.early_count == 1 and book.early_bytes > 0
    book.begin(9, 0, SliceData(np.array([0, 1]), rows([0, 1])), {"a": [2, 3]}, 4, 0.0, 1.0)
    (r,) = book.poll(0.0, frozenset({"a"}))
    np.testing.assert_array_equal(r.array, rows(range(4)))
    assert book.early_count == 0 and book.early_bytes == 0


def test_bad_early_slice_is_reported_at_begin():
    book = GatherBook("me")
    book.add_slice("a", 9, 0, np.array([3]), rows([3]))
    rejected = book.begin(9, 0, SliceData(np.array([0]), rows([0])), {"a": [1]}, 4, 0.0, 1.0)
    assert rejected == [("a", "bad_slice")]


def test_early_window_is_bounded_by_count_and_bytes():
    book = GatherBook("me", max_early_slices=3)
    for f in range(3):
        assert book.add_slice("a", f, 0, np.array([0]), rows([0])) is None
    assert book.add_slice("a", 3, 0, np.array([0]), rows([0])) == "early_evicted"
    assert book.early_count == 3
    small = GatherBook("me", max_early_bytes=40)
    small.add_slice("a", 0, 0, np.array([0]), rows([0]))  # 8 + 8 bytes
    small.add_slice("a", 1, 0, np.array([0]), rows([0]))
    assert small.add_slice("a", 2, 0, np.array([0]), rows([0])) == "early_evicted"
    assert small.early_bytes <= 40


def test_stale_slices_and_finished_memory():
    book = book_with(HOLDERS, finished_memory=2)
    book.poll(0.0, frozenset())
    assert book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3])) == "stale"
    with pytest.raises(MeshError):
        book.begin(5, 2, SliceData(np.array([0]), rows([0])), {}, N, 0.0, 1.0)
    for f in (6, 7, 8):
        book.begin(f, 0, SliceData(np.array([0]), rows([0])), {}, 1, 0.0, 1.0)
    assert len(book.poll(0.0, frozenset())) == 3
    # (5, 2) fell out of the bounded memory: it is now treated as early, not stale
    assert book.add_slice("a", 5, 2, np.array([2, 3]), rows([2, 3])) is None


def test_several_gathers_at_once():
    book = GatherBook("me")
    for stage in (0, 1):
        book.begin(1, stage, SliceData(np.array([0]), rows([0])), {"a": [1]}, 2, 0.0, 1.0)
    book.add_slice("a", 1, 1, np.array([1]), rows([1], 5.0))
    (r,) = book.poll(0.1, frozenset({"a"}))
    assert (r.frame, r.stage) == (1, 1) and sorted(book.active_keys()) == [(1, 0)]


def test_local_slice_misuse_raises():
    book = GatherBook("me")
    with pytest.raises(MeshError):
        book.begin(0, 0, SliceData(np.array([0, 7]), rows([0, 7])), {}, 4, 0.0, 1.0)
    with pytest.raises(MeshError):
        book.begin(0, 1, SliceData(np.array([0]), rows([0, 1])), {}, 4, 0.0, 1.0)
