"""The exporter's side of an ENGINE_DIR: the writer, and its access to the contract (docs/ENGINE_DIR.md).

The contract itself (format constants, model families, graph roles, the manifest's checks) is
``vv_engine_dir``, shared with the runtime; its names are re-exported here for the exporter's modules.
This module adds what only a writer needs:

* ``read_manifest`` (the contract's reader, its errors as one-line ExportError), ``update_manifest`` (re-read,
  change and replace atomically under a file lock), ``atomic_write``, ``file_lock``, ``sha256_file``.

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

import vv_engine_dir
from vv_engine_dir import (CONTROL_TOKENS, PROMPT, DEFAULT_ROLES, DEFAULT_RUNTIME, DERIVED_DIMS, ENGINE_FORMAT, FORMAT,
                           FORMAT_VERSION, MANIFEST, OPENVINO_RUNTIME, ROLES, RUNTIME_INSTALL, STREAMING_FAMILY, TRT_DIR,
                           EngineDirError, graph_roles)

from .errors import ExportError

__all__ = ["CONTROL_TOKENS", "PROMPT", "DEFAULT_ROLES", "DEFAULT_RUNTIME", "DERIVED_DIMS", "ENGINE_FORMAT", "FORMAT",
           "FORMAT_VERSION", "MANIFEST", "OPENVINO_RUNTIME", "ROLES", "RUNTIME_INSTALL", "TRT_DIR", "atomic_write", "file_lock", "graph_roles", "read_manifest", "sha256_file",
           "update_manifest"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(engine_dir: Path) -> dict:
    """ENGINE_DIR/manifest.json checked against the contract (vv_engine_dir.read_manifest); ExportError, one line."""
    try:
        return vv_engine_dir.read_manifest(engine_dir)
    except EngineDirError as exc:
        raise ExportError(str(exc)) from exc


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
