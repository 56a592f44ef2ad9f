"""The handler's pure books (node/serving.py): the engine's window and stall, when a node serves."""
import pytest

from robustdice.node.serving import ENGINE_QUEUE_S, MAX_ENGINE_WINDOW, EngineWindow, ServingState

PEERS = {"n1": "alive", "n2": "alive"}


# --- the engine's window ---------------------------------------------------------------------------

@pytest.mark.parametrize("item_s,window", [(0.001, 5), (0.0001, MAX_ENGINE_WINDOW), (0.1, 2), (0.0025, 2)])
def test_the_window_holds_about_engine_queue_s_of_work(item_s, window):
    w = EngineWindow(stall_s=1.0, now_s=0.0)
    w.item_s = item_s
    assert w.window() == window == max(2, min(MAX_ENGINE_WINDOW, int(ENGINE_QUEUE_S / item_s)))


def test_room_is_half_the_window_per_message_and_what_is_left():
    w = EngineWindow(stall_s=1.0, now_s=0.0)
    w.item_s = ENGINE_QUEUE_S / 10     # window 10
    assert w.room() == 5
    w.sent(8, now_s=0.0)
    assert w.room() == 2
    w.sent(2, now_s=0.0)
    assert w.room() == 0
    w.answered([0.0005] * 10, now_s=0.1)
    assert w.outstanding == 0 and w.busy_s == pytest.approx(0.005)


def test_the_item_time_is_a_running_mean_and_the_longest_is_kept():
    w = EngineWindow(stall_s=1.0, now_s=0.0)
    w.answered([0.017], now_s=0.0)
    assert w.item_s == pytest.approx(0.001 + (0.017 - 0.001) / 16) and w.max_item_s == 0.017
    w.answered([0.0] * 200, now_s=0.0)
    assert w.item_s < 1e-6 and w.max_item_s == 0.017


def test_an_idle_engine_never_stalls_and_a_busy_one_stalls_after_its_limit():
    w = EngineWindow(stall_s=0.5, now_s=0.0)
    assert not w.stalled(100.0)          # nothing pending: idle, not hung
    w.sent(1, now_s=100.0)               # the stall clock starts when work is given to an idle engine
    assert not w.stalled(100.5) and w.stalled(100.51)
    w.answered([0.1], now_s=100.6)
    assert not w.stalled(101.0)


def test_long_items_lengthen_the_stall_limit():
    w = EngineWindow(stall_s=0.5, now_s=0.0)
    w.answered([0.1], now_s=0.0)         # 20 items of 0.1 s: 2 s
    w.sent(1, now_s=1.0)
    assert not w.stalled(2.9) and w.stalled(3.01)


# --- serving ---------------------------------------------------------------------------------------

def test_never_serves_before_the_engine_is_ready_even_hearing_everyone():
    s = ServingState(startup_grace_s=1.0)
    change = s.update(10.0, PEERS, PEERS, {})
    assert not s.serving and not change.serving_started


def test_serves_once_every_peer_is_heard():
    s = ServingState(startup_grace_s=1.0)
    s.engine_ready(0.0)
    assert not s.update(0.1, PEERS, ["n1"], {}).serving_started
    change = s.update(0.2, PEERS, ["n1", "n2"], {})
    assert s.serving and change.serving_started and change.settled


def test_serves_after_the_grace_without_the_unheard_counted_from_the_engines_ready():
    s = ServingState(startup_grace_s=1.0)
    s.engine_ready(5.0)
    s.engine_ready(6.0)                  # only the first READY counts
    assert not s.update(5.99, PEERS, ["n1"], {}).serving_started
    change = s.update(6.0, PEERS, ["n1"], {})
    assert change.serving_started and not change.settled and change.unheard == ("n2",)


def test_a_stall_stops_serving_and_the_grace_counts_again_from_its_end():
    s = ServingState(startup_grace_s=1.0)
    s.engine_ready(0.0)
    s.update(0.1, PEERS, PEERS, {})
    s.stalled(end_s=50.0)
    assert not s.serving
    assert not s.update(50.5, PEERS, [], {}).serving_started
    assert s.update(51.0, PEERS, [], {}).serving_started


def test_refused_by_every_answering_peer_gives_the_reason_and_clears():
    s = ServingState(startup_grace_s=1.0)
    states = {"n1": "refused", "n2": "dead"}
    change = s.update(0.0, states, [], {"n1": "plan abc is not ours"})
    assert change.refusal_changed and s.refusal == "refused by every peer that answers (n1): plan abc is not ours"
    assert not s.update(0.1, states, [], {"n1": "plan abc is not ours"}).refusal_changed
    change = s.update(0.2, {"n1": "refused", "n2": "alive"}, ["n2"], {"n1": "x"})
    assert change.refusal_changed and s.refusal == ""


def test_a_refusing_peer_does_not_hold_back_serving():
    s = ServingState(startup_grace_s=10.0)
    s.engine_ready(0.0)
    change = s.update(0.1, {"n1": "refused", "n2": "alive"}, ["n2"], {"n1": "x"})
    assert change.serving_started and change.settled
