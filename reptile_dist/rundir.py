"""A run directory: config.yaml, run.json, metrics.jsonl, metrics.parquet, checkpoints/, final.pt,
test-scores.jsonl (training.kept_test_scores), summary.json, and the loggers' files (tensorboard/, mlflow.db, wandb/).

Everything is written through pyarrow filesystems, so `--out` may be a local or shared folder or
an `s3://` / `gs://` URI. Every file is written to a temporary name and then moved into place, so
an interrupted write never replaces a good file with a broken one (locally with `atomic_write`,
which also syncs it to disk).

Metric rows stream: each logged row is appended to metrics.jsonl (one JSON object a line) and
flushed when it is logged, so a killed run loses at most the row being written; a torn last line is
skipped on reading. An object store cannot append: there metrics.jsonl is rewritten whole at most
every REMOTE_STREAM_S and at every checkpoint. At checkpoints and at the end both metrics.jsonl and
metrics.parquet (the tidy table) are rewritten from the rows, which resume truncates to the
checkpoint's meta-step.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
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
from reptile_dist.loggers import HINTS, Logger, check_loggers, open_logger

CHECKPOINT_RE = re.compile(r"ckpt-(\d{8})\.pt$")
TEMPORARY_RE = re.compile(r"\.tmp$")  # atomic_write's `.<name>.<random>.tmp`, the remote `<name>.<random>.tmp`
RUN_FORMAT = "reptile-dist-run-v1"
RUN_FILE = "run.json"  # the run directory's format and its configuration's identity
LOCK_FILE = ".lock"
METRICS_STREAM = "metrics.jsonl"
MERGE_KEY = "_merge"  # a streamed line that adds its values to the row of its step (RunDir.annotate)
REMOTE_STREAM_S = 30.0  # an object store's metrics.jsonl is rewritten at most this often between checkpoints
# Keys that may differ between two invocations of the same run (resuming with another engine, or
# with another way of moving deltas: delta_dtype and tasks_per_push, whose defaults changed once).
RUN_INVARIANT_IGNORES = ("backend", "mode", "workers", "cpus_per_worker", "gpus_per_worker", "placement",
                         "delta_dtype", "tasks_per_push", "torch_threads", "eval_tasks", "log_every",
                         "checkpoint_every", "keep_checkpoints", "loggers", "device", "address")


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
        self._streaming = False  # whether logged rows go to metrics.jsonl and the loggers
        self._stream = None  # metrics.jsonl open for appending (local folders)
        self._streamed_at = 0.0  # when an object store's metrics.jsonl was last rewritten
        self._dirty = False  # an object store's metrics.jsonl lacks rows logged since
        self._cfg: Config | None = None  # the configuration start() claimed the folder for
        self._loggers: dict[str, Logger] | None = None  # opened at the first row streamed
        self._logger_folder: str | None = None  # where they write: the folder, or a local staging one
        self._purge_step: int | None = None  # the first meta-step redone after a resume

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.path(name)
        if self.local:
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
        folder another training holds is refused. Temporaries left by a crash are removed. The
        loggers `cfg` asks for must be installed; they open at the first row, from here on every
        row logged streams to metrics.jsonl and to them."""
        check_loggers(cfg.loggers)
        self._cfg = cfg
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
        if previous is not None:
            self.load_metrics()
        run_id = self.run_id() or uuid.uuid4().hex[:16]  # kept across resumes: the loggers continue their run
        self.write_bytes("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        self.write_bytes(RUN_FILE, json.dumps({"format": RUN_FORMAT, "config_identity": config_identity(cfg),
                                               "run_id": run_id}).encode())
        self._start_stream()

    def run_id(self) -> str | None:
        """The run's id in run.json (the loggers' name for it across resumes); None before one is recorded."""
        if not self.exists(RUN_FILE):
            return None
        try:
            recorded = json.loads(self.read_bytes(RUN_FILE))
        except ValueError:
            return None
        return recorded.get("run_id") if isinstance(recorded, dict) else None

    def _entries(self) -> list[str]:
        return [i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.root or "/"))
                if i.base_name != LOCK_FILE]

    def _take_lock(self) -> None:
        """One training per folder (local folders: an advisory lock, freed when the process ends)."""
        if not self.local:
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
        """Close the loggers and the stream, and free the folder for the next training (also freed
        when the process ends)."""
        self._stop_stream()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def hand_over(self, other: "RunDir") -> "RunDir":
        """Give this handle's lock to `other` (a fresh handle on the same folder); this one stops streaming."""
        self._stop_stream()
        other._lock, self._lock = self._lock, None
        return other

    def _remove_temporaries(self) -> None:
        for folder in (self.root or "/", self.path("checkpoints")):
            for entry in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                if entry.type == pafs.FileType.File and TEMPORARY_RE.search(entry.base_name):
                    self.fs.delete_file(entry.path)

    # --- metrics ------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Keep `row`; on a streaming handle, also append it to metrics.jsonl and give it to the loggers."""
        self._metrics.append(row)
        self._stream_row(row)

    def annotate(self, step: float, values: dict[str, Any]) -> None:
        """Add `values` to the newest row of meta-step `step` (a periodic evaluation that finished
        after its row was logged), or keep them as a row of their own when there is none."""
        merge_row(self._metrics, {"step": step, **values})
        self._stream_row({"step": step, **values, MERGE_KEY: True})

    def truncate_metrics(self, step: int) -> None:
        """Forget rows after `step` (they are redone after a restore): metrics.jsonl is rewritten
        without them and the loggers hide them. A handle that did not claim the run streams from
        here on (the all-reduce's rank 0, which writes the rows of the run its driver claimed)."""
        self._metrics = [r for r in self._metrics if r.get("step", 0) <= step]
        if self._loggers:
            for name, logger in list(self._loggers.items()):
                self._call_logger(name, logger.rewind, step)
        else:
            self._purge_step = step + 1
        self._rewrite_stream()
        self._streaming = True

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self._metrics

    def load_metrics(self) -> None:
        """Hold the rows on disk (`read_metrics`): a handle on a run that another handle claimed."""
        self._metrics = self.read_metrics()

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows on disk, a running run's too: metrics.jsonl (a line torn by a kill is skipped),
        else metrics.parquet (a run written before rows streamed); [] when there is neither."""
        if self.exists(METRICS_STREAM):
            return parse_stream(self.read_bytes(METRICS_STREAM))
        if self.exists("metrics.parquet"):
            return pq.read_table(self.path("metrics.parquet"), filesystem=self.fs).to_pylist()
        return []

    def flush_metrics(self) -> None:
        """Rewrite metrics.parquet, and on a streaming handle metrics.jsonl, from the rows (at
        checkpoints and at the end); a remote run's logger files are copied up too."""
        if self._streaming:
            self._rewrite_stream()
            self._mirror_logger_files()
        if not self._metrics:
            return
        columns = list(dict.fromkeys(k for row in self._metrics for k in row))  # rows may differ in keys
        table = pa.table({c: [row.get(c) for row in self._metrics] for c in columns})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_bytes("metrics.parquet", buf.getvalue().to_pybytes())

    # --- streaming -----------------------------------------------------------------------
    def _start_stream(self) -> None:
        self._rewrite_stream()  # also drops a line torn by the kill that ended the last session
        self._streaming = True

    def _stream_row(self, row: dict[str, Any]) -> None:
        if not self._streaming:
            return
        if self._stream is not None:
            self._stream.write(stream_line(row))
            self._stream.flush()  # in the kernel's hands: a killed process loses nothing written
        else:
            self._dirty = True
            if time.monotonic() - self._streamed_at >= REMOTE_STREAM_S:
                self._rewrite_stream()
        if self._loggers is None:
            self._open_loggers()
        step = int(row.get("step", 0))
        values = {k: v for k, v in row.items() if k != MERGE_KEY}
        for name, logger in list(self._loggers.items()):
            self._call_logger(name, logger.log, values, step)

    def _rewrite_stream(self) -> None:
        """metrics.jsonl as the rows stand; locally, reopened for appending."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.write_bytes(METRICS_STREAM, "".join(stream_line(r) for r in self._metrics).encode())
        self._streamed_at, self._dirty = time.monotonic(), False
        if self.local:
            self._stream = open(self.path(METRICS_STREAM), "a", encoding="utf-8")

    def _stop_stream(self) -> None:
        if self._streaming and self._dirty:
            self._rewrite_stream()
        for name, logger in list((self._loggers or {}).items()):
            self._call_logger(name, logger.close)
        self._mirror_logger_files()
        if self._logger_folder is not None and not self.local:
            shutil.rmtree(self._logger_folder, ignore_errors=True)
        if self._stream is not None:
            self._stream.close()
        self._stream, self._loggers, self._logger_folder, self._streaming = None, None, None, False

    def _open_loggers(self) -> None:
        """The configured loggers, writing into the run directory (a remote one's: a local staging
        folder, copied up at checkpoints and at the end). One that fails to open is reported and
        left out: a logger never ends a training."""
        self._loggers = {}
        cfg = self._cfg or self.recorded_config()
        if cfg is None or not cfg.loggers:
            return
        self._logger_folder = self.root if self.local else tempfile.mkdtemp(prefix="reptile-dist-loggers-")
        name_of_run = self.uri.rstrip("/").rsplit("/", 1)[-1] or self.uri
        for name in cfg.loggers:
            try:
                self._loggers[name] = open_logger(name, self._logger_folder, name_of_run, self.run_id() or "run",
                                                  cfg.to_dict(), self._purge_step)
            except Exception as exc:  # noqa: BLE001  (a logger's own failure, reported; the run goes on)
                _warn_logger(name, "could not start", exc)

    def _call_logger(self, name: str, method, *args) -> None:
        try:
            method(*args)
        except Exception as exc:  # noqa: BLE001  (a logger's own failure, reported; the run goes on)
            _warn_logger(name, "stopped", exc)
            (self._loggers or {}).pop(name, None)

    def _mirror_logger_files(self) -> None:
        """A remote run's logger files, copied up from the staging folder."""
        if self.local or self._logger_folder is None:
            return
        for folder, _, files in os.walk(self._logger_folder):
            for file in files:
                local = os.path.join(folder, file)
                with open(local, "rb") as f:
                    self.write_bytes(os.path.relpath(local, self._logger_folder), f.read())

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


