"""The strongly typed copy of a graph for TensorRT: every tensor carries the type the engine computes it in.

A strongly typed TensorRT network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) takes each tensor's
type from the ONNX graph and applies no precision of its own, which is how NVIDIA directs explicitly
quantized (Q/DQ) graphs to be built: with weak typing the builder may pick other precisions around the
Q/DQ pairs and skip the FP8 kernels. `strongly_typed_model(model, precision, keep_ops, keep_names)`
writes the precision the CPU emulation (vv_export.precision) models into the graph itself:

* the nodes the emulation computes in reduced precision ("low", `vv_export.precision.node_kinds`) read
  and write `precision` (bf16 or fp16) tensors: float inputs that arrive in fp32 (graph inputs, kept
  nodes' outputs, folded constants) go through a Cast, float weights they read are stored in `precision`
  (rounded as the emulation rounds them), and the few ops whose output type is an attribute (Cast,
  ConstantOfShape) produce `precision`;
* the kept nodes (the plan's keep rules) read fp32 (a Cast where the producer was reduced) and write fp32;
* DequantizeLinear of the quantized weights gets its scale in `precision` (the Q/DQ rewrite makes scales
  that are exact there, `vv_export.qdq.bf16_ceil`), so it yields the GEMM's operand type directly, the
  pattern TensorRT fuses into a quantized GEMM; an activation's QuantizeLinear takes its input as it comes
  (its scale in that input's type) and its DequantizeLinear yields `precision`;
* graph inputs and outputs keep their fp32 types (a Cast before an output a reduced node made), so the
  engine's I/O bindings are those of the manifest.

The values are the emulation's: each Cast to `precision` is the emulation's rounding of that tensor, each
reduced node's output is what the emulation rounds it to, and a Q/DQ product is exact before its
rounding. tests/test_qdq.py checks the copy under ONNX's strict type inference and, lowered back to fp32
with those roundings, against the emulation on ONNX Runtime.
"""

from __future__ import annotations

import copy

import numpy as np

from .errors import ExportError
from .precision import _round_array, _value_types, node_kinds

LOW_TYPES = {"bf16": 16, "fp16": 10}  # onnx.TensorProto.BFLOAT16, FLOAT16
FLOAT = 1  # onnx.TensorProto.FLOAT
# ops whose output element type is an attribute, not their inputs'
_TYPE_ATTRIBUTE = {"Cast": "to", "ConstantOfShape": "value"}


def _low_initializer(init, precision: str, name: str):
    """A copy of an fp32 initializer stored in `precision` (rounded to nearest even)."""
    from onnx import helper, numpy_helper

    values = _round_array(numpy_helper.to_array(init).astype(np.float32), precision)
    if precision == "fp16":
        return numpy_helper.from_array(values.astype(np.float16), name)
    import ml_dtypes

    raw = values.astype(ml_dtypes.bfloat16).tobytes()
    return helper.make_tensor(name, LOW_TYPES["bf16"], list(init.dims), raw, raw=True)


