"""mesh/membership.py: peer states over heartbeats and an injected clock, vouching by other peers'
`hears`, two-way `connected`, the `participants` clique, incarnations and refusal."""
import pytest

from robustdice.mesh import membership as mb
from robustdice.mesh.membership import EventKind, Membership, PeerState

TIMEOUT_MS = 500
T = TIMEOUT_MS / 1000
INC = 7  # our incarnation
IDS = ["me", "a", "b", "c"]


def kinds(result):
    evs = result[1] if isinstance(result, tuple) else result
    return [(e.kind.value, e.peer_id, e.restarted) for e in evs]


@pytest.fixture
def m():
    return Membership("me", IDS, "H", TIMEOUT_MS, incarnation=INC)


def hb(m, peer, now_s, inc=1, plan="H", **kw):
    return m.on_heartbeat(peer, now_s, inc, plan, **kw)


def hears_all(m, now_s, peers, age_ms=0):
    """A heartbeat from each of `peers` at `now_s` saying it hears every other node (us included)."""
    incs = {"me": INC, "a": 1, "b": 1, "c": 1}
    for p in peers:
        hb(m, p, now_s, hears={q: (incs[q], age_ms) for q in IDS if q != p})


# ---------------------------------------------------------------- states and timeouts

def test_join_then_death_after_the_timeout(m):
    assert m.state("a") == PeerState.UNKNOWN and m.alive() == frozenset()
    assert kinds(hb(m, "a", 0.0)) == [("joined", "a", False)]
    assert kinds(hb(m, "a", 0.1)) == []
    assert m.alive() == {"a"} and m.is_alive("a")
    assert m.next_expiry_s() == pytest.approx(0.6)
    assert m.tick(0.599) == []
    assert kinds(m.tick(0.6)) == [("died", "a", False)]
    assert m.state("a") == PeerState.DEAD and m.tick(5.0) == []


def test_dead_peer_is_revived_by_any_message_of_its_incarnation(m):
    hb(m, "a", 0.0)
    m.tick(1.0)
    assert kinds(m.on_message("a", 5.0, 1)) == [("rejoined", "a", False)]
    assert m.is_alive("a")


def test_dead_peer_is_revived_by_a_heartbeat_of_its_incarnation(m):
    hb(m, "a", 0.0)
    m.tick(1.0)
    assert kinds(hb(m, "a", 5.0)) == [("rejoined", "a", False)]


def test_any_message_is_a_sign_of_life(m):
    hb(m, "a", 0.0)
    assert m.on_message("a", 0.4, 1) == (None, [])
    assert m.tick(0.8) == []
    assert kinds(m.tick(0.9)) == [("died", "a", False)]


def test_messages_before_any_heartbeat_are_unverified(m):
    assert m.on_message("a", 0.0, 1) == (mb.NOT_VERIFIED, [])
    assert m.state("a") == PeerState.UNKNOWN


def test_unknown_sender_is_unverified(m):
    assert hb(m, "zz", 0.0) == (mb.NOT_VERIFIED, [])
    assert m.on_message("zz", 0.0, 1) == (mb.NOT_VERIFIED, [])
    assert m.report("zz") is None and m.alive() == frozenset()


def test_our_own_id_is_not_a_peer(m):
    assert hb(m, "me", 0.0, inc=INC) == (mb.NOT_VERIFIED, [])
    assert "me" not in m.snapshot(0.0)


def test_held_verdicts_declare_nobody_dead_until_they_end(m):
    hb(m, "a", 0.0)
    m.hold_verdicts(2.0)
    assert m.tick(1.0) == [] and m.is_alive("a")
    assert m.next_expiry_s() == pytest.approx(2.0)  # the loop wakes when the hold ends
    m.hold_verdicts(1.5)  # a shorter hold does not shorten the running one
    assert m.tick(1.99) == []
    assert kinds(m.tick(2.0)) == [("died", "a", False)]


def test_next_expiry_is_none_with_nobody_alive(m):
    assert m.next_expiry_s() is None
    hb(m, "a", 0.0)
    m.tick(1.0)
    assert m.next_expiry_s() is None


# ---------------------------------------------------------------- vouching

def test_peer_heard_by_another_is_unreachable_not_dead(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.0)
    # a's link to us is down; b still hears a
    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        hb(m, "b", t, hears={"a": (1, 10)})
    events = m.tick(0.6)
    assert kinds(events) == [("unreachable", "a", False)]
    assert m.state("a") == PeerState.UNREACHABLE and "a" not in m.alive()
    assert all(e.kind != EventKind.DIED for e in events)


