"""`reptile-dist bench` on a real local Ray cluster, and the scaling model."""
import json
import math

import pyarrow.parquet as pq
import pytest

from reptile_dist.bench import model
from reptile_dist.bench.suite import BenchPlan, run_bench
from reptile_dist.config import ConfigError, Config


def test_a_tiny_bench_writes_its_table_and_plots_with_every_column_filled(ray_local, tmp_path):
    plan = BenchPlan(config="sine", overrides=dict(torch_threads=1), workers=(2,), modes=("sync", "async"),
                     seconds=1.5, warmup=0.5, capacity_params=(10_000,), capacity_dtypes=("float32",),
                     capacity_pushers=(1,), capacity_seconds=1.0, model_presets=("sine",))
    written = run_bench(plan, tmp_path, say=lambda m: None)

    rows = pq.read_table(tmp_path / "bench.parquet").to_pylist()
    assert sorted((r["mode"], r["workers"]) for r in rows) == [("async", 1), ("async", 2), ("sync", 1), ("sync", 2)]
    for row in rows:
        empty = [k for k, v in row.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        assert not empty, (row["mode"], row["workers"], empty)
        assert row["tasks_per_s"] > 0 and row["meta_steps_per_s"] > 0 and row["pushes_per_s"] > 0
        assert 0 < row["efficiency_vs_w1"] <= 1.5 and 0 < row["efficiency_vs_local"] <= 1.5
        assert 0 < row["ps_busy_fraction"] < 1
        assert 0 < row["push_latency_median_ms"] <= row["push_latency_p95_ms"]
        assert row["mb_per_s"] > 0 and row["dropped_deltas"] == 0 and row["nodes"] == 1
        if row["mode"] == "sync":
            assert row["staleness_mean"] == row["staleness_max"] == 0
            assert set(json.loads(row["staleness_histogram"])) == {"0"}
    assert rows[0]["local_tasks_per_s"] > 0 and rows[0]["local_batched_tasks_per_s"] > 0

    capacity = pq.read_table(tmp_path / "capacity.parquet").to_pylist()
    assert len(capacity) == 1 and capacity[0]["pushes_per_s"] > 0
    assert pq.read_table(tmp_path / "model.parquet").to_pylist()[0]["async_max_workers"] >= 1
    for name in ("scaling.png", "capacity.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "bench.md").read_text()
    assert "| sync | 2 |" in text and "![scaling](scaling.png)" in text


def test_the_scaling_model_finds_the_largest_worker_count_a_server_absorbs():
    # 50 tasks/s per worker, meta-batch 5, a PS taking 300 deltas/s.
    assert model.push_demand(50, 2, "async", 5) == pytest.approx(2 * 50 / 3)  # ceil(5/2) = 3 tasks per push
    assert model.max_workers(300, 50, "async", 5) == 6  # from W=5 on, one task per push: 50 W <= 300
    assert model.max_workers(300, 50, "async", 5, configured=5) == 30  # pre-summing 5 tasks per push
    assert model.max_workers(300, 50, "sync", 5) == 5  # sync never uses more than a meta-batch of workers
    assert model.max_workers(30, 50, "async", 5) == 1
    assert model.capacity_at(300_000, [100_000, 1_000_000], [400.0, 40.0]) == pytest.approx(400 * 10 ** -math.log10(3))


def test_a_straggler_must_be_one_of_the_workers():
    with pytest.raises(ConfigError, match="straggler_worker"):
        Config(workers=2, straggler_factor=2.0, straggler_worker=2)
    with pytest.raises(ConfigError, match="--straggler"):
        BenchPlan(workers=(1,), straggler_factor=3.0)
