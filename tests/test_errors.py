"""What the user can fix ends in one line and exit code 2; a bug keeps its traceback.

The CLI's mapping of errors (UserError, environment OSErrors, everything else), `adapt` and
`export` given bad output paths or a decompression-bomb image, and the CSV that carries the
user's own file and folder names."""
from __future__ import annotations

import csv
import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reptile_dist import cli
from reptile_dist.pretrained import AdaptError, Prediction, to_csv
from reptile_dist.config import ConfigError, load_config
from reptile_dist.errors import UserError
from reptile_dist.plugins import Plugins
from reptile_dist.reptile import Learner
from reptile_dist.rundir import CheckpointError, RunDirError, save_torch
from reptile_dist.training import final_state


def _raising(exc: BaseException):
    def command(args):
        raise exc
    return command


def test_every_user_facing_error_is_a_user_error():
    from reptile_dist.data.omniglot import DataError
    from reptile_dist.engine.cluster import ClusterError
    from reptile_dist.sweep.spec import SweepError

    for error in (ConfigError, ClusterError, SweepError, RunDirError, CheckpointError, DataError, AdaptError):
        assert issubclass(error, UserError), error


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "config", _raising(AdaptError("class folder two\nlines holds no images")))
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == "reptile-dist: error: class folder two lines holds no images\n"


def _os_error(code: int, path: str | None = "/x/y") -> OSError:
    return OSError(code, os.strerror(code), path) if path else OSError(code, os.strerror(code))


ENVIRONMENT_ERRORS = [
    ("full disk", _os_error(errno.ENOSPC), f"cannot write /x/y: {os.strerror(errno.ENOSPC)}"),
    ("read-only disk", _os_error(errno.EROFS), f"cannot write /x/y: {os.strerror(errno.EROFS)}"),
    ("disk quota", _os_error(errno.EDQUOT), f"cannot write /x/y: {os.strerror(errno.EDQUOT)}"),
    ("folder for a file", _os_error(errno.EISDIR), f"/x/y: {os.strerror(errno.EISDIR)}"),
    ("file for a folder", _os_error(errno.ENOTDIR), f"/x/y: {os.strerror(errno.ENOTDIR)}"),
    ("exists", _os_error(errno.EEXIST), f"/x/y: {os.strerror(errno.EEXIST)}"),
    ("no access", _os_error(errno.EACCES), f"/x/y: {os.strerror(errno.EACCES)}"),
    ("not permitted", _os_error(errno.EPERM), f"/x/y: {os.strerror(errno.EPERM)}"),
    ("missing", _os_error(errno.ENOENT), f"/x/y: {os.strerror(errno.ENOENT)}"),
    # write() on a full disk names no file: the line names the command's --out.
    ("full disk, no path", _os_error(errno.ENOSPC, None), f"cannot write /out/model.pt: {os.strerror(errno.ENOSPC)}"),
]


@pytest.mark.parametrize("name, exc, message", ENVIRONMENT_ERRORS, ids=[e[0] for e in ENVIRONMENT_ERRORS])
def test_an_environment_os_error_is_one_line_naming_the_path(monkeypatch, capsys, name, exc, message):
    monkeypatch.setitem(cli.COMMANDS, "export", _raising(exc))
    assert cli.main(["export", "--checkpoint", "final.pt", "--out", "/out/model.pt"]) == 2
    assert capsys.readouterr().err == f"reptile-dist: error: {message}\n"


# A plain ValueError, TypeError or KeyError from our code is a bug, and so is an OSError not known
# to be the user's (EIO): each escapes main() with its traceback.
@pytest.mark.parametrize("bug", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug"),
                                 OSError(errno.EIO, os.strerror(errno.EIO), "/x/y")],
                         ids=["ValueError", "TypeError", "KeyError", "EIO"])
def test_a_bug_escapes_main_with_its_traceback(monkeypatch, capsys, bug):
    monkeypatch.setitem(cli.COMMANDS, "config", _raising(bug))
    with pytest.raises(type(bug)) as raised:
        cli.main(["config"])
    assert raised.value is bug
    assert "reptile-dist: error:" not in capsys.readouterr().err


