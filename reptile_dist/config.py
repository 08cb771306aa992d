"""Every knob of a run, with its default and allowed range, in one place.

Configuration is data: a validated dataclass, loaded from a YAML preset or file, with
command-line `--set key=value` overrides. Errors name the field and the allowed range.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from reptile_dist.errors import UserError

PRESETS = ("sine", "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "miniimagenet-5w1s",
           "miniimagenet-5w5s", "synthetic")

# The task families and networks shipped with the package: plug-ins like a user's, named here so
# a config may call them by a short name (reptile_dist/plugins.py imports them by these paths).
BUILTIN_FAMILIES = {
    "sine": "reptile_dist.tasks.sine:sine_family",
    "omniglot": "reptile_dist.tasks.images:omniglot_family",
    "synthetic": "reptile_dist.tasks.synthetic:synthetic_family",
    "images": "reptile_dist.tasks.images:images_family",
}
BUILTIN_MODELS = {
    "sine_mlp": "reptile_dist.models:sine_mlp",
    "omniglot_conv": "reptile_dist.models:omniglot_conv",
    "miniimagenet_conv": "reptile_dist.models:miniimagenet_conv",
}
OBJECT_PREFIX = "object:"  # a factory handed to rd.train as a Python object (plugins.name_of)
LOGGERS = ("tensorboard", "mlflow", "wandb")
# `package.module:attribute.path`, as Python finds it (setuptools entry points' form)
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(UserError):
    """A configuration value is unknown or out of range, or a config file cannot be read."""


def knob(default, help: str, lo=None, choices=None, lo_open=False):
    metadata = {"help": help, "lo": lo, "choices": choices, "lo_open": lo_open}
    if isinstance(default, (dict, list)):  # a fresh copy per Config
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    # Task family and data.
    family: str = knob("sine", "task family: a built-in name, or module:factory (a plug-in: factory(cfg, **family_args) "
                               "returns a TaskFamily)")
    family_args: dict = knob({}, "keyword arguments for the family's factory")
    data: str = knob("data/omniglot.arrow", "prepared image table (omniglot and images families)")
    split: str = knob("paper", "omniglot class split: paper (1200/423 characters) or alphabet (background/evaluation)",
                      choices=("paper", "alphabet"))
    val_characters: int = knob(0, "training characters held out as a validation split (for tuning)", lo=0)
    model: str = knob("sine_mlp", "network: a built-in name, or module:factory (a plug-in: factory(cfg, **model_args) "
                                 "returns a torch.nn.Module)")
    model_args: dict = knob({}, "keyword arguments for the network's factory")
    loss: str = knob("", "module:function(outputs, targets) -> scalar loss for adaptation and evaluation; empty: "
                         "cross-entropy for classification, mean squared error for regression")
    init: str = knob("torch", "initial weights: PyTorch's layer defaults, or glorot (TensorFlow's, as the "
                              "reference code had)", choices=("torch", "glorot"))
    ways: int = knob(5, "classes per task (N-way)", lo=1)
    shots: int = knob(1, "support examples per class at evaluation (K-shot)", lo=1)
    train_shots: int = knob(10, "examples per class in a meta-training task", lo=1)
    queries: int = knob(1, "query examples per class in an evaluation task", lo=1)

    # Inner loop (task adaptation).
    inner_optimizer: str = knob("adam", "inner optimizer; adam uses beta1=0 as in the paper", choices=("adam", "sgd"))
    inner_lr: float = knob(0.001, "inner learning rate", lo=0.0, lo_open=True)
    inner_steps: int = knob(5, "inner steps per meta-training task", lo=1)
    inner_batch_size: int = knob(10, "inner mini-batch size", lo=1)
    inner_replacement: bool = knob(False, "draw inner mini-batches with replacement")
    inner_state: str = knob("fresh", "inner Adam state: fresh per task, or carried (a second-moment estimate "
                                     "kept beside theta, averaged over each meta-step's tasks, as the reference "
                                     "code's one long-lived Adam)", choices=("fresh", "carried"))
    batched_adaptation: bool = knob(False, "adapt a push's tasks side by side (torch.func.vmap); same deltas "
                                           "to float rounding; slower than the loop on the CPUs measured")

    # Outer loop (meta update).
    meta_iters: int = knob(100_000, "meta-iterations (outer steps)", lo=1)
    meta_batch_size: int = knob(5, "tasks per meta-step", lo=1)
    meta_step_size: float = knob(1.0, "outer step size epsilon at the start", lo=0.0, lo_open=True)
    meta_step_size_final: float = knob(0.0, "outer step size at the end (linear annealing)", lo=0.0)
    outer_optimizer: str = knob("sgd", "sgd: theta += eps * mean delta; adam: Adam on the pseudo-gradient; "
                                       "nesterov: SGD with Nesterov momentum on it (DiLoCo's outer step), lr eps",
                                choices=("sgd", "adam", "nesterov"))
    outer_momentum: float = knob(0.9, "nesterov: momentum of the outer step (DiLoCo: 0.9, with meta_step_size 0.7)",
                                 lo=0.0)

    # Evaluation.
    eval_tasks: int = knob(10_000, "held-out tasks in the final evaluation", lo=1)
    eval_inner_steps: int = knob(50, "inner steps when adapting an evaluation task", lo=0)
    eval_batch_size: int = knob(5, "inner mini-batch size when adapting an evaluation task", lo=1)
    eval_every: int = knob(1000, "meta-steps between periodic evaluations (0: none; the "
                           "before-training evaluation of theta_0 runs either way)", lo=0)
    eval_tasks_periodic: int = knob(100, "tasks per periodic evaluation, and in the "
                                   "before-training one", lo=1)

    # Logging, checkpoints and devices.
    loggers: list = knob(["tensorboard"], "where rows go besides metrics.parquet: any of tensorboard, mlflow, wandb")
    device: str = knob("auto", "device of the local trainer, eval and adapt: auto (a GPU when there is one), cpu, "
                               "cuda, cuda:N (Ray workers use the GPU Ray grants them)")
    log_every: int = knob(100, "meta-steps between metric rows", lo=1)
    checkpoint_every: int = knob(1000, "meta-steps between checkpoints (0: only the final one)", lo=0)
    keep_checkpoints: int = knob(3, "checkpoints kept on disk", lo=1)
    seed: int = knob(0, "run seed; task i of meta-step t is drawn from (seed, t, i)", lo=0)

    # Distributed engine.
    backend: str = knob("local", "local: one process; ray: actors", choices=("local", "ray"))
    address: str = knob("", "ray: the cluster to join ('auto', ray://host:10001); empty: the one RAY_ADDRESS names, else a new local one in-process")
    mode: str = knob("sync", "sync: barrier per meta-step; async: apply deltas on arrival; "
                             "allreduce: Ray Train workers all-reduce deltas, no parameter server",
                     choices=("sync", "async", "allreduce"))
    max_failures: int = knob(3, "allreduce: worker-group restarts from the last checkpoint after a failure; "
                                "sync/async: restarts in a row of one actor (a worker replaced, the parameter server "
                                "restored from the last checkpoint, the evaluator restarted), 1, 2, 4 ... 30 s apart, "
                                "before the run stops (-1: no limit)", lo=-1)
    workers: int = knob(2, "adapt workers", lo=1)
    cpus_per_worker: float = knob(1.0, "CPUs reserved per worker when the cluster has no GPUs", lo=0.0, lo_open=True)
    gpus_per_worker: float = knob(1.0, "GPUs per worker when the cluster has GPUs (fractional allowed)", lo=0.0)
    placement: str = knob("PACK", "placement group strategy", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    staleness_bound: int = knob(4, "async: deltas staler than this many versions are dropped", lo=0)
    staleness_weighting: str = knob("none", "async: weight of a delta of staleness s", choices=("none", "inverse"))
    on_worker_loss: str = knob("wait", "sync: when a worker dies mid-step, wait for its replacement to adapt its share, "
                               "or skip (complete the step with the deltas that arrived)", choices=("wait", "skip"))
    max_rejected_updates: int = knob(20, "stop the run after this many updates in a row with every delta rejected", lo=1)
    delta_dtype: str = knob("auto", "precision of deltas on the wire; auto: float64 where a run is reproducible bit "
                            "for bit (sync, all-reduce, async with one worker: the local trainer's run), float32 "
                            "for async with several workers (their pushes land in an order that differs from run "
                            "to run anyway; half the bytes)",
                            choices=("auto", "float64", "float32", "bfloat16", "float16"))
    torch_threads: int = knob(0, "torch threads per process; 0: automatic (in-process: 1, a Ray worker: "
                                 "its CPU share rounded up)", lo=0)
    tasks_per_push: int = knob(0, "async: tasks a worker adapts and sums into one push, applied with the step size "
                                  "x tasks / meta_batch_size; 0: meta_batch_size (each push a meta-step of the "
                                  "worker's own; fewer pushes relieve the parameter server)", lo=0)
    prefetch: bool = knob(False, "async: adapt the next tasks while the push is on its way, from the theta at hand "
                                 "with the worker's own push applied as the PS will apply it (needs outer_optimizer "
                                 "sgd); hides Ray's round trip with several workers, at one more adaptation of "
                                 "staleness (a lone worker with sgd looks ahead without it, checked, in either mode)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.outer_momentum >= 1:
            raise ConfigError(f"outer_momentum={self.outer_momentum} is out of range (must be < 1)")
        if self.meta_step_size_final > self.meta_step_size:
            raise ConfigError(
                f"meta_step_size_final={self.meta_step_size_final} must not exceed meta_step_size={self.meta_step_size}"
            )
        if self.prefetch and self.mode == "async" and self.outer_optimizer != "sgd":
            raise ConfigError(f"prefetch needs outer_optimizer=sgd (a worker applies its own push ahead of the PS "
                              f"only for plain interpolation), got {self.outer_optimizer}")
        if self.inner_state == "carried" and self.inner_optimizer != "adam":
            raise ConfigError("inner_state=carried needs inner_optimizer=adam (it carries Adam's second moment)")
        _check_plugin("family", self.family, BUILTIN_FAMILIES)
        _check_plugin("model", self.model, BUILTIN_MODELS)
        if self.loss and not IMPORT_PATH_RE.match(self.loss):
            raise ConfigError(f"loss={self.loss!r} is not an import path module:function")
        if not DEVICE_RE.match(self.device):
            raise ConfigError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        bad = [name for name in self.loggers if name not in LOGGERS]
        if bad:
            raise ConfigError(f"loggers: {bad[0]!r} is not one of {', '.join(LOGGERS)}")
        if self.val_characters and self.family != "omniglot":
            raise ConfigError("val_characters applies to the omniglot family only")

    def replace(self, **changes) -> "Config":
        for key in set(changes) & set(RETIRED_FIELDS):
            if changes[key] not in (RETIRED_FIELDS[key], str(RETIRED_FIELDS[key])):
                raise ConfigError(f"{key} is no longer a run setting: a straggler is the bench's "
                                  f"(reptile-dist bench --straggler FACTOR)")
            del changes[key]
        unknown = sorted(set(changes) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown config key '{unknown[0]}' (known: {', '.join(sorted(FIELD_NAMES))})")
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def wire_dtype(self) -> str:
        """The precision pushes travel in: `delta_dtype`, with "auto" resolved."""
        if self.delta_dtype != "auto":
            return self.delta_dtype
        return "float32" if self.mode == "async" and self.workers > 1 else "float64"

    @property
    def async_tasks_per_push(self) -> int:
        """Tasks an async worker sums into one push: `tasks_per_push`, 0 resolved."""
        return self.tasks_per_push or self.meta_batch_size

    @property
    def carries_inner_moment(self) -> bool:
        return self.inner_state == "carried"

    def meta_step_size_at(self, progress: float) -> float:
        """Linear annealing from meta_step_size to meta_step_size_final; progress in meta-steps."""
        frac = min(max(progress / self.meta_iters, 0.0), 1.0)
        return frac * self.meta_step_size_final + (1 - frac) * self.meta_step_size


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
FIELD_NAMES = set(FIELDS)
# Keys older versions wrote into config.yaml and checkpoints (always with these values outside the
# bench), dropped when such a file is read back: the benchmarks' straggler is the bench's own hook
# now (bench/hooks.py), not run configuration.
RETIRED_FIELDS = {"straggler_factor": 1.0, "straggler_worker": 0}


def _check_plugin(key: str, value: str, builtins: dict[str, str]) -> None:
    if value not in builtins and not IMPORT_PATH_RE.match(value) and not value.startswith(OBJECT_PREFIX):
        raise ConfigError(f"{key}={value!r} is neither a built-in ({', '.join(builtins)}) nor an import path "
                          f"module:factory")


def _plain(value) -> bool:
    """Values YAML, JSON and a checkpoint all hold as they are."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _check_field(f: dataclasses.Field, value) -> None:
    m = f.metadata
    if f.type == "dict" and not (isinstance(value, dict) and _plain(value)):
        raise ConfigError(f"{f.name} must be a mapping of names to plain values (numbers, strings, lists), "
                          f"got {value!r}")
    if f.type == "list" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{f.name} must be a list of names, got {value!r}")
    if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{f.name} must be a number, got {value!r}")
    if f.type == "int" and not isinstance(value, int):
        raise ConfigError(f"{f.name} must be an integer, got {value!r}")
    # A YAML `data: 5` or `data: [a]` would otherwise reach the code that opens files as a non-string.
    if f.type == "str" and not isinstance(value, str):
        raise ConfigError(f"{f.name} must be a string, got {value!r}")
    if f.type == "float" and not math.isfinite(value):  # NaN passes every range check: refuse it here
        raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
    if m["choices"] is not None and value not in m["choices"]:
        raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(map(str, m['choices']))}")
    lo = m["lo"]
    if lo is not None and (value < lo or (m["lo_open"] and value == lo)):
        bound = f"> {lo}" if m["lo_open"] else f">= {lo}"
        raise ConfigError(f"{f.name}={value} is out of range (must be {bound})")


