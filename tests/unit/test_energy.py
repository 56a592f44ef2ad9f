"""The energy integral (node/telemetry.py EnergyMeter) and the cluster-wide joules per frame."""
import pytest

from robustdice.node.client_cli import energy_per_frame
from robustdice.node.telemetry import EnergyMeter


def test_power_readings_are_integrated_by_the_trapezoid_rule():
    m = EnergyMeter()
    m.sample(10.0, 4000.0)     # mW
    m.sample(12.0, 6000.0)     # 2 s at a mean of 5 W: 10 J
    m.sample(13.0, 6000.0)     # 1 s at 6 W
    assert m.joules == pytest.approx(16.0) and m.covered_s == pytest.approx(3.0)


def test_a_missing_reading_is_a_gap_never_a_guess():
    m = EnergyMeter()
    m.sample(0.0, 5000.0)
    m.sample(1.0, 5000.0)
    m.sample(2.0, None)        # jtop's service closing, say
    m.sample(5.0, 5000.0)      # the 4 s since the last reading are not counted
    m.sample(6.0, 5000.0)
    assert m.joules == pytest.approx(10.0) and m.covered_s == pytest.approx(2.0)


def test_a_clock_that_does_not_advance_adds_nothing():
    m = EnergyMeter()
    m.sample(1.0, 5000.0)
    m.sample(1.0, 9000.0)
    assert m.joules == 0.0


def test_cluster_energy_per_frame_needs_every_board_and_counts_answers_once():
    views = [{"node": "n0", "energy_j": 30.0, "answered": 10}, {"node": "n1", "energy_j": 20.0, "answered": 0}]
    assert energy_per_frame(views) == (5.0, "over 10 answered frames")
    views.append({"node": "n2", "energy_j": None, "answered": 3})
    joules, why = energy_per_frame(views)
    assert joules is None and "n2" in why
    assert energy_per_frame([{"node": "n3", "unreachable": True}] + views[:2])[0] == 5.0
