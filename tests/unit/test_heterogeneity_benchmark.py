"""benchmarks/heterogeneity.py's pure parts: the quota, the figures of a block, and the cgroup
shell's cleanup (on a fake cgroup folder: no root needed)."""
import pytest


@pytest.fixture(scope="module")
def hetero(load_benchmark):
    return load_benchmark("heterogeneity")


def test_a_third_of_a_core(hetero):
    assert hetero.quota_us(100_000, 1 / 3) == 33_333
    assert hetero.quota_us(100_000, 0.001) == 1000   # the kernel's least quota


def record(submitted, answered, latency_ms, **meta):
    return {"submitted_wall_s": submitted, "answered_wall_s": answered,
            "meta": None if answered is None else {"latency_ms": latency_ms, **meta}}


def test_blocks_pool_into_frames_per_second_and_percentiles(hetero):
    a = hetero.summarise([record(0.0, 0.1, 90.0), record(0.0, 0.3, 280.0), record(0.0, None, None)], 2.0)
    assert a["answered"] == 2 and a["errors"] == 1 and a["fps"] == 1.0
    b = hetero.summarise([record(0.0, 0.2, 150.0, zero_filled_fraction=0.1)], 1.0)
    pooled = hetero.pooled([a, b])
    assert pooled["fps"] == 1.0 and pooled["fps_by_block"] == [1.0, 1.0]
    assert pooled["latency_ms_p50"] == 200.0 and pooled["node_latency_ms_p50"] == 150.0
    assert 250.0 < pooled["latency_ms_p99"] < 300.0
    assert pooled["zero_filled"] == 1 and pooled["errors"] == 1


def test_the_throttle_moves_its_processes_back_and_removes_its_group(hetero, tmp_path, monkeypatch):
    root = tmp_path / "cpu"
    (root / "g").mkdir(parents=True)
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cgroup.procs").write_text("")
    (root / "g" / "cpu.cfs_period_us").write_text("100000\n")   # the kernel makes a group's files
    real_rmdir = hetero.Path.rmdir

    def rmdir(path):   # and removes them with the group
        for f in path.iterdir():
            f.unlink()
        real_rmdir(path)
    monkeypatch.setattr(hetero.Path, "rmdir", rmdir)

    with hetero.Throttle("g", 1 / 3, root=root) as group:
        assert (root / "g" / "cpu.cfs_quota_us").read_text() == "33333\n"
        group.add(4242)
        group.set(None)
        assert (root / "g" / "cpu.cfs_quota_us").read_text() == "-1\n"
        assert group.pids() == [4242]
    assert (root / "cgroup.procs").read_text() == "4242\n"   # moved back to the root group
    assert not (root / "g").exists()
    with pytest.raises(RuntimeError, match="no cgroup v1 cpu controller"):
        hetero.Throttle("x", 0.5, root=tmp_path / "nowhere")
