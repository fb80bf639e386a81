"""The rules the export modules share about ONNX graphs; this module imports no other module of vv_export
but `errors`, so every other one may import it (the modules of vv_export form a tree, this near its root).

* sizes: `EXTERNAL_DATA_BYTES` (past it a graph keeps its weights in a side file), `weight_bytes`,
  `save_graph`;
* precisions of the explicitly quantized (Q/DQ) engines: `QDQ_PRECISIONS`, `ACTIVATION_PRECISION`,
  `QDQ_FORMAT`, and the GPUs each precision needs, `MIN_COMPUTE_CAPABILITY`;
* the TensorRT layer an ONNX node becomes (`ONNX_TO_TRT_LAYER`) and which layers a plan's keep_fp32 rules
  pin to fp32 (`KEEP_FP32_OPS`, `FP32_LAYER_MATCH`, `COMPUTE_LAYERS`, `node_is_kept`): the TensorRT
  build (vv_export.trt_build), its CPU emulation (vv_export.precision) and the Q/DQ rewrite
  (vv_export.qdq) apply the same rule;
* graph structure: `inferred_value_infos` (shape inference without the weights' bytes),
  `bypass_weight_identities` (shared weights read directly), `CACHE_DTYPES` and `with_cache_dtype` (an LM
  graph whose cache I/O is stored in bf16);
* running a graph on the CPU and judging its outputs: `cpu_session`, and the tolerance rule
  ``max|got - ref| <= atol + rtol * max|ref|`` (`max_error`, `allowed_error`, `check_within_tolerance`).

Nothing here imports torch (`vv-export trt` uses it); onnx, ONNX Runtime and numpy are imported inside
the functions.
"""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

from .errors import ValidationError

# --- sizes ----------------------------------------------------------------------------------------

EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weight bytes keep them in a side file (protobuf caps at 2 GB)


def _initializer_bytes(init) -> int:
    from onnx import numpy_helper

    if init.raw_data:
        return len(init.raw_data)
    return int(numpy_helper.to_array(init).nbytes)


def weight_bytes(model) -> int:
    """Bytes of the initializers of an onnx.ModelProto (weights loaded)."""
    return sum(_initializer_bytes(i) for i in model.graph.initializer)


def save_graph(model, path) -> list[str]:
    """Save like the exporter: weights in a side file `<name>.data` past EXTERNAL_DATA_BYTES; checked with
    onnx.checker. Returns the file names written (the graph's first)."""
    import onnx

    path = Path(path)
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        data_name = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        files = [path.name, data_name]
    else:
        onnx.save_model(model, str(path))
        files = [path.name]
    onnx.checker.check_model(str(path))  # by path: works for external data too
    return files


# --- precisions of the explicitly quantized engines -----------------------------------------------

QDQ_PRECISIONS = ("fp8", "int8wo")
# What the engine computes the tensors outside the Q/DQ pairs in (the builder's float flag):
# bf16 for both (fp32 range): Qwen2's residual stream exceeds fp16 at full size (why the default lm is
# bf16), and next to FP8's 3 mantissa bits bf16's 8 cost little; TensorRT's FP8 GEMMs take bf16 outputs.
ACTIVATION_PRECISION = {"fp8": "bf16", "int8wo": "bf16"}
# Oldest GPU (compute capability) each precision runs on: FP8 tensor cores from Ada (8.9) and Hopper;
# bf16 (int8wo's activations) from Ampere (8.0).
MIN_COMPUTE_CAPABILITY = {"fp8": (8, 9), "int8wo": (8, 0), "bf16": (8, 0)}
# Version of what vv_export.qdq's rewrite makes an engine compute; part of the plan hash of fp8/int8wo
# engines, so a change to it rebuilds them. 2: fp8 engines run bf16 (not fp16) outside their FP8 GEMMs.
# 3: strongly typed (bf16 outside the kept nodes, bf16-exact scales), only GEMMs with quantized kernels.
QDQ_FORMAT = 3


# --- TensorRT layers and the keep_fp32 rules ------------------------------------------------------

