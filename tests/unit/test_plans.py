"""node/plans.py: a roll-out's steps as a pure state machine; membership's plan sets; the wire's
roll-out fields. Live nodes: tests/integration/test_rollout.py."""
from dataclasses import dataclass

import numpy as np
import pytest

from robustdice.mesh import wire
from robustdice.mesh.membership import Membership, PeerState
from robustdice.node.plans import Adopt, PlanLayout, Rollout

IDS = ["n0", "n1", "n2", "n3"]
NOW = 6000   # this node's wall clock, ms (switch times must not lie more than an hour ahead of it)
TIMEOUT_MS = 10_000


@dataclass
class FakeStage:
    name: str
    holders_by_device: dict
    total_ids: int

    @property
    def neurons(self):
        return self.total_ids

    def holders(self, d):
        return self.holders_by_device[d]


@dataclass
class FakePlan:
    plan_hash: str
    devices: int = 4
    input_shape: tuple = (1, 8, 8)
    rocoin: object = None


def layout(monkeypatch, plan_hash, devices=4):
    stages = [FakeStage("conv1", {d: [d, (d + 1) % 4] for d in range(4)}, 4)]
    monkeypatch.setattr("robustdice.node.plans.serving_stages", lambda plan: stages)
    return PlanLayout(FakePlan(plan_hash, devices), f"/plans/{plan_hash}", IDS, "n0",
                      lambda ids, n, what: np.asarray(ids, dtype=np.int32))


@pytest.fixture
def rollout(monkeypatch):
    r = Rollout(layout(monkeypatch, "A"))
    return r, layout(monkeypatch, "B")


def test_frames_run_on_the_current_plan_until_the_agreed_switch(rollout):
    r, b = rollout
    assert r.begin(b) is None and r.loading
    assert r.plan_for(10**12).hash == "A"                      # loading: not served yet
    assert r.layout("B") is None and r.heartbeat() == ("", 0, "")
    assert r.commit("B", 5000, NOW) == "plan B is still loading on this node"
    assert r.prepared("B") is False and r.heartbeat() == ("B", 0, "")          # served, no switch agreed yet
    assert r.layout("B") is b and r.layout("") is r.current and r.layout("C") is None
    assert r.plan_for(10**12).hash == "A"                      # served, but no switch agreed
    assert r.commit("B", 5000, NOW) is None and r.commit("B", 9000, NOW) is None
    assert r.switch_ms == 5000 and r.heartbeat() == ("B", 5000, "/plans/B")   # the first time agreed stays
    assert [r.plan_for(t).hash for t in (4999, 5000, 6000)] == ["A", "B", "B"]


def test_the_old_plan_retires_a_frame_timeout_after_the_switch_once_no_frame_needs_it(rollout):
    r, b = rollout
    r.begin(b), r.prepared("B"), r.commit("B", 5000, NOW)
    assert not r.retire_due(5000 + TIMEOUT_MS - 1, TIMEOUT_MS, lambda: 0)   # an input admitted before may still come
    assert not r.retire_due(5000 + TIMEOUT_MS, TIMEOUT_MS, lambda: 1)       # a frame still runs on it
    assert r.retire_due(5000 + TIMEOUT_MS, TIMEOUT_MS, lambda: 0)
    old = r.retire()
    assert old.hash == "A" and r.current is b and r.next is None and r.retired == ["A"]
    assert r.plan_for(0).hash == "B" and r.heartbeat() == ("", 5000, "/plans/B")
    assert r.status()["switch_ms"] == 5000 and r.switch_ms == 0
    assert r.commit("B", 5000, NOW) is None                                # a repeated switch is harmless


def test_refused_steps_say_why(rollout, monkeypatch):
    r, b = rollout
    assert r.commit("B", 5000, NOW) == "plan B is not prepared on this node"
    assert "is for 3 devices" in r.begin(layout(monkeypatch, "C", devices=3))
    assert r.begin(b) is None and r.begin(b) is None                  # the same plan twice: fine
    r.prepared("B")
    assert r.commit("B", 0, NOW).startswith("switch time 0 is not a wall-clock time in ms")
    assert "within 60 minutes" in r.commit("B", NOW + 3_600_001, NOW)        # microseconds by mistake
    c = layout(monkeypatch, "C")
    assert r.begin(c) is None and r.next is c and not r.next_ready  # B never switched to: C replaces it
    assert "still loading" in r.begin(b)                               # not while C loads (the engine's)
    r.prepared("C")
    assert r.begin(r.current) is None and r.next is None             # the current plan's own: a cancel
    assert r.begin(b) is None and r.next is b
    r.prepared("B"), r.commit("B", 5000, NOW)
    assert "in progress (its switch is agreed)" in r.begin(c)
    r.failed("B", "shard missing")
    assert r.next is None and r.last_error == "plan B: shard missing" and r.plan_for(10**12).hash == "A"


