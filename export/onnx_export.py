"""`vv-export onnx`: checkpoint -> validated ONNX graphs + manifest.json in an ENGINE_DIR.

Everything is written into a temporary sibling directory that is renamed to --out at the very end,
so an interrupted or failed export leaves nothing at --out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


import numpy as np

from .engine_dir import FORMAT, FORMAT_VERSION, ROLES, sha256_file
from .errors import ExportError
from .families import family_of
from .graph_rules import EXTERNAL_DATA_BYTES, check_within_tolerance, cpu_session
from .specs import DIMS, ContextBase, GraphSpec, sample_inputs
from .wrappers import FP32_STORAGE_PREFIXES

OPSET = 17



def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import __version__

    return {"vibevoice_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}


def round_weights_(model, dtype: str) -> None:
    """Round the weights to the storage dtype so PyTorch validates the very numbers the graphs hold."""
    import torch

    if dtype == "fp32":
        return
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32 and p.numel() >= 1024:
                p.copy_(p.to(target).float())


def _store_weights_as(model_proto, dtype: str) -> None:
    """Store large fp32 initializers as fp16/bf16, each followed by a Cast back to fp32.

    Compute stays fp32 (ONNX Runtime's CPU kernels are fp32), storage halves; TensorRT folds the casts
    and picks its precision from the build plan.
    """
    if dtype == "fp32":
        return
    from onnx import TensorProto, helper, numpy_helper

    target = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.BFLOAT16
    graph = model_proto.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name.startswith(FP32_STORAGE_PREFIXES):
            continue  # fp32 tables (RoPE cos/sin): exact at any storage dtype
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        if n < 1024:
            continue
        arr = numpy_helper.to_array(init)
        if dtype == "fp16":
            stored = numpy_helper.from_array(arr.astype(np.float16), name=init.name + "__stored")
        else:
            import ml_dtypes

            bits = arr.astype(ml_dtypes.bfloat16).view(np.uint16)
            stored = helper.make_tensor(init.name + "__stored", target, list(arr.shape), bits.tobytes(), raw=True)
        casts.append((init, stored))
    for init, stored in casts:
        graph.initializer.remove(init)
        graph.initializer.append(stored)
        graph.node.insert(0, helper.make_node("Cast", [stored.name], [init.name], to=TensorProto.FLOAT,
                                               name=init.name + "__cast"))


@contextlib.contextmanager
def _exportable_ops():
    """Decompose ops the TorchScript ONNX exporter lacks (aten::rms_norm in the diffusion head's final layer)."""
    import torch
    import torch.nn.functional as F

    original = F.rms_norm

    def rms_norm(x, normalized_shape, weight=None, eps=None):
        eps = 1e-6 if eps is None else eps
        dims = tuple(range(-len(normalized_shape), 0))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y * weight if weight is not None else y

    F.rms_norm = rms_norm
    try:
        yield
    finally:
        F.rms_norm = original


def export_graph(spec: GraphSpec, ctx: ContextBase, directory: Path, dtype: str) -> dict:
    """Export one graph to directory/<name>.onnx; returns its file entries."""
    import onnx
    import torch

    module = spec.build(ctx).eval()
    dims = spec.shapes[-1]
    feeds = sample_inputs(spec, ctx, dims, seed=0)
    args = tuple(feeds[io.name] for io in spec.inputs)
    scratch = directory / f".{spec.name}.export"
    scratch.mkdir()
    raw_path = scratch / f"{spec.name}.onnx"
    with warnings.catch_warnings(), torch.no_grad(), _exportable_ops():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(raw_path), dynamo=False, opset_version=OPSET,
                          input_names=[io.name for io in spec.inputs],
                          output_names=[io.name for io in spec.outputs],
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
    proto = onnx.load(str(raw_path), load_external_data=True)
    shutil.rmtree(scratch)
    _store_weights_as(proto, dtype)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    path = directory / f"{spec.name}.onnx"
    files = [path.name]
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data_name = f"{spec.name}.onnx.data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        files.append(data_name)
    else:
        onnx.save_model(proto, str(path))
    del proto
    onnx.checker.check_model(str(path))  # by path: works for external data too
    return {"file": path.name, "external_data": files[1:], "sha256": sha256_file(path),
            "weight_bytes": int(weight_bytes)}


def validate_graph(spec: GraphSpec, ctx: ContextBase, directory: Path, threads: int | None = None) -> dict:
    """Run the graph in ONNX Runtime (CPU) against PyTorch on every validation shape."""
    import torch

    from .validation_data import save_validation_data

    session = cpu_session(directory / f"{spec.name}.onnx", threads)
    module = spec.build(ctx).eval()
    worst = {o.name: 0.0 for o in spec.outputs}
    feeds_list, outputs_list = [], []
    for i, dims in enumerate(spec.shapes):
        feeds = sample_inputs(spec, ctx, dims, seed=100 + i)
        with torch.no_grad():
            ref = module(*[feeds[io.name] for io in spec.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        got = session.run([o.name for o in spec.outputs], np_feeds)
        ref_np = {}
        for io, g, r in zip(spec.outputs, got, ref):
            r = r.detach().numpy()
            ref_np[io.name] = r
            worst[io.name] = max(worst[io.name], check_within_tolerance(spec.name, io.name, g, r,
                                                                        spec.tolerance[io.name], dims))
        feeds_list.append(np_feeds)
        outputs_list.append(ref_np)
    save_validation_data(directory, spec.name, feeds_list, outputs_list)
    del session
    return worst


def _manifest(ctx: ContextBase, specs: list[GraphSpec], entries: dict, dtype: str, validation: dict | None) -> dict:
    loaded = ctx.loaded
    graphs = {}
    for spec in specs:
        if spec.role not in ROLES:
            raise ExportError(f"graph {spec.name}: role {spec.role!r} is not one of {', '.join(ROLES)}")
        graphs[spec.name] = {**entries[spec.name], "role": spec.role, **spec.manifest_entry()}
        if validation is not None:
            graphs[spec.name]["validated_max_abs_error"] = validation[spec.name]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_family": loaded.family,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **family_of(loaded).manifest_facts(ctx),
        "dtype": dtype,
        "dims": dict(DIMS),
        "graphs": graphs,
        "tokenizer": "tokenizer.json",
        "source": {"model": loaded.source, "layout": loaded.layout, "weights_sha256": loaded.weights_sha256},
        "versions": _versions(),
    }


def check_out_path(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an --out that exists (without --force) or whose parent cannot be written; returns the parent."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"--out {out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    parent = out.absolute().parent
    blocker = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ExportError(f"--out {out}: {blocker} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create {parent} ({exc.strerror})") from exc
    if not os.access(parent, os.W_OK):
        raise ExportError(f"--out {out}: directory {parent} is not writable")
    return parent


def export_onnx(loaded, out: str | os.PathLike, *, dtype: str = "fp32", validate: bool = True,
                force: bool = False, diffusion_steps: int | None = None, progress: bool = True,
                threads: int | None = None, quantize: str = "none", quantize_select: str = "measure",
                runtimes=("ort",), runtime_select: str = "measure", openvino_precisions=None) -> Path:
    """Export every graph of `loaded` into the ENGINE_DIR `out` (atomically).

    diffusion_steps: DPM-Solver++ steps of the sampler graph (default: the family's, 10 for VibeVoice, 5 for
    VibeVoice-Realtime).
    quantize int8|int4: weight quantization of each validated fp32 graph where it stays within its
    tolerance and is faster (export/quantize.py; quantize_select="all" keeps it whatever its speed).
    runtimes ("ort,openvino" or a sequence): with openvino, each graph the loop calls is also tried in OpenVINO
    (precisions `openvino_precisions`, default all) and served by it where that is faster within its tolerance
    (export/openvino_candidates.py; runtime_select="all" takes OpenVINO wherever a candidate is within tolerance).
    """
    from tqdm import tqdm

    if dtype not in ("fp32", "fp16", "bf16"):
        raise ExportError(f"--dtype {dtype}: expected fp32, fp16 or bf16")
    if quantize != "none":
        from .quantize import check_mode, quantize_graph, record_in_manifest

        check_mode(quantize)
        if not validate or dtype != "fp32":
            raise ExportError("--quantize needs an fp32, validated export (no --no-validate, --dtype fp32)")
    with_openvino = "openvino" in (runtimes.split(",") if isinstance(runtimes, str) else runtimes)
    if with_openvino:
        from .openvino_candidates import RuntimeSelection, check_export

        check_export(runtimes, validate, dtype)
    out = Path(out)
    parent = check_out_path(out, force)
    round_weights_(loaded.model, dtype)
    family = family_of(loaded)
    ctx = family.context(loaded, diffusion_steps=diffusion_steps or family.default_diffusion_steps)
    specs = family.build_specs(ctx)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        entries, validation, quantized = {}, {} if validate else None, {}
        selection = (RuntimeSelection(runtimes, ctx, work, threads=threads, select=runtime_select,
                                      precisions=openvino_precisions,
                                      log=(lambda line: tqdm.write(line, file=sys.stderr)) if progress else None)
                     if with_openvino else None)
        bar = tqdm(specs, desc="export", unit="graph", disable=not progress, file=sys.stderr)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            entries[spec.name] = export_graph(spec, ctx, work, dtype)
            if validate:
                bar.set_postfix_str(f"{spec.name}: validating")
                validation[spec.name] = validate_graph(spec, ctx, work, threads)
            if selection is not None:
                bar.set_postfix_str(f"{spec.name}: OpenVINO candidates")
                selection.prepare(spec, entries[spec.name])
            if quantize != "none":
                bar.set_postfix_str(f"{spec.name}: quantizing ({quantize})")
                entries[spec.name], quantized[spec.name] = quantize_graph(spec, ctx, work, entries[spec.name],
                                                                          quantize, threads=threads,
                                                                          select=quantize_select)
            if selection is not None:
                bar.set_postfix_str(f"{spec.name}: choosing the runtime")
                selection.choose(spec, entries[spec.name], quantized.get(spec.name))
        if loaded.tokenizer_json is not None:
            (work / "tokenizer.json").write_text(loaded.tokenizer_json)
        else:
            shutil.copyfile(loaded.tokenizer_file, work / "tokenizer.json")
        manifest = _manifest(ctx, specs, entries, dtype, validation)
        if quantize != "none":
            record_in_manifest(manifest, quantize, quantized)
        if selection is not None:
            selection.record(manifest)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
