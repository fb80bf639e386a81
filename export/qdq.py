"""Explicit quantization (Q/DQ) copies of exported graphs for TensorRT fp8 and int8wo engines.

`qdq_model(model, precision, calibration)` rewrites an fp32 graph of an ENGINE_DIR in the standard
QuantizeLinear / DequantizeLinear form that TensorRT 10's ONNX parser builds an explicitly quantized
network from, and that ONNX Runtime (CPU) runs, so the quantized arithmetic can be checked without a GPU
(vv_export.precision emulates the whole engine with it; tests/test_qdq.py):

* Which GEMMs: every MatMul / Gemm whose weight is a constant 2-D initializer and whose K and N are
  multiples of `QUANT_GEMM_MULTIPLE` (16: what FP8 / INT8 tensor-core GEMMs take); the narrower ones
  (the LM's 4-column control logits) keep fp32 weights and run in the engine's bf16.
* "int8wo" (INT8 weight-only): those GEMMs read the weight as
  ``DequantizeLinear(w_int8, scale, zero, axis=<output channel>)``: symmetric, one fp32 scale per
  output channel (absmax / 127, zero point 0). Activations are untouched: the engine runs them in bf16.
* "fp8" (FP8 E4M3FN weights and activations): the same MatMuls read ``DequantizeLinear(w_fp8, scale)``
  with ONE fp32 scale per weight tensor (absmax / 448), and their activation input through
  ``QuantizeLinear -> DequantizeLinear`` (FP8 E4M3FN, one fp32 scale per tensor: the calibrated absmax
  / 448). Per-tensor weight scales: TensorRT's FP8 GEMM fusion takes a scalar weight scale with a
  scalar activation scale (ModelOpt's FP8 ONNX recipe is per-tensor too); per-channel FP8 weights are
  reported to fall back to dequantize + fp16 GEMM, i.e. without FP8 speed. E4M3 is a float format: a
  per-tensor scale costs range, not resolution (3 mantissa bits at every magnitude down to ~2^-15 of
  the tensor's absmax), so the weights lose little by it. The engine's other tensors are bf16.
* Calibration (fp8): the absmax of each quantized activation over the graph's saved validation inputs
  (ENGINE_DIR/validation/<graph>.inputs.json), computed by running the fp32 graph in ONNX Runtime with
  those tensors added as outputs. Values beyond the calibrated absmax saturate to +-448 x scale at run
  time, as in the engine.
* Shared weights stay shared: the diffusion sampler's unrolled steps read each head weight through
  `Identity` nodes of one initializer; they are bypassed first (vv_export.graph_rules) and every reader
  gets its own DequantizeLinear node (the pattern TensorRT fuses) of the ONE quantized initializer.
* The copy's default-domain opset is raised to 19 (FP8 QuantizeLinear/DequantizeLinear need it; the
  exporter writes 17): the one change on the way that existing nodes need, the Reduce* ops' `axes`
  (an attribute up to 17, an input from 18), is made (the other ops of 18/19 only gained types or
  attributes with defaults), and the result is checked with onnx.checker.

Rounding is what TensorRT's quantization scheme defines (round to nearest even; INT8 codes within
+-127, FP8 saturated to +-448), so ONNX Runtime on this copy sees the very quantized values the
engine holds. Every scale is rounded up to a bf16 value (`bf16_ceil`) before the codes are made: the
strongly typed engine graph (vv_export.strong_typing) holds the weights' scales in bf16, and so loses
nothing. Nothing here imports torch: `vv-export trt` uses it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .errors import ExportError
from .graph_rules import (EXTERNAL_DATA_BYTES, QDQ_PRECISIONS, bypass_weight_identities, cpu_session, node_is_kept,
                          save_graph, weight_bytes)
from .validation_data import load_validation_data, validation_paths

QDQ_OPSET = 19
INT8_MAX = 127.0
FP8_MAX = 448.0
# A weight GEMM is quantized only when its reduction (K) and output (N) dimensions are both multiples of
# this: the FP8 and INT8 tensor-core GEMMs of TensorRT (cuBLASLt) take 16-element multiples; a narrower
# GEMM, like the LM's 4-column control-logits MatMul (N = 4), has no quantized kernel and would run as
# dequantize + bf16 GEMM, adding the quantization error for nothing.
QUANT_GEMM_MULTIPLE = 16
# ONNX ops whose `axes` moved from an attribute to an input in opset 18 (ReduceSum already in 13)
_AXES_TO_INPUT_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                     "ReduceLogSumExp", "ReduceSumSquare")


def check_precision(precision: str) -> None:
    if precision not in QDQ_PRECISIONS:
        raise ExportError(f"precision {precision!r}: a Q/DQ graph is made for {' or '.join(QDQ_PRECISIONS)}")


# --- finding the weights --------------------------------------------------------------------------

def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gemm_suits_quantized_kernels(k: int, n: int) -> bool:
    """Whether a weight GEMM of reduction `k` and `n` output channels has FP8 / INT8 tensor-core kernels
    (`QUANT_GEMM_MULTIPLE`)."""
    return k > 0 and n > 0 and k % QUANT_GEMM_MULTIPLE == 0 and n % QUANT_GEMM_MULTIPLE == 0


def weight_matmuls(graph, keep_ops=(), keep_names=(), kernel_dims: bool = True) -> list:
    """(node, weight initializer name, output-channel axis) of every MatMul / Gemm with a constant 2-D float
    weight as its second input, in graph order; nodes the plan keeps in fp32 (keep rules) are left out, and
    with `kernel_dims` those whose dimensions no quantized kernel takes (`gemm_suits_quantized_kernels`)."""
    from onnx import TensorProto

    inits = {i.name: i for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            continue
        if (keep_ops or keep_names) and node_is_kept(node, keep_ops, keep_names):
            continue
        # output channels: N of a [K, N] MatMul weight; a Gemm's B is [N, K] when transB
        axis = 0 if node.op_type == "Gemm" and _attrs(node).get("transB", 0) else 1
        n, k = int(init.dims[axis]), int(init.dims[1 - axis])
        if kernel_dims and not gemm_suits_quantized_kernels(k, n):
            continue
        out.append((node, node.input[1], axis))
    return out


# --- quantizing arrays ----------------------------------------------------------------------------

def bf16_ceil(x):
    """The smallest bf16 values >= the positive fp32 values `x`, as fp32: scales the engine holds in bf16
    without rounding (the strongly typed graph's DequantizeLinear runs in bf16), never below absmax / max
    code, so no code saturates for it."""
    import numpy as np

    bits = np.asarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000)).view(np.float32)


def quantize_int8(w, axis: int):
    """(int8 weights, fp32 scale per channel along `axis`): symmetric, scale = absmax / 127 rounded up to a
    bf16 value (`bf16_ceil`)."""
    import numpy as np

    w = np.asarray(w, np.float32)
    reduce_axis = 1 - axis
    absmax = np.max(np.abs(w), axis=reduce_axis)
    scale = bf16_ceil(np.where(absmax > 0, absmax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32))
    shape = [1, 1]
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)  # ties to even
    return q, scale


def fp8_round(x, scale):
    """FP8 E4M3FN codes of x / scale: saturated to +-448, rounded to nearest even (TensorRT's castToFp8)."""
    import ml_dtypes
    import numpy as np

    scaled = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def fp8_scale(absmax: float) -> float:
    """Per-tensor FP8 scale absmax / 448 rounded up to a bf16 value (`bf16_ceil`; 1.0 for an all-zero
    tensor, which quantizes to 0 either way)."""
    import numpy as np

    return float(bf16_ceil(np.float32(absmax) / np.float32(FP8_MAX))) if absmax > 0 else 1.0


def quantize_fp8(w):
    """(FP8 E4M3FN weights, fp32 scalar scale): per tensor, scale = absmax / 448 (as `fp8_scale`)."""
    import numpy as np

    w = np.asarray(w, np.float32)
    scale = np.float32(fp8_scale(float(np.max(np.abs(w))) if w.size else 0.0))
    return fp8_round(w, scale), scale


# --- calibration ----------------------------------------------------------------------------------

def calibrate(model, feeds_list: list, names: list[str]) -> dict:
    """name -> max |value| of each tensor `names` over the runs of the fp32 `model` on `feeds_list`."""
    import numpy as np
    from onnx import TensorProto, helper

    if not feeds_list:
        raise ExportError("calibration: no input sets given")
    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = cpu_session(probe, threads=None)
    absmax = {name: 0.0 for name in names}
    for feeds in feeds_list:
        values = session.run(names, {k: np.asarray(v) for k, v in feeds.items()})
        for name, value in zip(names, values):
            if value.size:
                peak = float(np.max(np.abs(value.astype(np.float64))))
                if not np.isfinite(peak):
                    raise ExportError(f"calibration: tensor {name!r} is not finite on the validation inputs")
                absmax[name] = max(absmax[name], peak)
    return absmax


def load_calibration(engine_dir, graph: str) -> list:
    """The graph's saved validation inputs (the fp8 calibration set), or a one-line ExportError."""
    inputs_path, _ = validation_paths(engine_dir, graph)
    if not inputs_path.is_file():
        raise ExportError(f"graph {graph}: fp8 needs calibration inputs and {inputs_path} is missing; re-export the "
                          f"ENGINE_DIR with validation (vv-export onnx without --no-validate)")
    feeds_list, _ = load_validation_data(engine_dir, graph)
    if not feeds_list:
        raise ExportError(f"graph {graph}: {inputs_path} holds no input sets to calibrate fp8 on; re-export the "
                          f"ENGINE_DIR with validation")
    return [dict(f) for f in feeds_list]


# --- opset ----------------------------------------------------------------------------------------

def upgrade_opset(model, opset: int = QDQ_OPSET) -> None:
    """Raise the default-domain opset to `opset` in place, rewriting the ops whose form changed on the way."""
    import numpy as np
    from onnx import helper, numpy_helper

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        model.opset_import.append(helper.make_opsetid("", opset))
        return
    if current >= opset:
        return
    if current < 13:
        raise ExportError(f"graph opset {current}: expected the exporter's opset 13 or newer")
    graph = model.graph
    if current < 18:
        made = 0
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in _AXES_TO_INPUT_18:
                continue
            axes = next((a for a in node.attribute if a.name == "axes"), None)
            if axes is None:
                continue  # no axes: reduce over all, the same in 18
            name = f"{node.name or node.output[0]}__axes"
            while any(i.name == name for i in graph.initializer):
                made += 1
                name = f"{node.name or node.output[0]}__axes{made}"
            graph.initializer.append(numpy_helper.from_array(np.array(list(axes.ints), np.int64), name))
            node.attribute.remove(axes)
            node.input.append(name)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset


# --- the rewrite ----------------------------------------------------------------------------------

def _unique(taken: set, name: str) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def qdq_model(model, precision: str, calibration=None, *, keep_ops=(), keep_names=(), name: str | None = None,
              check: bool = True):
    """An explicit-quantization copy of the fp32 `model` (weights loaded) for a `precision` engine.

    `calibration` (fp8 only): the graph's validation input sets (a list of feed dicts), or an already
    computed {activation name: absmax}. `keep_ops` / `keep_names`: the plan's keep_fp32 rules; MatMuls
    they pin to fp32 keep fp32 weights. Raises a one-line ExportError for a graph with no weight MatMul
    and for fp8 without calibration.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    check_precision(precision)
    graph_name = name or model.graph.name or "graph"
    out = copy.deepcopy(model)
    graph = out.graph
    bypass_weight_identities(graph)
    targets = weight_matmuls(graph, keep_ops, keep_names)
    if not targets:
        raise ExportError(f"graph {graph_name}: no MatMul/Gemm with a constant 2-D weight, so {precision} would change "
                          f"nothing; give it fp32, fp16 or bf16 in the plan")
    absmax = None
    if precision == "fp8":
        if calibration is None:
            raise ExportError(f"graph {graph_name}: fp8 needs calibration data (the graph's validation inputs, "
                              f"ENGINE_DIR/validation/{graph_name}.inputs.json); re-export the ENGINE_DIR with validation")
        wanted = []
        for node, _, _ in targets:
            if node.input[0] not in wanted:
                wanted.append(node.input[0])
        if isinstance(calibration, dict):
            missing = [n for n in wanted if n not in calibration]
            if missing:
                raise ExportError(f"graph {graph_name}: no calibrated absmax for activation {missing[0]!r}")
            absmax = {n: float(calibration[n]) for n in wanted}
        else:
            absmax = calibrate(model, list(calibration), wanted)

    inits = {i.name: i for i in graph.initializer}
    taken = {n.name for n in graph.node} | set(inits) | {v for n in graph.node for v in list(n.input) + list(n.output)}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    new_inits = []
    quantized: dict[tuple, tuple] = {}  # (weight initializer, axis) -> (codes, scale, zero) names, axis
    act_q: dict[str, str] = {}  # activation -> its QuantizeLinear output
    act_params: dict[str, tuple] = {}  # activation -> (scale, zero) initializer names
    inserted: dict[str, list] = {}  # a node's first output -> nodes to insert before it
    fp8_zero = None

    def weight_params(w_name: str, axis: int):
        nonlocal fp8_zero
        if (w_name, axis) in quantized:
            return quantized[w_name, axis]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        codes_name = _unique(taken, f"{w_name}__{precision}")
        scale_name = _unique(taken, f"{w_name}__scale")
        if precision == "int8wo":
            codes, scale = quantize_int8(w, axis)
            zero_name = _unique(taken, f"{w_name}__zero")
            new_inits.extend([numpy_helper.from_array(codes, codes_name), numpy_helper.from_array(scale, scale_name),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), zero_name)])
            quantized[w_name, axis] = (codes_name, scale_name, zero_name, axis)
        else:
            codes, scale = quantize_fp8(w)
            if fp8_zero is None:
                fp8_zero = _unique(taken, "fp8_zero_point")
                new_inits.append(_fp8_zero(fp8_zero))
            new_inits.extend([numpy_helper.from_array(codes, codes_name),
                              numpy_helper.from_array(np.array(scale, np.float32), scale_name)])
            quantized[w_name, axis] = (codes_name, scale_name, fp8_zero, None)
        return quantized[w_name, axis]

    for node, w_name, axis in targets:
        before = inserted.setdefault(node.output[0], [])
        base = node.name or node.output[0]
        codes_name, scale_name, zero_name, q_axis = weight_params(w_name, axis)
        w_dq = _unique(taken, f"{base}/weight_dequantized")
        kwargs = {"axis": q_axis} if q_axis is not None else {}
        before.append(helper.make_node("DequantizeLinear", [codes_name, scale_name, zero_name], [w_dq],
                                       name=_unique(taken, f"{base}/weight_DequantizeLinear"), **kwargs))
        node.input[1] = w_dq
        if precision == "fp8":
            x = node.input[0]
            if x not in act_q:
                scale_name = _unique(taken, f"{x}__fp8_scale")
                new_inits.append(numpy_helper.from_array(np.array(fp8_scale(absmax[x]), np.float32), scale_name))
                act_params[x] = (scale_name, fp8_zero)
                act_q[x] = _unique(taken, f"{x}__fp8")
                before.append(helper.make_node("QuantizeLinear", [x, scale_name, fp8_zero], [act_q[x]],
                                               name=_unique(taken, f"{base}/input_QuantizeLinear")))
            x_dq = _unique(taken, f"{base}/input_dequantized")
            before.append(helper.make_node("DequantizeLinear", [act_q[x], *act_params[x]], [x_dq],
                                           name=_unique(taken, f"{base}/input_DequantizeLinear")))
            node.input[0] = x_dq

    nodes = []
    for node in graph.node:
        nodes.extend(inserted.get(node.output[0], []))
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    upgrade_opset(out, QDQ_OPSET)
    if check and weight_bytes(out) <= EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(out, full_check=True)
    return out


def _fp8_zero(name: str):
    import ml_dtypes
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), name)


def quantized_weight_bytes(model) -> dict:
    """Bytes of the INT8 and FP8 initializers of a Q/DQ graph: {"int8": n, "fp8": n} (1 byte per weight)."""
    from onnx import TensorProto

    out = {"int8": 0, "fp8": 0}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.INT8 and len(init.dims) == 2:
            out["int8"] += len(init.raw_data)
        elif init.data_type == TensorProto.FLOAT8E4M3FN and len(init.dims) == 2:
            out["fp8"] += len(init.raw_data)
    return out


# --- files ----------------------------------------------------------------------------------------

def qdq_graph_file(engine_dir, graph: str, precision: str, builder: dict | None = None, out_path=None,
                   onnx_path=None):
    """The Q/DQ copy of ENGINE_DIR's `graph` under a plan's builder options (keep rules); saved to `out_path`.

    fp8 is calibrated on ENGINE_DIR/validation/<graph>.inputs.json. Returns the model.
    """
    import json

    import onnx

    check_precision(precision)
    engine_dir = Path(engine_dir)
    if onnx_path is None:
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        onnx_path = engine_dir / manifest["graphs"][graph]["file"]
    model = onnx.load(str(onnx_path), load_external_data=True)
    calibration = load_calibration(engine_dir, graph) if precision == "fp8" else None
    builder = builder or {}
    out = qdq_model(model, precision, calibration, keep_ops=builder.get("keep_fp32", ()),
                    keep_names=builder.get("keep_fp32_names", ()), name=graph)
    del model
    if out_path is not None:
        save_graph(out, out_path)
    return out
