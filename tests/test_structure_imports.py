"""Module structure: what each entry point imports, and no import circles.

* `vv-export trt` (cli, trt_build, plans, engine_dir, accuracy, graph_rules, qdq) never imports torch or
  transformers, so it runs where only TensorRT is installed; checked in fresh interpreters, and on the real
  command with ``python -X importtime`` (which lists every module the process imported).
* vv_runtime has no module-level import circle: the graph of its top-level ``from .x import`` statements
  (parsed with ast) is acyclic, and every module imports first in a fresh interpreter.
* vv_export (export/) and the benchmark scripts (benchmarks/) have no import circle either, counting the
  imports inside functions too (a circle there fails only when the function runs): their import graphs,
  parsed with ast, are trees; vv_export.graph_rules, the rules the export modules share, imports no other
  module of vv_export but its errors.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def test_trt_command_modules_do_not_import_torch():
    code = ("import sys, vv_export.cli, vv_export.trt_build, vv_export.plans, vv_export.engine_dir, "
            "vv_export.accuracy, vv_export.graph_rules, vv_export.qdq; "
            "print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # the check itself can fail: the exporter's model code does import torch
    code = "import sys, vv_export.specs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def _imported_modules(stderr: str) -> set[str]:
    """Top-level module names from `-X importtime` lines ('import time: self | cumulative | name')."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def _vv_export(args, **kw):
    exe = Path(sys.executable).parent / "vv-export"
    if not exe.exists():
        pytest.skip("vv-export is not installed next to this interpreter")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-X", "importtime", str(exe), *args], capture_output=True, text=True,
                          env=env, **kw)


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_trt_command_fails_in_one_line_without_torch(tiny_engine_dir, tmp_path):
    engine_dir = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, engine_dir)
    for args, start in ((["trt", "--engine-dir", str(engine_dir)], "error: TensorRT is not installed"),
                        (["trt", "--engine-dir", str(tmp_path / "nowhere")], "error: --engine-dir"),
                        (["trt", "--engine-dir", str(engine_dir), "--plan", "no-such-plan"], "error: plan")):
        proc = _vv_export(args)
        imported = _imported_modules(proc.stderr)
        assert "vv_export" in imported and "click" in imported  # importtime did list the imports
        assert not imported & set(HEAVY), f"{args}: imported {sorted(imported & set(HEAVY))}"
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
        assert proc.returncode == 1, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(start), lines
    assert not (engine_dir / "trt").exists()  # nothing written


# --- vv_runtime: no import circle ----------------------------------------------------------------

def _runtime_modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted((REPO / "runtime").glob("*.py")) if p.stem != "__init__"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.AST, nested: bool):
    """The import statements of a parsed module, those under `if TYPE_CHECKING:` excluded; with `nested`
    those inside functions too, else only what runs when the module is imported."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_statements(ast.Module(body=[stmt], type_ignores=[]), nested)
        elif nested or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _import_statements(child, nested)


def _module_level_imports(path: Path, package: str | None = "vv_runtime", nested: bool = False) -> set[str]:
    """Names of the modules `path` imports from its own directory: `from .x import`, `from . import x`,
    `import package.x`, `from package.x import`, `from package import x`; with `package` None (scripts that
    import each other by plain name) `import x` and `from x import`. Module level only unless `nested`.
    The caller keeps the names that are modules of the directory."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _import_statements(tree, nested):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.level == 0 and node.module:
                parts = node.module.split(".")
                if package is None:
                    found.add(parts[0])
                elif parts[0] == package:
                    if len(parts) > 1:
                        found.add(parts[1])
                    else:
                        found.update(a.name for a in node.names)
        else:
            for alias in node.names:
                parts = alias.name.split(".")
                if package is None:
                    found.add(parts[0])
                elif parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
    return found


