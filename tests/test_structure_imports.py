"""Module structure: what each entry point imports, and no import circle in vv_runtime.

* `vv-export trt` (cli, trt_build, plans, engine_dir, accuracy) never imports torch or transformers, so it
  runs where only TensorRT is installed; checked in fresh interpreters, and on the real command with
  ``python -X importtime`` (which lists every module the process imported).
* vv_runtime has no module-level import circle: the graph of its top-level ``from .x import`` statements
  (parsed with ast) is acyclic, and every module imports first in a fresh interpreter.
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
            "vv_export.accuracy; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,))
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


def _module_level_imports(path: Path, package: str = "vv_runtime") -> set[str]:
    """Sibling modules imported at module level (not inside functions): `from .x import`, `from . import x`,
    `import vv_runtime.x`, `from vv_runtime.x import`; under `if TYPE_CHECKING:` excluded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    if node.module:
                        found.add(node.module.split(".")[0])
                    else:
                        found.update(a.name for a in node.names)
                elif node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")
                    if len(parts) > 1:
                        found.add(parts[1])
                    else:
                        found.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package and len(parts) > 1:
                        found.add(parts[1])
            elif isinstance(node, ast.If):
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


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