def stream_line(row: dict[str, Any]) -> str:
    """One row of metrics.jsonl; NaN and infinities as Python's json writes them (NaN, Infinity), so
    the table rebuilt from the stream holds the values logged."""
    return json.dumps(row, default=_json_default, separators=(",", ":")) + "\n"


def parse_stream(data: bytes) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not whole (the last, when a kill tore it) is skipped."""
    rows: list[dict[str, Any]] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        if row.pop(MERGE_KEY, False):
            merge_row(rows, row)
        else:
            rows.append(row)
    return rows


def merge_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Add `row`'s values to the newest row of its step in `rows`, or append it when there is none."""
    match = next((r for r in reversed(rows) if r.get("step") == row["step"]), None)
    if match is None:
        rows.append(dict(row))
    else:
        match.update(row)


def _warn_logger(name: str, what: str, exc: Exception) -> None:
    hint = f" ({HINTS[name]})" if name in HINTS else ""
    print(f"warning: loggers: {name} {what} ({type(exc).__name__}: {' '.join(str(exc).split())}){hint}; "
          f"the run goes on, metrics.jsonl and metrics.parquet keep every row", file=sys.stderr)


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


def run_defining(cfg: Config) -> Config:
    """`cfg` with the keys that may differ between invocations of one run (RUN_INVARIANT_IGNORES,
    but for eval_tasks) at their defaults: what the run is, not how this invocation runs it."""
    defaults = Config()
    return cfg.replace(**{k: getattr(defaults, k) for k in RUN_INVARIANT_IGNORES if k != "eval_tasks"})


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
