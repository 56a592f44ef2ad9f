import pytest

from robustdice.mesh.membership import Membership

TIMEOUT_MS = 500


def events(pairs):
    return [(e.kind, e.peer_id, e.restarted) for e in pairs[1]] if isinstance(pairs, tuple) else \
        [(e.kind, e.peer_id, e.restarted) for e in pairs]


@pytest.fixture
def m():
    return Membership("me", ["me", "a", "b"], "H", TIMEOUT_MS)


def test_join_timeout_and_rejoin(m):
    assert m.alive() == frozenset()
    assert events(m.on_heartbeat("a", 0.0, 1, "H")) == [("joined", "a", False)]
    assert events(m.on_heartbeat("a", 0.1, 1, "H")) == []
    assert m.alive() == {"a"} and m.next_expiry_s() == pytest.approx(0.6)
    assert m.tick(0.599) == []
    assert events(m.tick(0.6)) == [("died", "a", False)]
    assert m.alive() == frozenset() and m.tick(5.0) == []
    # same incarnation after a pause (SIGSTOP): any message revives it
    reason, ev = m.on_message("a", 5.0, 1)
    assert reason is None and events(ev) == [("rejoined", "a", False)]
    assert m.is_alive("a")


def test_held_verdicts_declare_nobody_dead_until_they_end(m):
    m.on_heartbeat("a", 0.0, 1, "H")
    m.hold_verdicts(2.0)
    assert m.tick(1.0) == [] and m.is_alive("a")
    assert m.next_expiry_s() == pytest.approx(2.0)  # the loop wakes when the hold ends
    m.hold_verdicts(1.5)  # a shorter hold does not shorten the running one
    assert m.tick(1.99) == []
    assert events(m.tick(2.0)) == [("died", "a", False)]


def test_any_message_is_a_sign_of_life(m):
    m.on_heartbeat("a", 0.0, 1, "H")
    assert m.on_message("a", 0.4, 1) == (None, [])
    assert m.tick(0.8) == []  # 0.4 s after the last sign of life
    assert events(m.tick(0.9)) == [("died", "a", False)]


def test_restart_is_a_new_incarnation(m):
    m.on_heartbeat("a", 0.0, 1, "H")
    m.tick(1.0)
    # a slice from an incarnation never verified by a heartbeat is not accepted
    assert m.on_message("a", 1.1, 2) == ("unverified", [])
    assert not m.is_alive("a")
    assert events(m.on_heartbeat("a", 1.2, 2, "H")) == [("rejoined", "a", True)]
    # restart faster than the timeout is still reported
    assert events(m.on_heartbeat("a", 1.3, 3, "H")) == [("rejoined", "a", True)]


def test_messages_before_any_heartbeat_are_unverified(m):
    assert m.on_message("a", 0.0, 1) == ("unverified", [])
    assert m.on_heartbeat("zz", 0.0, 1, "H") == ("unverified", [])
    assert m.alive() == frozenset()


def test_plan_mismatch_is_refused_loudly_until_it_matches(m, caplog):
    reason, ev = m.on_heartbeat("b", 0.0, 1, "OTHER")
    assert reason == "refused_plan" and events(ev) == [("refused", "b", False)]
    assert any(r.levelname == "ERROR" and "b" in r.message for r in caplog.records)
    assert m.on_heartbeat("b", 0.1, 1, "OTHER") == ("refused_plan", [])  # one event, not one per heartbeat
    assert m.on_message("b", 0.1, 1) == ("refused_plan", [])
    assert m.tick(10.0) == [] and m.state("b") == "refused"
    assert events(m.on_heartbeat("b", 10.0, 1, "H")) == [("joined", "b", False)]
    # an alive peer that switches plan is refused too
    assert events(m.on_heartbeat("b", 10.1, 1, "X"))[0][0] == "refused"
    assert "b" not in m.alive()


def test_snapshot(m):
    m.on_heartbeat("a", 1.0, 7, "H", newest_frame=12)
    snap = m.snapshot(1.25)
    assert snap["a"] == {"state": "alive", "last_heard_s": 1.0, "incarnation": 7, "newest_frame": 12, "silent_ms": 250.0}
    assert snap["b"]["state"] == "unknown" and "me" not in snap