def test_unreachable_peer_heard_again_is_reachable(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.5, hears={"a": (1, 0)})
    m.tick(0.6)
    assert kinds(hb(m, "a", 0.7)) == [("reachable", "a", False)]
    assert m.is_alive("a")


def test_unreachable_peer_answering_with_a_message_is_reachable(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.5, hears={"a": (1, 0)})
    m.tick(0.6)
    assert kinds(m.on_message("a", 0.7, 1)) == [("reachable", "a", False)]


def test_unreachable_peer_nobody_hears_any_more_dies(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.5, hears={"a": (1, 100)})  # b heard a at 0.4
    m.tick(0.6)
    assert m.state("a") == PeerState.UNREACHABLE
    assert m.next_expiry_s() == pytest.approx(0.9)
    assert m.tick(0.899) == []
    assert kinds(m.tick(0.9)) == [("died", "a", False)]


def test_crashed_peer_silent_to_everyone_is_dead_after_the_timeout(m):
    hb(m, "a", 0.0)  # a's last heartbeat reached us and b at 0.0
    for t in (0.125, 0.25, 0.375, 0.5):
        hb(m, "b", t, hears={"a": (1, int(t * 1000))})  # b's heard-ages grow: nobody hears a
    assert kinds(m.tick(0.5)) == [("died", "a", False)]


@pytest.mark.parametrize("heard_after_ms,expected", [(0, "died"), (100, "died"), (200, "unreachable")])
def test_only_a_vouch_clearly_after_our_last_news_keeps_a_peer_unreachable(heard_after_ms, expected):
    m = Membership("me", IDS, "H", TIMEOUT_MS, incarnation=INC, vouch_margin_ms=150)
    hb(m, "a", 0.0)
    hb(m, "b", 0.25, hears={"a": (1, 250 - heard_after_ms)})  # b heard a heard_after_ms after we did
    assert kinds(m.tick(0.5)) == [(expected, "a", False)]


def test_crashed_peer_is_dead_at_the_timeout_with_vouches_from_a_real_peer_view():
    # b's view of the crashed c, as its heartbeats carry it (ages rounded down to the ms)
    m = Membership("me", IDS, "H", TIMEOUT_MS, incarnation=INC, vouch_margin_ms=150)
    b_view = Membership("b", IDS, "H", TIMEOUT_MS, incarnation=1)
    for t in (0.0, 0.1):  # c's last heartbeats reach us and b; then c crashes
        hb(m, "c", t)
        hb(b_view, "c", t)
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):
        hb(m, "b", t, hears=b_view.heard_view(t))
    assert kinds(m.tick(0.6)) == [("died", "c", False)]


def test_vouch_for_another_incarnation_does_not_count(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.5, hears={"a": (2, 0)})
    assert kinds(m.tick(0.6)) == [("died", "a", False)]


def test_stale_vouch_does_not_count(m):
    hb(m, "a", 0.0)
    hb(m, "b", 0.5, hears={"a": (1, 500)})  # b heard a half a second ago
    assert kinds(m.tick(0.5)) == [("died", "a", False)]


def test_peer_cannot_vouch_for_itself(m):
    hb(m, "a", 0.0, hears={"a": (1, 0)})
    assert kinds(m.tick(0.5)) == [("died", "a", False)]


# ---------------------------------------------------------------- incarnations

def test_restart_is_a_new_incarnation_believed_only_from_a_heartbeat(m):
    hb(m, "a", 0.0)
    m.tick(1.0)
    assert m.on_message("a", 1.1, 2) == (mb.NOT_VERIFIED, [])
    assert not m.is_alive("a")
    assert kinds(hb(m, "a", 1.2, inc=2)) == [("rejoined", "a", True)]
    assert kinds(hb(m, "a", 1.3, inc=3)) == [("rejoined", "a", True)]  # faster than the timeout too


@pytest.mark.parametrize("state", ["alive", "dead"])
def test_older_incarnation_is_refused(m, state):
    hb(m, "a", 0.0, inc=5)
    if state == "dead":
        m.tick(1.0)
    assert hb(m, "a", 1.1, inc=4) == (mb.OLD_INCARNATION, [])
    assert m.state("a") == PeerState(state)
    assert m.on_message("a", 1.1, 4) == (mb.NOT_VERIFIED, [])


def test_alternating_incarnations_are_not_rejoins(m):
    # issue 9: incarnations that went down or alternated were each a "rejoin".
    hb(m, "a", 0.0, inc=5)
    assert kinds(hb(m, "a", 0.1, inc=6)) == [("rejoined", "a", True)]
    for t, inc in [(0.2, 5), (0.3, 6), (0.4, 5), (0.5, 6)]:
        reason, events = hb(m, "a", t, inc=inc)
        assert events == [] and reason == (mb.OLD_INCARNATION if inc == 5 else None)
    assert m.snapshot(0.5)["a"]["incarnation"] == 6


