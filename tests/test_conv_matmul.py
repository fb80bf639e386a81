"""The conv stacks' strided Conv / ConvTranspose rewritten as MatMul (vv_export.conv_matmul): same outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vv_export.conv_matmul import convs_to_matmul


def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _one_node_model(op, w, stride, length, bias=True):
    rng = np.random.default_rng(1)
    out_ch = w.shape[0] if op == "Conv" else w.shape[1]
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_ch).astype(np.float32), "b"))
    in_ch = w.shape[1] if op == "Conv" else w.shape[0]
    node = helper.make_node(op, inputs, ["y"], strides=[stride], kernel_shape=[w.shape[2]], pads=[0, 0])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_ch, length])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_ch, "t"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,kernel,stride,length", [
    ("Conv", 16, 8, 16), ("Conv", 10, 5, 45), ("Conv", 4, 2, 12), ("Conv", 6, 3, 9),
    ("ConvTranspose", 16, 8, 2), ("ConvTranspose", 10, 5, 3), ("ConvTranspose", 4, 2, 7), ("ConvTranspose", 6, 2, 1),
])
def test_one_convolution_equals_its_matmul_form(op, kernel, stride, length):
    rng = np.random.default_rng(0)
    in_ch, out_ch = 24, 40
    shape = (out_ch, in_ch, kernel) if op == "Conv" else (in_ch, out_ch, kernel)
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    model = _one_node_model(op, w, stride, length)
    rewritten = _one_node_model(op, w, stride, length)
    assert convs_to_matmul(rewritten, min_weights=0) == 1
    assert [n.op_type for n in rewritten.graph.node].count(op) == 0
    onnx.checker.check_model(rewritten)
    x = rng.standard_normal((3, in_ch, length)).astype(np.float32)
    want, got = _run(model, {"x": x})[0], _run(rewritten, {"x": x})[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("op,length", [("Conv", 16), ("ConvTranspose", 2)])
def test_a_wrong_weight_layout_would_be_caught(op, length):
    """The equality check above can fail: the rewrite with its MatMul weight's kernel taps in the wrong
    order (the rows of one tap block swapped with the next) differs from the convolution."""
    rng = np.random.default_rng(0)
    shape = (40, 24, 16) if op == "Conv" else (24, 40, 16)
    w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    model = _one_node_model(op, w, 8, length)
    rewritten = _one_node_model(op, w, 8, length)
    assert convs_to_matmul(rewritten, min_weights=0) == 1
    weight = next(i for i in rewritten.graph.initializer if "/as_matmul/weight" in i.name)
    values = numpy_helper.to_array(weight)
    half = values.shape[0] // 2 if op == "Conv" else values.shape[1] // 2  # the r = 2 tap blocks
    swapped = np.roll(values, half, axis=0 if op == "Conv" else 1)
    weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(swapped), weight.name))
    x = rng.standard_normal((1, 24, length)).astype(np.float32)
    want, got = _run(model, {"x": x})[0], _run(rewritten, {"x": x})[0]
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()


def test_small_or_unsupported_convolutions_stay():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8, 7)) * 0.1).astype(np.float32)  # kernel not a multiple of the stride
    model = _one_node_model("Conv", w, 2, 16)
    assert convs_to_matmul(model, min_weights=0) == 0
    big_enough = _one_node_model("Conv", (rng.standard_normal((8, 8, 4)) * 0.1).astype(np.float32), 2, 16)
    assert convs_to_matmul(big_enough) == 0  # below MIN_WEIGHTS
    assert convs_to_matmul(big_enough, min_weights=0) == 1


@pytest.mark.parametrize("graph", ["acoustic_decoder", "semantic_encoder"])
def test_fixture_conv_stack_equals_its_matmul_form(tiny_engine_dir, graph):
    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    path = tiny_engine_dir / manifest["graphs"][graph]["file"]
    model, rewritten = onnx.load(str(path)), onnx.load(str(path))
    count = convs_to_matmul(rewritten, min_weights=0)
    assert count >= 1
    onnx.checker.check_model(rewritten)
    rng = np.random.default_rng(0)
    feeds = {}
    for io in manifest["graphs"][graph]["inputs"]:
        shape = [2 if d == "batch" else d for d in io["shape"]]
        feeds[io["name"]] = rng.standard_normal(shape).astype(np.float32)
    for want, got in zip(_run(model, feeds), _run(rewritten, feeds)):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