def test_a_failed_run_exits_1_and_an_interrupt_130(monkeypatch, capsys):
    from reptile_dist.training import RunFailed

    monkeypatch.setitem(cli.COMMANDS, "config", _raising(RunFailed("theta is no longer finite")))
    assert cli.main(["config"]) == 1
    assert "run stopped: theta is no longer finite" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "config", _raising(KeyboardInterrupt()))
    assert cli.main(["config"]) == 130


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A small PNG whose header claims side x side pixels, as a decompression bomb's does; Pillow
    refuses it when opening, before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def write_task(folder: Path, classes: list[str], queries: list[str]) -> tuple[Path, Path]:
    """support/<class>/0.png and query/<name> holding random 28x28 drawings."""
    rng = np.random.default_rng(0)
    for name in classes:
        (folder / "support" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "support" / name / "0.png")
    (folder / "query").mkdir(parents=True)
    for name in queries:
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "query" / name)
    return folder / "support", folder / "query"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained 5-way Omniglot final.pt: these checks need a model, not a good one."""
    cfg = load_config("omniglot-5w1s")
    learner = Learner(Plugins.of(cfg).build_model(cfg, None), "classification", cfg.inner_optimizer, cfg.inner_lr)
    path = tmp_path_factory.mktemp("model") / "final.pt"
    path.write_bytes(save_torch(final_state(cfg, 0, learner, learner.initial_theta())))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("task"), [f"class{c}" for c in range(5)], ["q0.png", "q1.png"])


BAD_ADAPT_AND_EXPORT = [
    ("adapt --out is a folder", ["adapt", "--out", "{folder}"], "{folder} is a folder"),
    ("adapt --out below a file", ["adapt", "--out", "{file}/predictions.csv"], "{file} is a file, not a folder"),
    ("export --out is a folder", ["export", "--out", "{folder}"], "{folder} is a folder"),
    ("export --out below a file", ["export", "--out", "{file}/model.pt"], "{file} is a file, not a folder"),
    ("adapt a decompression bomb", ["adapt", "--query", "{bomb_query}"], "cannot read image {bomb_query}/bomb.png"),
]


@pytest.mark.parametrize("name, args, message", BAD_ADAPT_AND_EXPORT, ids=[b[0] for b in BAD_ADAPT_AND_EXPORT])
def test_bad_adapt_and_export_input_gives_one_line_and_exit_code_2(model_file, task, tmp_path, capsys, name, args,
                                                                      message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("mine\n")
    bomb_png(tmp_path / "bomb_query" / "bomb.png")
    places = {f"{{{p}}}": str(tmp_path / p) for p in ("folder", "file", "bomb_query")}

    def fill(text: str) -> str:
        for placeholder, path in places.items():
            text = text.replace(placeholder, path)
        return text

    command, *rest = [fill(a) for a in args]
    defaults = {"adapt": {"--checkpoint": str(model_file), "--support": str(task[0]), "--query": str(task[1])},
                "export": {"--checkpoint": str(model_file)}}[command]
    argv = [command, *rest, *(x for flag, value in defaults.items() if flag not in rest for x in (flag, value))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("reptile-dist: error: ") and fill(message) in err, err
    if "bomb" in name:
        assert "decompression bomb" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb_query", "file", "folder"]  # nothing written
    assert (tmp_path / "file").read_text() == "mine\n" and not any((tmp_path / "folder").iterdir())


def test_adapt_and_export_replace_an_existing_output_file(model_file, task, tmp_path, capsys):
    for name in ("predictions.csv", "model.pt"):
        (tmp_path / name).write_text("an older file\n")
    assert cli.main(["adapt", "--checkpoint", str(model_file), "--support", str(task[0]), "--query", str(task[1]),
                     "--steps", "0", "--out", str(tmp_path / "predictions.csv")]) == 0
    assert (tmp_path / "predictions.csv").read_bytes().startswith(b"file,predicted_class,probability\r\n")
    assert cli.main(["export", "--checkpoint", str(model_file), "--out", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.pt").read_bytes() != b"an older file\n"


FORMULAS = ['=HYPERLINK("http://example.com")', "+1", "-1", "@SUM(A1)", "\tx", "\rx"]


def test_csv_cells_are_quoted_and_never_start_a_formula():
    names = FORMULAS + ["two\nlines", "a, b", 'say "hi"', "plain"]
    text = to_csv([Prediction(f"{n}.png", n, 0.5) for n in names])
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == ["file", "predicted_class", "probability"] and len(rows) == len(names) + 1
    inert = ["'" + n if n in FORMULAS else n for n in names]
    assert [r[1] for r in rows[1:]] == inert
    assert [r[0] for r in rows[1:]] == [n + ".png" for n in inert]
    assert [r[2] for r in rows[1:]] == ["0.5000"] * len(names)


def test_adapt_writes_the_users_names_safely_into_the_csv(model_file, tmp_path, capsys):
    newline = "two\nlines"
    try:
        (tmp_path / newline).mkdir()
        (tmp_path / newline).rmdir()
    except OSError:  # a filesystem that refuses newlines in names
        newline = "two lines"
    classes = ['=HYPERLINK("x")', "+cmd", "-minus", "@at", newline]
    queries = ['=HYPERLINK("y").png', "@q.png", f"{newline}.png"]
    support, query = write_task(tmp_path, classes, queries)
    out = tmp_path / "predictions.csv"
    assert cli.main(["adapt", "--checkpoint", str(model_file), "--support", str(support), "--query", str(query),
                     "--steps", "0", "--out", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(["'=HYPERLINK(\"y\").png", "'@q.png", f"{newline}.png"])
    assert {r["predicted_class"] for r in rows} <= {"'" + c if c[0] in "=+-@" else c for c in classes}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "sine", "--set", "device=cuda", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device=cuda, but torch sees no GPU here" in err
    assert not out.exists()
    assert cli.main(["train", "--config", "sine", "--set", "device=gpu", "--out", str(out)]) == 2
    assert "device='gpu' is not one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err
