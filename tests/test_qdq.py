"""TensorRT fp8 / int8wo engines (plans fp8, int8wo; docs/QUANTIZATION.md), verified on the CPU.

The engines are built from an explicitly quantized (Q/DQ) copy of each graph made by vv_export.qdq. Here,
on the shared fixture's ENGINE_DIR: the copies are valid ONNX (opset 19) holding their weights as INT8 /
FP8 (1 byte each; the diffusion sampler's shared weights once), ONNX Runtime runs them on the saved
validation inputs within the plan's per-graph tolerance of the saved PyTorch outputs, alone and composed
with the engine's fp16/bf16 rounding (vv_export.precision), and a wrong scale fails that check. The plans
resolve, `vv-export trt` refuses fp8 on a GPU older than compute capability 8.9 in one line before any
build, and the Q/DQ file a build uses is the checked one.

The `gpu`-marked tests at the end build the fp8 / int8wo engines of the fixture and compare them with
ONNX Runtime (fp32) under the plan's tolerance (`make check-accuracy-quant`); they skip without TensorRT
and a CUDA GPU (a failure under VV_REQUIRE_GPU=1, except fp8's "not applicable" below sm89).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import tensorrt_gpu_unavailable
from vv_export import trt_build
from vv_export.accuracy import reference_outputs
from vv_export.errors import ExportError
from vv_export.plans import PlanError, load_plan_data, memory_estimate, resolve_plan
from vv_export.graph_rules import ACTIVATION_PRECISION, allowed_error, bypass_weight_identities, cpu_session, max_error
from vv_export.precision import emulate_model, emulate_quantized_model, write_emulated_engine_dir
from vv_export.qdq import (QDQ_OPSET, QUANT_GEMM_MULTIPLE, gemm_suits_quantized_kernels, load_calibration,
                           qdq_graph_file, qdq_model, quantized_weight_bytes, weight_matmuls)
from vv_export.trt_build import build_engines, check_precision_supported
from vv_export.validation_data import load_validation_data

GRAPHS = ("lm", "diffusion_step", "diffusion_sampler")
PRECISIONS = ("fp8", "int8wo")
CODE_TYPE = {"fp8": TensorProto.FLOAT8E4M3FN, "int8wo": TensorProto.INT8}


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plans(manifest):
    return {p: resolve_plan(p, manifest) for p in PRECISIONS}


@pytest.fixture(scope="module")
def graphs(tiny_engine_dir, manifest):
    return {g: onnx.load(str(tiny_engine_dir / manifest["graphs"][g]["file"]))
            for g in (*GRAPHS, "acoustic_connector", "text_embed")}


@pytest.fixture(scope="module")
def validation(tiny_engine_dir):
    out = {}
    for g in GRAPHS:
        feeds, saved = load_validation_data(tiny_engine_dir, g)
        out[g] = (feeds, reference_outputs(saved))
    return out


def _keep(gp):
    return {"keep_ops": gp.builder["keep_fp32"], "keep_names": gp.builder["keep_fp32_names"]}


@pytest.fixture(scope="module")
def qdq(tiny_engine_dir, graphs, plans):
    """(graph, precision) -> the Q/DQ copy, as `vv-export trt` makes it (plan keep rules, fp8 calibrated on
    ENGINE_DIR/validation)."""
    cache = {}

    def get(graph, precision):
        if (graph, precision) not in cache:
            gp = plans[precision].graphs[graph]
            calibration = load_calibration(tiny_engine_dir, graph) if precision == "fp8" else None
            cache[graph, precision] = qdq_model(graphs[graph], precision, calibration, name=graph, **_keep(gp))
        return cache[graph, precision]

    return get


def _run(session, feeds):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _worst(model, feeds_list, refs, tolerance):
    """output -> (max error, allowed) of the input set closest to (or furthest beyond) its bound."""
    session = cpu_session(model)
    worst = {}
    for feeds, ref in zip(feeds_list, refs):
        got = _run(session, feeds)
        for name, r in ref.items():
            r = np.asarray(r)
            err, allowed = max_error(got[name], r), allowed_error(tolerance[name], r)
            if name not in worst or err - allowed > worst[name][0] - worst[name][1]:
                worst[name] = (err, allowed)
    return worst


def _gemm_dims(node, init) -> tuple[int, int]:
    """(K, N) of a weight MatMul ([K, N] weight) or Gemm (B [N, K] when transB)."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    k, n = (init.dims[1], init.dims[0]) if node.op_type == "Gemm" and trans_b else (init.dims[0], init.dims[1])
    return int(k), int(n)