def test_a_node_that_missed_the_rollout_adopts_it_from_a_peer(rollout):
    r, b = rollout
    assert r.heard("A", "B", 0, "/plans/B", NOW) is None                   # prepared there, not agreed: not ours to follow
    assert r.heard("B", "", 5000, "/plans/B", NOW) == Adopt("B", "/plans/B", 5000)
    assert r.heard("A", "B", 5000, "/plans/B", NOW) == Adopt("B", "/plans/B", 5000)
    r.begin(b)
    r.pending_switch_ms = 5000                                        # what the handler keeps from the Adopt
    assert r.prepared("B") is True and r.switch_ms == 5000            # committed the moment it loads


def test_an_adoption_that_failed_is_not_asked_again_until_a_later_switch(rollout, monkeypatch):
    r, b = rollout
    assert r.heard("B", "", 5000, "/plans/B", NOW) is not None
    r.refuse("B", 5000)                                                # the folder held something else
    assert r.heard("B", "", 5000, "/plans/B", NOW) is None
    assert r.heard("B", "", 5500, "/plans/B", NOW) is not None
    r.begin(b), r.prepared("B")                                        # prepared, never switched to ...
    c = layout(monkeypatch, "C")
    assert r.heard("A", "C", 5500, "/plans/C", NOW) == Adopt("C", "/plans/C", 5500)   # ... the cluster chose C
    r.commit("B", 5000, NOW)
    assert r.heard("A", "C", 5500, "/plans/C", NOW) is None           # ours is agreed: it stays
    assert c.hash == "C"


def test_a_peers_switch_time_is_adopted_for_our_prepared_plan(rollout):
    r, b = rollout
    r.begin(b)
    assert r.heard("A", "B", 7000, "/plans/B", NOW) is None and r.pending_switch_ms == 7000 and not r.switch_ms
    r.prepared("B")
    assert r.switch_ms == 7000
    r.retire()
    assert r.heard("A", "", 3000, "/plans/A", NOW) is None               # an older roll-out is never adopted back
    assert r.heard("A", "", 8000, "/plans/A", NOW) == Adopt("A", "/plans/A", 8000)   # a later one back to A is
    assert r.heard("A", "", NOW + 3_600_001, "/plans/A", NOW) is None    # not from an hour ahead


def test_membership_accepts_a_peer_that_shares_a_plan_and_counts_on_it_only_for_that_plan():
    m = Membership("n0", IDS, "A", 500, incarnation=1)
    m.set_plans("A", ("B",))
    for peer, plan, following in (("n1", "A", ""), ("n2", "A", "B"), ("n3", "B", "")):
        reason, _ = m.on_heartbeat(peer, 0.0, 1, plan, next_plan=following,
                                   hears={p: (1, 0) for p in IDS if p != peer})
        assert reason is None, peer
    assert m.plans_of("n2") == {"A", "B"} and m.rollout_of("n3") == ("B", "", 0, "")
    assert m.participants(0.0, "A") == {"n0", "n1", "n2"}
    assert m.participants(0.0, "B") == {"n0", "n2", "n3"}
    m.set_plans("B")                                                  # A retired here: n1 (A only) is refused
    reason, events = m.on_heartbeat("n1", 0.1, 1, "A")
    assert reason == "refused_plan" and m.state("n1") == PeerState.REFUSED
    assert "it runs plan A, this node runs plan B" in events[0].detail


def test_the_wire_carries_the_rollout_fields_and_bounds_them():
    hb = wire.Heartbeat("n1", 3, "A", next_plan="B", switch_ms=5000, rollout_dir="/plans/B")
    assert wire.decode(wire.encode(hb)) == hb
    plain = wire.Heartbeat("n1", 3, "A")
    assert wire.decode(wire.encode(plain)) == plain and len(wire.encode(plain)[0]) < len(wire.encode(hb)[0])
    x = np.zeros((1, 1, 8, 8), np.float32)
    got = wire.decode(wire.encode(wire.Input(5, "n0", x, {}, "n0", 1, ("n0",), 99, plan="B")))
    assert got.plan == "B" and got.t_ms == 99
    too_long = wire.Heartbeat("n1", 3, "A", rollout_dir="/" * (wire.MAX_PATH_CHARS + 1))
    with pytest.raises(wire.WireError, match="rdir"):
        wire.decode(wire.encode(too_long))