def _coerce(name: str, value):
    """Turn a YAML/CLI value into the field's type; strings from --set are parsed as YAML."""
    kind = FIELDS[name].type
    if isinstance(value, str) and kind != "str":
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}={value!r} is not a valid value ({str(exc).splitlines()[0]})") from None
    if kind == "list" and isinstance(value, str):  # --set loggers=tensorboard
        value = [value] if value else []
    if kind in ("list", "dict") and value is None:  # `family_args:` left empty in YAML, `--set loggers=`
        value = [] if kind == "list" else {}
    if isinstance(value, str) and kind in ("int", "float"):
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python reads it as the number users mean.
        try:
            value = float(value)
        except ValueError:
            pass
    try:
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def preset_path(name: str) -> Path:
    return Path(str(resources.files("reptile_dist") / "presets" / f"{name}.yaml"))


def read_yaml_mapping(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, or `error` in one line naming the file."""
    if path.is_dir():
        raise error(f"{path} is a folder, not a YAML file of {what}")
    try:
        data = yaml.safe_load(path.read_bytes()) or {}  # bytes: YAML's own decoding reports a binary file
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of {what}")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:  # `5: x` would otherwise reach keyword arguments as an int
        raise error(f"{path}: key {odd[0]!r} is not a name")
    return data


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> Config:
    """A preset name or a YAML file, then overrides. Unknown keys and bad values raise ConfigError."""
    path = Path(name_or_path)
    if not path.suffix and preset_path(name_or_path).exists():
        path = preset_path(name_or_path)
    if not path.exists():
        raise ConfigError(f"config '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = read_yaml_mapping(path, ConfigError, "config keys")
    data.update(overrides or {})
    return Config().replace(**data)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = value
    return out


def describe() -> str:
    """Every knob with its default and range, for `reptile-dist config --list`."""
    lines = []
    for f in dataclasses.fields(Config):
        m = f.metadata
        rng = ""
        if m["choices"]:
            rng = " | ".join(map(str, m["choices"]))
        elif m["lo"] is not None:
            rng = f"{'>' if m['lo_open'] else '>='} {m['lo']}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name:22} {default!s:20} {rng:24} {m['help']}")
    lines += ["", "built-in families (family: NAME; any module:factory is a plug-in):"]
    lines += [f"  {name:20} {path}" for name, path in BUILTIN_FAMILIES.items()]
    lines += ["built-in networks (model: NAME; any module:factory is a plug-in):"]
    lines += [f"  {name:20} {path}" for name, path in BUILTIN_MODELS.items()]
    return "\n".join(lines)
