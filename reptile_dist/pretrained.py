"""Adapt a pretrained model to a user's own few-shot task: a folder of class folders (support)
and a folder of images to classify (query). Plain PyTorch, no Ray.

The inner loop and the prediction rules are the evaluation's own (`Learner.adapt` with the
checkpoint's evaluation settings, `non_transductive_outputs`), and images are converted the way
the checkpoint's training data was (`preprocess_image`, then `load_images`), so a user's task is
adapted exactly as a held-out evaluation task would be.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reptile_dist.config import Config, ConfigError
from reptile_dist.data.images import IMAGE_ERRORS, preprocess_like
from reptile_dist.data.omniglot import preprocess_image
from reptile_dist.errors import UserError
from reptile_dist.evaluation import non_transductive_outputs
from reptile_dist.files import atomic_write
from reptile_dist.plugins import FamilyInfo, Plugins
from reptile_dist.reptile import InnerMoment, Learner
from reptile_dist.rundir import load_checkpoint, save_torch
from reptile_dist.tasks.images import load_images
from reptile_dist.training import CHECKPOINT_FORMAT, FINAL_FORMAT, final_state, make_learner, resolve_device

IMAGE_FAMILIES = ("omniglot", "synthetic")  # both store 28x28 uint8 images, ink 255 on paper 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CSV_COLUMNS = ("file", "predicted_class", "probability")
# A spreadsheet runs a cell starting with one of these as a formula (OWASP: CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class AdaptError(UserError):
    """The checkpoint or the task folders cannot be used: one line naming the file or folder."""


@dataclass(frozen=True)
class Prediction:
    file: str
    predicted_class: str
    probability: float  # softmax probability of the predicted class


@dataclass
class Pretrained:
    cfg: Config
    learner: Learner
    theta: torch.Tensor
    step: int
    moment: InnerMoment | None = None  # the carried inner estimate adaptation starts from (inner_state: carried)
    info: FamilyInfo | None = None  # what the file records of the family it was trained on


def _config_of(state: dict, path: str) -> Config:
    try:
        return Config().replace(**state["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise AdaptError(f"{path}: its config cannot be read ({exc})") from None


def _learner_for(cfg: Config, info: FamilyInfo, plugins: Plugins | None = None,
                 device: str | torch.device = "cpu") -> Learner:
    """The trained network's workspace, built by the run's own plug-ins without its data (the
    model factory is handed the recorded FamilyInfo as its `family`)."""
    return make_learner(cfg, info, device, plugins or Plugins.of(cfg, with_family=False), check=False)


def is_image_classifier(cfg: Config, info: FamilyInfo) -> bool:
    if info.kind != "classification":
        return False
    return len(info.input_shape) == 3 if info.input_shape else cfg.family in IMAGE_FAMILIES


def load_pretrained(path: str, model=None, device: str | None = None, images: bool = True,
                    overrides: dict | None = None) -> Pretrained:
    """A final.pt as a learner and its theta, its network built by the run's plug-ins (or the
    `model` factory, for a run trained on Python objects) with `overrides` applied to its config
    first (an evaluation's inner_lr, say), on `device` (`auto`, `cpu`, `cuda[:N]`; default auto:
    the machine that trained it may have had a GPU this one lacks); `images`: only an image
    classifier's (what the `adapt` command reads)."""
    state = load_checkpoint(path)  # CheckpointError for a missing or truncated file
    if not isinstance(state, dict) or state.get("format") != FINAL_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        hint = (f"; make one with `reptile-dist export --checkpoint {path} --out model.pt`"
                if found == CHECKPOINT_FORMAT else "")
        raise AdaptError(f"{path} is not a final.pt written by reptile-dist (format {found!r}, expected "
                         f"{FINAL_FORMAT!r}){hint}")
    cfg = _config_of(state, path).replace(**(overrides or {}))
    cfg = cfg.replace(device=device or (overrides or {}).get("device") or "auto")
    info = FamilyInfo.from_state(state.get("family_info"), cfg)
    if images and not is_image_classifier(cfg, info):
        raise AdaptError(f"{path} is a {cfg.family} checkpoint ({info.kind}); adapt needs an image-classification "
                         f"checkpoint")
    learner = _learner_for(cfg, info, Plugins.of(cfg, model=model, with_family=False), resolve_device(cfg))
    try:
        learner.model.load_state_dict(state["model_state"])
    except (KeyError, RuntimeError) as exc:
        raise AdaptError(f"{path}: its weights do not fit a {cfg.ways}-way {cfg.model} "
                         f"({' '.join(str(exc).split())[:200]})") from None
    theta = learner.initial_theta()
    # Carried inner state: adaptation starts from the saved estimate (as `eval` does), unless the
    # config says fresh.
    moment = InnerMoment.from_state(state.get("inner_moment")) if cfg.carries_inner_moment else None
    if moment is not None and moment.sq.numel() != theta.numel():
        raise AdaptError(f"{path}: its inner second-moment estimate does not fit its weights")
    return Pretrained(cfg, learner, theta, int(state.get("step", 0)), moment, info)


