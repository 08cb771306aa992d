"""Plug-ins: the task family, the network and the loss a run meta-trains, found by import path.

    family: my_module:make_family   ->  make_family(cfg, **cfg.family_args) -> a TaskFamily
    model:  my_module:make_model    ->  make_model(cfg, **cfg.model_args)   -> a torch.nn.Module
    loss:   my_module:my_loss       ->  my_loss(outputs, targets)           -> a scalar tensor

The built-in families and networks are plug-ins too (config.BUILTIN_FAMILIES / BUILTIN_MODELS
name their import paths), so there is one way in. A model factory that also takes a `family`
keyword is handed the task family (the image families say their `input_shape`).

Everything is checked before training starts, in the process that starts it: a module that does
not import, a missing attribute, a factory that raises or returns the wrong kind of object, a
network whose forward pass fails on a training task or that changes a buffer (batch-norm running
statistics: theta is the parameters only) each end with one line naming the import path.

`rd.train` may instead be handed the factories as Python objects (a script's functions, a
closure): they reach Ray workers through Ray's own serialization, and the run records them as
`object:<module>:<qualname>`, which `eval`, `export` and `--resume` cannot import: those are given
the factories again.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from reptile_dist.config import BUILTIN_FAMILIES, BUILTIN_MODELS, OBJECT_PREFIX, Config
from reptile_dist.errors import UserError
from reptile_dist.tasks.base import Task, TaskFamily

KINDS = ("classification", "regression")
CHECK_SEED = 2**31 - 1  # the sample task a plug-in is checked on (never a training task's seed)


class PluginError(UserError):
    """A plug-in cannot be imported, or its factory fails or returns the wrong kind of object."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_object(path: str, key: str) -> Any:
    """The object at `module:attr.attr`, imported as Python would from here (the current folder,
    PYTHONPATH, installed packages); PluginError in one line naming `key` and the path."""
    if path.startswith(OBJECT_PREFIX):
        raise PluginError(f"{key}={path[len(OBJECT_PREFIX):]} was a Python object handed to rd.train, not an import "
                          f"path: pass it again ({key}=...), or name it by module:factory")
    module_name, _, attrs = path.partition(":")
    if "" not in sys.path and "." not in sys.path:  # the `reptile-dist` script's path lacks the current folder
        sys.path.insert(0, "")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(f"{key}={path}: no module named {exc.name!r} (run from the folder that holds it, or "
                              f"add that folder to PYTHONPATH)") from None
        raise PluginError(f"{key}={path}: importing {module_name} fails: {_one_line(exc)}") from None
    except Exception as exc:  # the user's module raised on import
        raise PluginError(f"{key}={path}: importing {module_name} fails: {_one_line(exc)}") from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            raise PluginError(f"{key}={path}: {module_name} has no attribute {attrs!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise PluginError(f"{key}={path} is a {type(obj).__name__}, not a callable")
    return obj


def name_of(factory: Callable) -> str:
    """How a run records a factory handed to it as an object: its import path when importing that
    path gives this very object back, else `object:<module>:<qualname>`."""
    module = getattr(factory, "__module__", None) or "?"
    qualname = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    path = f"{module}:{qualname}"
    if module != "__main__" and "<" not in qualname:
        try:
            if import_object(path, "factory") is factory:
                return path
        except PluginError:
            pass
    return OBJECT_PREFIX + path


def _ship_by_value(factory: Callable) -> None:
    """A user's module outside any installed package travels with the factory (Ray pickles it by
    value), so Ray workers on other machines need no copy of the file. Modules it imports in
    turn must be on the workers (cluster/README.md: runtime_env)."""
    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if module is None or file is None or module.__name__.split(".")[0] == "reptile_dist":
        return
    if any(part in file for part in ("site-packages", "dist-packages")):
        return
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def default_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "classification":
        return nn.functional.cross_entropy
    return nn.functional.mse_loss


@dataclass(frozen=True)
class Plugins:
    """The factories a run builds its family and network with, and its loss (None: the default
    for the family's kind). Picklable: Ray hands it to every worker."""

    family: Callable[..., TaskFamily] | None  # None: not needed (a trained model loaded without its data)
    model: Callable[..., nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def of(cls, cfg: Config, family: Callable | None = None, model: Callable | None = None,
           with_family: bool = True) -> "Plugins":
        """The config's plug-ins, imported (PluginError if one cannot be), or the factories given;
        without the family when `with_family` is False (loading a trained network needs none)."""
        return cls(
            family or (import_object(BUILTIN_FAMILIES.get(cfg.family, cfg.family), "family") if with_family else None),
            model or import_object(BUILTIN_MODELS.get(cfg.model, cfg.model), "model"),
            import_object(cfg.loss, "loss") if cfg.loss else None,
        )

    def ship(self) -> "Plugins":
        for factory in (self.family, self.model, self.loss):
            if factory is not None:
                _ship_by_value(factory)
        return self

    def loss_for(self, kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.loss or default_loss(kind)

    def build_family(self, cfg: Config) -> TaskFamily:
        family = _call(self.family, "family", cfg.family, cfg, cfg.family_args)
        kind = getattr(family, "kind", None)
        if kind not in KINDS:
            raise PluginError(f"family={cfg.family} returned a {type(family).__name__} whose `kind` is {kind!r}, "
                              f"not one of {', '.join(KINDS)}")
        for method in ("train_task", "eval_task"):
            if not callable(getattr(family, method, None)):
                raise PluginError(f"family={cfg.family} returned a {type(family).__name__} without a "
                                  f"{method}(rng{', split' if method == 'eval_task' else ''}) method")
        return family

    def build_model(self, cfg: Config, family: TaskFamily) -> nn.Module:
        args = dict(cfg.model_args)
        if _accepts(self.model, "family"):
            args["family"] = family
        model = _call(self.model, "model", cfg.model, cfg, args)
        if not isinstance(model, nn.Module):
            raise PluginError(f"model={cfg.model} returned a {type(model).__name__}, not a torch.nn.Module")
        params = list(model.parameters())
        if not params:
            raise PluginError(f"model={cfg.model} returned a network without parameters: nothing to meta-learn")
        odd = next((name for name, p in model.named_parameters() if p.dtype != torch.float32), None)
        if odd is not None:
            raise PluginError(f"model={cfg.model}: parameter {odd} is not float32 (theta travels as float32)")
        return model


def _accepts(factory: Callable, keyword: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _ours(obj: Any) -> bool:
    """A built-in (reptile-dist's own code): its failures are bugs, shown with their traceback."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return module.split(".")[0] == "reptile_dist"


def _shown(key: str, args: dict[str, Any]) -> str:
    mine = {k: v for k, v in args.items() if k != "family"}  # the family handed to a model factory is not an arg
    return f" (with {key}_args {mine})" if mine else ""


def _call(factory: Callable, key: str, name: str, cfg: Config, args: dict[str, Any]) -> Any:
    try:
        return factory(cfg, **args)
    except UserError:
        raise  # a built-in's own one-line error (a missing data table, too few classes)
    except TypeError as exc:
        if _ours(factory) and "argument" not in str(exc):  # a wrong family_args key is the user's
            raise
        raise PluginError(f"{key}={name}: the factory raised {_one_line(exc)}"
                          f"{_shown(key, args)}") from None
    except Exception as exc:
        if _ours(factory):
            raise

        raise PluginError(f"{key}={name}: the factory raised {_one_line(exc)}"
                          f"{_shown(key, args)}") from None


def check_task(task: Any, name: str, what: str) -> Task:
    if not isinstance(task, Task):
        raise PluginError(f"family={name}: {what} returned a {type(task).__name__}, not a reptile_dist Task")
    for field in ("support_x", "support_y", "query_x", "query_y"):
        if not isinstance(getattr(task, field), torch.Tensor):
            raise PluginError(f"family={name}: {what} returned a Task whose {field} is not a tensor")
    if len(task.support_x) != len(task.support_y) or len(task.support_x) == 0:
        raise PluginError(f"family={name}: {what} returned {len(task.support_x)} support inputs and "
                          f"{len(task.support_y)} targets")
    return task


def check_network(model: nn.Module, family: TaskFamily, cfg: Config,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device) -> None:
    """One forward pass and loss on a sample training task: shapes that do not fit, and buffers a
    training step would change (batch-norm running statistics), are refused in one line. Theta
    is the parameters: such a buffer would be neither adapted nor averaged, so every worker's copy
    would drift from the others' and from the checkpoint."""
    rng = np.random.default_rng([cfg.seed, CHECK_SEED])
    try:
        task = family.train_task(rng)
    except UserError:
        raise
    except Exception as exc:
        if _ours(family):
            raise
        raise PluginError(f"family={cfg.family}: train_task raised {_one_line(exc)}") from None
    task = check_task(task, cfg.family, "train_task")
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    # Dropout in a check must not shift the run's own draws, on the CPU or the GPU.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            with torch.no_grad():
                out = model(task.support_x.to(device))
                value = loss(out, task.support_y.to(device))
        except Exception as exc:  # a network that does not fit the family's tasks (built-in or not)
            raise PluginError(f"model={cfg.model} fails on a training task of family={cfg.family} (inputs "
                              f"{tuple(task.support_x.shape)}): {_one_line(exc)}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise PluginError(f"the loss ({cfg.loss or 'default'}) returned {type(value).__name__} "
                          f"{tuple(getattr(value, 'shape', ()))}, not a scalar tensor")
    changed = [name for name, b in model.named_buffers() if not torch.equal(before[name], b)]
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(before[name])
    if changed:
        owner = changed[0].rpartition(".")[0] or changed[0]
        module = model.get_submodule(owner) if owner != changed[0] else model
        raise PluginError(f"model={cfg.model}: module {owner} ({type(module).__name__}) changes its buffer "
                          f"{changed[0].rpartition('.')[2]} in training (batch-norm running statistics?); theta "
                          f"is the parameters only, so build it with track_running_stats=False (batch statistics, "
                          f"as the paper's networks)")


@dataclass(frozen=True)
class FamilyInfo:
    """What a trained model's file records of the family it was trained on, and the stand-in a
    model factory is handed (`family=`) when a trained model is loaded without its data: the
    kind, the input shape (image families) and how images were prepared (for `adapt`)."""

    kind: str
    input_shape: tuple[int, ...] | None = None
    preprocessing: dict | None = None

    @classmethod
    def from_state(cls, state: dict | None, cfg: Config) -> "FamilyInfo":
        if not state:  # files from before plug-ins: the built-in families
            return cls("regression" if cfg.family == "sine" else "classification")
        shape = state.get("input_shape")
        return cls(state["kind"], tuple(shape) if shape else None, state.get("preprocessing"))


def family_info(family: TaskFamily) -> dict[str, Any]:
    shape = getattr(family, "input_shape", None)
    return {"kind": family.kind, "input_shape": list(shape) if shape else None,
            "preprocessing": getattr(family, "preprocessing", None)}


def build_family(cfg: Config, plugins: Plugins | None = None) -> TaskFamily:
    """The task family a config names (or `plugins` give), with its data loaded."""
    return (plugins or Plugins.of(cfg)).build_family(cfg)