# ONNX op type -> (TensorRT layer type, operation) that TensorRT's ONNX parser builds for it; ops not
# listed become data movement / shape / selection layers (SHUFFLE, CONCATENATION, GATHER, SLICE, CAST,
# SELECT, CONSTANT, ...), which `keep_fp32_names` never pins (see COMPUTE_LAYERS).
ONNX_TO_TRT_LAYER = {
    "Add": ("ELEMENTWISE", "SUM"), "Sub": ("ELEMENTWISE", "SUB"), "Mul": ("ELEMENTWISE", "PROD"),
    "Div": ("ELEMENTWISE", "DIV"), "Pow": ("ELEMENTWISE", "POW"), "Max": ("ELEMENTWISE", "MAX"),
    "Min": ("ELEMENTWISE", "MIN"),
    "Sqrt": ("UNARY", "SQRT"), "Reciprocal": ("UNARY", "RECIP"), "Exp": ("UNARY", "EXP"), "Log": ("UNARY", "LOG"),
    "Sin": ("UNARY", "SIN"), "Cos": ("UNARY", "COS"), "Neg": ("UNARY", "NEG"), "Abs": ("UNARY", "ABS"),
    "Erf": ("UNARY", "ERF"), "Floor": ("UNARY", "FLOOR"), "Ceil": ("UNARY", "CEIL"), "Round": ("UNARY", "ROUND"),
    "Tanh": ("ACTIVATION", None), "Sigmoid": ("ACTIVATION", None), "Relu": ("ACTIVATION", None),
    "Elu": ("ACTIVATION", None), "LeakyRelu": ("ACTIVATION", None), "Softplus": ("ACTIVATION", None),
    "ReduceMean": ("REDUCE", None), "ReduceSum": ("REDUCE", None), "ReduceMax": ("REDUCE", None),
    "ReduceMin": ("REDUCE", None), "ReduceProd": ("REDUCE", None), "ReduceL2": ("REDUCE", None),
    "ReduceSumSquare": ("REDUCE", None),
    "MatMul": ("MATRIX_MULTIPLY", None), "Gemm": ("MATRIX_MULTIPLY", None),
    "Conv": ("CONVOLUTION", None), "ConvTranspose": ("DECONVOLUTION", None),
    "Softmax": ("SOFTMAX", None), "LogSoftmax": ("SOFTMAX", None),
    "LayerNormalization": ("NORMALIZATION", None), "RMSNormalization": ("NORMALIZATION", None),
    "GroupNormalization": ("NORMALIZATION", None), "InstanceNormalization": ("NORMALIZATION", None),
}
# ONNX op types a plan may keep in fp32 (`[builder] keep_fp32`)
KEEP_FP32_OPS = ("Pow", "Div", "Mul", "Add", "Sub", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Exp", "Log",
                 "Sin", "Cos", "RMSNormalization", "LayerNormalization", "Softmax", "MatMul", "Gemm", "Conv",
                 "ConvTranspose")
# keep_fp32 ONNX op types -> the TensorRT layers they become (layer type, operation or None: any operation)
FP32_LAYER_MATCH = {op: ONNX_TO_TRT_LAYER[op] for op in KEEP_FP32_OPS}
# Layers a name pattern (keep_fp32_names) may pin to fp32: arithmetic, not data movement or shape logic.
COMPUTE_LAYERS = frozenset({"ELEMENTWISE", "UNARY", "REDUCE", "NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY",
                            "CONVOLUTION", "DECONVOLUTION", "ACTIVATION", "SCALE"})


def node_is_kept(node, keep_ops, keep_names, float_inputs: bool = True) -> bool:
    """Whether the TensorRT build pins the layer of this ONNX node to fp32: the rule trt_build applies to
    the layers of the parsed network, applied to the node that layer is made of."""
    if not float_inputs:
        return False  # integer shape arithmetic: trt_build skips it
    layer_type, operation = ONNX_TO_TRT_LAYER.get(node.op_type, ("OTHER", None))
    if layer_type in COMPUTE_LAYERS and any(fnmatch.fnmatchcase(node.name, pat) for pat in keep_names):
        return True
    for op in keep_ops:
        want_type, want_op = FP32_LAYER_MATCH[op]
        if want_type == layer_type and (want_op is None or want_op == operation):
            return True
    return False


# --- graph structure ------------------------------------------------------------------------------

def inferred_value_infos(model) -> list:
    """ONNX shape inference over a weightless copy of `model`: the value infos of its inputs, inferred
    intermediate values and outputs (types and shapes), without copying the weights' bytes."""
    import onnx

    structure = onnx.ModelProto()
    structure.CopyFrom(model)
    for init in structure.graph.initializer:  # shape inference needs only the declared types and shapes ...
        if init.data_type == onnx.TensorProto.INT64 and len(init.dims) <= 1 and init.data_location == 0 \
                and (not init.dims or init.dims[0] <= 16):
            continue  # ... and the values of small integer inputs (the `axes` of opset-18 Reduce* ops)
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("int64_data")
        init.ClearField("int32_data")
        init.ClearField("double_data")
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(structure)
    return list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)


def bypass_weight_identities(graph) -> int:
    """Consumers of `Identity(initializer)` read the initializer itself (shared weights stay shared).

    The diffusion sampler's unrolled steps read every head weight through such Identity nodes; rewrites
    that replace a weight (quantization) then replace it once for all its readers. Returns how many
    Identity nodes were removed."""
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not alias:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    graph.ClearField("node")
    graph.node.extend(keep)
    return len(alias)


