"""`reptile-dist bench` on a real local Ray cluster, and the scaling model."""
import json
import os
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reptile_dist.bench import allreduce, model, runner
from reptile_dist.bench.suite import BenchPlan, run_bench
from reptile_dist.config import ConfigError, Config, load_config


@pytest.mark.slow  # 4 engine runs, local baselines and a capacity sweep (the PS and a bare actor)
def test_a_tiny_bench_writes_its_table_and_plots_with_every_column_filled(ray_local, tmp_path):
    # async-prefetch goes through the async PS; plain async rows are the same code with another
    # worker loop, which tests/test_engine.py runs
    plan = BenchPlan(config="sine", overrides=dict(torch_threads=1), workers=(2,),
                     modes=("sync", "async-prefetch"), seconds=1.5, warmup=0.5, capacity_params=(10_000,), capacity_dtypes=("float32",),
                     capacity_pushers=(1,), capacity_seconds=1.0, model_presets=("sine",), baselines=False)
    written = run_bench(plan, tmp_path, say=lambda m: None)

    rows = pq.read_table(tmp_path / "bench.parquet").to_pylist()
    assert sorted((r["mode"], r["workers"]) for r in rows) == [("async-prefetch", 1), ("async-prefetch", 2),
                                                               ("sync", 1), ("sync", 2)]
    for row in rows:
        empty = [k for k, v in row.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        assert not empty, (row["mode"], row["workers"], empty)
        assert row["tasks_per_s"] > 0 and row["meta_steps_per_s"] > 0 and row["pushes_per_s"] > 0
        # The efficiencies are ratios of timings; their size depends on what else runs beside the
        # test (another pytest process can slow the local baseline alone), so only their definition
        # is checked here.
        single = next(r["tasks_per_s"] for r in rows if r["mode"] == row["mode"] and r["workers"] == 1)
        assert row["efficiency_vs_w1"] == row["tasks_per_s"] / (row["workers"] * single) > 0
        assert row["efficiency_vs_local"] == row["tasks_per_s"] / (row["workers"] * row["paired_local_tasks_per_s"])
        assert 0 < row["ps_busy_fraction"] < 1
        assert 0 < row["push_latency_median_ms"] <= row["push_latency_p95_ms"]
        assert row["mb_per_s"] > 0 and row["nodes"] == 1
        # Sync never drops a delta. Two prefetching workers do not wait for the other's pushes at
        # all: with millisecond tasks their deltas can reach the staleness bound (4) and be dropped
        # (a prefetching worker's theta misses the others' pushes of one more adaptation).
        if row["mode"] == "sync":
            assert row["dropped_deltas"] == 0
        assert max(int(s) for s in json.loads(row["staleness_histogram"])) <= 4
        if row["mode"] == "sync" or (row["mode"] == "async-prefetch" and row["workers"] == 1):
            # one prefetching worker sends each delta computed where its previous one lands
            assert row["staleness_mean"] == row["staleness_max"] == 0
            assert set(json.loads(row["staleness_histogram"])) == {"0"}
    # every row is bracketed by the local trainer, before and after it: its baseline is their mean
    assert all(r["paired_local_before"] > 0 and r["paired_local_after"] > 0 for r in rows)
    assert all(r["paired_local_tasks_per_s"] == (r["paired_local_before"] + r["paired_local_after"]) / 2 for r in rows)
    assert rows[0]["local_tasks_per_s"] > 0 and rows[0]["local_batched_tasks_per_s"] > 0
    # the wire each row ran on: float64 and a sync share where a run is the local trainer's, float32
    # and a meta-batch per push for two async workers (delta_dtype auto, tasks_per_push 0)
    batch = load_config("sine").meta_batch_size
    wire = {(r["mode"], r["workers"]): (r["delta_dtype"], r["tasks_per_push"]) for r in rows}
    assert wire == {("sync", 1): ("float64", batch), ("sync", 2): ("float64", -(-batch // 2)),
                    ("async-prefetch", 1): ("float64", batch), ("async-prefetch", 2): ("float32", batch)}

    capacity = pq.read_table(tmp_path / "capacity.parquet").to_pylist()
    assert len(capacity) == 1 and capacity[0]["pushes_per_s"] > 0 and capacity[0]["bare_actor_pushes_per_s"] > 0
    empty = [k for k, v in capacity[0].items() if v is None or (isinstance(v, float) and math.isnan(v))]
    assert not empty, empty
    assert capacity[0]["of_bare_actor"] > 0 and capacity[0]["bare_actor_load_1m"] >= 0
    assert pq.read_table(tmp_path / "model.parquet").to_pylist()[0]["async_max_workers"] >= 1
    for name in ("scaling.png", "capacity.png"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "bench.md").read_text()
    assert "| sync | 2 | float64 |" in text and "| async-prefetch | 2 | float32 |" in text
    assert "![scaling](scaling.png)" in text



def test_the_local_baselines_run_the_plain_loop_and_the_trainer_beside_a_busy_process(tmp_path):
    from reptile_dist.bench.baselines import local_baselines
    from reptile_dist.bench.suite import write_outputs
    from reptile_dist.plugins import build_family

    cfg = Config(torch_threads=1)  # sine
    rows = local_baselines(cfg, build_family(cfg), seconds=0.6, warmup=0.1, rounds=3)
    plain = [r for r in rows if r["what"].startswith("plain loop")]
    assert plain and all(r["tasks_per_s"] > 0 and r["vs_plain_loop"] == 1.0 for r in plain)
    for r in rows:  # every unloaded row took its turn in each round, and is compared within the round
        if r["busy_process_beside"]:
            continue
        assert len(r["round_tasks_per_s"]) == 3 and r["tasks_per_s"] == pytest.approx(sum(r["round_tasks_per_s"]) / 3)
        same = next(p for p in plain if p["threads"] == r["threads"])
        ratios = sorted(a / b for a, b in zip(r["round_tasks_per_s"], same["round_tasks_per_s"]))
        assert (r["vs_plain_loop_min"], r["vs_plain_loop"], r["vs_plain_loop_max"]) == pytest.approx(tuple(ratios))
    assert {r["threads"] for r in rows if not r["busy_process_beside"]} == {1, os.cpu_count()}
    loaded = [r for r in rows if r["busy_process_beside"]]
    assert len(loaded) == 2 and all(r["tasks_per_s"] > 0 and r["vs_plain_loop"] is None for r in loaded)
    written = write_outputs(BenchPlan(config="sine"), tmp_path, "", [], [], [], rows)
    assert len(pq.read_table(written["local.parquet"]).to_pylist()) == len(rows)
    assert "Local trainer against a plain loop" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow  # Ray Train
def test_the_bench_measures_allreduce_in_a_window_after_ray_trains_start_up(ray_local, tmp_path):
    # A test of its own: each worker count is one TorchTrainer.fit, whose start-up (13-40 s here) the
    # window leaves out but the test still waits for.
    plan = BenchPlan(config="sine", overrides=dict(torch_threads=1), workers=(2,), modes=("allreduce",),
                     seconds=1.5, warmup=0.5, baselines=False)
    lines = []
    written = run_bench(plan, tmp_path, say=lines.append)

    rows = pq.read_table(tmp_path / "bench.parquet").to_pylist()
    assert [(r["mode"], r["workers"]) for r in rows] == [("allreduce", 1), ("allreduce", 2)]
    for row in rows:
        empty = [k for k, v in row.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        assert not empty, (row["workers"], empty)
        assert row["window_s"] == pytest.approx(1.5)  # the measured window, not Ray Train's start-up
        assert row["tasks_per_s"] > 0 and row["tasks_per_s"] == pytest.approx(row["meta_steps_per_s"] * 5)
        assert row["pushes_per_s"] == pytest.approx(row["meta_steps_per_s"] * row["workers"])
        # The efficiencies are ratios of timings; their size depends on what else runs beside the
        # test (another pytest process can slow the local baseline alone), so only their definition
        # is checked here.
        single = next(r["tasks_per_s"] for r in rows if r["mode"] == row["mode"] and r["workers"] == 1)
        assert row["efficiency_vs_w1"] == row["tasks_per_s"] / (row["workers"] * single) > 0
        assert row["efficiency_vs_local"] == row["tasks_per_s"] / (row["workers"] * row["paired_local_tasks_per_s"]) > 0
        assert 0 < row["push_latency_median_ms"] <= row["push_latency_p95_ms"] and 0 < row["allreduce_fraction"] < 1
        assert row["ps_busy_fraction"] == 0 and row["staleness_mean"] == row["staleness_max"] == 0
        assert row["dropped_deltas"] == 0 and row["nodes"] == 1
        assert (row["mb_per_s"] > 0) == (row["workers"] > 1)  # one worker all-reduces with nobody
    assert written["scaling.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| allreduce | 2 |" in (tmp_path / "bench.md").read_text()
    assert "all-reduce" in lines[-1]


def test_allreduce_rows_have_the_parameter_server_rows_columns():
    # bench.parquet takes its columns from the rows, so a mode with other keys would leave holes.
    drain = {"uptime_s": 0.0, "progress": 0, "busy_s": 0.0,
             "counters": {"pushes": 0, "dropped_stale": 0, "applied_tasks": 0, "staleness": {}}}
    later = {**drain, "uptime_s": 1.0, "progress": 2, "busy_s": 0.5,
             "counters": {"pushes": 4, "dropped_stale": 0, "applied_tasks": 10, "staleness": {0: 4}}}
    ps = runner.window_figures(drain, later, [(0.5, 0.01, 100, 100)])
    timeline = [(1.0, 0.002), (1.4, 0.002), (1.8, 0.003), (2.2, 0.002)]
    ar = allreduce.window_figures(timeline, warmup=0.2, seconds=1.0, workers=2, meta_batch_size=5, params=100)
    assert list(ar) == list(ps)
    assert ar["meta_steps_per_s"] == pytest.approx(3 / 1.0) and ar["allreduce_fraction"] == pytest.approx(0.007)
    # ring: 2(W-1) buffers a meta-step, each 100 float64 delta values + 4 counts + the stop vote
    assert ar["mb_per_s"] == pytest.approx(2 * 105 * 8 * 3 / 1e6)
    carried16 = allreduce.window_figures(timeline, warmup=0.2, seconds=1.0, workers=2, meta_batch_size=5, params=100,
                                         carried=True, dtype="bfloat16")
    assert carried16["mb_per_s"] == pytest.approx(2 * (200 * 2 + 5 * 8) * 3 / 1e6)  # delta + estimates in 16 bits


def test_the_scaling_model_finds_the_largest_worker_count_a_server_absorbs():
    # 50 tasks/s per worker, meta-batch 5, a PS taking 300 deltas/s.
    assert model.push_demand(50, 2, "async", 5) == pytest.approx(2 * 50 / 5)  # a meta-batch of 5 tasks per push
    assert model.push_demand(50, 2, "sync", 5) == pytest.approx(2 * 50 / 3)  # the busiest worker: 3 of 5 tasks
    assert model.max_workers(300, 50, "async", 5) == 30  # 50 W / 5 <= 300
    assert model.max_workers(300, 50, "async", 5, configured=1) == 6  # one task per push: 50 W <= 300
    assert model.max_workers(300, 50, "sync", 5) == 5  # sync never uses more than a meta-batch of workers
    assert model.max_workers(30, 50, "async", 5) == 3
    assert model.max_workers(30, 50, "async", 5, configured=1) == 0  # not even one worker's 50 pushes/s
    assert model.capacity_at(300_000, [100_000, 1_000_000], [400.0, 40.0]) == pytest.approx(400 * 10 ** -math.log10(3))


def test_a_straggler_needs_a_second_worker_and_is_not_run_configuration():
    with pytest.raises(ConfigError, match="--straggler"):
        BenchPlan(workers=(1,), straggler_factor=3.0)
    with pytest.raises(ConfigError, match="no longer a run setting"):
        Config().replace(straggler_factor=2.0)
    # what older versions wrote into every config.yaml and checkpoint still reads back
    assert Config().replace(straggler_factor=1.0, straggler_worker=0) == Config()


def test_the_straggler_hook_slows_only_its_worker():
    import time

    from reptile_dist.bench.hooks import Straggler

    hook = Straggler(worker=1, factor=3.0)
    t0 = time.perf_counter()
    hook.after_adapt(0, 0.05)
    assert time.perf_counter() - t0 < 0.05  # not its worker: no sleep at all
    t0 = time.perf_counter()
    hook.after_adapt(1, 0.05)
    assert time.perf_counter() - t0 >= 0.1  # (factor - 1) x the adapt time


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_the_bare_actor_takes_the_wire_format_and_answers_theta_as_the_ps_does(dtype):
    """The capacity floor moves what the PS moves: a delta as DeltaCodec encodes it in, theta out."""
    import numpy as np
    import torch

    from reptile_dist.bench.ps_capacity import BareServer
    from reptile_dist.engine.wire import DeltaCodec
    from reptile_dist.reptile import DeltaSum

    threads = torch.get_num_threads()  # BareServer sets this process's torch threads, as an actor
    delta = torch.linspace(-1, 1, 7, dtype=torch.float64)
    payload = DeltaCodec(7, False, dtype).encode(DeltaSum(delta, 1, 0.0, 0.0))
    payload.vector.setflags(write=False)  # as Ray hands it over
    server = BareServer(np.ones(7, dtype=np.float32), dtype)
    (theta, moment), version, _ = server.pull()
    assert moment is None and version == 0 and theta.dtype == np.float32 and (theta == 1).all()
    (theta, _), version, _, waited = server.push_pull(0, 0, 1, payload)
    assert version == 1 and waited == 0.0
    np.testing.assert_allclose(theta, 1 + 1e-3 * delta.numpy(), rtol=0, atol=1e-5)
    assert server.drain()["counters"]["pushes"] == 1
    server.stop()
    assert server.pull() is None and server.push_pull(0, 1, 1, payload) is None
    torch.set_num_threads(threads)


def test_the_interleaved_hook_holds_the_engine_while_worker_0_runs_the_local_trainer():
    """Odd phases of the wall clock: the worker does not come back from its hook before the phase
    ends, and worker 0 ran the local trainer meanwhile (whole meta-steps, begun past the guard);
    even phases: the adaptation is only recorded, the worker comes straight back."""
    import time

    from reptile_dist.bench.hooks import Interleaved

    import threading

    threads = torch.get_num_threads()
    phase = 1.5
    cfg = Config(torch_threads=1, workers=2)  # sync: worker 1 adapts tasks 1 and 3 of the meta-batch of 5
    hook, other = Interleaved(cfg, phase), Interleaved(cfg, phase)
    try:
        hook.after_adapt(0, 0.01)  # worker 0 builds its local trainer at its first call
        calls = {0: [], 1: []}  # (called, returned)
        deadline = time.time() + 4 * phase

        def loop(worker, h):  # each worker in its own thread, as each is its own process in the engine
            while time.time() < deadline:
                called = time.time()
                h.after_adapt(worker, 0.01)
                calls[worker].append((called, time.time()))
                time.sleep(0.02)

        threads_ = [threading.Thread(target=loop, args=(w, h)) for w, h in ((0, hook), (1, other))]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
    finally:
        torch.set_num_threads(threads)
    for worker, h in ((0, hook), (1, other)):
        held = {p: at for p, at in h.held}
        assert held and all(p % 2 == 1 for p in held)
        for called, back in calls[worker]:
            holding = [p for p, at in held.items() if called <= at <= back]
            if holding:  # held in an odd phase: back only once it is over
                assert back >= (holding[0] + 1) * phase
            else:  # an engine phase: straight back, recorded as an adaptation
                assert back - called < phase / 2
        assert len(h.adapted) + len(h.held) >= len(calls[worker])
    assert {n for _, n, _ in other.adapted} == {2} and {n for _, n, _ in hook.adapted} == {3}
    windows = hook.result()["local"]
    assert windows and not other.result()["local"]  # the local trainer runs in worker 0 alone
    for p, start, stop, tasks in windows:
        assert p in dict(hook.held) and p * phase + Interleaved.GUARD_S <= start < stop
        assert tasks > 0 and tasks % cfg.meta_batch_size == 0  # whole meta-steps


def test_interleaved_figures_pair_each_engine_phase_with_the_local_phase_after_it():
    from reptile_dist.bench.hooks import Interleaved
    from reptile_dist.bench.runner import interleaved_figures

    g = Interleaved.GUARD_S
    # phase 4: adaptations of 5 tasks every 0.1 s (50 tasks/s, adapting 0.08 s of each); phase 6: every 0.2 s
    adapted = ([(4 * 2.0 + g + 0.1 * i, 5, 0.08) for i in range(10)]
               + [(6 * 2.0 + g + 0.2 * i, 5, 0.08) for i in range(5)]
               + [(3 * 2.0 + 0.6, 5, 0.08)])  # before the first round: not counted
    local = [(5, 5 * 2.0 + g, 5 * 2.0 + 1.5, 100), (7, 7 * 2.0 + g, 7 * 2.0 + 1.5, 50)]  # 100, then 50 tasks/s
    held = [(5, 5 * 2.0 + 0.1), (7, 7 * 2.0 + 0.1)]
    row = interleaved_figures([{"adapted": adapted, "held": held, "local": local}], 2.0, 4, 2)
    assert row["rounds"] == row["rounds_asked"] == 2 and row["rounds_late"] == 0
    assert row["engine_tasks_per_s"] == pytest.approx((50 + 25) / 2)
    assert row["local_tasks_per_s"] == pytest.approx(75)
    assert row["efficiency_min"] == pytest.approx(0.5) and row["efficiency_max"] == pytest.approx(0.5)
    assert row["efficiency_vs_local"] == pytest.approx(0.5) and row["efficiency_pooled"] == pytest.approx(0.5)
    assert row["adapting_share"] == pytest.approx((0.8 + 0.4) / 2)
    # adaptation speed: 5 tasks / 0.08 s = 62.5 tasks/s, against 100 and against 50
    assert row["adapt_speed_vs_local"] == pytest.approx((0.625 + 1.25) / 2)
    # a second worker's phase counts beside the first one's: W x the local trainer in the denominator
    two = interleaved_figures([{"adapted": adapted, "held": held, "local": local},
                               {"adapted": adapted, "held": held, "local": []}], 2.0, 4, 2)
    assert two["engine_tasks_per_s"] == pytest.approx(75) and two["efficiency_vs_local"] == pytest.approx(0.5)
    # a second worker that came to hold after the local window of phase 7 began: that round is left out
    late = interleaved_figures([{"adapted": adapted, "held": held, "local": local},
                                {"adapted": adapted, "held": [(5, 10.1), (7, 7 * 2.0 + g + 0.2)], "local": []}], 2.0, 4, 2)
    assert late["rounds"] == 1 and late["rounds_late"] == 1 and late["engine_tasks_per_s"] == pytest.approx(100)
    with pytest.raises(RuntimeError, match="too short"):
        interleaved_figures([{"adapted": adapted[:1], "held": held, "local": local}], 2.0, 4, 2)


def test_the_bench_interleaves_the_engine_with_the_local_trainer_in_the_workers_processes(ray_local, tmp_path):
    from reptile_dist.bench.runner import measure_interleaved
    from reptile_dist.bench.suite import engine_config

    from reptile_dist.plugins import build_family
    from reptile_dist.training import make_learner

    cfg = engine_config(Config(torch_threads=1), "async-prefetch", 2)
    theta = make_learner(cfg, build_family(cfg)).initial_theta().numpy()
    row = measure_interleaved(cfg, theta, phase_s=1.5, rounds=2, warmup=0.5)
    assert 1 <= row["rounds"] <= row["rounds_asked"] == 2 and row["phase_s"] == 1.5
    assert row["engine_tasks_per_s"] > 0 and row["local_tasks_per_s"] > 0
    assert 0 < row["efficiency_min"] and row["efficiency_pooled"] > 0
    assert 0 < row["adapting_share"] <= 1 and row["adapt_speed_vs_local"] > 0


def test_interleaved_rows_go_to_their_parquet_and_bench_md(tmp_path):
    from reptile_dist.bench.suite import write_outputs

    row = {"config": "sine", "mode": "sync", "workers": 1, "rounds": 8, "rounds_asked": 8, "rounds_late": 0,
           "engine_tasks_per_s": 24.0,
           "local_tasks_per_s": 25.0, "efficiency_vs_local": 0.96, "efficiency_min": 0.8, "efficiency_max": 1.1,
           "efficiency_pooled": 0.95, "adapting_share": 0.94, "adapt_speed_vs_local": 1.01, "phase_s": 5.0,
           "guard_s": 0.5, "load_1m": 1.0}
    written = write_outputs(BenchPlan(config="sine", interleave=5.0), tmp_path, "", [], [], [], (), [row])
    assert pq.read_table(written["interleaved.parquet"]).to_pylist() == [row]
    text = written["bench.md"].read_text()
    assert "Phases of 5 s" in text and "| sync | 1 | 8 | 8 | 24.0 | 25.0 | 0.96 | 0.8 | 1.1 | 0.95 | 0.94 | 1.01 |" in text
    with pytest.raises(ConfigError, match="--interleave"):
        BenchPlan(interleave=0.8)
    with pytest.raises(ConfigError, match="--rounds"):
        BenchPlan(interleave=5.0, rounds=0)