def test_old_incarnation_heartbeat_is_not_a_sign_of_life(m):
    hb(m, "a", 0.0, inc=5)
    hb(m, "a", 0.4, inc=4)
    assert kinds(m.tick(0.5)) == [("died", "a", False)]


def test_old_incarnation_with_another_plan_is_not_a_refusal(m):
    hb(m, "a", 0.0, inc=5)
    assert hb(m, "a", 0.1, inc=4, plan="OTHER") == (mb.OLD_INCARNATION, [])
    assert m.is_alive("a")


# ---------------------------------------------------------------- refusal

def test_plan_mismatch_is_refused_once_until_it_matches(m):
    reason, events = hb(m, "b", 0.0, plan="OTHER")
    assert reason == mb.REFUSED_PLAN and kinds(events) == [("refused", "b", False)]
    assert "OTHER" in events[0].detail
    assert hb(m, "b", 0.1, plan="OTHER") == (mb.REFUSED_PLAN, [])  # one event, not one per heartbeat
    assert m.on_message("b", 0.1, 1) == (mb.REFUSED_PLAN, [])
    assert m.tick(10.0) == [] and m.state("b") == PeerState.REFUSED
    assert m.refusal("b") == "plan mismatch: it runs plan OTHER, this node runs plan H" and m.report("b") is None
    assert kinds(hb(m, "b", 10.0)) == [("joined", "b", False)]
    assert m.refusal("b") == ""


def test_alive_peer_switching_plan_is_refused(m):
    hb(m, "b", 0.0)
    assert kinds(hb(m, "b", 0.1, plan="X")) == [("refused", "b", False)]
    assert "b" not in m.alive()


def test_refused_peer_restarting_with_another_wrong_plan_is_reported_again(m):
    hb(m, "b", 0.0, plan="X")
    assert kinds(hb(m, "b", 0.1, inc=2, plan="Y")) == [("refused", "b", True)]


def test_wire_dtype_mismatch_is_refused_like_a_plan_mismatch(m):
    reason, events = hb(m, "b", 0.0, wire_dtype="float16")
    assert reason == mb.REFUSED_PLAN and kinds(events) == [("refused", "b", False)]
    assert "float16" in events[0].detail
    assert m.state("b") == PeerState.REFUSED
    assert kinds(hb(m, "b", 0.1, wire_dtype="float32")) == [("joined", "b", False)]


def test_refusal_detail_is_cut(m):
    _, (event,) = hb(m, "b", 0.0, plan="p" * 10_000)
    assert len(event.detail) < 200


# ---------------------------------------------------------------- connected

def test_connected_needs_the_peer_to_hear_us_ready_and_sends_taken(m):
    hb(m, "a", 0.0)
    assert m.connected(0.0) == frozenset() and not m.hears_us("a", 0.0)  # does not say it hears us
    hb(m, "a", 0.1, hears={"me": (INC, 50)})
    assert m.hears_us("a", 0.1) and m.connected(0.1) == {"a"}
    m.on_send("a", False)
    assert m.connected(0.1) == frozenset()
    m.on_send("a", True)
    assert m.connected(0.1) == {"a"}
    hb(m, "a", 0.2, ready=False, hears={"me": (INC, 0)})
    assert m.connected(0.2) == frozenset()


def test_peer_hearing_an_older_incarnation_of_us_is_not_connected(m):
    hb(m, "a", 0.0, hears={"me": (INC - 1, 0)})
    assert not m.hears_us("a", 0.0) and m.connected(0.0) == frozenset()


def test_peer_hearing_us_long_ago_is_not_connected(m):
    hb(m, "a", 0.0, hears={"me": (INC, 300)})
    assert m.connected(0.1) == {"a"}  # heard us 400 ms ago
    assert m.connected(0.2) == frozenset()  # 500 ms ago: the peer timeout


def test_unreachable_or_dead_peer_is_not_connected(m):
    hb(m, "a", 0.0, hears={"me": (INC, 0)})
    hb(m, "b", 0.5, hears={"a": (1, 0), "me": (INC, 0)})
    m.tick(0.5)
    assert m.state("a") == PeerState.UNREACHABLE and "a" not in m.connected(0.5)


# ---------------------------------------------------------------- participants

