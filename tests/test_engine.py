"""The Ray engine against the local trainer, on a real local Ray cluster."""
import numpy as np
import pytest
import torch

from conftest import in_thread, named_actor, tiny
from reptile_dist.engine.driver import train_ray
from reptile_dist.local import train_local
from reptile_dist.rundir import load_checkpoint

quiet = dict(progress=False, say=lambda m: None)


def _params(out):
    state = load_checkpoint(str(out / "final.pt"))["model_state"]
    return torch.cat([v.flatten() for v in state.values()])


@pytest.mark.slow  # the Ray runs here take 12-47 s each on 2 idle cores, 28-95 s on busy ones
@pytest.mark.parametrize("workers, inner_state, outer", [(1, "carried", "sgd"), (1, "fresh", "nesterov"),
                                                         (2, "fresh", "nesterov"), (2, "carried", "sgd")])
def test_sync_equals_the_local_trainer(ray_local, tmp_path, workers, inner_state, outer):
    cfg = tiny("synthetic", meta_iters=5, inner_state=inner_state, outer_optimizer=outer, meta_step_size=0.7,
               meta_step_size_final=0.0)
    local_summary = train_local(cfg, str(tmp_path / "local"), **quiet)
    ray_summary = train_ray(cfg.replace(backend="ray", mode="sync", workers=workers), str(tmp_path / "ray"), **quiet)
    local, ray_ = _params(tmp_path / "local"), _params(tmp_path / "ray")
    assert not torch.equal(local, _initial(cfg))  # it did train
    assert torch.allclose(local, ray_, atol=1e-6)
    if inner_state == "carried":  # the PS averaged the workers' estimates as the local trainer does
        a, b = (load_checkpoint(str(tmp_path / run / "final.pt"))["inner_moment"] for run in ("local", "ray"))
        assert a["steps"] == b["steps"] == 5 * cfg.inner_steps
        assert torch.allclose(a["sq"], b["sq"], rtol=1e-5, atol=1e-12)
        # and the final evaluation (sharded over the actors) started from it, as the local one did
        assert ray_summary["test_loss"] == pytest.approx(local_summary["test_loss"], rel=1e-4)
    # A lone worker with the SGD outer step adapts each step's tasks while the push before travels
    # (every step but the first); otherwise no worker can know the next theta before the PS.
    looked_ahead = workers == 1 and outer == "sgd"
    assert ray_summary["adapted_ahead"] == (cfg.meta_iters - 1 if looked_ahead else 0)
    assert ray_summary["adapted_ahead_again"] == 0


def _initial(cfg):
    from reptile_dist.plugins import build_family
    from reptile_dist.training import make_learner

    return make_learner(cfg, build_family(cfg)).initial_theta()


@pytest.mark.slow
def test_local_and_async_training_on_sine_beat_a_random_initialisation_alike(ray_local, tmp_path):
    """A real learning check: post-adaptation MSE on 200 held-out sine tasks, for the local trainer
    and for async on the engine."""
    cfg = tiny("sine", meta_iters=600, eval_tasks=200, eval_tasks_periodic=200, log_every=50)
    local = train_local(cfg, str(tmp_path / "local"), **quiet)
    assert local["test_loss"] < 0.4 * local["before_loss"], local
    remote = train_ray(cfg.replace(backend="ray", mode="async", workers=2), str(tmp_path / "async"), **quiet)
    assert remote["test_loss"] < 0.5 * local["before_loss"]
    assert remote["test_loss"] < 2.0 * local["test_loss"], (remote["test_loss"], local["test_loss"])
    # Each applied push is counted once, at a staleness within the bound (staler ones are dropped).
    # The run applies pushes of a meta-batch (5 tasks, the default) until 600 x 5 tasks are in: exactly 600.
    histogram = remote["staleness_histogram"]
    assert sum(histogram.values()) == cfg.meta_iters == 600, histogram
    assert set(histogram) <= set(range(cfg.staleness_bound + 1)), histogram


