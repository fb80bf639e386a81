"""Large 1-D (transposed) convolutions of the per-frame conv stacks rewritten as MatMul (for `--quantize`).

ONNX Runtime quantizes MatMul weights block-wise (MatMulNBits) but has no fast quantized kernel for
Conv / ConvTranspose, and the biggest weights of the conv stacks are in their strided convolutions:
the semantic encoder's last downsampling Conv and the acoustic decoder's first upsampling
ConvTranspose hold 2048 x 1024 x 16 weights each (134 MB in fp32), read in full for every audio frame.
Both are exactly a matrix product over a few whole frames of `stride` samples when the kernel is a
multiple of the stride (kernel = r * stride), which is how VibeVoice's tokenizers are built:

- Conv, stride s, kernel r*s, no padding, input length a multiple of s: output t reads input frames
  t .. t+r-1 (frame = s samples). `X [N, C, L] -> frames [N, L/s, C*s] -> the r neighbouring frames side
  by side [N, T, r*C*s] -> MatMul W' [r*C*s, O] (+ bias) -> [N, O, T]`.
- ConvTranspose, stride s, kernel r*s, no padding: input frame t adds `x_t W[:, :, k]` at output t*s+k.
  `X [N, C, n] -> [N, n, C] -> MatMul W' [C, r*s*O] -> [N, n, r, s, O]`; chunk c (kernel taps
  c*s .. c*s+s-1) is shifted by c frames and the r chunks are summed (overlap-add) -> [N, O, (n+r-1)*s].

The products are the same as the convolution's (summed in another order: fp32 rounding differences
only); afterwards these MatMuls are quantized like every other. Only convolutions with at least
`MIN_WEIGHTS` weights are rewritten (the small ones at high time resolution are compute-bound and
stay Conv), and a Conv only where shape inference gives its input's length (whole frames).
"""

from __future__ import annotations

import numpy as np

from .graph_rules import inferred_value_infos

MIN_WEIGHTS = 1 << 20


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_shapes(model) -> dict:
    """Static shapes (tuples with None for dynamic dims) of every value shape inference can tell."""
    shapes = {}
    for vi in inferred_value_infos(model):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def _plain(attrs: dict, rank: int = 1) -> bool:
    pads = attrs.get("pads", [0] * (2 * rank))
    return (attrs.get("group", 1) == 1 and all(d == 1 for d in attrs.get("dilations", [1] * rank))
            and not any(pads) and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and not attrs.get("output_padding") and not attrs.get("output_shape"))


class _Builder:
    def __init__(self, graph, prefix: str):
        self.graph, self.prefix, self.nodes, self.count = graph, prefix, [], 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/as_matmul/{what}_{self.count}"

    def const(self, what: str, values) -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        out = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


def _conv_nodes(b: _Builder, node, w: np.ndarray, bias: str | None, length: int) -> None:
    out_ch, in_ch, kernel = w.shape
    s = _attrs(node).get("strides", [1])[0]
    r = kernel // s
    frames = length // s
    steps = frames - r + 1
    # W'[(c, ci, j), o] = W[o, ci, c*s + j]
    w2 = w.reshape(out_ch, in_ch, r, s).transpose(2, 1, 3, 0).reshape(r * in_ch * s, out_ch)
    x = b.node("Reshape", [node.input[0], b.const("shape", np.array([0, in_ch, frames, s], np.int64))])
    x = b.node("Transpose", [x], perm=[0, 2, 1, 3])  # [N, frames, C, s]
    x = b.node("Reshape", [x, b.const("shape", np.array([0, frames, in_ch * s], np.int64))])
    if r > 1:
        parts = [b.node("Slice", [x, b.const("start", np.array([c], np.int64)),
                                  b.const("end", np.array([c + steps], np.int64)),
                                  b.const("axis", np.array([1], np.int64))]) for c in range(r)]
        x = b.node("Concat", parts, axis=2)  # [N, steps, r*C*s]
    y = b.node("MatMul", [x, b.const("weight", w2.astype(np.float32))])
    if bias is not None:
        y = b.node("Add", [y, bias])
    b.node("Transpose", [y], output=node.output[0], perm=[0, 2, 1])


def _convtr_nodes(b: _Builder, node, w: np.ndarray, bias: str | None) -> None:
    in_ch, out_ch, kernel = w.shape
    s = _attrs(node).get("strides", [1])[0]
    r = kernel // s
    # W'[ci, (c, j, o)] = W[ci, o, c*s + j]
    w2 = w.reshape(in_ch, out_ch, r, s).transpose(0, 2, 3, 1).reshape(in_ch, r * s * out_ch)
    x = b.node("Transpose", [node.input[0]], perm=[0, 2, 1])  # [N, n, C]
    z = b.node("MatMul", [x, b.const("weight", w2.astype(np.float32))])
    z = b.node("Reshape", [z, b.const("shape", np.array([0, 0, r, s * out_ch], np.int64))])  # [N, n, r, s*O]
    total = None
    for c in range(r):
        part = b.node("Slice", [z, b.const("start", np.array([c], np.int64)), b.const("end", np.array([c + 1], np.int64)),
                                b.const("axis", np.array([2], np.int64))])
        part = b.node("Reshape", [part, b.const("shape", np.array([0, -1, out_ch], np.int64))])  # [N, n*s, O]
        if r > 1:
            pads = np.array([0, c * s, 0, 0, (r - 1 - c) * s, 0], np.int64)
            part = b.node("Pad", [part, b.const("pads", pads)])
        total = part if total is None else b.node("Add", [total, part])
    if bias is not None:
        total = b.node("Add", [total, bias])
    b.node("Transpose", [total], output=node.output[0], perm=[0, 2, 1])


def convs_to_matmul(model, min_weights: int = MIN_WEIGHTS) -> int:
    """Rewrite the large strided 1-D Conv / ConvTranspose nodes of `model` in place; returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    shapes = None
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in inits:
            nodes.append(node)
            continue
        init = inits[node.input[1]]
        dims = list(init.dims)
        attrs = _attrs(node)
        stride = (attrs.get("strides") or [1])[0]
        if len(dims) != 3 or int(np.prod(dims)) < min_weights or stride < 1 or dims[2] % stride or not _plain(attrs):
            nodes.append(node)
            continue
        if node.op_type == "Conv":  # the input's frames must be whole: its length must be known
            if shapes is None:
                shapes = _static_shapes(model)
            in_shape = shapes.get(node.input[0])
            length = in_shape[2] if in_shape and len(in_shape) == 3 else None
            if not length or length % stride:
                nodes.append(node)
                continue
        w = numpy_helper.to_array(init).astype(np.float32)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        b = _Builder(graph, node.name or node.output[0])
        if node.op_type == "Conv":
            _conv_nodes(b, node, w, bias, length)
        else:
            _convtr_nodes(b, node, w, bias)
        nodes.extend(b.nodes)
        count += 1
    if count:
        graph.ClearField("node")
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
    return count
