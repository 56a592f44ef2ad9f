"""benchmarks/_results.py: every results file says when, at which commit and on how much of the
machine it was measured."""
import json
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def results(load_benchmark):
    return load_benchmark("_results")


def test_the_written_file_keeps_the_result_and_its_conditions(results, tmp_path, capsys):
    sum(i for i in range(200_000))   # some CPU time between the module's start and the write
    out = results.write_result({"fps": 12.5}, tmp_path / "sub" / "x.json", echo_json=True)
    written = json.loads(out.read_text())
    assert written["fps"] == 12.5
    m = written["measured"]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCH.parent, capture_output=True,
                          text=True).stdout.strip()
    assert m["commit"].split("-")[0] == head
    assert m["cores"] >= 1 and m["python_mops"] > 0 and m["run_s"] >= 0
    assert 0.0 <= m["cpu_stolen_pct"] <= 100.0 and 0.0 <= m["cpu_idle_pct"] <= 100.0
    assert m["utc"].endswith("+00:00")
    # --json: the same object is the last stdout line
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == written


def test_a_result_is_not_changed_in_place(results, tmp_path):
    result = {"fps": 1.0}
    results.write_result(result, tmp_path / "y.json", echo_json=False)
    assert result == {"fps": 1.0}


def test_the_commit_is_the_one_the_run_started_at(results, tmp_path, monkeypatch):
    # a commit made while a long benchmark runs is not the code it measured
    monkeypatch.setattr(results, "_commit", lambda: "committed-during-the-run")
    out = results.write_result({}, tmp_path / "z.json", echo_json=False)
    commit = json.loads(out.read_text())["measured"]["commit"]
    assert commit == results.START_COMMIT and commit != "committed-during-the-run"


def test_a_rewrite_from_stored_figures_keeps_when_they_were_measured(results, tmp_path):
    stored = {"fps": 2.0, "measured": {"utc": "2026-01-01T00:00:00+00:00", "commit": "abc"}}
    out = results.write_result(stored, tmp_path / "w.json", echo_json=False, measured_now=False)
    assert json.loads(out.read_text())["measured"] == stored["measured"]
    fresh = results.write_result({"fps": 2.0}, tmp_path / "v.json", echo_json=False, measured_now=False)
    assert json.loads(fresh.read_text())["measured"]["commit"] == results.START_COMMIT   # none stored: now
