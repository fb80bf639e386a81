"""Load and validate ENGINE_DIR/manifest.json (the contract in docs/ENGINE_DIR.md)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RuntimeInputError, one_line

FORMAT = "vibevoice-trt/engine-dir"
FORMAT_VERSION = 1

# Graph roles (manifest["graphs"][g]["role"], docs/ENGINE_DIR.md): "loop" graphs are called by the
# generation loop outside the per-frame path, "per-frame" graphs once per audio frame (CUDA-graph
# replayed by TensorRT), "auxiliary" graphs are exported and validated but never called by the loop.
ROLES = ("loop", "per-frame", "auxiliary")
LOOP_ROLES = ("loop", "per-frame")
# The graphs the generation loop calls by name, with their roles: every manifest must list them. They are
# also the roles of a manifest written before roles existed (any other graph of such a manifest: auxiliary).
DEFAULT_ROLES = {"text_embed": "loop", "lm": "loop", "acoustic_encoder": "loop",
                 "acoustic_decoder": "per-frame", "semantic_encoder": "per-frame", "diffusion_sampler": "per-frame"}
REQUIRED_GRAPHS = tuple(DEFAULT_ROLES)
CONTROL_TOKENS = ("speech_start", "speech_end", "speech_diffusion", "eos")


def load_manifest(engine_dir: str | Path) -> dict:
    """Read ENGINE_DIR/manifest.json, check its format, version, graph files and token table."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise RuntimeInputError(f"--engine-dir {engine_dir}: not a directory")
    path = engine_dir / "manifest.json"
    if not path.is_file():
        raise RuntimeInputError(f"{path}: missing (not an ENGINE_DIR written by `vv-export onnx`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RuntimeInputError(f"{path}: unreadable manifest ({one_line(exc)})") from exc
    if not isinstance(manifest, dict):
        raise RuntimeInputError(f"{path}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise RuntimeInputError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RuntimeInputError(f"{path}: unsupported format_version {manifest.get('format_version')!r} "
                                f"(this runtime reads version {FORMAT_VERSION})")
    for key in ("model", "tokens", "control_tokens", "prompt", "graphs"):
        if key not in manifest:
            raise RuntimeInputError(f"{path}: missing field {key!r}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise RuntimeInputError(f"{path}: graphs is not a table of graph entries")
    for name in REQUIRED_GRAPHS:
        if name not in graphs:
            raise RuntimeInputError(f"{path}: graph {name!r} not listed")
    for name, role in graph_roles(manifest).items():
        if role not in ROLES:
            raise RuntimeInputError(f"{path}: graph {name!r} has role {role!r} (expected one of {', '.join(ROLES)})")
        if name in REQUIRED_GRAPHS and role == "auxiliary":
            raise RuntimeInputError(f"{path}: graph {name!r} has role 'auxiliary', but the generation loop calls it")
    for name, graph in graphs.items():
        files = [graph.get("file", f"{name}.onnx")] + list(graph.get("external_data") or [])
        for file in files:
            if not (engine_dir / file).is_file():
                raise RuntimeInputError(f"{engine_dir / file}: graph file of {name!r} is missing")
        for side in ("inputs", "outputs"):
            if not isinstance(graph.get(side), list):
                raise RuntimeInputError(f"{path}: graph {name!r} has no {side} list")
    if list(manifest["control_tokens"]) != list(CONTROL_TOKENS):
        raise RuntimeInputError(f"{path}: control_tokens {manifest['control_tokens']!r} "
                                f"(expected {list(CONTROL_TOKENS)!r})")
    for name in CONTROL_TOKENS + ("pad",):
        if not isinstance(manifest["tokens"].get(name), int):
            raise RuntimeInputError(f"{path}: tokens.{name} missing")
    tokenizer = engine_dir / manifest.get("tokenizer", "tokenizer.json")
    if not tokenizer.is_file():
        raise RuntimeInputError(f"{tokenizer}: tokenizer file is missing")
    return manifest


def graph_roles(manifest: dict) -> dict[str, str]:
    """graph -> role, in manifest order: the recorded role, else DEFAULT_ROLES, else "auxiliary"."""
    return {name: (entry.get("role") or DEFAULT_ROLES.get(name, "auxiliary"))
            for name, entry in manifest["graphs"].items()}


def graphs_with_role(manifest: dict, *roles: str) -> list[str]:
    """The manifest's graphs whose role is one of `roles`, in manifest order."""
    return [name for name, role in graph_roles(manifest).items() if role in roles]


def required_graphs(manifest: dict) -> list[str]:
    """The graphs a backend must load to run the generation loop: roles "loop" and "per-frame"."""
    return graphs_with_role(manifest, *LOOP_ROLES)


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
