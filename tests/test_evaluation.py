import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny
from reptile_dist.config import Config
from reptile_dist.evaluation import mean_ci95, score_tasks
from reptile_dist.models import OmniglotConv
from reptile_dist.reptile import Learner
from reptile_dist.tasks.base import EVAL_STREAMS, task_rng
from reptile_dist.tasks.images import ImageFamily
from reptile_dist.tasks.synthetic import synthetic_classes


class Recording(nn.Module):
    """The Omniglot net, remembering every batch it was asked to predict."""

    def __init__(self, ways):
        super().__init__()
        self.net = OmniglotConv(ways)
        self.batches = []

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.batches.append(x.detach().clone())
        return self.net(x)


def _setup(ways=5, shots=1, queries=2):
    family = ImageFamily(synthetic_classes(), ways=ways, train_shots=5, shots=shots, queries=queries)
    cfg = Config(family="synthetic", model="omniglot_conv", ways=ways, shots=shots, queries=queries,
                 eval_inner_steps=2, eval_batch_size=5)
    torch.manual_seed(0)
    learner = Learner(Recording(ways), "classification", "adam", 1e-3)
    return family, cfg, learner


def test_non_transductive_never_puts_two_queries_in_one_batch():
    family, cfg, learner = _setup(queries=2)
    theta = learner.initial_theta()
    task = family.eval_task(np.random.default_rng(0), "test")
    score_tasks(learner, family, theta, cfg, "test", range(3))
    queries = {tuple(q.flatten().tolist()) for i in range(3)
               for q in family.eval_task(task_rng(cfg.seed, EVAL_STREAMS["test"], 0, i), "test").query_x}
    assert task.query_x.shape[0] == 10
    separate = [b for b in learner.model.batches if len(b) != 10]  # the one transductive batch per task has 10
    assert len(separate) == 3 * 10
    for batch in separate:
        in_batch = sum(tuple(img.flatten().tolist()) in queries for img in batch)
        assert in_batch == 1, "a non-transductive batch held more than one query"
        assert len(batch) == 5 * 1 + 1  # the whole support set plus that one query


def test_transductive_predicts_all_queries_together():
    family, cfg, learner = _setup(queries=2)
    score_tasks(learner, family, learner.initial_theta(), cfg, "test", range(2))
    assert sum(len(b) == 10 for b in learner.model.batches) == 2


def test_scores_cover_every_task_and_restore_theta():
    family, cfg, learner = _setup()
    theta = learner.initial_theta()
    scores = score_tasks(learner, family, theta, cfg, "test", range(4))
    assert len(scores.accuracy) == len(scores.transductive_accuracy) == 4
    assert torch.equal(learner.theta(), theta)


def test_task_blocks_cover_the_ranges_in_order_and_ask_a_changing_size_before_each_block():
    from reptile_dist.evaluation import task_blocks

    assert list(task_blocks([(0, 5), (7, 9)], 2)) == [(0, 2), (2, 4), (4, 5), (7, 9)]
    assert list(task_blocks([(0, 5), (7, 9)], None)) == [(0, 5), (7, 9)]
    sizes = iter([3, 1, 4, 4])  # as the actors scoring them are lost, the blocks shrink
    assert list(task_blocks([(0, 5), (7, 9)], lambda: next(sizes))) == [(0, 3), (3, 4), (4, 5), (7, 9)]


def test_confidence_interval_is_the_normal_95_percent_half_width():
    values = [0.0, 1.0] * 50
    mean, ci = mean_ci95(values)
    assert mean == 0.5
    assert abs(ci - 1.96 * np.std(values, ddof=1) / 10) < 1e-12


@pytest.fixture(scope="module")
def small_final(tmp_path_factory):
    """A final.pt of a short carried-state run (its evaluation starts from the kept estimate)."""
    from reptile_dist.local import train_local

    out = tmp_path_factory.mktemp("evaluated") / "run"
    train_local(tiny("synthetic", meta_iters=3, inner_state="carried"), str(out), progress=False, say=lambda m: None)
    return str(out / "final.pt")