def mutual(m, now_s, pairs, ages=None):
    """Heartbeats at `now_s` in which each peer hears us and the peers it is paired with."""
    incs = {"me": INC, "a": 1, "b": 1, "c": 1}
    heard = {p: {"me"} for p in ("a", "b", "c")}
    for x, y in pairs:
        heard[x].add(y)
        heard[y].add(x)
    for p, others in heard.items():
        hb(m, p, now_s, hears={q: (incs[q], 0) for q in others})


@pytest.mark.parametrize("pairs,expected", [
    ([("a", "b"), ("a", "c"), ("b", "c")], {"me", "a", "b", "c"}),
    ([("a", "b"), ("b", "c")], {"me", "a", "b"}),        # a-c broken: {a,b} and {b,c} tie, lower indices win
    ([("b", "c")], {"me", "b", "c"}),                    # the largest clique, not the lowest indices
    ([("a", "c")], {"me", "a", "c"}),
    ([], {"me", "a"}),                                   # nobody hears anybody: one peer, the first
])
def test_participants_are_the_largest_pairwise_connected_set(m, pairs, expected):
    mutual(m, 0.0, pairs)
    assert m.participants(0.0) == expected


def test_one_way_link_between_peers_keeps_them_apart(m):
    # a, b and c hear each other, except that c does not hear b
    hb(m, "a", 0.0, hears={"me": (INC, 0), "b": (1, 0), "c": (1, 0)})
    hb(m, "b", 0.0, hears={"me": (INC, 0), "a": (1, 0), "c": (1, 0)})
    hb(m, "c", 0.0, hears={"me": (INC, 0), "a": (1, 0)})
    assert m.participants(0.0) == {"me", "a", "b"}


def test_participants_only_counts_connected_peers(m):
    mutual(m, 0.0, [("a", "b"), ("a", "c"), ("b", "c")])
    m.on_send("b", False)
    assert m.participants(0.0) == {"me", "a", "c"}


def test_alone_we_are_the_only_participant(m):
    assert m.participants(0.0) == {"me"}


def test_participants_after_a_restart_need_the_new_incarnation_heard(m):
    mutual(m, 0.0, [("a", "b"), ("a", "c"), ("b", "c")])
    hb(m, "c", 0.1, inc=2, hears={"me": (INC, 0), "a": (1, 0), "b": (1, 0)})
    # a and b still say they hear c's old incarnation
    assert m.participants(0.1) == {"me", "a", "b"}


@pytest.mark.parametrize("n", [3, 12, 13, 20])
def test_largest_clique_of_a_complete_graph_is_everybody(n):
    names = [f"n{i}" for i in range(n)]
    assert mb.largest_clique(names, lambda a, b: True) == names


def test_largest_clique_finds_the_larger_set_over_the_earlier_one():
    edges = {frozenset(p) for p in [("a", "b"), ("c", "d"), ("c", "e"), ("d", "e")]}
    assert mb.largest_clique(list("abcde"), lambda x, y: frozenset((x, y)) in edges) == ["c", "d", "e"]


def test_largest_clique_ties_go_to_the_earlier_candidates():
    edges = {frozenset(p) for p in [("a", "d"), ("b", "c")]}
    assert mb.largest_clique(list("abcd"), lambda x, y: frozenset((x, y)) in edges) == ["a", "d"]


def test_largest_clique_of_nobody_is_empty():
    assert mb.largest_clique([], lambda a, b: True) == []


# ---------------------------------------------------------------- reports and views

def test_report_keeps_what_the_latest_heartbeat_claimed(m):
    hb(m, "a", 0.3, ready=False, hears={"b": (1, 20)}, progress={11: 2}, inputs={"a": 11})
    r = m.report("a")
    assert (r.received_s, r.ready, dict(r.hears), dict(r.progress), dict(r.inputs)) == (
        0.3, False, {"b": (1, 20)}, {11: 2}, {"a": 11})


def test_heard_view_lists_alive_peers_with_their_age(m):
    hb(m, "a", 0.0, inc=3)
    hb(m, "b", 0.25)
    hb(m, "c", 0.0)
    m.tick(0.5)  # a and c die
    hb(m, "a", 0.5, inc=3)
    assert m.heard_view(0.625) == {"a": (3, 125), "b": (1, 375)}


def test_snapshot(m):
    hb(m, "a", 1.0, inc=7, hears={"me": (INC, 0), "b": (1, 0)})
    snap = m.snapshot(1.25)
    assert snap["a"] == {"state": "alive", "incarnation": 7, "connected": True, "hears_us": True, "ready": True,
                         "hears": ["b", "me"], "silent_ms": 250.0}
    assert snap["b"]["state"] == "unknown" and snap["b"]["ready"] is None and "silent_ms" not in snap["b"]
    assert set(snap) == {"a", "b", "c"}
