"""The module map of docs/architecture.md, enforced: no import circles, no import from a lower
layer to a higher one, the library never imports ``cli``, and inference never imports the
trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "xmc_toolkit"

# low -> high: a module may import (at module level or inside a function) only modules of its
# own or a lower layer. Each row is one layer (docs/architecture.md, "Module map").
LAYERS: list[set[str]] = [
    {"errors"},
    {"_fileio", "config", "device", "native"},
    {"data"},  # the data package (numpy / scipy only)
    {"metrics", "codebook", "loss_log", "progress", "label_init", "sparse_optim"},
    {"sampling", "losses", "batching", "checkpoint", "optim"},
    {"encoder", "output_layer", "distributed", "featurizer", "export"},
    {"train_config"},
    {"network"},
    {"objective", "model_dir", "ann"},
    {"evaluate", "inputs", "model_info", "placement"},
    {"train"},
    {"dist_train"},
    {"grow"},
    {"model"},
    {"__init__"},
]
# the known function-level imports that reach up a layer, each with its reason
ALLOWED_UP = {
    ("train_config", "network"),  # memory_problems: the size of the network a config describes
}


def _layer(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if mod in layer:
            return i
    raise AssertionError(f"xmc_toolkit.{mod} is in no layer of tests/test_layering.py: add it "
                         "there and to the module map of docs/architecture.md")


def _top(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported top-level name, line, module_level, under __main__) of every import."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, int, bool, bool]] = []
    pkg_parts = path.relative_to(ROOT).with_suffix("").parts[:-1]

    def visit(node: ast.AST, top: bool, main: bool) -> None:
        for child in ast.iter_child_nodes(node):
            is_main = main or (isinstance(child, ast.If) and "__main__" in ast.unparse(child.test))
            type_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            if type_only:
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((a.name, child.lineno, top, is_main))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = list(pkg_parts[: len(pkg_parts) - child.level + 1])
                    name = ".".join(base + ([child.module] if child.module else []))
                    if not child.module:  # from . import x
                        for a in child.names:
                            out.append((f"{name}.{a.name}", child.lineno, top, is_main))
                        continue
                else:
                    name = child.module or ""
                out.append((name, child.lineno, top, is_main))
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            visit(child, inner_top, is_main)

    visit(tree, True, False)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in _modules():
        _layer(_top(path))


def test_the_library_never_imports_cli() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in _modules()
           for name, line, _top_level, main in _imports(p)
           if name.split(".")[0] == "cli" and not main]
    assert not bad, f"the library imports cli at {bad} (only a __main__ guard may)"


def test_no_import_reaches_a_higher_layer() -> None:
    bad = []
    for path in _modules():
        me = _top(path)
        for name, line, _top_level, main in _imports(path):
            parts = name.split(".")
            if parts[0] != "xmc_toolkit" or len(parts) < 2 or main:
                continue
            other = parts[1]
            if other == me or (me, other) in ALLOWED_UP:
                continue
            if _layer(other) > _layer(me):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports xmc_toolkit.{other}")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_module_level_import_circle() -> None:
    graph: dict[str, set[str]] = {}
    for path in _modules():
        me = _top(path)
        for name, _line, top_level, main in _imports(path):
            parts = name.split(".")
            if top_level and not main and parts[0] == "xmc_toolkit" and len(parts) > 1 \
                    and parts[1] != me:
                graph.setdefault(me, set()).add(parts[1])
    seen: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in graph.get(node, ()):
            if seen.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
                            if nxt in stack else f"import circle through {nxt}")
            if nxt not in seen:
                dfs(nxt, stack + [nxt])
        seen[node] = 2

    for node in list(graph):
        if node not in seen:
            dfs(node, [node])


def test_inference_never_imports_the_trainer() -> None:
    mods = ["xmc_toolkit.evaluate", "xmc_toolkit.model_dir", "xmc_toolkit.model_info",
            "xmc_toolkit.model", "xmc_toolkit.export", "xmc_toolkit.inputs"]
    code = ("import importlib, sys\n"
            f"for mod in {mods!r}:\n"
            "    importlib.import_module(mod)\n"
            "bad = [m for m in ('xmc_toolkit.train', 'xmc_toolkit.dist_train', 'cli') "
            "if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"importing {mods} imported {r.stdout.strip()} {r.stderr[-500:]}"


def test_loading_and_predicting_never_import_the_trainer(tmp_path: Path) -> None:
    """A model written here is loaded and used for predictions in a fresh process that never
    imports xmc_toolkit.train."""
    import numpy as np
    import scipy.sparse as sp

    from xmc_toolkit.model import XMCModel

    rng = np.random.default_rng(0)
    X = sp.random(60, 20, density=0.3, format="csr", random_state=1, dtype=np.float32)
    Y = (rng.random((60, 5)) < 0.3).astype(np.float32)
    Y[np.arange(60), rng.integers(0, 5, 60)] = 1
    m = XMCModel(epochs=1, dim=8, hidden=(8,), device="cpu", ensemble=1,
                 batch_size=32).fit(X, sp.csr_matrix(Y))
    m.save(tmp_path / "m")
    sp.save_npz(tmp_path / "x.npz", X)
    code = ("import sys, scipy.sparse as sp; from xmc_toolkit.model import XMCModel; "
            f"m = XMCModel.load({str(tmp_path / 'm')!r}, device='cpu'); "
            f"m.predict_topk(sp.load_npz({str(tmp_path / 'x.npz')!r}), k=2); "
            "from xmc_toolkit.evaluate import evaluate_model; "
            "bad = [n for n in ('xmc_toolkit.train', 'xmc_toolkit.dist_train', 'cli') "
            "if n in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT),
                                      "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-800:]