@pytest.mark.slow  # starts Ray actors
def test_an_evaluation_sharded_over_ray_actors_equals_the_one_process_evaluation(ray_local, small_final, capsys,
                                                                                 tmp_path, monkeypatch):
    from reptile_dist.api import evaluate
    from reptile_dist.cli import main

    one = evaluate(small_final, tasks=7)
    assert main(["eval", "--checkpoint", small_final, "--tasks", "7", "--workers", "3"]) == 0
    sharded = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert one["tasks"] == 7 and len({one["accuracy"], one["transductive_accuracy"]}) == 2  # scored both ways
    assert sharded == one  # task for task: shards 0-2, 2-4 and 4-7, combined in order
    transductive_only = evaluate(small_final, tasks=5, transductive=True, workers=2)
    assert transductive_only == evaluate(small_final, tasks=5, transductive=True)
    assert "accuracy" not in transductive_only and transductive_only["transductive_accuracy"] >= 0
    assert evaluate(small_final, tasks=0, workers=2) == evaluate(small_final, tasks=0) == {"tasks": 0}
    # With a scores file, in blocks of 2 (1 per actor, the same actors block after block): tasks
    # 0-2 kept by one run, 3-6 added by the next, the same result.
    from reptile_dist import api

    monkeypatch.setattr(api, "SCORES_BLOCK", 1)
    scores = tmp_path / "scores.jsonl"
    assert evaluate(small_final, tasks=3, workers=2, scores=str(scores)) == evaluate(small_final, tasks=3)
    assert evaluate(small_final, tasks=7, workers=2, scores=str(scores)) == one
    assert [r["task"] for r in _records(scores)[1]] == list(range(7))
    assert evaluate(small_final, tasks=7, workers=2, scores=str(scores), address="ray://nowhere:1") == one  # all kept