# --- the Q/DQ copies ------------------------------------------------------------------------------

def test_only_gemms_with_quantized_kernels_are_quantized(graphs):
    """The rule (K and N multiples of QUANT_GEMM_MULTIPLE = 16) on the fixture's graphs: the lm's 4-column
    control-logits MatMul is the one weight GEMM left in fp32; every other weight GEMM of lm and the
    diffusion graphs is quantized."""
    assert QUANT_GEMM_MULTIPLE == 16
    assert gemm_suits_quantized_kernels(1536, 8960) and gemm_suits_quantized_kernels(16, 64)
    assert not gemm_suits_quantized_kernels(1536, 4) and not gemm_suits_quantized_kernels(24, 64)
    assert not gemm_suits_quantized_kernels(64, 8)
    for name in GRAPHS:
        graph = copy.deepcopy(graphs[name].graph)
        bypass_weight_identities(graph)
        inits = {i.name: i for i in graph.initializer}
        every = weight_matmuls(graph, kernel_dims=False)
        suited = weight_matmuls(graph)
        skipped = [node for node, _, _ in every if node.name not in {n.name for n, _, _ in suited}]
        dims = [_gemm_dims(node, inits[node.input[1]]) for node in skipped]
        if name == "lm":
            assert len(skipped) == 1 and dims == [(64, 4)], dims     # hidden -> the 4 control tokens
            logits = next(o for o in graphs["lm"].graph.output if o.name == "control_logits")
            assert skipped[0].output[0] in {n.input[0] for n in graph.node if n.output[0] == logits.name} | {logits.name}
        else:
            assert skipped == [], dims
        assert len(suited) == len(every) - len(skipped) > 0



