"""Reduced precision on the CPU: an ONNX Runtime emulation of a TensorRT fp16/bf16 engine (docs/PRECISION.md).

`emulate_model(model, precision, keep_ops, keep_names)` rewrites an fp32 graph of an ENGINE_DIR so that
ONNX Runtime (CPU) computes what a TensorRT engine built from it at `precision` computes in the worst
case the build plan allows:

* every node the plan does NOT keep in fp32 computes in fp32 on inputs rounded to fp16/bf16 and has
  its float outputs rounded to fp16/bf16 (a `Cast(to=FLOAT16|BFLOAT16) -> Cast(to=FLOAT)` pair after it,
  which ONNX Runtime's CPU provider runs with round-to-nearest-even; fp16 overflow gives +-inf, as on
  the GPU);
* weights (initializers, Constant nodes and what is folded from them only) are rounded to fp16/bf16
  when a non-kept node reads them; weights read only by kept nodes stay fp32;
* the nodes the plan keeps in fp32 (`[builder] keep_fp32` op types and `keep_fp32_names` globs, matched
  by `vv_export.graph_rules.node_is_kept`, the rule `vv_export.trt_build._mark_fp32_layers` applies to
  TensorRT layers: an ONNX node stands for the TensorRT layer the ONNX parser makes of it) read their
  inputs as they come (rounded if their producer is not kept) and produce fp32;
* graph inputs and outputs stay fp32, like the engine's I/O bindings (an output produced by a non-kept
  node carries its rounded value).

What it models: storage/activation rounding with fp32 accumulation inside each op, which is what
tensor-core GEMMs and convolutions do (fp16/bf16 operands, fp32 accumulators, one rounding of the
result), and the weakest choice TensorRT may make for every layer the plan does not pin ("worst case":
in weak typing TensorRT may run any un-pinned layer, data movement included, in reduced precision).

What it does not model: TensorRT's kernel fusions and their internal order of operations (a fused
kernel may keep an intermediate in fp32 that this rounds: the emulation is pessimistic there), fp16
accumulation tactics (TensorRT may pick GEMM/convolution kernels that accumulate in fp16 when a
layer's precision is fp16 and no constraint forbids it; not emulated), and the exact transcendental
implementations (exp, sin, erf on the GPU differ from ONNX Runtime's in the last bits).

Explicitly quantized engines (fp8, int8wo; `emulate_quantized_model`): the graph's Q/DQ copy
(vv_export.qdq: the very INT8 / FP8 weights and the calibrated FP8 activation rounding the engine
uses) composed with the rounding above at the engine's activation precision (bf16 for both,
`vv_export.graph_rules.ACTIVATION_PRECISION`). The two compose cleanly: Cast pairs only ever touch float
tensors, so the INT8/FP8 tensors between QuantizeLinear and DequantizeLinear pass untouched; QuantizeLinear/DequantizeLinear count as
kept in fp32 (TensorRT applies their scales in fp32: the scales are not rounded, a Q reads its input as
its producer left it); a dequantized weight is rounded to fp16/bf16 where a reduced-precision MatMul
reads it, like any weight, and a MatMul's output is rounded. The FP8 GEMM itself (exact products of
FP8 values, fp32 accumulation, one rounding of the scaled result) is what ONNX Runtime computes on the
dequantized operands, up to that rounding.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

from .engine_dir import sha256_file
from .errors import ExportError
from .graph_rules import (ACTIVATION_PRECISION, FP32_LAYER_MATCH, QDQ_PRECISIONS, inferred_value_infos, node_is_kept,
                          save_graph)
from .qdq import load_calibration, qdq_model

LOW_PRECISIONS = ("fp16", "bf16")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")  # computed in fp32 (their scales) by the emulation


def _value_types(model) -> dict:
    """Element type of every tensor (graph inputs, initializers, Constant nodes, inferred values)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred_value_infos(model)}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _round_array(arr: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return arr.astype(np.float16).astype(np.float32)
    import ml_dtypes

    return arr.astype(ml_dtypes.bfloat16).astype(np.float32)


def node_kinds(graph, types: dict, keep_ops=(), keep_names=()) -> list[str]:
    """What each node of `graph` (in order) computes in under a plan's keep rules: "const" (only constants
    in: folded at build time, in fp32), "kept" (fp32: the keep rules, and QuantizeLinear/DequantizeLinear,
    whose scales TensorRT applies in fp32) or "low" (the engine's reduced precision). `types`: tensor name
    -> ONNX element type (`_value_types`)."""
    from onnx import TensorProto

    const = {i.name for i in graph.initializer}
    kinds = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" or (ins and all(i in const for i in ins)):
            const.update(o for o in node.output if o)
            kinds.append("const")
        elif node.op_type in QDQ_OPS:
            kinds.append("kept")
        elif node_is_kept(node, keep_ops, keep_names, any(types.get(i) == TensorProto.FLOAT for i in ins)):
            kinds.append("kept")
        else:
            kinds.append("low")
    return kinds


def emulate_model(model, precision: str, keep_ops=(), keep_names=()):
    """A copy of `model` (an fp32 onnx.ModelProto, weights loaded) that computes like a `precision` engine."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision == "fp32":
        return copy.deepcopy(model)
    if precision not in LOW_PRECISIONS:
        raise ExportError(f"precision {precision!r}: expected fp32, fp16 or bf16")
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    keep_ops, keep_names = list(keep_ops), list(keep_names)
    for op in keep_ops:
        if op not in FP32_LAYER_MATCH:
            raise ExportError(f"keep_fp32: unknown op type {op!r}")
    out = copy.deepcopy(model)
    graph = out.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"node {node.name!r} ({node.op_type}) has a subgraph: not supported by the emulation")
    types = _value_types(out)
    untyped = [o for n in graph.node for o in n.output if o and not types.get(o)]
    if untyped:  # an unknown type would silently escape the rounding
        raise ExportError(f"emulation: no inferred type for {len(untyped)} tensors (first: {untyped[0]!r})")
    FLOAT = TensorProto.FLOAT

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    graph_inputs = {i.name for i in graph.input}
    initializers = {i.name: i for i in graph.initializer}
    kinds = node_kinds(graph, types, keep_ops, keep_names)
    low_produced = {o for node, kind in zip(graph.node, kinds) if kind == "low" for o in node.output if is_float(o)}

    new_nodes = []
    rounded: dict[str, str] = {}  # fp32-valued tensor -> its rounded copy (for low consumers)
    new_inits = []
    counter = [0]

    def uid(base: str) -> str:
        counter[0] += 1
        return f"{base}__{precision}_{counter[0]}"

    def round_pair(src: str, dst: str, base: str) -> list:
        mid = uid(base + "_lp")
        return [helper.make_node("Cast", [src], [mid], to=low, name=uid(base + "_to_" + precision)),
                helper.make_node("Cast", [mid], [dst], to=FLOAT, name=uid(base + "_to_fp32"))]

    def rounded_input(name: str) -> str:
        if name in rounded:
            return rounded[name]
        if name in initializers:
            arr = numpy_helper.to_array(initializers[name]).astype(np.float32)
            new_name = uid(name)
            new_inits.append(numpy_helper.from_array(_round_array(arr, precision), name=new_name))
        else:
            new_name = uid(name)
            new_nodes.extend(round_pair(name, new_name, name))
        rounded[name] = new_name
        return new_name

    for node, kind in zip(graph.node, kinds):
        if kind == "low":
            for k, name in enumerate(node.input):
                if is_float(name) and name not in low_produced:
                    node.input[k] = rounded_input(name)  # graph input, weight or kept node's fp32 output
        new_nodes.append(node)
        if kind == "low":
            for k, name in enumerate(node.output):
                if is_float(name):
                    raw = uid(name + "_raw")
                    node.output[k] = raw
                    new_nodes.extend(round_pair(raw, name, name))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    # drop initializers nobody reads any more (weights replaced by their rounded copies)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used or i.name in graph_inputs]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out


def kept_node_names(model, keep_ops=(), keep_names=()) -> set:
    """Names of the nodes of `model` that the plan keeps in fp32 (for tests and reports)."""
    types = _value_types(model)
    kept = set()
    for node in model.graph.node:
        floats = any(types.get(i) == 1 for i in node.input if i)
        if node.op_type != "Constant" and node_is_kept(node, keep_ops, keep_names, floats):
            kept.add(node.name)
    return kept


def emulate_quantized_model(model, precision: str, keep_ops=(), keep_names=(), calibration=None, name=None):
    """A copy of the fp32 `model` that computes like an fp8 / int8wo engine: its Q/DQ copy (vv_export.qdq)
    rounded like the engine's activation precision (`ACTIVATION_PRECISION`: bf16). `calibration`: fp8's (see qdq_model)."""
    quantized = qdq_model(model, precision, calibration, keep_ops=keep_ops, keep_names=keep_names, name=name)
    return emulate_model(quantized, ACTIVATION_PRECISION[precision], keep_ops, keep_names)


def emulate_graph_file(onnx_path, precision: str, builder: dict, out_path=None, calibration=None, name=None):
    """Emulated copy of the graph at `onnx_path` under a plan's builder options; saved to `out_path` if given.

    fp8 needs `calibration` (the graph's validation inputs, vv_export.qdq.load_calibration)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=True)
    keep = (builder.get("keep_fp32", ()), builder.get("keep_fp32_names", ()))
    if precision in QDQ_PRECISIONS:
        emulated = emulate_quantized_model(model, precision, *keep, calibration=calibration, name=name)
    else:
        emulated = emulate_model(model, precision, *keep)
    if out_path is not None:
        save_graph(emulated, out_path)
    return emulated


def write_emulated_engine_dir(engine_dir, out_dir, plan, precisions: dict | None = None,
                              builders: dict | None = None) -> Path:
    """An ENGINE_DIR copy whose graphs compute like the plan's engines (ONNX Runtime can run it).

    `plan` is a resolved vv_export.plans.Plan; `precisions` (graph -> fp32/fp16/bf16/fp8/int8wo) and
    `builders` (graph -> builder dict) override the plan's. fp8 graphs are calibrated on ENGINE_DIR's
    validation inputs, like the engine. manifest.json records `emulated_precision` per graph and the new
    files' sha256.
    """
    engine_dir, out_dir = Path(engine_dir), Path(out_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists")
    out_dir.mkdir(parents=True)
    shutil.copyfile(engine_dir / manifest.get("tokenizer", "tokenizer.json"),
                    out_dir / manifest.get("tokenizer", "tokenizer.json"))
    emulated = {}
    for name, entry in manifest["graphs"].items():
        gp = plan.graphs.get(name)
        precision = (precisions or {}).get(name, gp.precision if gp is not None else "fp32")
        builder = (builders or {}).get(name, gp.builder if gp is not None else {})
        src = engine_dir / entry["file"]
        dst = out_dir / entry["file"]
        if precision == "fp32":
            shutil.copyfile(src, dst)
            for extra in entry.get("external_data") or []:
                shutil.copyfile(engine_dir / extra, out_dir / extra)
        else:
            calibration = load_calibration(engine_dir, name) if precision == "fp8" else None
            emulate_graph_file(src, precision, builder, dst, calibration=calibration, name=name)
            data = out_dir / (dst.name + ".data")
            entry["external_data"] = [data.name] if data.exists() else []
        entry["sha256"] = sha256_file(dst)
        emulated[name] = precision
    manifest["emulated_precision"] = emulated
    manifest.pop("trt", None)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
