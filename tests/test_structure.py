"""The layout DESIGN.md promises, checked on the source: every module's imports (function-local ones
too) are read with the AST, and the test fails on an import cycle or an edge that runs the wrong way.

    entry points (train.py, sample.py, their glue cli/, scripts/)  ->  causality/, engine/  ->  model/, data/

- model/ imports torch, the standard library and itself, and reads or writes no file;
- data/ imports neither model/ nor anything above it; model/ and data/ never import each other;
- nothing below the entry points imports Hydra (hydra, omegaconf);
- scripts import the packages, never each other; no module imports an entry point.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data", "engine", "causality", "cli")
ENTRY_POINTS = ("train", "sample")  # and the package cli/, their shared glue
STDLIB = set(sys.stdlib_module_names)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the packages, the entry points and the scripts."""
    modules = {name: ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = f
    for f in sorted((ROOT / "scripts").glob("*.py")):
        modules[f"scripts.{f.stem}"] = f
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Everything `name` imports, anywhere in the file: project modules by dotted name, others by
    their top-level name. `from pkg import mod` counts as importing pkg.mod when that is a module."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    resolved = set()
    for target in found:
        if target in modules:
            resolved.add(target)
            continue
        # `import model.gpt` style names: the longest project module that prefixes it, else the top level
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        resolved.add(".".join(parts) if parts else target.split(".")[0])
    resolved.discard(name)
    return resolved


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> str:
    top = module.split(".")[0]
    return "entry" if top in (*ENTRY_POINTS, "scripts", "cli") else top


def test_the_reader_sees_local_and_relative_imports(graph):
    # Guards the guard: a checker that read nothing would pass everything below.
    assert "model.attention" in graph["model.block"]  # `from .attention import ...`
    assert "torch" in graph["model.gpt"]
    assert "engine.checkpoint" in graph["train"] or "engine.formats" in graph["train"]
    assert "hydra" in graph["cli"]  # register_configs imports it inside the function


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_run_downward_only(graph):
    allowed = {  # which project layers each layer may import
        "model": {"model"},
        "data": {"data"},
        "engine": {"engine", "model", "data"},
        "causality": {"causality", "engine", "model", "data"},
        "entry": {"entry", "causality", "engine", "model", "data"},
    }
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if target not in graph:
                continue
            if layer(target) not in allowed[layer(module)]:
                bad.append(f"{module} -> {target}")
            elif target.split(".")[0] in ENTRY_POINTS:  # train.py and sample.py are imported by no module
                bad.append(f"{module} -> {target}")
            elif module.startswith("scripts.") and target.startswith("scripts."):
                bad.append(f"{module} -> {target} (scripts never import each other)")
    assert not bad, "imports that run the wrong way: " + ", ".join(sorted(bad))


def test_model_imports_only_torch_the_standard_library_and_itself(graph):
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if layer(m) == "model"
                 for t in ts if not (t in graph or t.split(".")[0] in STDLIB or t.split(".")[0] == "torch"))
    assert not bad, bad


# `python -m data.prepare` is a command-line entry point that lives beside its library: Hydra is
# imported inside its main() only, which the library functions never call.
HYDRA_ENTRY_POINTS = {"data.prepare"}


def test_nothing_below_the_entry_points_imports_hydra(graph):
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if layer(m) != "entry" and m not in HYDRA_ENTRY_POINTS
                 for t in ts if t.split(".")[0] in ("hydra", "omegaconf"))
    assert not bad, bad


def test_model_reads_and_writes_no_file():
    io_calls = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "save", "load", "memmap",
                "mkdir", "unlink", "save_file", "load_file"}
    bad = []
    for f in sorted((ROOT / "model").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if called in io_calls:
                    bad.append(f"{f.name}:{node.lineno} {called}()")
    assert not bad, "file I/O in model/: " + ", ".join(bad)


def test_top_level_is_the_products_own_list():
    expected = {"configs", "model", "data", "engine", "causality", "scripts", "tests", "train.py", "sample.py",
                "cli"}
    tracked = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")
               and (p.is_dir() or p.suffix == ".py")} - {"outputs", "multirun", "wandb", "build"}
    tracked = {n for n in tracked if not n.endswith(".egg-info") and n != "__pycache__"}
    assert tracked == expected, f"unexpected top-level code: {sorted(tracked - expected)}; missing {sorted(expected - tracked)}"
