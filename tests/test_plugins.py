"""A user's own task family and network: by import path (YAML, CLI) and as Python objects
(rd.train), on the local trainer and on the Ray engine, checked up front, remembered by the run."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import reptile_dist as rd
from reptile_dist.cli import main
from reptile_dist.config import Config, describe, load_config
from reptile_dist.plugins import PluginError, Plugins, name_of

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = '''
import numpy as np
import torch
from torch import nn
import reptile_dist as rd


class Lines:
    """y = a x + b: a regression family that is neither sine nor images."""
    kind = "regression"

    def __init__(self, support, queries, slope):
        self.support, self.queries, self.slope = support, queries, slope

    def _task(self, rng, support, queries):
        a, b = rng.uniform(-self.slope, self.slope), rng.uniform(-1, 1)
        x = torch.from_numpy(rng.uniform(-2, 2, size=(support + queries, 1)).astype(np.float32))
        y = a * x + b
        return rd.Task(x[:support], y[:support], x[support:], y[support:])

    def train_task(self, rng):
        return self._task(rng, self.support, 0)

    def eval_task(self, rng, split):
        return self._task(rng, self.support, self.queries)


def make_family(cfg, slope=1.0):
    return Lines(cfg.train_shots, cfg.queries, slope)


def make_model(cfg, hidden=8):
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def make_bn_model(cfg, track=True):
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=track), nn.Linear(8, 1))


def l1_loss(outputs, targets):
    return (outputs - targets).abs().mean()


def wrong_kind(cfg, **args):
    return 42


def raises(cfg, **args):
    raise ValueError("the data folder is empty")


def bad_shape(cfg, **args):
    return nn.Linear(3, 1)


NOT_CALLABLE = 5
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`lines_plugin.py` in a folder outside the package, which the test then runs from (as a
    user runs reptile-dist from their project)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "lines_plugin.py").write_text(USER_MODULE)
    (folder / "broken_plugin.py").write_text("import nonexistent_dependency_xyz\n")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in ("lines_plugin", "broken_plugin"):
        sys.modules.pop(name, None)


def plugin_config(**changes) -> Config:
    base = dict(family="lines_plugin:make_family", family_args={"slope": 2.0}, model="lines_plugin:make_model",
                model_args={"hidden": 8}, ways=1, train_shots=8, shots=8, queries=8, inner_lr=0.02, inner_steps=3,
                inner_batch_size=8, meta_iters=6, meta_batch_size=4, eval_tasks=6, eval_every=3,
                eval_tasks_periodic=3, eval_inner_steps=5, eval_batch_size=8, log_every=2, checkpoint_every=3,
                torch_threads=1, loggers=[])
    base.update(changes)
    return Config().replace(**base)


def final_theta(run: Path) -> torch.Tensor:
    state = torch.load(run / "final.pt", weights_only=True)
    return torch.cat([v.flatten() for v in state["model_state"].values()])


def test_builtins_are_plugins_listed_by_config_list(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("sine", "omniglot", "synthetic", "sine_mlp", "omniglot_conv", "miniimagenet_conv"):
        assert name in out
    assert "reptile_dist.tasks.sine:sine_family" in describe()
    plugins = Plugins.of(load_config("sine"))
    assert plugins.family.__module__ == "reptile_dist.tasks.sine"


@pytest.mark.slow
def test_module_plugin_on_ray_sync_equals_the_local_trainer(user_module, tmp_path):
    cfg = plugin_config()
    local = rd.train(cfg, str(tmp_path / "local"))
    # What a worker on another node sees: no copy of the plug-in's file. It is gone after the driver
    # imported it, and the run still trains on Ray: the factories travel with it (pickled by value).
    (user_module / "lines_plugin.py").unlink()
    ray_run = rd.train(cfg.replace(backend="ray", mode="sync", workers=2, cpus_per_worker=0.5), str(tmp_path / "ray"))
    assert torch.equal(final_theta(tmp_path / "local"), final_theta(tmp_path / "ray"))
    assert local["test_loss"] == pytest.approx(ray_run["test_loss"], rel=1e-6)
    # The run directory records the plug-ins, so the CLI rebuilds them.
    recorded = (tmp_path / "local" / "config.yaml").read_text()
    assert "lines_plugin:make_family" in recorded and "slope: 2.0" in recorded


@pytest.mark.slow
def test_closure_factories_reach_ray_workers(tmp_path):
    slope = 1.5  # captured: the factory is a closure, defined nowhere importable

    def family(cfg):
        from reptile_dist.tasks.sine import SineFamily

        fam = SineFamily(cfg.train_shots, cfg.shots, cfg.queries)
        fam.slope = slope
        return fam

    def model(cfg):
        return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    cfg = load_config("sine", dict(meta_iters=4, meta_batch_size=2, eval_tasks=4, eval_every=0, log_every=2,
                                   checkpoint_every=2, torch_threads=1, loggers=[]))
    local = rd.train(cfg, str(tmp_path / "local"), family=family, model=model)
    remote = rd.train(cfg.replace(backend="ray", mode="sync", workers=2, cpus_per_worker=0.5), str(tmp_path / "ray"),
                      family=family, model=model)
    assert torch.equal(final_theta(tmp_path / "local"), final_theta(tmp_path / "ray"))
    assert local["test_loss"] == pytest.approx(remote["test_loss"], rel=1e-6)
    recorded = Config().replace(**torch.load(tmp_path / "ray" / "final.pt", weights_only=True)["config"])
    assert recorded.family.startswith("object:") and "family" in recorded.family
    # Loading it back needs the factories again: one line says so.
    with pytest.raises(PluginError, match="pass it again"):
        rd.load_model(str(tmp_path / "ray" / "final.pt"))
    net = rd.load_model(str(tmp_path / "ray" / "final.pt"), model=model)  # the network's factory: no data needed
    assert torch.equal(torch.cat([p.flatten() for p in net.parameters()]), final_theta(tmp_path / "ray"))


def test_yaml_plugin_through_the_cli_then_eval_export(user_module, tmp_path, capsys):
    (user_module / "run.yaml").write_text(textwrap.dedent("""
        family: lines_plugin:make_family
        family_args: {slope: 2.0}
        model: lines_plugin:make_model
        loss: lines_plugin:l1_loss
        ways: 1
        train_shots: 8
        shots: 8
        queries: 8
        meta_iters: 6
        meta_batch_size: 3
        eval_tasks: 5
        eval_every: 0
        log_every: 3
        checkpoint_every: 3
        loggers: []
    """))
    out = tmp_path / "run"
    assert main(["train", "--config", "run.yaml", "--out", str(out), "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", "4"]) == 0
    assert "over 4 tasks" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "ckpt-00000003.pt"),
                 "--out", str(tmp_path / "mid.pt")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "mid.pt"), "--tasks", "2"]) == 0  # the export loads

    # Your own tasks, scored with the run's own loss: the user's L1. Without inner steps a task's
    # query loss is the trained network's mean absolute error on it.
    net = rd.load_model(str(out / "final.pt"))
    config = net.reptile.config
    fam = Plugins.of(config).build_family(config)
    drawn = [fam.eval_task(np.random.default_rng(i), "test") for i in range(3)]
    scored = rd.evaluate(str(out / "final.pt"), tasks=drawn, overrides={"eval_inner_steps": 0})
    with torch.no_grad():
        expected = np.mean([(net(t.query_x) - t.query_y).abs().mean().item() for t in drawn])
    assert scored["tasks"] == 3 and scored["loss"] == pytest.approx(expected, rel=1e-5)
    adapted = rd.adapt(net, drawn[0].support_x, drawn[0].support_y, steps=5)
    assert not torch.equal(next(adapted.parameters()), next(net.parameters()))  # net itself unchanged by adapt
    # Without the module, the checkpoint names it in one line.
    sys.modules.pop("lines_plugin", None)
    (user_module / "lines_plugin.py").rename(user_module / "elsewhere.py")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--tasks", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no module named 'lines_plugin'" in err


@pytest.mark.parametrize("changes, expected", [
    ({"family": "missing_module_xyz:make"}, "no module named 'missing_module_xyz'"),
    ({"family": "broken_plugin:make"}, "importing broken_plugin fails: ModuleNotFoundError"),
    ({"family": "lines_plugin:nope"}, "lines_plugin has no attribute 'nope'"),
    ({"family": "lines_plugin:NOT_CALLABLE"}, "is a int, not a callable"),
    ({"family": "lines_plugin:raises"}, "the factory raised ValueError: the data folder is empty"),
    ({"family": "lines_plugin:wrong_kind"}, "returned a int whose `kind` is None"),
    ({"model": "lines_plugin:wrong_kind"}, "returned a int, not a torch.nn.Module"),
    ({"model": "lines_plugin:bad_shape"}, "fails on a training task of family=lines_plugin:make_family"),
    ({"family_args": {"no_such_arg": 1}}, "unexpected keyword argument 'no_such_arg'"),
    ({"loss": "lines_plugin:nope"}, "loss=lines_plugin:nope: lines_plugin has no attribute"),
    ({"model": "lines_plugin:make_bn_model", "model_args": {}}, "module 1 (BatchNorm1d) changes its buffer running_mean"),
])
def test_a_bad_plugin_is_one_line_before_anything_starts(user_module, tmp_path, capsys, changes, expected):
    config = plugin_config(**changes)
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "run"
    for backend in (["--backend", "local"], ["--backend", "ray", "--workers", "2"]):
        code = main(["train", "--config", str(path), "--out", str(out), "--no-progress", *backend])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not out.exists()  # checked before the run directory (or Ray) was touched


def test_batch_norm_with_batch_statistics_trains(user_module, tmp_path):
    summary = rd.train(plugin_config(model="lines_plugin:make_bn_model", model_args={"track": False}),
                       str(tmp_path / "bn"))
    assert np.isfinite(summary["test_loss"])


def test_name_of_records_an_import_path_when_it_leads_back(user_module):
    import lines_plugin

    assert name_of(lines_plugin.make_family) == "lines_plugin:make_family"
    assert name_of(lambda cfg: None).startswith("object:") and "<lambda>" in name_of(lambda cfg: None)


@pytest.mark.slow  # example (a) starts a local Ray cluster
def test_examples_run_shortened(tmp_path):
    """examples/: the Python API on Ray with 2 workers, and the YAML plug-in through the CLI."""
    env_python = sys.executable
    api = subprocess.run([env_python, "train_waves.py", "--out", str(tmp_path / "api"), "--meta-iters", "6",
                          "--eval-tasks", "4"], cwd=ROOT / "examples", capture_output=True, text=True, timeout=600)
    assert api.returncode == 0, api.stderr[-2000:]
    assert "a new wave from 10 points" in api.stdout
    cli = subprocess.run([str(Path(env_python).with_name("reptile-dist")), "train", "--config", "waves.yaml",
                          "--out", str(tmp_path / "cli"), "--no-progress", "--set", "meta_iters=6",
                          "--set", "eval_tasks=4", "--set", "eval_every=3", "--set", "eval_tasks_periodic=2"],
                         cwd=ROOT / "examples", capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (tmp_path / "cli" / "final.pt").exists()



def test_a_plugin_run_resumes_from_the_cli_exactly(user_module, tmp_path):
    """Interrupted after its first checkpoint (on_log raises), then resumed by the CLI from what the
    run directory records: the same theta as a run never interrupted."""
    cfg = plugin_config(meta_iters=6, checkpoint_every=2, log_every=1, eval_every=0)
    rd.train(cfg, str(tmp_path / "whole"))

    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rd.train(cfg, str(tmp_path / "cut"), on_log=stop_at_3)
    assert not (tmp_path / "cut" / "final.pt").exists()
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    assert torch.equal(final_theta(tmp_path / "cut"), final_theta(tmp_path / "whole"))


def test_eval_honours_overrides_of_the_inner_loop_and_ignores_the_training_machines_device(user_module, tmp_path,
                                                                                            capsys):
    rd.train(plugin_config(), str(tmp_path / "run"))
    path = str(tmp_path / "run" / "final.pt")
    plain = rd.evaluate(path, tasks=3)
    assert rd.evaluate(path, tasks=3, overrides={"inner_lr": 5.0}) != plain
    # A file written on a GPU machine (device: cuda) loads and evaluates on this one.
    state = torch.load(path, weights_only=True)
    state["config"]["device"] = "cuda"
    from reptile_dist.rundir import save_torch

    (tmp_path / "gpu.pt").write_bytes(save_torch(state))
    assert main(["eval", "--checkpoint", str(tmp_path / "gpu.pt"), "--tasks", "3"]) == 0
    assert rd.evaluate(str(tmp_path / "gpu.pt"), tasks=3) == plain


def test_a_bug_in_a_builtin_factory_keeps_its_traceback(monkeypatch, tmp_path):
    import reptile_dist.tasks.sine as sine

    def broken(*args):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(sine, "SineFamily", broken)  # what the built-in factory, sine_family, calls
    with pytest.raises(KeyError, match="a bug of ours"):
        main(["train", "--config", "sine", "--out", str(tmp_path / "run"), "--no-progress"])


def test_an_unreachable_cluster_leaves_no_run_directory(tmp_path):
    # A process of its own: in this one a test before may have left Ray running, which a run joins.
    out = tmp_path / "run"
    cli = subprocess.run([str(Path(sys.executable).with_name("reptile-dist")), "train", "--config", "sine",
                          "--backend", "ray", "--address", "127.0.0.1:1", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "cannot reach the Ray cluster" in cli.stderr, cli.stderr[-2000:]
    assert not out.exists()
