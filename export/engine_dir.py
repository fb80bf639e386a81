"""The exporter's one reader and writer of an ENGINE_DIR's manifest.json (contract: docs/ENGINE_DIR.md).

* format constants: ``FORMAT``, ``FORMAT_VERSION`` (the manifest), ``ENGINE_FORMAT`` (an engine record),
  ``TRT_DIR`` (where engines, the timing cache and the locks live);
* graph roles (``ROLES``): how the generation loop uses each graph, written by `vv-export onnx` into
  ``manifest["graphs"][g]["role"]``; ``graph_roles`` reads them, falling back to ``DEFAULT_ROLES`` for
  manifests written before roles existed;
* ``read_manifest`` (checked, one-line ExportError), ``update_manifest`` (re-read, change and replace
  atomically under a file lock), ``atomic_write``, ``file_lock``, ``sha256_file``.

Imports neither torch nor the model code: `vv-export trt` and the plans use it on machines where only
TensorRT is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ExportError, one_line

FORMAT = "vibevoice-trt/engine-dir"
FORMAT_VERSION = 1
ENGINE_FORMAT = "vibevoice-trt/engine"
MANIFEST = "manifest.json"
TRT_DIR = "trt"

# How the generation loop uses a graph (manifest["graphs"][g]["role"]):
#   loop       called by the loop outside the per-frame path (prompt, prefill and decode steps)
#   per-frame  called once per generated audio frame at a fixed shape (replayed as CUDA graphs)
#   auxiliary  exported and validated, never called by the loop
ROLES = ("loop", "per-frame", "auxiliary")
LOOP_ROLES = ("loop", "per-frame")
# Roles of the graphs of manifests written before the field existed (any other graph: auxiliary).
DEFAULT_ROLES = {"text_embed": "loop", "lm": "loop", "acoustic_encoder": "loop",
                 "diffusion_sampler": "per-frame", "acoustic_decoder": "per-frame", "semantic_encoder": "per-frame",
                 "acoustic_connector": "auxiliary", "semantic_connector": "auxiliary", "diffusion_step": "auxiliary"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def graph_roles(manifest: dict) -> dict:
    """graph -> role, in the manifest's graph order (recorded role, else DEFAULT_ROLES, else auxiliary)."""
    roles = {}
    for graph, entry in manifest["graphs"].items():
        role = entry.get("role") if isinstance(entry, dict) else None
        if role is None:
            role = DEFAULT_ROLES.get(graph, "auxiliary")
        if role not in ROLES:
            raise ExportError(f"manifest: graph {graph!r} has role {role!r} (expected one of {', '.join(ROLES)})")
        roles[graph] = role
    return roles


def graphs_with_role(manifest: dict, *roles: str) -> list[str]:
    """The manifest's graphs whose role is one of `roles`, in manifest order."""
    return [g for g, r in graph_roles(manifest).items() if r in roles]


def read_manifest(engine_dir: Path) -> dict:
    """ENGINE_DIR/manifest.json, checked (format, version, graphs, roles); ExportError in one line."""
    path = Path(engine_dir) / MANIFEST
    if not Path(engine_dir).is_dir():
        raise ExportError(f"--engine-dir {engine_dir}: not a directory")
    if not path.is_file():
        raise ExportError(f"{path}: missing (run `vv-export onnx --out {engine_dir}` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({one_line(exc)})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a vibevoice-trt ENGINE_DIR manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    if not isinstance(manifest.get("graphs"), dict) or not all(isinstance(e, dict) for e in manifest["graphs"].values()):
        raise ExportError(f"{path}: no graphs")
    try:
        graph_roles(manifest)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None
    return manifest


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` (named .<name>.<pid>.*.tmp), fsync, rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_lock(path: Path, timeout: float = 600.0):
    """An inter-process lock (filelock.FileLock) on `path`, its directory created."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


def update_manifest(engine_dir: Path, update: Callable[[dict], None]) -> dict:
    """Re-read manifest.json under a lock, apply `update(manifest)`, replace it atomically."""
    engine_dir = Path(engine_dir)
    with file_lock(engine_dir / TRT_DIR / ".manifest.lock"):
        manifest = read_manifest(engine_dir)
        update(manifest)
        atomic_write(engine_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
