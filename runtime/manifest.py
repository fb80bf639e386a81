"""The runtime's side of an ENGINE_DIR: load its manifest.json, and what the runtime reads of the contract.

The contract itself (format constants, model families, graph roles, the manifest's checks) is
``vv_engine_dir``, shared with the exporter; its names are re-exported here for the runtime's modules.
This module adds ``load_manifest`` (the contract's reader, its errors as one-line RuntimeInputError) and
two readers of graph entries, ``io_names`` and ``state_size``.
"""

from __future__ import annotations

from pathlib import Path

import vv_engine_dir
from vv_engine_dir import (CONTROL_TOKENS, PROMPT, DEFAULT_ROLES, DEFAULT_RUNTIME, DERIVED_DIMS, FORMAT, FORMAT_VERSION,
                           GRAPH_RUNTIMES, LOOP_ROLES, OPENVINO_RUNTIME, REQUIRED_GRAPHS, ROLES, RUNTIME_INSTALL,
                           STREAMING_FAMILY, EngineDirError, graph_roles,
                           graph_runtime, graphs_with_role, required_graphs)

from .errors import RuntimeInputError

__all__ = ["CONTROL_TOKENS", "PROMPT", "DEFAULT_ROLES", "DEFAULT_RUNTIME", "DERIVED_DIMS", "FORMAT", "FORMAT_VERSION",
           "GRAPH_RUNTIMES", "LOOP_ROLES", "OPENVINO_RUNTIME", "REQUIRED_GRAPHS", "ROLES", "RUNTIME_INSTALL", "graph_roles", "graph_runtime", "graphs_with_role",
           "io_names", "load_manifest", "required_graphs", "state_size"]


def load_manifest(engine_dir: str | Path) -> dict:
    """ENGINE_DIR/manifest.json checked against the contract (vv_engine_dir.read_manifest: format, version,
    model family, graphs and their files, token table, tokenizer, voice presets); RuntimeInputError, one line."""
    try:
        return vv_engine_dir.read_manifest(engine_dir)
    except EngineDirError as exc:
        raise RuntimeInputError(str(exc)) from exc


def io_names(manifest: dict, graph: str) -> tuple[list[str], list[str]]:
    g = manifest["graphs"][graph]
    return [i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]]


def state_size(manifest: dict, graph: str) -> int:
    """Length of the flattened streaming state of acoustic_decoder / semantic_encoder."""
    g = manifest["graphs"][graph]
    for spec in g["inputs"]:
        if spec["name"] == "state" and isinstance(spec["shape"][-1], int):
            return int(spec["shape"][-1])
    layout = g.get("state_layout")
    if layout is None:
        raise RuntimeInputError(f"manifest: graph {graph!r} gives no state size")
    return int(sum(e["channels"] * e["length"] for e in layout))