def export_final(checkpoint_path: str, out_path: str | Path, overrides: dict | None = None) -> dict:
    """Write a final.pt (the format `eval` and `adapt` load) from a mid-run engine checkpoint or
    another final.pt, with `overrides` applied to its config (e.g. shots=5: the 1-shot and 5-shot
    presets of a way count meta-train identically, so one model serves both)."""
    check_output_file(out_path)
    state = load_checkpoint(checkpoint_path)
    found = state.get("format") if isinstance(state, dict) else None
    if found == FINAL_FORMAT:
        pretrained = load_pretrained(checkpoint_path, device="cpu", images=False)  # the overrides come below
        cfg, theta, step, moment = pretrained.cfg, pretrained.theta, pretrained.step, pretrained.moment
        info = pretrained.info
    elif found == CHECKPOINT_FORMAT:
        outer = state.get("outer", {})
        cfg, theta, step = _config_of(state, checkpoint_path), outer.get("theta"), int(state["step"])
        moment = InnerMoment.from_state(outer.get("inner_moment"))
        info = FamilyInfo.from_state(state.get("family_info"), cfg)
    else:
        raise AdaptError(f"{checkpoint_path} is not a reptile-dist checkpoint (format {found!r}, expected "
                         f"{CHECKPOINT_FORMAT!r} or {FINAL_FORMAT!r})")
    cfg = cfg.replace(**(overrides or {}))
    learner = _learner_for(cfg, info)
    expected = learner.initial_theta().numel()
    if not isinstance(theta, torch.Tensor) or theta.numel() != expected:
        raise AdaptError(f"{checkpoint_path}: theta does not fit a {cfg.ways}-way {cfg.model} ({expected} parameters)")
    final = final_state(cfg, step, learner, theta.float(), moment)
    atomic_write(out_path, save_torch(final))
    return final


def check_output_file(path: str | Path) -> None:
    """Refuse, before any work is done, a path that cannot become a file: a folder, or a path
    below an existing file."""
    out = Path(path)
    if out.is_dir():
        raise AdaptError(f"{out} is a folder; name the file to write")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise AdaptError(f"cannot write {out}: {parent} is a file, not a folder")


