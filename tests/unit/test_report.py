"""benchmarks/report.py: docs/robustness.md's results are generated from benchmarks/results/*.json,
and the doc holds exactly what the files give today."""
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "robustness.md"


@pytest.fixture(scope="module")
def report(load_benchmark):
    return load_benchmark("report")


@pytest.fixture(scope="module")
def generated(report):
    return report.render(RESULTS)


def test_the_doc_holds_what_the_results_files_give(report, generated):
    # a results file rerun, or a figure typed between the markers, fails here: run report.py
    assert report.held(DOC.read_text()) == generated, "docs/robustness.md is stale: python benchmarks/report.py"


def row_of(section: str, after: str, plan: str, fill: str) -> list:
    """The cells of the first table row for (plan, fill) after the line that starts with `after`."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    row = next(line for line in lines[start:] if line.startswith(f"| {plan} | {fill} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_a_figure_is_the_one_in_the_json(generated):
    data = json.loads((RESULTS / "robustness_fashion_vgg.json").read_text())
    row = next(r for r in data["runs"]["main"]["rows"] if r["name"] == "robust@0.5/mean+bn")
    cells = row_of(generated, "**fashion_vgg** over", "robust@0.5", "mean+bn")
    assert cells[-1] == f"{100 * row['by_failed']['3']['mean']:.1f}"
    assert cells[3] == f"{row['replication']:.2f}"


def test_a_changed_results_file_changes_the_table(report, generated, tmp_path):
    # the figures are read, not typed: change one in a copy of the files and the table follows
    shutil.copytree(RESULTS, tmp_path / "results")
    path = tmp_path / "results" / "robustness_digits_cnn.json"
    data = json.loads(path.read_text())
    row = next(r for r in data["runs"]["main"]["rows"] if r["name"] == "lop/zero")
    row["by_failed"]["1"]["mean"] = 0.12345
    path.write_text(json.dumps(data))
    changed = report.render(tmp_path / "results")
    assert row_of(changed, "**digits_cnn** over", "lop", "zero")[6] == "12.3"
    assert row_of(generated, "**digits_cnn** over", "lop", "zero")[6] != "12.3"


def test_every_table_names_its_file_and_when_it_was_measured(report, generated):
    for spec in (spec for s in report.SECTIONS for spec in s.tables):
        measured = json.loads((RESULTS / spec.file).read_text())["runs"][spec.run]["measured"]
        assert (f"Source: [`{spec.file}`](../benchmarks/results/{spec.file}), run `{spec.run}`, measured "
                f"{measured['utc'][:10]} at commit `{measured['commit']}`") in generated, spec
    for name in set(report.MEMBERSHIP_FILES) | {"cluster_failure.json", "chaos.json"}:
        measured = json.loads((RESULTS / name).read_text())["measured"]
        assert (f"Source: [`{name}`](../benchmarks/results/{name}), measured {measured['utc'][:10]} "
                f"at commit `{measured['commit']}`") in generated, name


def test_one_results_file_per_benchmark_and_model(report):
    # runs under other conditions are entries inside the model's file, each with its record
    for path in RESULTS.glob("robustness*.json"):
        data = json.loads(path.read_text())
        assert path.name == f"robustness_{data['model']}.json"
        for run, entry in data["runs"].items():
            assert entry["model"] == data["model"] and "budget_ratio" in entry, (path.name, run)
            assert entry["measured"]["commit"] and not entry["measured"]["commit"].endswith("-dirty"), (path.name, run)


def test_a_missing_run_is_named(report, tmp_path):
    shutil.copytree(RESULTS, tmp_path / "results")
    path = tmp_path / "results" / "robustness_digits_cnn.json"
    data = json.loads(path.read_text())
    del data["runs"]["budget-0.35"]
    path.write_text(json.dumps(data))
    with pytest.raises(report.ReportError, match="robustness_digits_cnn.json: no run 'budget-0.35'"):
        report.render(tmp_path / "results")


def test_check_fails_on_a_stale_doc_and_write_mends_it(report, tmp_path, capsys):
    doc = tmp_path / "robustness.md"
    doc.write_text(f"# prose kept\n\n{report.BEGIN}\n| typed by hand | 12.345 |\n{report.END}\nafter\n")
    assert report.main(["--doc", str(doc), "--check"]) == 1
    assert "typed by hand" in doc.read_text()   # --check writes nothing
    assert report.main(["--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# prose kept\n") and text.endswith(f"{report.END}\nafter\n")
    assert "typed by hand" not in text and report.main(["--doc", str(doc), "--check"]) == 0


def test_a_doc_without_markers_is_refused(report, tmp_path, capsys):
    doc = tmp_path / "robustness.md"
    doc.write_text("no markers\n")
    assert report.main(["--doc", str(doc)]) == 2
    assert "results:begin" in capsys.readouterr().err
    assert doc.read_text() == "no markers\n"


def test_a_missing_results_file_is_named(report, tmp_path):
    shutil.copytree(RESULTS, tmp_path / "results")
    (tmp_path / "results" / "chaos.json").unlink()
    with pytest.raises(report.ReportError, match="chaos.json"):
        report.render(tmp_path / "results")