def _import_graph(directory: Path, package: str | None, nested: bool) -> dict[str, set[str]]:
    """module -> the modules of the same directory it imports (its *.py files, __init__ aside)."""
    modules = {p.stem: p for p in sorted(directory.glob("*.py")) if p.stem != "__init__"}
    return {name: _module_level_imports(path, package, nested) & (set(modules) - {name})
            for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_detects_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_runtime_has_no_module_level_import_circle():
    modules = _runtime_modules()
    graph = {name: _module_level_imports(path) & set(modules) for name, path in modules.items()}
    assert "backend" in graph and "trt_backend" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    # the TensorRT backend depends on the shared base only, never on the ORT backend module
    assert "backend" not in graph["trt_backend"]


def test_runtime_modules_import_first_in_a_fresh_interpreter():
    """Each module imported first (its dependencies then load in whatever order it gives them)."""
    for name in _runtime_modules():
        code = f"import vv_runtime.{name}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, f"{code}: {proc.stderr.strip().splitlines()[-1:]}"


def test_backend_names_keep_their_old_import_path():
    from vv_runtime import backend, backend_base

    assert backend.Backend is backend_base.Backend
    assert backend.HostKVCache is backend_base.HostKVCache
    assert backend.bucket_slots is backend_base.bucket_slots


# --- vv_export and benchmarks: no import circle, function-level imports included ---------------------

def _assert_no_circle(graph: dict[str, set[str]]) -> None:
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_import_graph_sees_a_circle_through_function_level_imports(tmp_path):
    """The checker on constructed packages: a circle closed by an import inside a function is found (and is
    invisible to a module-level-only parse), in package form and in the benchmarks' plain-name form."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def rule():\n    from .high import use\n    return use\n")
    (pkg / "high.py").write_text("from . import low\n\n\ndef use():\n    return low.rule\n")
    (pkg / "leaf.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import use\n")
    graph = _import_graph(pkg, "pkg", nested=True)
    assert graph == {"high": {"low"}, "leaf": set(), "low": {"high"}}
    assert _find_cycle(graph) in (["high", "low", "high"], ["low", "high", "low"])
    assert _find_cycle(_import_graph(pkg, "pkg", nested=False)) is None
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "common.py").write_text("import json\n\n\ndef helper():\n    import report\n")
    (scripts / "report.py").write_text("import sys\nfrom common import helper\n")
    graph = _import_graph(scripts, None, nested=True)
    assert graph == {"common": {"report"}, "report": {"common"}}
    assert _find_cycle(graph) is not None


def test_export_modules_form_a_tree():
    graph = _import_graph(REPO / "export", "vv_export", nested=True)
    # the graph is the real one: module-level and function-level edges are both seen
    assert "graph_rules" in graph["trt_build"] and "quantize" in graph["onnx_export"]
    _assert_no_circle(graph)
    # the shared ONNX-graph rules sit below every other export module
    assert graph["graph_rules"] <= {"errors"}, graph["graph_rules"]
    for name in ("conv_matmul", "precision", "qdq", "quantize", "trt_build", "plans", "accuracy"):
        assert "graph_rules" in graph[name], name


def test_benchmarks_have_no_import_circle():
    graph = _import_graph(REPO / "benchmarks", None, nested=True)
    assert "common" in graph["bench_runtime"] and "bench_runtime" in graph["bench_quant"]
    assert "generation_compare" in graph["precision_report"]
    _assert_no_circle(graph)

# --- vv_engine_dir: the contract below both sides -------------------------------------------------

@pytest.mark.parametrize("module, unwanted", [
    ("vv_engine_dir", HEAVY + ("vv_export", "vv_runtime")),
    ("vv_runtime.manifest", HEAVY + ("vv_export",)),
    ("vv_export.engine_dir", HEAVY + ("vv_runtime",)),
])
def test_engine_dir_contract_imports_neither_side_nor_torch(module, unwanted):
    """vv_engine_dir, which the exporter and the runtime (on its ONNX Runtime path) import, imports neither of
    them, nor torch or transformers; nor does each side's module that reads the contract import the other
    side. Checked in a fresh interpreter."""
    code = f"import sys, {module}; print(sorted(m for m in {unwanted!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


@pytest.mark.parametrize("directory, package", [("runtime", "vv_runtime"), ("runtime/serve", "vv_runtime.serve")])
def test_runtime_has_no_import_circle_function_level_imports_included(directory, package):
    graph = _import_graph(REPO / directory, package.split(".")[-1] if "." in package else package, nested=True)
    if package == "vv_runtime":
        # the loop's layers: policy below the model steps, the KV-row manager below the policy
        assert "scheduler" in graph["vibevoice_steps"] and "kv_rows" in graph["scheduler"]
        assert not graph["kv_rows"] & {"scheduler", "vibevoice_steps", "realtime_steps", "pipeline"}
    _assert_no_circle(graph)