@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_qdq_copy_is_valid_and_holds_quantized_weights(graphs, qdq, graph, precision):
    q = qdq(graph, precision)
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == QDQ_OPSET
    inits = {i.name: i for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    matmuls = [n for n in q.graph.node if n.op_type in ("MatMul", "Gemm")]
    quantized = [n for n in matmuls if n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"]
    # every weight MatMul a quantized kernel takes reads its weight through a DequantizeLinear of 1-byte
    # codes; the only ones reading fp32 weights are those no quantized kernel takes (the control logits)
    fp32_weights = [n for n in matmuls if n.input[1] in inits]
    assert all(not gemm_suits_quantized_kernels(*_gemm_dims(n, inits[n.input[1]])) for n in fp32_weights)
    original = copy.deepcopy(graphs[graph].graph)
    bypass_weight_identities(original)
    targets = weight_matmuls(original)
    assert len(quantized) == len(targets) > 0
    for node in quantized:
        dq = producers[node.input[1]]
        codes, scale, zero = (inits[i] for i in dq.input)
        assert codes.data_type == CODE_TYPE[precision] and len(codes.raw_data) == int(np.prod(codes.dims))
        assert zero.data_type == CODE_TYPE[precision] and not np.any(numpy_helper.to_array(zero).astype(np.float32))
        axis = {a.name: a.i for a in dq.attribute}.get("axis")
        if precision == "int8wo":  # one scale per output channel
            assert axis is not None and list(scale.dims) == [codes.dims[axis]]
            assert axis == (0 if node.op_type == "Gemm" else 1)
        else:  # one scale per tensor, and the activation through FP8 Q -> DQ
            assert list(scale.dims) == [] and axis is None
            x_dq = producers[node.input[0]]
            assert x_dq.op_type == "DequantizeLinear"
            x_q = producers[x_dq.input[0]]
            assert x_q.op_type == "QuantizeLinear" and inits[x_q.input[2]].data_type == TensorProto.FLOAT8E4M3FN
            assert float(numpy_helper.to_array(inits[x_q.input[1]])) > 0
    # 1 byte per weight, each weight once: the original's distinct weight initializers
    distinct = {w for _, w, _ in targets}
    elements = sum(int(np.prod(next(i.dims for i in original.initializer if i.name == w))) for w in distinct)
    stored = quantized_weight_bytes(q)
    assert stored == {"int8": elements if precision == "int8wo" else 0, "fp8": elements if precision == "fp8" else 0}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sampler_steps_share_one_quantized_copy(graphs, qdq, plans, precision):
    """The 10 unrolled head evaluations read one quantized copy: the sampler's 1-byte weights are the step
    graph's (the same head; its timestep MLP, which the sampler holds as constants for its 10 fixed steps,
    aside) plus the acoustic connector's, not 10 heads."""
    key = "int8" if precision == "int8wo" else "fp8"
    sampler = quantized_weight_bytes(qdq("diffusion_sampler", precision))[key]
    step_model = qdq("diffusion_step", precision)
    step = quantized_weight_bytes(step_model)[key]
    inits = {i.name: i for i in step_model.graph.initializer}
    producers = {o: n for n in step_model.graph.node for o in n.output}
    timestep = sum(len(inits[producers[n.input[1]].input[0]].raw_data) for n in step_model.graph.node
                   if n.op_type == "MatMul" and n.name.startswith("/timestep_proj/"))
    assert timestep > 0
    calibration = None
    if precision == "fp8":  # any input: only the weight bytes are compared
        calibration = [{"latent": np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)}]
    connector = quantized_weight_bytes(qdq_model(graphs["acoustic_connector"], precision, calibration))[key]
    assert sampler == step - timestep + connector, (sampler, step, timestep, connector)
    assert sampler < 1.1 * (step + connector)
    # ... read by every step: one DequantizeLinear per reading MatMul (the pattern TensorRT fuses), all of
    # them on far fewer quantized initializers
    nodes = qdq("diffusion_sampler", precision).graph.node
    readers = [n for n in nodes if n.op_type == "DequantizeLinear" and n.name.endswith("/weight_DequantizeLinear")]
    weight_readers = [n for n in graphs["diffusion_sampler"].graph.node if n.op_type in ("MatMul", "Gemm")
                      and not n.name.startswith("/attn")]
    assert len(readers) == len(weight_readers)
    assert len({n.input[0] for n in readers}) * 5 < len(readers)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_qdq_copy_within_plan_tolerance_of_pytorch(qdq, plans, validation, graph, precision):
    """ONNX Runtime on the Q/DQ copy, and on it rounded like the engine's fp16/bf16 (the CPU emulation of the
    engine), vs the saved PyTorch outputs, on every validation input set: within the plan's tolerance."""
    gp = plans[precision].graphs[graph]
    assert gp.precision == precision
    tolerance = gp.tolerance_for(precision)
    feeds, refs = validation[graph]
    q = qdq(graph, precision)
    engine = emulate_model(q, ACTIVATION_PRECISION[precision], gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    for label, model in (("Q/DQ", q), (f"Q/DQ + {ACTIVATION_PRECISION[precision]}", engine)):
        for name, (err, allowed) in _worst(model, feeds, refs, tolerance).items():
            assert err <= allowed, f"{graph} {precision} ({label}) {name}: max error {err:.3g} > allowed {allowed:.3g}"
            assert err > 1e-4 * allowed, f"{graph} {precision} ({label}) {name}: no quantization error at all"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_wrong_scale_fails_the_tolerance(qdq, plans, validation, graph, precision):
    """The check can fail: every weight scale doubled (each shared scale once) takes every output beyond its
    bound (measured: by 3.9x to 93x)."""
    q = copy.deepcopy(qdq(graph, precision))
    inits = {i.name: i for i in q.graph.initializer}
    scales = {n.input[1] for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == CODE_TYPE[precision]}
    assert scales
    for name in scales:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * np.float32(2), name))
    feeds, refs = validation[graph]
    worst = _worst(q, feeds, refs, plans[precision].graphs[graph].tolerance_for(precision))
    assert all(err > allowed for err, allowed in worst.values()), worst


