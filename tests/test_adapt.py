"""`reptile-dist adapt` / `export`: a pretrained model adapted to a task given as image folders.

The shipped model's accuracy is measured on held-out characters of the official release; the
command's behaviour on tasks drawn from the generated release."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from reptile_dist.pretrained import AdaptError, adapt_and_predict, export_final, load_pretrained
from reptile_dist.cli import main
from reptile_dist.config import load_config
from reptile_dist.data.omniglot import load_omniglot
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import Learner
from reptile_dist.rundir import save_torch
from reptile_dist.training import FINAL_FORMAT, checkpoint_state, final_state

PRETRAINED = REPO / "pretrained" / "omniglot-5w1s.pt"
# Measured over the 10 tasks below (200 queries) with the shipped model (the paper's 100,000
# meta-steps on the engine, see the README's reproduction section): 96.5% non-transductive, 98.0%
# transductive (the earlier 15,000-step model: 94.0% and 96.5%); chance is 20%. Asserted at 80%,
# which leaves a margin for a retrained model.
MIN_ACCURACY = 0.80


def write_png(pixels: np.ndarray, path: Path, scale: int = 1) -> None:
    """Table pixels (ink 255) as a drawing: dark ink on white paper, optionally enlarged."""
    image = Image.fromarray(255 - pixels)
    if scale > 1:
        image = image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_task(classes, folder: Path, seed: int, ways: int = 5, shots: int = 1, queries: int = 4) -> dict[str, str]:
    """support/<class>/*.png and query/*.png from held-out characters; returns query file -> class."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(classes.splits["test"]), size=ways, replace=False)
    truth = {}
    for c, index in enumerate(chosen):
        rows = rng.choice(classes.splits["test"][index].rows, size=shots + queries, replace=False)
        name = f"char{index:03d}"
        for j, row in enumerate(rows[:shots]):
            write_png(classes.images[row], folder / "support" / name / f"{j}.png", scale=3 if j % 2 == 0 else 1)
        for j, row in enumerate(rows[shots:]):
            file = f"q{c}{j}.png"
            write_png(classes.images[row], folder / "query" / file)
            truth[file] = name
    return truth


@pytest.fixture(scope="module")
def official_classes(official_omniglot_table):
    return load_omniglot(official_omniglot_table, split="paper")


@pytest.fixture(scope="module")
def generated_classes(generated_omniglot_table):
    return load_omniglot(generated_omniglot_table, split="alphabet")


@pytest.fixture(scope="module")
def task_folder(generated_classes, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("task")
    return folder, write_task(generated_classes, folder, seed=0)


def accuracy(predictions, truth) -> float:
    return float(np.mean([truth[p.file] == p.predicted_class for p in predictions]))


@pytest.mark.slow  # prepares the full release, then adapts 20 tasks
@pytest.mark.parametrize("transductive", [False, True])
def test_pretrained_model_classifies_held_out_characters_well_above_chance(official_classes, tmp_path, transductive):
    hits = []
    for seed in range(10):
        truth = write_task(official_classes, tmp_path / str(seed), seed=seed)
        predictions = adapt_and_predict(str(PRETRAINED), tmp_path / str(seed) / "support", tmp_path / str(seed) / "query",
                                        transductive=transductive)
        assert sorted(p.file for p in predictions) == sorted(truth)
        hits.append(accuracy(predictions, truth))
    assert np.mean(hits) >= MIN_ACCURACY, hits


def test_adapt_command_prints_a_table_and_writes_the_csv(task_folder, tmp_path, capsys):
    folder, truth = task_folder
    out = tmp_path / "predictions.csv"
    assert main(["adapt", "--checkpoint", str(PRETRAINED), "--support", str(folder / "support"),
                 "--query", str(folder / "query"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["file", "predicted_class", "probability"]
    assert sorted(r["file"] for r in rows) == sorted(truth)
    assert all(r["predicted_class"] in set(truth.values()) and 0.2 <= float(r["probability"]) <= 1 for r in rows)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["file", "predicted_class", "probability"]
    assert all(r["file"] in printed for r in rows)


def test_adaptation_is_seeded(task_folder):
    folder, _ = task_folder
    first = adapt_and_predict(str(PRETRAINED), folder / "support", folder / "query", steps=10, seed=3)
    assert first == adapt_and_predict(str(PRETRAINED), folder / "support", folder / "query", steps=10, seed=3)


def test_export_writes_a_final_pt_holding_the_checkpoints_theta(tmp_path):
    cfg = load_config("omniglot-5w1s")
    theta = torch.randn(sum(p.numel() for p in Plugins.of(cfg).build_model(cfg, None).parameters()))
    (tmp_path / "ckpt.pt").write_bytes(save_torch(checkpoint_state(cfg, 1500, {"kind": "sgd", "theta": theta})))
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "model.pt")]) == 0
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["format"] == FINAL_FORMAT and state["step"] == 1500
    assert torch.equal(load_pretrained(str(tmp_path / "model.pt")).theta, theta)


def run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reptile-dist: error: ")
    return err


def adapt_args(support: Path, query: Path, checkpoint: Path = PRETRAINED) -> list[str]:
    return ["adapt", "--checkpoint", str(checkpoint), "--support", str(support), "--query", str(query)]


def copy_task(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def test_wrong_number_of_classes_names_the_expected_count(task_folder, tmp_path, capsys):
    folder = copy_task(task_folder[0], tmp_path / "task")
    import shutil

    shutil.rmtree(sorted((folder / "support").iterdir())[0])
    err = run_error(adapt_args(folder / "support", folder / "query"), capsys)
    assert "4 class folders" in err and "5-way" in err and "exactly 5" in err


def test_unreadable_image_is_named(task_folder, tmp_path, capsys):
    folder = copy_task(task_folder[0], tmp_path / "task")
    broken = folder / "query" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert str(broken) in run_error(adapt_args(folder / "support", folder / "query"), capsys)


def test_empty_class_folder_is_named(task_folder, tmp_path, capsys):
    folder = copy_task(task_folder[0], tmp_path / "task")
    empty = sorted((folder / "support").iterdir())[2]
    for f in empty.iterdir():
        f.unlink()
    err = run_error(adapt_args(folder / "support", folder / "query"), capsys)
    assert f"class folder {empty} holds no images" in err


def test_empty_or_missing_query_folder_is_an_error(task_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "holds no images" in run_error(adapt_args(task_folder[0] / "support", tmp_path / "empty"), capsys)
    assert "query folder not found" in run_error(adapt_args(task_folder[0] / "support", tmp_path / "nope"), capsys)
    assert "support folder not found" in run_error(adapt_args(tmp_path / "nope", tmp_path / "empty"), capsys)


def test_checkpoints_of_the_wrong_kind_are_refused(task_folder, tmp_path, capsys):
    support, query = task_folder[0] / "support", task_folder[0] / "query"
    sine = load_config("sine")
    learner = Learner(Plugins.of(sine).build_model(sine, None), "regression", sine.inner_optimizer, sine.inner_lr)
    (tmp_path / "sine.pt").write_bytes(save_torch(final_state(sine, 10, learner, learner.initial_theta())))
    assert "is a sine checkpoint" in run_error(adapt_args(support, query, tmp_path / "sine.pt"), capsys)

    (tmp_path / "truncated.pt").write_bytes(PRETRAINED.read_bytes()[:1000])
    assert "not a readable checkpoint" in run_error(adapt_args(support, query, tmp_path / "truncated.pt"), capsys)

    omniglot = load_config("omniglot-5w1s")
    theta = torch.zeros(sum(p.numel() for p in Plugins.of(omniglot).build_model(omniglot, None).parameters()))
    (tmp_path / "ckpt.pt").write_bytes(save_torch(checkpoint_state(omniglot, 500, {"kind": "sgd", "theta": theta})))
    assert "reptile-dist export" in run_error(adapt_args(support, query, tmp_path / "ckpt.pt"), capsys)


def test_export_refuses_a_file_that_is_not_a_reptile_checkpoint(tmp_path):
    (tmp_path / "other.pt").write_bytes(save_torch({"format": "someone-else", "weights": torch.zeros(3)}))
    with pytest.raises(AdaptError, match="not a reptile-dist checkpoint"):
        export_final(str(tmp_path / "other.pt"), tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_export_retargets_a_final_pt_to_another_shot_count_with_the_same_weights(tmp_path, capsys):
    out = tmp_path / "five-shot.pt"
    assert main(["export", "--checkpoint", str(PRETRAINED), "--out", str(out), "--set", "shots=5"]) == 0
    source, exported = load_pretrained(str(PRETRAINED)), load_pretrained(str(out))
    assert exported.cfg.shots == 5 and exported.cfg.replace(shots=source.cfg.shots) == source.cfg
    assert exported.step == source.step and torch.equal(exported.theta, source.theta)
    # Weights of a 5-way net do not fit a 20-way one: one line, nothing written.
    assert "does not fit a 20-way" in run_error(["export", "--checkpoint", str(PRETRAINED), "--out",
                                                  str(tmp_path / "bad.pt"), "--set", "ways=20"], capsys)
    assert not (tmp_path / "bad.pt").exists()
