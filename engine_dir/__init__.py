"""The ENGINE_DIR contract (docs/ENGINE_DIR.md), shared by the exporter (vv_export, which writes an ENGINE_DIR)
and the runtime (vv_runtime, which loads one); neither imports the other, both import this.

* format constants: ``FORMAT``, ``FORMAT_VERSION`` and ``MANIFEST`` (the manifest), ``ENGINE_FORMAT`` (an engine
  record), ``TRT_DIR`` (where engines, the timing cache and the locks live), ``TOKENIZER`` (the default
  tokenizer file), ``DERIVED_DIMS`` (dimensions computed from others, never given);
* model families (``FAMILIES``, ``manifest["model_family"]``, "vibevoice" when absent): each with its graphs and
  their roles, its required manifest fields and token ids; ``CONTROL_TOKENS`` of the "vibevoice" family;
* graph roles (``ROLES``): how the generation loop uses each graph (``manifest["graphs"][g]["role"]``);
  ``graph_roles``, ``graphs_with_role``, ``required_graphs`` read them;
* graph runtimes (``GRAPH_RUNTIMES``): which CPU runtime serves a graph (``manifest["graphs"][g]["runtime"]``,
  optional; ``graph_runtime`` reads it), its ONNX file being ONNX Runtime's wherever that runtime is missing;
* ``read_manifest``: the one reader of ENGINE_DIR/manifest.json, with every check of the contract, raising
  ``EngineDirError`` in one line; ``one_line`` renders any exception's message as one line.

Imports the standard library only: the runtime loads it on its ONNX Runtime path and `vv-export trt` on
machines without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "vibevoice-trt/engine-dir"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINE_FORMAT = "vibevoice-trt/engine"
TRT_DIR = "trt"
TOKENIZER = "tokenizer.json"

# Dimensions of the graphs' shapes that are computed from others, never given (the lm attention mask's length).
DERIVED_DIMS = {"total": ("past", "seq")}

# How the generation loop uses a graph (manifest["graphs"][g]["role"]):
#   loop       called by the loop outside the per-frame path (prompt, prefill and decode steps)
#   per-frame  called once per generated audio frame at a fixed shape (replayed as CUDA graphs)
#   auxiliary  exported and validated, never called by the loop
ROLES = ("loop", "per-frame", "auxiliary")
LOOP_ROLES = ("loop", "per-frame")

# CPU runtimes that may serve a graph (manifest["graphs"][g]["runtime"]["name"], chosen by measurement at export:
# `vv-export onnx --runtimes`). The graph's ONNX file (`file`) is always there; ONNX Runtime runs it where the
# entry is absent, names "onnxruntime", or names a runtime that is not installed or not known.
DEFAULT_RUNTIME = "onnxruntime"
OPENVINO_RUNTIME = "openvino"
GRAPH_RUNTIMES = (DEFAULT_RUNTIME, OPENVINO_RUNTIME)
# how to install a runtime that is an optional extra of this package
RUNTIME_INSTALL = {OPENVINO_RUNTIME: "pip install 'vibevoice-trt[openvino]'"}
# the files of a runtime entry (read_manifest checks that they are in the ENGINE_DIR)
RUNTIME_FILES = ("file", "weights_file")

# The "vibevoice" lm's control_logits columns, in this order (manifest["control_tokens"]).
CONTROL_TOKENS = ("speech_start", "speech_end", "speech_diffusion", "eos")
# The prompt template of the vibevoice family (manifest["prompt"]; the runtime falls back to it for a missing key)
PROMPT = {
    "system_prompt": " Transform the text provided by various speakers into speech output, utilizing the distinct "
                     "voice of each respective speaker.\n",
    "voice_header": " Voice input:\n",
    "text_header": " Text input:\n",
    "output_header": " Speech output:\n",
}


class EngineDirError(ValueError):
    """An ENGINE_DIR that breaks the contract; its message is one line naming the file and the problem."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs, newlines included, become one space), or its
    type name when it has no message: what every one-line error shows of a cause."""
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class ModelFamily:
    """What an ENGINE_DIR of one model family holds (docs/ENGINE_DIR.md, Model families)."""

    name: str
    # the family's graphs -> role: the role of a graph whose manifest entry records none; the graphs of a
    # loop role are the ones the generation loop calls, which every manifest of the family must list
    graph_roles: dict[str, str]
    fields: tuple[str, ...]  # top-level manifest fields, besides format, format_version and graphs
    tokens: tuple[str, ...]  # entries of manifest["tokens"] (integer token ids)
    control_tokens: tuple[str, ...] | None = None  # manifest["control_tokens"], exactly, where the family has it

    @property
    def required_graphs(self) -> tuple[str, ...]:
        return tuple(graph for graph, role in self.graph_roles.items() if role in LOOP_ROLES)


DEFAULT_FAMILY = "vibevoice"        # VibeVoice-1.5B / 7B
STREAMING_FAMILY = "vibevoice_streaming"  # VibeVoice-Realtime-0.5B
FAMILIES = {family.name: family for family in (
    ModelFamily(
        DEFAULT_FAMILY,  # one lm, control tokens, voice prompts encoded from audio
        graph_roles={"text_embed": "loop", "lm": "loop", "acoustic_encoder": "loop",
                     "acoustic_decoder": "per-frame", "semantic_encoder": "per-frame", "diffusion_sampler": "per-frame",
                     "acoustic_connector": "auxiliary", "semantic_connector": "auxiliary",
                     "diffusion_step": "auxiliary"},
        fields=("model", "tokens", "control_tokens", "prompt"),
        tokens=CONTROL_TOKENS + ("pad",),
        control_tokens=CONTROL_TOKENS),
    ModelFamily(
        STREAMING_FAMILY,  # text and TTS lms, an end-of-speech classifier, voices as preset caches
        graph_roles={"text_embed": "loop", "text_lm": "loop", "tts_lm": "loop",
                     "diffusion_sampler": "per-frame", "acoustic_decoder": "per-frame",
                     "acoustic_connector": "auxiliary"},
        fields=("model", "tokens", "streaming", "diffusion"),
        tokens=("endoftext", "pad")),
)}
# The "vibevoice" family's roles and loop graphs (the family of a manifest without "model_family").
DEFAULT_ROLES = FAMILIES[DEFAULT_FAMILY].graph_roles
REQUIRED_GRAPHS = FAMILIES[DEFAULT_FAMILY].required_graphs


def model_family(manifest: dict) -> ModelFamily:
    """The manifest's family ("vibevoice" without the field); EngineDirError naming the known ones."""
    name = manifest.get("model_family", DEFAULT_FAMILY)
    if not isinstance(name, str) or name not in FAMILIES:
        raise EngineDirError(f"unknown model_family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def graph_roles(manifest: dict) -> dict[str, str]:
    """graph -> role, in the manifest's graph order: the recorded role, else the family's role of that graph,
    else "auxiliary"; EngineDirError for a role that is not one of ROLES."""
    defaults = model_family(manifest).graph_roles
    roles = {}
    for graph, entry in manifest["graphs"].items():
        role = entry.get("role")
        if role is None:
            role = defaults.get(graph, "auxiliary")
        if role not in ROLES:
            raise EngineDirError(f"graph {graph!r} has role {role!r} (expected one of {', '.join(ROLES)})")
        roles[graph] = role
    return roles


def graphs_with_role(manifest: dict, *roles: str) -> list[str]:
    """The manifest's graphs whose role is one of `roles`, in manifest order."""
    return [graph for graph, role in graph_roles(manifest).items() if role in roles]


def required_graphs(manifest: dict) -> list[str]:
    """The graphs a backend must load to run the generation loop: roles "loop" and "per-frame"."""
    return graphs_with_role(manifest, *LOOP_ROLES)


def graph_runtime(manifest: dict, graph: str) -> str:
    """The name of the runtime chosen for `graph` (DEFAULT_RUNTIME where the manifest names none)."""
    entry = manifest["graphs"][graph].get("runtime")
    return entry["name"] if isinstance(entry, dict) and isinstance(entry.get("name"), str) else DEFAULT_RUNTIME


def read_manifest(engine_dir: str | Path) -> dict:
    """ENGINE_DIR/manifest.json, checked against the contract: format and version, model family and its
    fields, graphs (listed, roles, files, I/O lists), token ids, tokenizer, voice presets. EngineDirError
    (one line) for the first problem found."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineDirError(f"--engine-dir {engine_dir}: not a directory")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineDirError(f"{path}: missing (not an ENGINE_DIR written by `vv-export onnx`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineDirError(f"{path}: unreadable manifest ({one_line(exc)})") from exc
    if not isinstance(manifest, dict):
        raise EngineDirError(f"{path}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise EngineDirError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineDirError(f"{path}: unsupported format_version {manifest.get('format_version')!r} "
                             f"(expected {FORMAT_VERSION})")
    try:
        family = model_family(manifest)
    except EngineDirError as exc:
        raise EngineDirError(f"{path}: {exc}") from None
    for key in family.fields + ("graphs",):
        if key not in manifest:
            raise EngineDirError(f"{path}: missing field {key!r}")
    _check_graphs(manifest, family, engine_dir, path)
    if family.control_tokens is not None and manifest["control_tokens"] != list(family.control_tokens):
        raise EngineDirError(f"{path}: control_tokens {manifest['control_tokens']!r} "
                             f"(expected {list(family.control_tokens)!r})")
    if not isinstance(manifest["tokens"], dict):
        raise EngineDirError(f"{path}: tokens is not a table of token ids")
    for name in family.tokens:
        if not isinstance(manifest["tokens"].get(name), int):
            raise EngineDirError(f"{path}: tokens.{name} missing")
    tokenizer = engine_dir / manifest.get("tokenizer", TOKENIZER)
    if not tokenizer.is_file():
        raise EngineDirError(f"{tokenizer}: tokenizer file is missing")
    _check_voices(manifest.get("voices"), engine_dir, path)
    return manifest


def _check_graphs(manifest: dict, family: ModelFamily, engine_dir: Path, path: Path) -> None:
    """The graphs table: the family's loop graphs listed, known roles, files present, I/O lists."""
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(entry, dict) for entry in graphs.values()):
        raise EngineDirError(f"{path}: graphs is not a table of graph entries")
    for name in family.required_graphs:
        if name not in graphs:
            raise EngineDirError(f"{path}: graph {name!r} not listed")
    try:
        roles = graph_roles(manifest)
    except EngineDirError as exc:
        raise EngineDirError(f"{path}: {exc}") from None
    for name, role in roles.items():
        if name in family.required_graphs and role == "auxiliary":
            raise EngineDirError(f"{path}: graph {name!r} has role 'auxiliary', but the generation loop calls it")
    for name, graph in graphs.items():
        for file in [graph.get("file", f"{name}.onnx")] + list(graph.get("external_data") or []):
            if not (engine_dir / file).is_file():
                raise EngineDirError(f"{engine_dir / file}: graph file of {name!r} is missing")
        for side in ("inputs", "outputs"):
            if not isinstance(graph.get(side), list):
                raise EngineDirError(f"{path}: graph {name!r} has no {side} list")
        _check_runtime(graph.get("runtime"), name, engine_dir, path)