def test_rounding_is_tensorrts(graphs):
    """INT8 codes round half to even within [-127, 127] (absmax / 127 per output channel); FP8 saturates
    at +-448 and rounds to nearest even, activations included."""
    from onnx import helper

    from vv_export.qdq import fp8_round, quantize_int8

    w = np.array([[127.0, -254.0], [2.5, 5.0], [-3.5, 1.0], [0.4, 3.0]], np.float32)  # scales 1 and 2: exact
    q, scale = quantize_int8(w, axis=1)
    assert scale.tolist() == [1.0, 2.0] and q.dtype == np.int8
    assert q[:, 0].tolist() == [127, 2, -4, 0] and q[:, 1].tolist() == [-127, 2, 0, 2]  # 2.5 -> 2, -3.5 -> -4
    q0, scale0 = quantize_int8(w.T, axis=0)  # a Gemm's [N, K] weight: the same per output channel
    assert scale0.tolist() == [1.0, 2.0] and np.array_equal(q0, q.T)
    codes = fp8_round(np.array([1000.0, -1000.0, 1.0625, 1.1875], np.float32), np.float32(1))
    assert codes.astype(np.float32).tolist() == [448.0, -448.0, 1.0, 1.25]  # ties to even (1.0 | 1.125 | 1.25)
    # ONNX Runtime's QuantizeLinear on the copy agrees (the activation path of an fp8 graph)
    x = np.array([[900.0, 1.0625, -3.3, 0.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(fp8_round(np.zeros(()), 1.0), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", QDQ_OPSET)])
    got = _run(cpu_session(model), {"x": x})["y"]
    np.testing.assert_array_equal(got, fp8_round(x, np.float32(0.5)).astype(np.float32) * np.float32(0.5))


def test_opset_upgrade_alone_changes_nothing(graphs, validation):
    """Opset 17 -> 19 (the Reduce* ops' axes become inputs): the same numbers, bit for bit."""
    from vv_export.qdq import upgrade_opset

    model = copy.deepcopy(graphs["lm"])
    assert any(n.op_type == "ReduceMean" and any(a.name == "axes" for a in n.attribute) for n in model.graph.node)
    upgrade_opset(model)
    onnx.checker.check_model(model, full_check=True)
    assert not any(a.name == "axes" for n in model.graph.node if n.op_type == "ReduceMean" for a in n.attribute)
    feeds = validation["lm"][0][0]
    before, after = _run(cpu_session(graphs["lm"]), feeds), _run(cpu_session(model), feeds)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_one_line_refusals(tiny_engine_dir, graphs, tmp_path):
    for call, expected in (
            (lambda: qdq_model(graphs["lm"], "fp8", None, name="lm"), "fp8 needs calibration data"),
            (lambda: qdq_model(graphs["text_embed"], "int8wo", name="text_embed"), "no MatMul/Gemm with a constant"),
            (lambda: qdq_model(graphs["lm"], "int4"), "precision 'int4'"),
            (lambda: load_calibration(tmp_path, "lm"), "re-export the ENGINE_DIR with validation")):
        with pytest.raises(ExportError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and expected in message, message


def test_qdq_graph_file_is_what_a_build_uses(tiny_engine_dir, qdq, plans, tmp_path):
    """`vv-export trt` writes the Q/DQ copy with qdq_graph_file into its work directory: the checked model."""
    gp = plans["fp8"].graphs["lm"]
    path = tmp_path / "lm.fp8.onnx"
    qdq_graph_file(tiny_engine_dir, "lm", "fp8", gp.builder, out_path=path)
    onnx.checker.check_model(str(path))
    assert onnx.load(str(path)).SerializeToString() == qdq("lm", "fp8").SerializeToString()


def test_emulated_engine_dir(tiny_engine_dir, manifest, qdq, plans, validation, tmp_path):
    """write_emulated_engine_dir emulates the plan's fp8 graphs as emulate_quantized_model does, and the rest
    of the plan (fp16) as before: an ENGINE_DIR ONNX Runtime runs like the plan's engines."""
    out = write_emulated_engine_dir(tiny_engine_dir, tmp_path / "fp8", plans["fp8"])
    emulated = json.loads((out / "manifest.json").read_text())
    assert {g: emulated["emulated_precision"][g] for g in GRAPHS} == {g: "fp8" for g in GRAPHS}
    assert emulated["emulated_precision"]["acoustic_decoder"] == "fp16"
    gp = plans["fp8"].graphs["diffusion_step"]
    model = onnx.load(str(tiny_engine_dir / "diffusion_step.onnx"))
    direct = emulate_quantized_model(model, "fp8", gp.builder["keep_fp32"], gp.builder["keep_fp32_names"],
                                     calibration=validation["diffusion_step"][0], name="diffusion_step")
    feeds = validation["diffusion_step"][0][0]
    a = _run(cpu_session(str(out / "diffusion_step.onnx")), feeds)
    b = _run(cpu_session(direct), feeds)
    np.testing.assert_array_equal(a["guided"], b["guided"])


# --- the strongly typed copy the engines are built from ------------------------------------------------

def _lowered_to_fp32(typed):
    """The strongly typed copy run in fp32 on ONNX Runtime: reduced-precision weights widened (exactly), and
    every tensor the copy holds in bf16 rounded to bf16 where it is made (a Cast pair), as the engine
    holds it."""
    low = TensorProto.BFLOAT16
    model = copy.deepcopy(typed)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(graph.output)}
    for init in graph.initializer:
        if init.data_type == low:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes, count = [], [0]

    def uid(base):
        count[0] += 1
        return f"{base}__lowered_{count[0]}"

    for node in graph.node:
        nodes.append(node)
        for k, name in enumerate(node.output):
            if types.get(name) != low:
                continue
            raw = uid(name)
            node.output[k] = raw
            if node.op_type == "Cast":  # Cast(to=bf16): the rounding itself, then back to fp32
                nodes.append(onnx.helper.make_node("Cast", [raw], [name], to=TensorProto.FLOAT, name=uid("f32")))
            else:  # computed in fp32 on the (widened) inputs, rounded like the engine's bf16 output
                mid = uid(name)
                nodes += [onnx.helper.make_node("Cast", [raw], [mid], to=low, name=uid("bf16")),
                          onnx.helper.make_node("Cast", [mid], [name], to=TensorProto.FLOAT, name=uid("f32"))]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_strongly_typed_copy_is_the_emulated_engine(qdq, plans, validation, graph, precision):
    """The graph an fp8 / int8wo engine is built from (strongly typed): it passes ONNX's strict type
    inference; its I/O stay fp32; every node the plan keeps computes in fp32 and every other compute node
    in bf16; each quantized GEMM reads its weight from a DequantizeLinear with a bf16 scale (yielding bf16);
    and run on ONNX Runtime with its bf16 tensors rounded where they are made, it gives bit for bit what
    the CPU emulation of the engine gives (which the tolerance checks above hold to the plan)."""
    from vv_export.precision import _value_types, node_kinds
    from vv_export.strong_typing import strongly_typed_model

    gp = plans[precision].graphs[graph]
    keep = (gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    q = qdq(graph, precision)
    typed = strongly_typed_model(q, ACTIVATION_PRECISION[precision], *keep)
    inferred = onnx.shape_inference.infer_shapes(typed, check_type=True, strict_mode=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in typed.graph.initializer})
    types.update({i.name: i.type.tensor_type.elem_type for i in list(typed.graph.input) + list(typed.graph.output)})
    for side in ("input", "output"):
        assert ([v.type.tensor_type.elem_type for v in getattr(typed.graph, side)] ==
                [v.type.tensor_type.elem_type for v in getattr(q.graph, side)])
    kinds = dict(zip((n.name for n in q.graph.node), node_kinds(q.graph, _value_types(q), *keep)))
    floats = (TensorProto.FLOAT, TensorProto.BFLOAT16)
    compute = {"MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "Softmax", "ReduceMean", "Sigmoid", "Sin", "Cos"}
    seen = {"kept": 0, "low": 0}
    for node in typed.graph.node:
        kind = kinds.get(node.name)
        if node.op_type not in compute or kind not in seen:
            continue
        ins = {types[i] for i in node.input if i and types.get(i) in floats}
        if not ins:
            continue  # integer arithmetic (positions, shapes)
        assert ins == ({TensorProto.FLOAT} if kind == "kept" else {TensorProto.BFLOAT16}), (node.name, kind, ins)
        seen[kind] += 1
    assert seen["kept"] > 0 and seen["low"] > 0
    def dq_gemms(model):
        producers = {o: n for n in model.graph.node for o in n.output}
        return producers, [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in producers
                           and producers[n.input[1]].op_type == "DequantizeLinear"]

    producers, gemms = dq_gemms(typed)
    assert len(gemms) == len(dq_gemms(q)[1]) > 0
    inits = {i.name: i for i in typed.graph.initializer}
    for node in gemms:
        dq = producers[node.input[1]]
        assert inits[dq.input[0]].data_type == CODE_TYPE[precision] and inits[dq.input[1]].data_type == TensorProto.BFLOAT16
        assert types[node.input[1]] == TensorProto.BFLOAT16
    feeds, _ = validation[graph]
    emulated = cpu_session(emulate_model(q, ACTIVATION_PRECISION[precision], *keep))
    lowered = cpu_session(_lowered_to_fp32(typed))
    for feed in feeds:
        want, got = _run(emulated, feed), _run(lowered, feed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{graph} {precision} {name}")


def test_typed_qdq_graph_file_is_what_a_build_uses(tiny_engine_dir, qdq, plans, tmp_path):
    """`vv-export trt` builds fp8 / int8wo engines from typed_qdq_graph_file's file: the strongly typed copy
    of the checked Q/DQ graph, its weights once, in 1 byte."""
    from vv_export.strong_typing import strongly_typed_model, typed_qdq_graph_file

    gp = plans["fp8"].graphs["lm"]
    path = tmp_path / "lm.fp8.onnx"
    typed_qdq_graph_file(tiny_engine_dir, "lm", "fp8", gp.builder, path)
    onnx.checker.check_model(str(path), full_check=True)
    want = strongly_typed_model(qdq("lm", "fp8"), "bf16", gp.builder["keep_fp32"], gp.builder["keep_fp32_names"])
    assert onnx.load(str(path)).SerializeToString() == want.SerializeToString()
    assert quantized_weight_bytes(want) == quantized_weight_bytes(qdq("lm", "fp8"))


def test_strong_typing_refuses_what_it_cannot_type(graphs):
    from vv_export.strong_typing import strongly_typed_model

    with pytest.raises(ExportError, match="strong typing: precision 'fp8'"):
        strongly_typed_model(graphs["lm"], "fp8")
    typed = strongly_typed_model(graphs["text_embed"], "bf16")  # no Q/DQ: a plain bf16 graph types as well
    assert {o.type.tensor_type.elem_type for o in typed.graph.output} == {TensorProto.FLOAT}


def test_quantized_layers_read_from_the_engine_inspector():
    """The GPU check's reading of the engine inspector (ProfilingVerbosity.DETAILED, JSON): layers whose
    tensor formats or tactic carry the quantized type; names alone (the quantized initializers are named
    `<w>__fp8`) never count."""
    from vv_export.trt_build import quantized_layers

    info = {"Layers": [
        {"Name": "/layers.0/mlp/up_proj/MatMul", "LayerType": "gemm",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP8"},
                    {"Name": "w__fp8", "Format/Datatype": "Row major linear FP8"}],
         "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear BF16"}],
         "TacticName": "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x64"},
        {"Name": "w__fp8 constant", "LayerType": "Constant",
         "Outputs": [{"Name": "w__fp8_out", "Format/Datatype": "Row major linear BF16"}], "TacticName": ""},
        {"Name": "/lm/down_proj/MatMul", "LayerType": "gemm",
         "Inputs": [{"Name": "a", "Format/Datatype": "Row major Int8 format"}], "TacticName": "sm80_gemm_i8bf16"},
        "a name only (LAYER_NAMES_ONLY)"]}
    assert quantized_layers(info, "fp8") == ["/layers.0/mlp/up_proj/MatMul"]
    assert quantized_layers(info, "int8wo") == ["/lm/down_proj/MatMul"]
    assert quantized_layers({"Layers": ["only names"]}, "fp8") == []


# --- plans and the build ------------------------------------------------------------------------------

def test_plans_resolve(manifest, plans):
    default = resolve_plan("default", manifest)
    for precision, plan in plans.items():
        assert {g: gp.precision for g, gp in plan.graphs.items() if g in GRAPHS} == {g: precision for g in GRAPHS}
        for g, gp in plan.graphs.items():
            if g not in GRAPHS:
                assert gp.precision == default.graphs[g].precision and gp.hash == default.graphs[g].hash
            assert gp.tolerance_for(gp.precision)
        assert memory_estimate(plan, manifest)["total_bytes"] < memory_estimate(default, manifest)["total_bytes"]
    # the Q/DQ rewrite's format is part of these engines' hash, not of the others'
    assert plans["fp8"].graphs["lm"].hash_payload()["qdq_format"] >= 1
    assert "qdq_format" not in default.graphs["lm"].hash_payload()


def test_plan_precision_rules(manifest):
    with pytest.raises(PlanError, match=r"--precision fp8: .*--plan fp8"):
        resolve_plan("default", manifest, precision="fp8")
    data, _ = load_plan_data("default")
    data["graphs"]["acoustic_decoder"]["precision"] = "int8wo"  # no measured tolerance for it
    with pytest.raises(PlanError) as info:
        resolve_plan(data, manifest)
    message = str(info.value)
    assert "\n" not in message and "int8wo has no tolerance for output 'audio'" in message


def test_check_precision_supported():
    with pytest.raises(ExportError) as info:
        check_precision_supported("fp8", (8, 6))
    message = str(info.value)
    assert "\n" not in message and message.startswith("fp8 needs compute capability 8.9") and "sm86" in message
    for ok in ((9, 0), (8, 9), "sm89", "sm100", (12, 0)):
        check_precision_supported("fp8", ok)
    for precision in ("int8wo", "bf16"):
        with pytest.raises(ExportError, match=f"{precision} needs compute capability 8.0"):
            check_precision_supported(precision, "sm75")
        check_precision_supported(precision, (8, 0))
    for precision in ("fp32", "fp16"):
        check_precision_supported(precision, (7, 5))


class _StubTrt:
    """TensorRT's part of build_engines replaced (as in tests/test_trt_build.py)."""

    def __init__(self, monkeypatch, cc, version="10.8.0.43"):
        self.built = []
        env = trt_build.TrtEnv(trt=types.SimpleNamespace(), version=version, major=int(version.split(".")[0]),
                               compute_capability=cc, device_name="Stub GPU")
        monkeypatch.setattr(trt_build, "trt_environment", lambda: env)
        monkeypatch.setattr(trt_build, "build_engine_bytes", self.build)

    def build(self, env, onnx_path, gp, cache_path, work, progress):
        self.built.append((gp.graph, gp.precision))
        return b"engine", trt_build._typing(env, gp), 0


def test_build_refuses_fp8_before_ampere_plus_and_names_engines(tiny_engine_dir, tmp_path, monkeypatch):
    engine_dir = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, engine_dir)
    stub = _StubTrt(monkeypatch, "sm86")
    with pytest.raises(ExportError) as info:
        build_engines(engine_dir, plan="fp8", progress=lambda line: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith("fp8 needs compute capability 8.9")
    assert "lm, diffusion_step, diffusion_sampler ask fp8" in message
    assert stub.built == [] and not (engine_dir / "trt").exists()
    # int8wo on the same GPU: built, named and recorded at its precision, strongly typed
    build_engines(engine_dir, plan="int8wo", graphs=list(GRAPHS), progress=lambda line: None)
    records = json.loads((engine_dir / "manifest.json").read_text())["trt"]["engines"]
    for g in GRAPHS:
        assert records[g]["precision"] == "int8wo" and records[g]["file"].endswith(".int8wo.engine")
        assert records[g]["typing"] == "strong"
    # TensorRT 11 (strong typing only) builds them the same way
    stub = _StubTrt(monkeypatch, "sm90", version="11.0.0.1")
    build_engines(engine_dir, plan="fp8", graphs=list(GRAPHS), force=True, progress=lambda line: None)
    assert stub.built == [(g, "fp8") for g in GRAPHS]
    # a plan that asks weak typing for them is refused in one line before anything is built
    stub = _StubTrt(monkeypatch, "sm90")
    weak = tmp_path / "weak-fp8.toml"
    weak.write_text('extends = "fp8"\n[builder]\ntyping = "weak"\n')
    with pytest.raises(ExportError, match="built strongly typed .*typing = \"weak\""):
        build_engines(engine_dir, plan=str(weak), graphs=list(GRAPHS), force=True, progress=lambda line: None)
    assert stub.built == []


# --- on a GPU: the engines against ONNX Runtime -------------------------------------------------------

_GPU_REASON = tensorrt_gpu_unavailable()
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "trt_quant_accuracy.json"


@pytest.fixture(scope="module")
def quant_engines(tiny_engine_dir, tmp_path_factory):
    """precision -> (ENGINE_DIR copy with lm/diffusion engines built at it, manifest, TrtBackend, plan file).

    The plan is "ci" (small profiles, fast builds) with the three graphs at the precision; their
    tolerances are default.toml's, which ci inherits."""
    import torch

    from vv_runtime.manifest import load_manifest
    from vv_runtime.trt_backend import TrtBackend

    major, minor = torch.cuda.get_device_capability(0)
    cache: dict = {}

    def get(precision):
        if precision == "fp8" and (major, minor) < (8, 9):
            pytest.skip(f"not applicable: fp8 needs compute capability 8.9+, this GPU is sm{major}{minor}")
        if precision not in cache:
            base = tmp_path_factory.mktemp(f"trt-{precision}")
            out = base / "tiny"
            shutil.copytree(tiny_engine_dir, out)
            plan = base / f"ci-{precision}.toml"
            plan.write_text('extends = "ci"\n' + "".join(f'[graphs.{g}]\nprecision = "{precision}"\n' for g in GRAPHS))
            start = time.time()
            summary = build_engines(out, plan=str(plan), graphs=list(GRAPHS), progress=print)
            manifest = load_manifest(out)
            backend = TrtBackend(out, manifest, graphs=GRAPHS)
            cache[precision] = (out, manifest, backend, str(plan),
                                {"build_seconds": round(time.time() - start, 1), "trt_version": summary["trt_version"],
                                 "compute_capability": summary["compute_capability"],
                                 "engine_bytes": {g: e["size_bytes"] for g, e in summary["engines"].items()}})
        return cache[precision]

    yield get
    for _, _, backend, _, _ in cache.values():
        backend.close()


@pytest.fixture(scope="module")
def gpu_results():
    data: dict = {}
    yield data
    if data:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        data["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, RESULTS)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=_GPU_REASON or "")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_quantized_engine_matches_onnxrt(graph, precision, quant_engines, tiny_engine_dir, gpu_results):
    from vv_export.accuracy import compare_outputs, run_backend, run_onnxrt

    out, manifest, backend, plan, build = quant_engines(precision)
    fp32_manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    feeds, saved = load_validation_data(tiny_engine_dir, graph)
    ort = run_onnxrt(tiny_engine_dir, fp32_manifest, graph, feeds)
    tolerance = resolve_plan(plan, manifest).graphs[graph].tolerance_for(precision)
    got = run_backend(backend, manifest, graph, feeds, name=f"tensorrt-{precision}")
    report = compare_outputs(graph, got, ort, tolerance, f"tensorrt-{precision}", "onnxrt")
    entry = {**report.to_json(), "tolerance": tolerance, "build": build}
    gpu_results.setdefault(precision, {})[graph] = entry
    assert report.passed, "; ".join(report.failures())


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=_GPU_REASON or "")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("graph", GRAPHS)
def test_quantized_engine_runs_quantized_kernels(graph, precision, quant_engines, gpu_results):
    """The engine inspector of each fixture engine lists layers computing in the quantized type (FP8 GEMMs
    for fp8, INT8 weights for int8wo): the builder kept the quantization rather than folding it away."""
    from vv_export.trt_build import engine_layer_information, quantized_layers

    out, manifest, _, _, _ = quant_engines(precision)
    record = manifest["trt"]["engines"][graph]
    assert record["typing"] == "strong"
    layers = quantized_layers(engine_layer_information((out / record["file"]).read_bytes()), precision)
    gpu_results.setdefault("kernels", {}).setdefault(precision, {})[graph] = {"quantized_layers": len(layers),
                                                                             "first": layers[:5]}
    assert layers, f"{graph} {precision}: the engine inspector shows no layer in the quantized type"


def _gemm_stack(width: int, layers: int):
    """An fp32 graph of `layers` weight GEMMs [width, width] with Relu between: the weights dominate the
    engine, so the engine sizes show the bytes per weight."""
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"/gemm{i}/MatMul"))
        x = f"m{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"/gemm{i}/Relu"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "gemm_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=_GPU_REASON or "")