# an LM graph's cache I/O: what the caller's cache holds (past_kv in) and what it writes into it (new_kv out)
CACHE_INPUT, CACHE_OUTPUT = "past_kv", "new_kv"
CACHE_DTYPES = ("fp32", "bf16")  # storage of an engine's LM cache (a plan's builder `cache_dtype`)


def has_cache_io(model) -> bool:
    return (any(i.name == CACHE_INPUT for i in model.graph.input)
            and any(o.name == CACHE_OUTPUT for o in model.graph.output))


def with_cache_dtype(model, dtype: str) -> int:
    """Make the LM graph `model` (in place) take `past_kv` and give `new_kv` in `dtype` (CACHE_DTYPES), so that
    an engine binds a cache stored in that type: the input is cast to fp32 where the graph reads it, the
    output cast from fp32 where the graph makes it; the graph in between is unchanged. Returns the casts
    added (0 for fp32 or a graph without cache I/O).

    A bf16 engine computes with its cache rounded to bf16 anyway and writes new_kv in bf16: storing it so
    halves the cache's memory and traffic and changes no result (tests/test_lm_cache_in_place.py)."""
    from onnx import TensorProto, helper

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
    if dtype == "fp32" or not has_cache_io(model):
        return 0
    graph = model.graph
    inside_in, inside_out = f"{CACHE_INPUT}/fp32", f"{CACHE_OUTPUT}/fp32"
    for node in graph.node:
        node.input[:] = [inside_in if n == CACHE_INPUT else n for n in node.input]
        node.output[:] = [inside_out if n == CACHE_OUTPUT else n for n in node.output]
    for io, name in ((graph.input, CACHE_INPUT), (graph.output, CACHE_OUTPUT)):
        for value in io:
            if value.name == name:
                value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    graph.node.insert(0, helper.make_node("Cast", [CACHE_INPUT], [inside_in], to=TensorProto.FLOAT,
                                          name=f"/{CACHE_INPUT}/cache_dtype_Cast"))
    graph.node.append(helper.make_node("Cast", [inside_out], [CACHE_OUTPUT], to=TensorProto.BFLOAT16,
                                       name=f"/{CACHE_OUTPUT}/cache_dtype_Cast"))
    return 2


# --- running a graph on the CPU and judging its outputs -------------------------------------------

def cpu_session(model_or_path, threads: int | None = 1):
    """An ONNX Runtime CPU session for a graph file or an in-memory onnx.ModelProto (one past
    EXTERNAL_DATA_BYTES of weights goes through a temporary file: protobuf cannot serialize it).

    `threads`: intra-op threads (None: ONNX Runtime's default, one per core). Timings that choose a graph use
    the runtime's own session options instead (export/quantize.py `_session`)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    providers = ["CPUExecutionProvider"]
    if not isinstance(model_or_path, onnx.ModelProto):
        return ort.InferenceSession(str(model_or_path), sess_options=opts, providers=providers)
    if weight_bytes(model_or_path) <= EXTERNAL_DATA_BYTES:
        return ort.InferenceSession(model_or_path.SerializeToString(), sess_options=opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="vv-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model_or_path, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def peak_of(ref) -> float:
    """max |ref| (0 for an empty tensor): the scale a tolerance's rtol is relative to."""
    import numpy as np

    ref = np.asarray(ref)
    return float(np.max(np.abs(ref))) if ref.size else 0.0


def max_error(got, ref) -> float:
    """max |got - ref| in float64 (inf when `got` has a non-finite value where `ref` is finite)."""
    import numpy as np

    got, ref = np.asarray(got), np.asarray(ref)
    if ref.size == 0:
        return 0.0
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if not np.all(np.isfinite(got64[np.isfinite(ref64)])):
        return float("inf")
    return float(np.max(np.abs(got64 - ref64)))


def allowed_error(tol: dict, ref) -> float:
    """atol + rtol * max |ref|: the tolerance rule of every graph output (docs/PRECISION.md)."""
    return float(tol["atol"]) + float(tol["rtol"]) * peak_of(ref)


def check_within_tolerance(graph: str, output: str, got, ref, tol: dict, dims: dict) -> float:
    """max |got - ref| of one output against the PyTorch reference `ref`, or a one-line ValidationError
    when the shapes differ or the error exceeds atol + rtol * max|ref| (or is not finite)."""
    import numpy as np

    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise ValidationError(f"graph {graph}: output {output} has shape {got.shape}, PyTorch gives {ref.shape} "
                              f"(dims {dims})")
    err, allowed, peak = max_error(got, ref), allowed_error(tol, ref), peak_of(ref)
    if not np.isfinite(err) or err > allowed:
        raise ValidationError(
            f"graph {graph}: output {output} differs from PyTorch by {err:.3g} (allowed {allowed:.3g} = atol "
            f"{tol['atol']:g} + rtol {tol['rtol']:g} x peak {peak:.3g}) at dims {dims}")
    return err
