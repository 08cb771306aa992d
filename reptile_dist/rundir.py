"""A run directory: config.yaml, metrics.parquet, checkpoints/, final.pt, summary.json.

Everything is written through pyarrow filesystems, so `--out` may be a local or shared folder or
an `s3://` / `gs://` URI. Every file is written to a temporary name and then moved into place, so
an interrupted write never replaces a good file with a broken one (locally with `atomic_write`,
which also syncs it to disk).
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import yaml

from reptile_dist.config import RETIRED_FIELDS, Config
from reptile_dist.files import atomic_write

CHECKPOINT_RE = re.compile(r"ckpt-(\d{8})\.pt$")
# Keys that may differ between two invocations of the same run (resuming with another engine).
RUN_INVARIANT_IGNORES = ("backend", "mode", "workers", "cpus_per_worker", "gpus_per_worker", "placement",
                         "torch_threads", "eval_tasks", "log_every", "checkpoint_every", "keep_checkpoints")


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not one of ours."""


def save_torch(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_bytes(data: bytes, name: str) -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for truncated or foreign files
        raise CheckpointError(f"{name} is not a readable checkpoint ({type(exc).__name__})") from None


class RunDir:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri) if "://" in self.uri else (pafs.LocalFileSystem(), _abs(self.uri))
        self._metrics: list[dict[str, Any]] = []

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.path(name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            atomic_write(final, data)
            return
        # s3:// and gs:// (pyarrow offers no fsync there): a temporary object, then moved into place.
        tmp = f"{final}.tmp"
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    # --- the run's identity -------------------------------------------------------------
    def start(self, cfg: Config, resume: bool = False) -> None:
        """Claim the folder for this run. A folder holding a different run is refused, and a
        finished or started run is not overwritten unless resuming it."""
        if self.exists("config.yaml"):
            previous = yaml.safe_load(self.read_bytes("config.yaml")) or {}
            if _identity(previous) != _identity(cfg.to_dict()):
                changed = sorted(k for k in _identity(cfg.to_dict()) if previous.get(k) != cfg.to_dict()[k])
                raise RunDirError(f"{self.uri} already holds a different run (differs in: {', '.join(changed)}); choose another --out")
            if not resume:
                raise RunDirError(f"{self.uri} already holds this run; pass --resume to continue it or choose another --out")
            if self.exists("metrics.parquet"):
                self._metrics = pq.read_table(self.path("metrics.parquet"), filesystem=self.fs).to_pylist()
        elif resume:
            raise RunDirError(f"{self.uri} holds no run to resume (no config.yaml)")
        self.write_bytes("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    # --- metrics ------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        self._metrics.append(row)

    def truncate_metrics(self, step: int) -> None:
        """Forget rows after `step` (they are redone after a restore)."""
        self._metrics = [r for r in self._metrics if r.get("step", 0) <= step]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self._metrics

    def flush_metrics(self) -> None:
        if not self._metrics:
            return
        columns = list(dict.fromkeys(k for row in self._metrics for k in row))  # rows may differ in keys
        table = pa.table({c: [row.get(c) for row in self._metrics] for c in columns})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_bytes("metrics.parquet", buf.getvalue().to_pybytes())

    # --- checkpoints --------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, str]]:
        selector = pafs.FileSelector(self.path("checkpoints"), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            m = CHECKPOINT_RE.search(info.base_name)
            if m:
                found.append((int(m.group(1)), f"checkpoints/{info.base_name}"))
        return sorted(found)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> str:
        name = f"checkpoints/ckpt-{step:08d}.pt"
        self.write_bytes(name, save_torch(state))
        for _, old in self.checkpoints()[:-keep]:
            self.fs.delete_file(self.path(old))
        self.flush_metrics()
        return name

    def latest_checkpoint(self, warn=print) -> dict[str, Any] | None:
        """The newest readable checkpoint; a truncated one is reported and the previous used."""
        for step, name in reversed(self.checkpoints()):
            try:
                return load_torch_bytes(self.read_bytes(name), f"{self.uri}/{name}")
            except CheckpointError as exc:
                warn(f"warning: {exc}; using the previous checkpoint")
        return None

    # --- results ------------------------------------------------------------------------
    def write_final(self, state: dict[str, Any]) -> None:
        self.write_bytes("final.pt", save_torch(state))

    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}  # NaN is not JSON
        self.write_bytes("summary.json", (json.dumps(clean, indent=2, default=_json_default) + "\n").encode())


def load_checkpoint(uri: str) -> dict[str, Any]:
    """final.pt or a checkpoint file, local or remote, loaded with weights_only=True."""
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), _abs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise CheckpointError(f"checkpoint not found: {uri}")
    with fs.open_input_stream(path) as f:
        return load_torch_bytes(f.read(), uri)


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    # Retired keys that an older version wrote are not part of the run's identity.
    return {k: v for k, v in cfg.items() if k not in RUN_INVARIANT_IGNORES and k not in RETIRED_FIELDS}


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