def test_quantized_engines_hold_one_byte_per_weight(tmp_path, gpu_results):
    """Engine sizes: a stack of 8 GEMMs of 2048 x 2048 (67 MB of bf16 weights) built strongly typed as the
    plans build them (bf16; fp8 and int8wo Q/DQ copies typed in bf16): each quantized engine at most 0.65x
    the bf16 one (1 byte per weight against 2), and its inspector lists the quantized kernels. An int8wo
    engine as large as the bf16 one means TensorRT dequantized the INT8 weights into a bf16 GEMM at build
    time (it documents weight-only kernels for INT4 blocks): the plan then saves no memory."""
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    from vv_export.graph_rules import save_graph
    from vv_export.strong_typing import strongly_typed_model
    from vv_export.trt_build import engine_layer_information, quantized_layers

    width, layers = 2048, 8
    model = _gemm_stack(width, layers)
    calibration = [{"x": np.random.default_rng(1).standard_normal((8, width)).astype(np.float32)}]
    major, minor = torch.cuda.get_device_capability(0)
    precisions = ["bf16", "int8wo"] + (["fp8"] if (major, minor) >= (8, 9) else [])
    sizes, kernels = {}, {}
    for precision in precisions:
        if precision == "bf16":
            typed = strongly_typed_model(model, "bf16")
        else:
            quantized = qdq_model(model, precision, calibration if precision == "fp8" else None, name="gemm_stack")
            typed = strongly_typed_model(quantized, ACTIVATION_PRECISION[precision])
        path = tmp_path / f"gemm_stack.{precision}.onnx"
        save_graph(typed, path)
        profile = Profile().add("x", min=[1, width], opt=[8, width], max=[32, width])
        builder, network, parser = NetworkFromOnnxPath(str(path), strongly_typed=True)()
        config = CreateConfig(profiles=[profile], profiling_verbosity=trt.ProfilingVerbosity.DETAILED)(builder, network)
        engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
        sizes[precision] = len(bytes(memoryview(engine)))
        if precision != "bf16":
            kernels[precision] = len(quantized_layers(engine_layer_information(engine), precision))
    ratios = {p: round(sizes[p] / sizes["bf16"], 3) for p in precisions if p != "bf16"}
    gpu_results["engine_sizes"] = {"model": f"{layers} GEMMs {width}x{width}", "bytes": sizes,
                                   "ratio_to_bf16": ratios, "quantized_layers": kernels,
                                   "compute_capability": f"sm{major}{minor}"}
    for precision, ratio in ratios.items():
        assert kernels[precision] > 0, f"{precision}: the engine inspector shows no quantized layer"
        assert ratio <= 0.65, (f"{precision} engine is {ratio}x the bf16 one ({sizes[precision]} vs {sizes['bf16']} "
                               f"bytes): its weights are not stored in 1 byte")