def _folder(path: str | Path, role: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise AdaptError(f"{role} folder not found: {folder}")
    return folder


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def read_images(files: list[Path], preprocessing: dict | None = None) -> torch.Tensor:
    """float32 (n, C, H, W) in [0, 1], converted as the training table was: as its recorded
    `preprocessing` says (tables of `reptile-dist data images`), else as Omniglot's (28x28 ink)."""
    pixels = []
    for path in files:
        try:
            with Image.open(path) as image:
                pixels.append(preprocess_like(image, preprocessing) if preprocessing else preprocess_image(image))
        except IMAGE_ERRORS as exc:
            raise AdaptError(f"cannot read image {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    images = np.stack(pixels)
    return torch.from_numpy(load_images(images, np.arange(len(images)), rotation=0))


def read_support(path: str | Path, ways: int, preprocessing: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One subfolder per class (label = index in sorted order), any number of images in each."""
    folder = _folder(path, "support")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = _image_files(folder)
    if stray:
        raise AdaptError(f"{stray[0]} lies outside a class folder: put each class's images in a subfolder of {folder} "
                         "named for the class")
    if len(classes) != ways:
        names = ", ".join(c.name for c in classes) or "none"
        raise AdaptError(f"{folder} has {len(classes)} class folders ({names}); the checkpoint is {ways}-way, "
                         f"so it expects exactly {ways}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        mine = _image_files(cls)
        if not mine:
            raise AdaptError(f"class folder {cls} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += mine
        labels += [label] * len(mine)
    return read_images(files, preprocessing), torch.tensor(labels, dtype=torch.long), [c.name for c in classes]


def read_queries(path: str | Path, preprocessing: dict | None = None) -> tuple[torch.Tensor, list[Path]]:
    folder = _folder(path, "query")
    files = _image_files(folder)
    if not files:
        raise AdaptError(f"query folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return read_images(files, preprocessing), files


def adapt_and_predict(checkpoint: str, support: str | Path, query: str | Path, steps: int | None = None,
                      transductive: bool = False, seed: int = 0, device: str | None = None) -> list[Prediction]:
    """Adapt the checkpoint's theta on the support set with its evaluation inner loop (from its
    carried second-moment estimate when it has one, else a fresh optimizer; mini-batches drawn
    from `seed`), then predict every query."""
    model = load_pretrained(checkpoint, device=device)
    cfg = model.cfg
    preprocessing = model.info.preprocessing if model.info else None
    sx, sy, names = read_support(support, cfg.ways, preprocessing)
    qx, files = read_queries(query, preprocessing)
    if steps is not None and steps < 0:
        raise AdaptError(f"--steps={steps} is out of range (must be >= 0)")
    adapt_task(model, sx, sy, steps, seed)
    outputs = predict(model.learner.model, sx, qx, transductive)
    probability, label = torch.softmax(outputs, dim=1).max(dim=1)
    return [Prediction(f.name, names[int(k)], float(p)) for f, k, p in zip(files, label, probability)]


def adapt_task(model: Pretrained, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
               seed: int = 0) -> torch.nn.Module:
    """Adapt the trained theta to one task with the evaluation's inner loop (`steps`, default the
    config's eval_inner_steps, mini-batches of eval_batch_size drawn from `seed`; from the carried
    second-moment estimate when the run kept one). Returns the adapted network (the workspace:
    the next adaptation starts again from theta)."""
    cfg = model.cfg
    model.learner.adapt(model.theta, support_x, support_y, cfg.eval_inner_steps if steps is None else steps,
                        cfg.eval_batch_size, cfg.inner_replacement, np.random.default_rng(seed), moment=model.moment)
    return model.learner.model


def predict(network: torch.nn.Module, support_x: torch.Tensor, query_x: torch.Tensor,
            transductive: bool = False) -> torch.Tensor:
    """The adapted network's outputs for the queries: all in one batch (transductive: batch norm
    sees the queries together), or each query beside the support set, as evaluation does."""
    device = next(network.parameters()).device
    support_x, query_x = support_x.to(device), query_x.to(device)
    with torch.no_grad():
        return network(query_x) if transductive else non_transductive_outputs(network, support_x, query_x)


def _inert(text: str) -> str:
    """A name a spreadsheet shows as text, never runs: a leading apostrophe, as OWASP recommends."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def to_csv(predictions: list[Prediction]) -> str:
    """Names are the user's file and folder names: csv quotes commas, quotes, CR and LF in them.
    Rows end in CRLF (RFC 4180): csv quotes only the line breaks its row terminator holds."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    writer.writerows((_inert(p.file), _inert(p.predicted_class), f"{p.probability:.4f}") for p in predictions)
    return buf.getvalue()


def to_table(predictions: list[Prediction]) -> str:
    rows = [CSV_COLUMNS] + [(p.file, p.predicted_class, f"{p.probability:.4f}") for p in predictions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(CSV_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def write_csv(predictions: list[Prediction], out: str | Path) -> None:
    check_output_file(out)
    atomic_write(out, to_csv(predictions).encode())
