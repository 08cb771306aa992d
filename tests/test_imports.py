"""The package's import graph: no cycles, and every module imports only from its own layer or
the layers below it (STYLE.md: flow in one direction). Imports inside functions count as much
as those at the top of a module: a lazy import only hides a cycle, it does not break it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "reptile_dist"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest layer first. Every module of the package is listed, with a reason where its place is
# not obvious from its name; a new module fails test_every_module_has_a_layer until it is placed.
LAYERS: list[tuple[str, dict[str, str]]] = [
    ("config/models", {
        "reptile_dist.config": "",
        "reptile_dist.errors": "the base class of every user-facing error, for all layers",
        "reptile_dist.models": "",
        "reptile_dist.files": "atomic writes, for the data layer and the run directory alike",
    }),
    ("tasks/data", {
        "reptile_dist.data": "",
        "reptile_dist.data.classes": "",
        "reptile_dist.data.images": "",
        "reptile_dist.data.omniglot": "",
        "reptile_dist.tasks": "",
        "reptile_dist.tasks.base": "",
        "reptile_dist.tasks.images": "",
        "reptile_dist.tasks.sine": "",
        "reptile_dist.tasks.synthetic": "",
        "reptile_dist.plugins": "imports the built-in families and networks by path, as a user's",
    }),
    ("core", {
        "reptile_dist.reptile": "",
        "reptile_dist.evaluation": "",
    }),
    ("training", {
        "reptile_dist.training": "",
        "reptile_dist.local": "",
        "reptile_dist.rundir": "the run directory that training and every engine write",
        "reptile_dist.loggers": "TensorBoard, MLflow, W&B: where the run directory sends its rows",
        "reptile_dist.runview": "status and plots of runs, read from their run directories",
        "reptile_dist.pretrained": "plain-PyTorch use of a trained model; loads training's final.pt format",
    }),
    ("engine", {
        "reptile_dist.engine": "",
        "reptile_dist.engine.actors": "",
        "reptile_dist.engine.adapt_worker": "",
        "reptile_dist.engine.aggregation": "",
        "reptile_dist.engine.allreduce": "",
        "reptile_dist.engine.cluster": "",
        "reptile_dist.engine.driver": "",
        "reptile_dist.engine.metrics": "the engine's figures through Ray's metrics API",
        "reptile_dist.engine.parameter_server": "",
        "reptile_dist.engine.sharded_eval": "held-out evaluations in shards on Ray actors, one retry loop (a run's driver, `eval --workers N`)",
        "reptile_dist.engine.wire": "pure, but only the engine's transports (and their benchmark) speak it",
    }),
    ("bench/sweep", {
        "reptile_dist.bench": "",
        "reptile_dist.bench.allreduce": "",
        "reptile_dist.bench.baselines": "",
        "reptile_dist.bench.hooks": "the bench's loop hooks: the engine is handed them, never imports them",
        "reptile_dist.bench.model": "",
        "reptile_dist.bench.plots": "",
        "reptile_dist.bench.ps_capacity": "",
        "reptile_dist.bench.report": "",
        "reptile_dist.bench.runner": "",
        "reptile_dist.bench.suite": "",
        "reptile_dist.sweep": "",
        "reptile_dist.sweep.placement": "",
        "reptile_dist.sweep.runner": "",
        "reptile_dist.sweep.spec": "",
        "reptile_dist.sweep.trainable": "",
    }),
    ("api", {
        "reptile_dist.api": "",
        "reptile_dist": "the public API (`import reptile_dist as rd`), loaded from reptile_dist.api on first use",
    }),
    ("cli", {
        "reptile_dist.cli": "",
    }),
]
LAYER_OF = {module: (rank, name) for rank, (name, modules) in enumerate(LAYERS) for module in modules}


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file. `from pkg import name`
    names the submodule pkg.name when there is one, else pkg itself. Importing a.b.c runs a.b's
    __init__ too, so a.b counts, unless `module` lives in it (then it is already loaded)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    own = set(_packages_of(module)) | {module}
    return {name for target in found if target in modules
            for name in (target, *_packages_of(target)) if name not in own}


def _packages_of(module: str) -> list[str]:
    """a.b.c -> [a.b]: the packages whose __init__.py importing a.b.c runs. The root package's
    runs too, but it imports nothing when it runs (test_the_root_package_imports_nothing_on_import):
    the public API it offers is loaded on first use."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions_and_submodules_named_in_from_imports():
    graph = import_graph()
    assert "reptile_dist.data.omniglot" in graph["reptile_dist.tasks.images"]  # inside omniglot_family
    assert "reptile_dist.sweep.runner" in graph["reptile_dist.cli"]  # inside a command
    assert "reptile_dist.sweep" in graph["reptile_dist.cli"]  # from reptile_dist.sweep import load_sweep
    assert "reptile_dist.tasks" in graph["reptile_dist.reptile"]  # tasks.base runs tasks/__init__.py first


def test_the_root_package_imports_nothing_on_import():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in top_level)
    code = f"import sys, {PACKAGE}.config; print(sorted(m for m in sys.modules if m.startswith('{PACKAGE}')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['reptile_dist', 'reptile_dist.config', 'reptile_dist.errors']"


def test_find_cycle_reports_the_modules_of_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    unplaced = sorted(set(package_modules()) - set(LAYER_OF))
    assert not unplaced, f"modules missing from LAYERS in {__file__}: {', '.join(unplaced)}"
    gone = sorted(set(LAYER_OF) - set(package_modules()))
    assert not gone, f"LAYERS lists modules that no longer exist: {', '.join(gone)}"


def test_modules_import_only_from_their_own_layer_or_below():
    upward = []
    for module, targets in sorted(import_graph().items()):
        if module not in LAYER_OF:
            continue  # reported by test_every_module_has_a_layer
        rank, layer = LAYER_OF[module]
        for target in sorted(targets):
            if target in LAYER_OF and LAYER_OF[target][0] > rank:
                upward.append(f"{module} ({layer}) imports {target} ({LAYER_OF[target][1]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_omniglot_data_module_imports_without_torch():
    # Its decode worker processes re-import it; torch would cost each of them seconds.
    code = f"import sys, {PACKAGE}.data.omniglot; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