def _check_runtime(runtime, graph: str, engine_dir: Path, path: Path) -> None:
    """The optional runtime entry of a graph: a table with a name; the files it lists are present. A name this
    reader does not know is accepted (the runtime serves the graph's ONNX file with ONNX Runtime)."""
    if runtime is None:
        return
    if not isinstance(runtime, dict) or not isinstance(runtime.get("name"), str):
        raise EngineDirError(f"{path}: graph {graph!r} has a runtime entry without a name")
    for key in RUNTIME_FILES:
        file = runtime.get(key)
        if file is not None and not (isinstance(file, str) and (engine_dir / file).is_file()):
            raise EngineDirError(f"{engine_dir / str(file)}: {runtime['name']} file of {graph!r} is missing")


def _check_voices(voices, engine_dir: Path, path: Path) -> None:
    """The optional voice presets table: name -> {"file": a file of the ENGINE_DIR, ...}."""
    if voices is None:
        return
    if not isinstance(voices, dict):
        raise EngineDirError(f"{path}: voices is not a table of voice presets")
    for name, entry in voices.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise EngineDirError(f"{path}: voice {name!r} names no file")
        if not (engine_dir / entry["file"]).is_file():
            raise EngineDirError(f"{engine_dir / entry['file']}: file of voice {name!r} is missing")