def strongly_typed_model(model, precision: str, keep_ops=(), keep_names=()):
    """A copy of the fp32 (or Q/DQ) `model` whose tensors carry the types a `precision` engine under these
    keep rules computes them in (module docstring). Raises a one-line ExportError for an op it cannot type."""
    from onnx import helper

    if precision not in LOW_TYPES:
        raise ExportError(f"strong typing: precision {precision!r} (expected {' or '.join(LOW_TYPES)})")
    low = LOW_TYPES[precision]
    out = copy.deepcopy(model)
    graph = out.graph
    types = _value_types(out)
    kinds = node_kinds(graph, types, keep_ops, keep_names)
    inits = {i.name: i for i in graph.initializer}
    producer_kind = {}
    for node, kind in zip(graph.node, kinds):
        for o in node.output:
            producer_kind[o] = kind
    readers: dict[str, list] = {}
    for node, kind in zip(graph.node, kinds):
        for name in node.input:
            readers.setdefault(name, []).append((node, kind))

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    taken = {n.name for n in graph.node} | set(types) | set(inits)
    counter = [0]

    def uid(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{base}__{precision}_{counter[0]}"
            if name not in taken:
                taken.add(name)
                return name

    now = {}  # float tensor -> its element type in the typed graph
    for vi in graph.input:
        now[vi.name] = vi.type.tensor_type.elem_type
    for name, init in inits.items():
        now[name] = init.data_type
    casts: dict[tuple[str, int], str] = {}  # (tensor, type) -> the Cast's output
    low_inits: dict[str, str] = {}
    new_nodes, new_inits = [], []

    def as_type(name: str, want: int) -> str:
        """`name` as a tensor of type `want` (itself, a weight stored so, or a Cast of it)."""
        if now.get(name) == want:
            return name
        if want == low and name in inits and now.get(name) == FLOAT:
            if name not in low_inits:
                low_inits[name] = uid(name)
                new_inits.append(_low_initializer(inits[name], precision, low_inits[name]))
                now[low_inits[name]] = low
            return low_inits[name]
        if (name, want) not in casts:
            cast = uid(f"{name}_cast")
            new_nodes.append(helper.make_node("Cast", [name], [cast], to=want, name=uid(f"{name}_Cast")))
            casts[name, want] = cast
            now[cast] = want
        return casts[name, want]

    def weight_dq_to_low(node) -> bool:
        """A DequantizeLinear of a quantized weight read only by reduced GEMMs: its scale in `precision`."""
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            return False
        return all(kind == "low" for _, kind in readers.get(node.output[0], []))

    for node, kind in zip(graph.node, kinds):
        if kind == "const":
            if weight_dq_to_low(node):
                node.input[1] = as_type(node.input[1], low)
                now[node.output[0]] = low
            else:
                for o in node.output:
                    if is_float(o):
                        now[o] = FLOAT
            new_nodes.append(node)
            continue
        if node.op_type == "QuantizeLinear":  # input as it comes, the scale in its type
            node.input[1] = as_type(node.input[1], now.get(node.input[0], FLOAT))
        elif node.op_type == "DequantizeLinear":  # the activation's: yields the reduced GEMM's operand type
            node.input[1] = as_type(node.input[1], low)
            now[node.output[0]] = low
        else:
            want = FLOAT if kind == "kept" else low
            for k, name in enumerate(node.input):
                if is_float(name):
                    node.input[k] = as_type(name, want)
            if node.op_type in _TYPE_ATTRIBUTE and kind == "low":
                _retype_attribute(node, low, precision)
            for o in node.output:
                if is_float(o):
                    now[o] = want
        new_nodes.append(node)

    # graph outputs keep fp32: a reduced producer's output goes through a Cast under the output's name
    for vi in graph.output:
        name = vi.name
        if is_float(name) and now.get(name) == low:
            raw = uid(f"{name}_{precision}")
            for node in new_nodes:
                for k, o in enumerate(node.output):
                    if o == name:
                        node.output[k] = raw
                for k, i in enumerate(node.input):
                    if i == name:
                        node.input[k] = raw
            new_nodes.append(helper.make_node("Cast", [raw], [name], to=FLOAT, name=uid(f"{name}_to_fp32")))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]  # the fp32 graph's inferred types no longer hold
    _check_types(out)
    return out


def _retype_attribute(node, low: int, precision: str) -> None:
    from onnx import numpy_helper

    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = low
        elif node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == FLOAT:
            value = numpy_helper.to_array(attr.t).astype(np.float32)
            attr.t.CopyFrom(_low_initializer(numpy_helper.from_array(value, attr.t.name or "value"), precision,
                                             attr.t.name or "value"))


def _check_types(model) -> None:
    """ONNX's strict type inference over the typed copy: a node fed mixed or wrong types is an error."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = " ".join(str(exc).split())[:300]
        raise ExportError(f"strongly typed copy of {model.graph.name or 'the graph'} does not type-check: {first}") from exc


def typed_qdq_graph_file(engine_dir, graph: str, precision: str, builder: dict, out_path, onnx_path=None):
    """What `vv-export trt` builds an fp8 / int8wo engine from: the Q/DQ copy of ENGINE_DIR's `graph`
    (vv_export.qdq.qdq_graph_file, fp8 calibrated) strongly typed at the engine's activation precision
    under the plan's keep rules; saved to `out_path`. Returns the model."""
    from .graph_rules import ACTIVATION_PRECISION, save_graph
    from .qdq import qdq_graph_file

    quantized = qdq_graph_file(engine_dir, graph, precision, builder, onnx_path=onnx_path)
    typed = strongly_typed_model(quantized, ACTIVATION_PRECISION[precision], builder.get("keep_fp32", ()),
                                 builder.get("keep_fp32_names", ()))
    del quantized
    save_graph(typed, out_path)
    return typed
