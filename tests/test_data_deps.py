"""Dependencies: a required one that fails to import must fail its tests, not skip them; only the
optional extras (transformers: the `hf` extra) may skip. And datasets stays at >= 3, the versions
that run no loading scripts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Distribution names whose import name differs.
IMPORT_NAMES = {"hydra-core": "hydra"}


def required_modules() -> set[str]:
    """Import names of pyproject's [project] dependencies (not the optional extras)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block, "pyproject.toml has no [project] dependencies list"
    names = [re.split(r"[<>=!~; \[]", req, maxsplit=1)[0] for req in re.findall(r'"([^"]+)"', block.group(1))]
    return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names}


def skips_on_import(tree: ast.AST) -> set[str]:
    """Modules that this test file skips on when they fail to import: pytest.importorskip("m"),
    find_spec("m") (for a skipif), or `try: import m` with a handler of ImportError that skips."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if name in ("importorskip", "find_spec") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value).split(".")[0])
        if isinstance(node, ast.Try):
            catches_import = any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                      for n in ast.walk(h.type)) for h in node.handlers)
            skips = any(isinstance(n, ast.Attribute) and n.attr in ("skip", "skipif")
                        for h in node.handlers for n in ast.walk(h))
            if catches_import and skips:
                for n in node.body:
                    for imp in ast.walk(n):
                        if isinstance(imp, ast.Import):
                            found |= {a.name.split(".")[0] for a in imp.names}
                        elif isinstance(imp, ast.ImportFrom) and imp.module:
                            found.add(imp.module.split(".")[0])
    return found


def test_the_scan_finds_each_way_of_skipping():
    source = (
        "import pytest\n"
        "w = pytest.importorskip('wandb')\n"
        "try:\n    import matplotlib.pyplot\nexcept ImportError:\n    pytest.skip('no matplotlib')\n"
        "HAS = importlib.util.find_spec('safetensors') is not None\n"
        "t = pytest.importorskip('transformers')\n"
    )
    assert skips_on_import(ast.parse(source)) == {"wandb", "matplotlib", "safetensors", "transformers"}
    assert {"torch", "numpy", "datasets", "tokenizers", "wandb", "hydra", "matplotlib", "safetensors"} <= \
        required_modules()
    assert "transformers" not in required_modules()


# Known offenders, to be fixed in their own files; strict, so each mark must go with its fix.
PENDING: dict[str, str] = {}  # test files allowed to fail the check for now, with the reason


@pytest.mark.parametrize("test_file", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=PENDING[name])) if name in PENDING else name
    for name in sorted(p.name for p in (REPO / "tests").glob("*.py"))
])
def test_no_test_skips_when_a_required_dependency_is_missing(test_file):
    tree = ast.parse((REPO / "tests" / test_file).read_text(encoding="utf-8"))
    skipped = sorted(skips_on_import(tree) & required_modules())
    assert not skipped, (f"tests/{test_file} skips when {', '.join(skipped)} cannot be imported; a required "
                         "dependency must be imported normally, so a broken install fails instead of skipping")


def test_datasets_requires_a_version_without_loading_scripts():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'"datasets>=(\d+)', text) and int(re.search(r'"datasets>=(\d+)', text).group(1)) >= 3


def test_the_torch_floor_is_what_the_code_needs():
    """torch.optim.Muon (optim=muon, used by the CPU recipes) first shipped in torch 2.9: the floor in
    pyproject.toml and the Makefile's CUDA default both say so."""
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (2, 9)
    assert f'"torch>={floor.group(1)}.{floor.group(2)}"' in (REPO / "Makefile").read_text(encoding="utf-8")
    recipes = [p.name for p in (REPO / "configs" / "experiment").glob("*.yaml")
               if re.search(r"^\s*-?\s*(override )?/?optim: muon", p.read_text(), re.M)]
    assert recipes, "no recipe uses Muon: the floor could be lower"
