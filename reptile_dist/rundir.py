"""A run directory: config.yaml, metrics.parquet, checkpoints/, final.pt, summary.json.

Everything is written through pyarrow filesystems, so `--out` may be a local or shared folder or
an `s3://` / `gs://` URI. Every file is written to a temporary name and then moved into place, so
an interrupted write never replaces a good file with a broken one (locally with `atomic_write`,
which also syncs it to disk).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import yaml

from reptile_dist.config import Config, ConfigError
from reptile_dist.errors import UserError
from reptile_dist.files import atomic_write

CHECKPOINT_RE = re.compile(r"ckpt-(\d{8})\.pt$")
TEMPORARY_RE = re.compile(r"\.tmp$")  # atomic_write's `.<name>.<random>.tmp`, the remote `<name>.<random>.tmp`
RUN_FORMAT = "reptile-dist-run-v1"
RUN_FILE = "run.json"  # the run directory's format and its configuration's identity
LOCK_FILE = ".lock"
# Keys that may differ between two invocations of the same run (resuming with another engine).
RUN_INVARIANT_IGNORES = ("backend", "mode", "workers", "cpus_per_worker", "gpus_per_worker", "placement",
                         "torch_threads", "eval_tasks", "log_every", "checkpoint_every", "keep_checkpoints")


class RunDirError(UserError):
    """The run directory cannot be used as asked."""


class CheckpointError(UserError):
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
        self.uri = uri.rstrip("/") or uri  # "/" stays the root folder, not the current one
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri) if "://" in self.uri else (pafs.LocalFileSystem(), _abs(self.uri))
        self.root = self.root.rstrip("/") if self.root != "/" else ""
        self._metrics: list[dict[str, Any]] = []
        self._lock = None

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
        tmp = f"{final}.{uuid.uuid4().hex[:12]}.tmp"
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    # --- the run's identity -------------------------------------------------------------
    def recorded_config(self) -> Config | None:
        """The configuration config.yaml records, with fields newer than the file at their defaults;
        None when there is no config.yaml."""
        if not self.exists("config.yaml"):
            return None
        try:
            recorded = yaml.safe_load(self.read_bytes("config.yaml")) or {}
            if not isinstance(recorded, dict) or not all(isinstance(k, str) for k in recorded):
                raise RunDirError(f"{self.uri}/config.yaml does not hold a configuration")
            return Config().replace(**recorded)
        except yaml.YAMLError as exc:
            raise RunDirError(f"{self.uri}/config.yaml is not valid YAML ({str(exc).splitlines()[0]})") from None
        except ConfigError as exc:
            raise RunDirError(f"{self.uri}/config.yaml: {exc}") from None

    def is_finished(self) -> bool:
        return self.exists("final.pt") and self.exists("summary.json")

    def start(self, cfg: Config, resume: bool = False) -> None:
        """Claim the folder for this run. A folder holding a different run, or files that are not
        a run's, is refused; a started or finished run is not overwritten unless resuming it; a
        folder another training holds is refused. Temporaries left by a crash are removed."""
        info = self.fs.get_file_info(self.root or "/")
        if info.type == pafs.FileType.File:
            raise RunDirError(f"{self.uri} is a file, not a run directory; choose a folder for --out")
        previous = self.recorded_config()
        if previous is not None:
            differs = config_differences(previous, cfg)
            if differs:
                raise RunDirError(f"{self.uri} already holds a different run (differs in: {', '.join(differs)}); "
                                  f"choose another --out")
            if not resume:
                state = "a finished run" if self.is_finished() else "this run"
                raise RunDirError(f"{self.uri} already holds {state}; pass --resume to continue it or choose another --out")
        elif resume:
            raise RunDirError(f"{self.uri} holds no run to resume (no config.yaml)")
        elif info.type == pafs.FileType.Directory and self._entries():
            raise RunDirError(f"{self.uri} is not empty and holds no run (no config.yaml); "
                              f"choose an empty or new folder for --out")
        self._take_lock()
        self._remove_temporaries()
        if previous is not None and self.exists("metrics.parquet"):
            self._metrics = pq.read_table(self.path("metrics.parquet"), filesystem=self.fs).to_pylist()
        self.write_bytes("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        self.write_bytes(RUN_FILE, json.dumps({"format": RUN_FORMAT, "config_identity": config_identity(cfg)}).encode())

    def _entries(self) -> list[str]:
        return [i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.root or "/"))
                if i.base_name != LOCK_FILE]

    def _take_lock(self) -> None:
        """One training per folder (local folders: an advisory lock, freed when the process ends)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            return
        os.makedirs(self.root or "/", exist_ok=True)
        handle = open(self.path(LOCK_FILE), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{self.uri} is in use by another training ({holder}); wait for it or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        """Free the folder for the next training (also freed when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def hand_over(self, other: "RunDir") -> "RunDir":
        """Give this handle's lock to `other` (a fresh handle on the same folder)."""
        other._lock, self._lock = self._lock, None
        return other

    def _remove_temporaries(self) -> None:
        for folder in (self.root or "/", self.path("checkpoints")):
            for entry in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if entry.type == pafs.FileType.File and TEMPORARY_RE.search(entry.base_name):
                    self.fs.delete_file(entry.path)

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
        """Write checkpoint `step`, then drop the oldest beyond `keep`: the new one is on disk before
        any older one goes, so there is always one to fall back to."""
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
        text = json.dumps(json_safe(summary), indent=2, default=_json_default, allow_nan=False)
        self.write_bytes("summary.json", (text + "\n").encode())

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.read_bytes("summary.json"))


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
    return {k: v for k, v in cfg.items() if k not in RUN_INVARIANT_IGNORES}


def config_differences(recorded: Config, cfg: Config) -> list[str]:
    """The fields that make `cfg` a different run from `recorded` (engine, workers and logging may differ)."""
    a, b = _identity(recorded.to_dict()), _identity(cfg.to_dict())
    return sorted(k for k in a if a[k] != b[k])


def config_identity(cfg: Config) -> str:
    """A short digest of the fields that define a run, recorded in run.json and every checkpoint."""
    text = json.dumps(_identity(cfg.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None at any depth: they are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