@pytest.mark.slow
def test_one_async_worker_is_sync_by_another_name_with_or_without_prefetch(ray_local, tmp_path):
    """One async worker is sync mode by another name (its push is the whole update, at staleness
    0), so it looks ahead as a lone sync worker does, without `prefetch`, and ends where sync does.
    With prefetch the worker adapts its next tasks before its push comes back, from the theta it
    has with its own push applied: with one worker that is the theta the PS answers with, so the
    run equals the one that waits (same tasks, same updates, staleness 0)."""
    cfg = tiny("synthetic", meta_iters=6, inner_state="carried", meta_step_size=0.7).replace(backend="ray", workers=1)
    runs = {"sync": cfg.replace(mode="sync"), "async": cfg.replace(mode="async"),
            "prefetch": cfg.replace(mode="async", prefetch=True)}
    summaries = {name: train_ray(run_cfg, str(tmp_path / name), **quiet) for name, run_cfg in runs.items()}
    assert [summaries[m]["adapted_ahead"] for m in ("sync", "async")] == [cfg.meta_iters - 1] * 2
    assert summaries["prefetch"]["staleness_histogram"] == summaries["async"]["staleness_histogram"] == {0: cfg.meta_iters}
    params = {name: _params(tmp_path / name) for name in runs}
    assert not torch.equal(params["sync"], _initial(cfg))
    # bit for bit: the worker applies the float64 sum as the PS does
    assert torch.equal(params["sync"], params["async"]) and torch.equal(params["async"], params["prefetch"])
    moments = [load_checkpoint(str(tmp_path / name / "final.pt"))["inner_moment"]["sq"] for name in ("async", "prefetch")]
    assert torch.equal(*moments)


@pytest.mark.slow
def test_a_lone_workers_wrong_guesses_are_adapted_again_without_a_trace(ray_local):
    """The look-ahead is a guess checked against the PS's answer. A worker whose own update
    differs from the PS's (here a different meta step size) adapts the step again from the answer,
    stops guessing after LOOK_AHEAD_MISSES misses, and ends at the same theta as a worker whose
    guesses were right: with a dropout network, only if each wrong guess gives back the random
    draws it took."""
    import ray
    from reptile_dist.engine.adapt_worker import LOOK_AHEAD_MISSES, AdaptWorker
    from reptile_dist.engine.parameter_server import ParameterServer, concurrency
    from reptile_dist.plugins import Plugins, build_family
    from reptile_dist.training import make_learner

    def dropout_net(cfg):
        return torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    cfg = tiny("sine", meta_iters=5, meta_batch_size=2, meta_step_size=0.7, meta_step_size_final=0.0).replace(
        backend="ray", mode="sync", workers=1)
    plugins = Plugins.of(cfg, model=dropout_net)
    theta0 = make_learner(cfg, build_family(cfg, plugins), "cpu", plugins).initial_theta().numpy()

    def run(worker_cfg):
        ps = ray.remote(ParameterServer).options(max_concurrency=concurrency(cfg)).remote(cfg.to_dict(), theta0)
        worker = ray.remote(AdaptWorker).options(max_concurrency=2).remote(worker_cfg.to_dict(), 0, None, plugins)
        try:
            return ray.get(worker.run.remote(ps)), ray.get(ps.state.remote())["theta"]
        finally:
            ray.kill(ps)
            ray.kill(worker)

    right, theta_right = run(cfg)
    wrong, theta_wrong = run(cfg.replace(meta_step_size=0.3))
    assert (right["adapted_ahead"], right["adapted_ahead_again"]) == (cfg.meta_iters - 1, 0)
    assert (wrong["adapted_ahead"], wrong["adapted_ahead_again"]) == (0, LOOK_AHEAD_MISSES)
    assert not np.array_equal(theta_right, theta0)
    assert np.array_equal(theta_right, theta_wrong)


@pytest.mark.slow
def test_a_nan_delta_is_rejected_and_the_run_finishes_finite(ray_local, tmp_path):
    import ray

    cfg = tiny("sine", meta_iters=200, log_every=20).replace(backend="ray", mode="sync", workers=2)
    thread, outcome = in_thread(lambda: train_ray(cfg, str(tmp_path / "run"), **quiet))
    ray.get(named_actor("worker-").poison_next_push.remote())  # the first worker found may be 0 or 1
    thread.join(timeout=120)
    assert "value" in outcome, outcome
    result = outcome["value"]
    assert result["rejected_nonfinite"] == 1
    assert sum(result["rejected_by_worker"].values()) == 1
    assert torch.isfinite(_params(tmp_path / "run")).all()
    assert np.isfinite(result["test_loss"])


@pytest.mark.slow
def test_a_ray_run_directory_is_complete_and_eval_reads_it(ray_local, tmp_path, capsys):
    from reptile_dist.cli import main

    out = tmp_path / "run"
    train_ray(tiny("synthetic", meta_iters=4, checkpoint_every=2).replace(backend="ray", workers=2), str(out), **quiet)
    for name in ("config.yaml", "metrics.parquet", "final.pt", "summary.json", "checkpoints/ckpt-00000004.pt"):
        assert (out / name).exists(), name
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", "5"]) == 0
    assert "accuracy" in capsys.readouterr().out