def _records(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_a_scores_file_keeps_every_task_and_a_second_run_scores_only_the_missing_ones(small_final, tmp_path, capsys,
                                                                                        monkeypatch):
    from reptile_dist import api
    from reptile_dist.api import evaluate
    from reptile_dist.evaluation import ScoresFile

    scores = tmp_path / "kept" / "scores.jsonl"  # its folder made
    whole = evaluate(small_final, tasks=7)
    assert evaluate(small_final, tasks=4, scores=str(scores)) == evaluate(small_final, tasks=4)
    header, records = _records(scores)
    assert set(header["evaluation"]) == {"weights_sha256", "split", "transductive", "device", "config"}
    assert [r["task"] for r in records] == [0, 1, 2, 3]
    assert set(records[0]) == {"task", "accuracy", "transductive_accuracy", "loss"}
    # Stopped part way: task 3's line cut off, tasks 4-6 never scored. The rest is scored on the
    # second run, task 3 again; the result is the uninterrupted evaluation's.
    text = scores.read_text()
    scores.write_text(text[: text.rindex('{"task": 3') + 12])
    assert evaluate(small_final, tasks=7, scores=str(scores)) == whole
    assert "3 of the 7 tasks scored already; scoring the rest" in capsys.readouterr().err
    assert [r["task"] for r in _records(scores)[1]] == [0, 1, 2, 3, 4, 5, 6]
    # A task already kept is not scored again: its kept value is the one summed.
    _, records = _records(scores)
    records[0]["accuracy"] = records[0]["accuracy"] - 7.0
    scores.write_text("\n".join(json.dumps(r) for r in [header, *records]) + "\n")
    assert evaluate(small_final, tasks=7, scores=str(scores))["accuracy"] == pytest.approx(whole["accuracy"] - 1.0)
    # In blocks of 2: a crash after the second block's scores are kept leaves tasks 0-3 in the file,
    # and the next run adds the rest.
    monkeypatch.setattr(api, "SCORES_BLOCK", 2)
    crashed, add, blocks = tmp_path / "crashed.jsonl", ScoresFile.add, []

    def add_then_crash(self, lo, part):
        add(self, lo, part)
        blocks.append((lo, len(part.loss)))
        if len(blocks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ScoresFile, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        evaluate(small_final, tasks=7, scores=str(crashed))
    assert blocks == [(0, 2), (2, 2)] and [r["task"] for r in _records(crashed)[1]] == [0, 1, 2, 3]
    monkeypatch.setattr(ScoresFile, "add", add)
    assert evaluate(small_final, tasks=7, scores=str(crashed)) == whole
    assert [r["task"] for r in _records(crashed)[1]] == list(range(7))


def test_an_interrupted_evaluation_says_its_scores_file_keeps_the_tasks_scored(small_final, tmp_path, capsys,
                                                                              monkeypatch):
    from reptile_dist.cli import main
    from reptile_dist.evaluation import ScoresFile

    scores, add = tmp_path / "scores.jsonl", ScoresFile.add

    def add_then_interrupt(self, lo, part):
        add(self, lo, part)
        raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(ScoresFile, "add", add_then_interrupt)
    assert main(["eval", "--checkpoint", small_final, "--tasks", "3", "--scores", str(scores)]) == 130
    assert f"interrupted; {scores} keeps the tasks scored so far" in capsys.readouterr().err
    assert len(_records(scores)[1]) == 3


def test_a_scores_file_of_another_evaluation_is_refused_in_one_line(small_final, tmp_path, capsys):
    from reptile_dist.cli import main

    scores = tmp_path / "scores.jsonl"
    assert main(["eval", "--checkpoint", small_final, "--tasks", "2", "--scores", str(scores)]) == 0
    kept = scores.read_text()
    assert main(["eval", "--checkpoint", small_final, "--tasks", "2", "--scores", str(scores),
                 "--set", "eval_inner_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds the scores of another evaluation" in err and "config.eval_inner_steps" in err
    assert main(["eval", "--checkpoint", small_final, "--tasks", "2", "--scores", str(scores), "--split", "val"]) == 2
    assert "holds the scores of another evaluation (it differs in split)" in capsys.readouterr().err
    assert scores.read_text() == kept  # nothing already kept is touched
    header, records = _records(scores)
    for bad in ["not scores", json.dumps({"evaluation": "x"}), json.dumps(header) + "\n" + json.dumps({"task": 0}),
                json.dumps(header) + "\n" + json.dumps({**records[0], "task": 0.5})]:
        other = tmp_path / "other.txt"
        other.write_text(bad + "\n")
        assert main(["eval", "--checkpoint", small_final, "--tasks", "2", "--scores", str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is not a scores file" in err, bad
        assert other.read_text() == bad + "\n"
    assert main(["eval", "--checkpoint", small_final, "--tasks", "2", "--scores", str(tmp_path)]) == 2
    assert "is not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_an_evaluation_with_no_workers_is_one_line_and_exit_code_2(small_final, capsys, workers):
    from reptile_dist.cli import main

    assert main(["eval", "--checkpoint", small_final, "--workers", workers]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"workers={workers}" in err


@pytest.mark.slow  # starts Ray actors, one of them killed
def test_a_shard_whose_actor_dies_is_scored_again_with_the_same_result(ray_local, small_final, capsys):
    import ray

    from conftest import in_thread, named_actor
    from reptile_dist.api import evaluate
    from reptile_dist.engine.sharded_eval import ACTOR_PREFIX

    thread, outcome = in_thread(lambda: evaluate(small_final, tasks=12, workers=2))
    ray.kill(named_actor(ACTOR_PREFIX))  # named as it is created, long before it has started
    thread.join(timeout=300)
    assert "value" in outcome, outcome
    assert "evaluation tasks were lost with their actor; scoring them again" in capsys.readouterr().err
    assert outcome["value"] == evaluate(small_final, tasks=12)
