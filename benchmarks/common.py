"""Pieces the benchmark scripts share: machine facts, versions, manifest-driven inputs, result files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import time

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VV_SHARED_DIR", REPO.parent / "shared"))
FULL_SIZE_CONFIG = SHARED / "reference" / "vibevoice-1.5b-original-config.json"


def export_key(**facts) -> str:
    """What a cached benchmark export depends on: the given facts (model config, seed, mode) and the exporter's
    code; a cached ENGINE_DIR is reused only while its key file holds the same key."""
    import vv_export

    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
    for source in sorted(Path(vv_export.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine while measuring), where the OS has one."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def provenance(**machine_extra) -> dict:
    """The machine, package versions and time of a result: the fields every result JSON ends with."""
    return {"machine": {**machine_info(), **machine_extra}, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine_info() -> dict:
    info = {"platform": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine while measuring
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["ram_gb"] = round(int(line.split()[1]) / 1e6, 2)
    except OSError:
        pass
    return info


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import transformers

    import vv_export

    return {"vibevoice_trt": vv_export.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__}


def feeds_for(manifest: dict, graph: str, dims: dict, seed: int = 0) -> dict:
    """Host inputs of `graph` at the named `dims`, built from the manifest alone."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for io in manifest["graphs"][graph]["inputs"]:
        shape = [dims[d] if isinstance(d, str) else int(d) for d in io["shape"]]
        name = io["name"]
        if io["dtype"] == "int64":
            if name == "input_ids":
                value = rng.integers(0, int(manifest["model"]["vocab_size"]), size=shape)
            elif name == "attention_mask":
                value = np.ones(shape)
            elif name == "position_ids":
                value = np.broadcast_to(np.arange(shape[-1]) + dims.get("past", 0), shape)
            else:
                value = np.zeros(shape)
            feeds[name] = np.ascontiguousarray(value, dtype=np.int64)
        elif name == "timestep":
            feeds[name] = np.full(shape, 500.0, dtype=np.float32)
        elif name == "cfg_scale":
            feeds[name] = np.full(shape, 1.3, dtype=np.float32)
        else:
            scale = {"audio": 0.1, "state": 0.1, "past_kv": 0.5}.get(name, 1.0)
            feeds[name] = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    return feeds


class ForcedDiffusion:
    """Backend wrapper: the LM's control logits always pick speech_diffusion (a fixed number of frames)."""

    def __init__(self, backend, diffusion_column: int):
        self.backend = backend
        self.column = diffusion_column

    def run(self, graph, feeds):
        out = self.backend.run(graph, feeds)
        if graph == "lm":
            out = dict(out)
            logits = np.array(out["control_logits"], dtype=np.float32, copy=True)
            logits[:, self.column] = np.abs(logits).max() + 1e4
            out["control_logits"] = logits
        return out

    def __getattr__(self, name):  # kv_cache, close, describe, ...
        return getattr(self.backend, name)


def write_result(out_dir, name: str, result: dict) -> Path:
    """Write result JSON atomically (temporary file, then rename) into out_dir/name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / name)
    return out_dir / name