def _sum(delta, tasks, moment, moment_steps):
    from reptile_dist.reptile import DeltaSum

    return DeltaSum(torch.tensor(delta, dtype=torch.float64), tasks, 0.5 * tasks, 1.0 * tasks,
                    torch.tensor(moment, dtype=torch.float64), moment_steps)


@pytest.mark.slow  # starts Ray (for the metrics API the parameter server reports to)
def test_one_worker_loops_pushes_are_applied_in_the_order_sent_whichever_thread_runs_first(ray_local, monkeypatch):
    # A prefetching worker has two pushes on their way. Ray runs them in that order on the async PS
    # (a plain actor); on a PS with a pool of threads, `push` must keep the order itself.
    import threading
    import time

    from reptile_dist.engine.parameter_server import ParameterServer
    from reptile_dist.engine.wire import DeltaCodec
    from reptile_dist.reptile import DeltaSum

    cfg = tiny("sine").replace(backend="ray", mode="async", workers=1, inner_state="fresh")
    ps = ParameterServer(cfg.to_dict(), np.zeros(4, dtype=np.float32))
    payload = DeltaCodec(4, False, cfg.wire_dtype).encode(DeltaSum(torch.ones(4, dtype=torch.float64), 1, 0.0, 0.0))
    # The second push (made at the version the first one makes) reaches its thread first.
    later = threading.Thread(target=ps.push, args=(0, 1, 1, payload, ("loop-a", 1)))
    later.start()
    time.sleep(0.5)
    assert ps.agg.counters.pushes == 0  # it waits for the first
    ps.push(0, 0, 1, payload, ("loop-a", 0))
    later.join(timeout=10)
    assert [row["staleness"] for row in ps.drain()["rows"]] == [0.0, 0.0]  # each at the version it was made for
    ps.push(0, 2, 1, payload, ("loop-b", 0))  # another loop (a replaced worker) numbers from 0 again
    assert ps.agg.counters.pushes == 3
    # A push whose predecessor never arrives is applied after the timeout, and said so.
    monkeypatch.setattr("reptile_dist.engine.parameter_server.IN_ORDER_TIMEOUT_S", 0.05)
    ps.push(0, 3, 1, payload, ("loop-b", 2))
    drained = ps.drain()
    assert ps.agg.counters.pushes == 4 and len(drained["rows"]) == 2
    assert drained["messages"] == ["applied push 2 of worker 0 without the one before it, which had not arrived after 0.05 s"]


def test_the_aggregator_rejects_a_push_whose_carried_estimate_is_not_finite():
    from reptile_dist.engine.aggregation import Aggregator, Push

    cfg = tiny("synthetic", inner_state="carried", meta_batch_size=2).replace(backend="ray", workers=2)
    agg = Aggregator(cfg, np.zeros(4, dtype=np.float32))
    agg.push(Push(0, 0, 1, _sum(np.ones(4), 1, np.full(4, 2.0), 5.0)))
    bad = np.array([1.0, np.nan, 1.0, 1.0])
    row = agg.push(Push(1, 0, 1, _sum(np.ones(4), 1, bad, 5.0)))
    assert agg.counters.rejected_nonfinite == 1 and row["tasks"] == 1
    moment = agg.outer.inner_moment  # the finite push alone made the new estimate
    assert np.array_equal(moment.sq.numpy(), np.full(4, 2.0, dtype=np.float32)) and moment.steps == 5.0


def test_async_aggregation_takes_each_applied_pushs_mean_estimate():
    from reptile_dist.engine.aggregation import Aggregator, Push

    cfg = tiny("synthetic", inner_state="carried", meta_batch_size=4).replace(backend="ray", workers=2, mode="async")
    agg = Aggregator(cfg, np.zeros(3, dtype=np.float32))
    agg.push(Push(0, 0, 2, _sum(np.ones(3), 2, np.full(3, 4.0), 10.0)))
    moment = agg.outer.inner_moment
    assert np.allclose(moment.sq.numpy(), 2.0) and moment.steps == 10.0
    agg.push(Push(1, 0, 2, _sum(np.ones(3), 2, np.full(3, 8.0), 10.0)))  # one version stale, still applied
    assert np.allclose(agg.outer.inner_moment.sq.numpy(), 4.0) and agg.counters.staleness[1] == 1
