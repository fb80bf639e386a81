"""VibeVoice-Realtime-0.5B export (`vv-export onnx` on a `model_type: vibevoice_streaming` checkpoint).

Every graph of the streaming family's ENGINE_DIR, run in ONNX Runtime, against the reference outputs of
Microsoft's streaming code in ../shared/fixtures/vibevoice-realtime-tiny-original (reference_outputs.safetensors).
Tolerances as for the 1.5B's components (test_fixture_components.py): the graphs compute in fp32 like the
reference, so only operator order differs; errors relative to each tensor's peak:
- 1e-5 x peak for shallow graphs (connector, diffusion head),
- 1e-4 x peak for the LMs (softmax/RMSNorm over layers, through the KV cache), the acoustic decoder fed
  latents through the latent scale/bias round trip, and the sampler (5 unrolled head evaluations).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

VV_EXPORT = Path(sys.executable).with_name("vv-export")
GRAPHS = {"text_embed": "loop", "text_lm": "loop", "tts_lm": "loop", "acoustic_decoder": "per-frame",
          "acoustic_connector": "auxiliary", "diffusion_sampler": "per-frame"}
MODEL_FIELDS = ("hidden_size", "text_lm_layers", "tts_lm_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                "acoustic_vae_dim", "max_position_embeddings", "hop_length", "sample_rate", "vocab_size")


def _run_export(*args):
    return subprocess.run([str(VV_EXPORT), "onnx", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def _session(engine_dir, name):
    return ort.InferenceSession(str(engine_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _close(got, ref, rel):
    peak = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert got.shape == ref.shape
    assert err <= rel * peak + 1e-6, f"max error {err:.3g} > {rel:g} x peak {peak:.3g}"


def _empty_cache(manifest, layers_key, rows=1):
    m = manifest["model"]
    return np.zeros((m[layers_key], 2, rows, m["num_kv_heads"], 0, m["head_dim"]), np.float32)


@pytest.fixture(scope="module")
def ctx(realtime_engine_dir, realtime_reference):
    manifest = json.loads((realtime_engine_dir / "manifest.json").read_text())
    return realtime_engine_dir, manifest, realtime_reference[1]


# --- the CLI and the manifest --------------------------------------------------------------------

def test_cli_recognises_the_streaming_checkpoint(realtime_fixture_dir, realtime_reference, tmp_path):
    out = tmp_path / "rt"
    proc = _run_export("--model", realtime_fixture_dir, "--out", out, "--no-validate")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_family"] == "vibevoice_streaming"
    assert manifest["format"] == "vibevoice-trt/engine-dir" and manifest["format_version"] == 1
    assert {g: e["role"] for g, e in manifest["graphs"].items()} == GRAPHS
    assert all((out / e["file"]).exists() for e in manifest["graphs"].values())
    assert (out / "tokenizer.json").exists()
    assert manifest["diffusion"]["steps"] == 5 and len(manifest["diffusion"]["timesteps"]) == 5  # the family's
    assert manifest["graphs"]["diffusion_sampler"]["steps"] == 5
    ref = realtime_reference[0]
    special = ref["special_tokens"]
    assert manifest["tokens"] == {"endoftext": special["endoftext"], "pad": special["image_pad"]}
    assert "control_tokens" not in manifest and "prompt" not in manifest


def test_manifest_says_the_family_and_its_facts(ctx, realtime_reference):
    engine_dir, manifest, _ = ctx
    ref = realtime_reference[0]
    assert manifest["model_family"] == "vibevoice_streaming"
    m = manifest["model"]
    assert set(MODEL_FIELDS) <= set(m)
    assert (m["text_lm_layers"], m["tts_lm_layers"]) == (ref["layers"]["lower"], ref["layers"]["tts"])
    assert (m["hidden_size"], m["num_attention_heads"], m["num_kv_heads"], m["head_dim"]) == (64, 4, 2, 16)
    assert (m["acoustic_vae_dim"], m["vocab_size"], m["max_position_embeddings"]) == (16, 320, 8192)
    assert (m["hop_length"], m["sample_rate"]) == (ref["hop"], ref["sample_rate"])
    assert m["decoder_state_size"] == manifest["graphs"]["acoustic_decoder"]["inputs"][1]["shape"][1]
    assert manifest["streaming"] == {"text_window": ref["generate"]["text_window"],
                                     "speech_window": ref["generate"]["speech_window"],
                                     "decode_frames": ref["generate"]["speech_window"]}
    assert manifest["diffusion"]["steps"] == ref["generate"]["diffusion_steps"]
    assert manifest["diffusion"]["default_cfg_scale"] == ref["generate"]["cfg_scale"]
    for name in GRAPHS:
        assert manifest["graphs"][name]["validated_max_abs_error"]  # validated against PyTorch
        assert (engine_dir / "validation" / f"{name}.inputs.json").exists()
    # the I/O of the contract, in its dimension names
    io = {g: ({i["name"]: i["shape"] for i in e["inputs"]}, {o["name"]: o["shape"] for o in e["outputs"]})
          for g, e in manifest["graphs"].items()}
    Lt, Ls, KV, D, H = m["text_lm_layers"], m["tts_lm_layers"], m["num_kv_heads"], m["head_dim"], m["hidden_size"]
    assert io["text_lm"] == ({"inputs_embeds": ["batch", "seq", H], "attention_mask": ["batch", "total"],
                              "position_ids": ["batch", "seq"], "past_kv": [Lt, 2, "batch", KV, "past", D]},
                             {"hidden": ["batch", "seq", H], "new_kv": [Lt, 2, "batch", KV, "seq", D]})
    assert io["tts_lm"] == ({"inputs_embeds": ["batch", "seq", H], "input_types": ["batch", "seq"],
                             "attention_mask": ["batch", "total"], "position_ids": ["batch", "seq"],
                             "past_kv": [Ls, 2, "batch", KV, "past", D]},
                            {"hidden": ["batch", "seq", H], "eos_logit": ["batch", "seq", 1],
                             "new_kv": [Ls, 2, "batch", KV, "seq", D]})
    A, S = m["acoustic_vae_dim"], m["decoder_state_size"]
    assert io["acoustic_decoder"] == ({"latent": ["batch", "decode_frames", A], "state": ["batch", S]},
                                      {"audio": ["batch", 1, "decode_samples"], "new_state": ["batch", S]})
    int64 = {(g, i["name"]) for g, e in manifest["graphs"].items() for i in e["inputs"] if i["dtype"] == "int64"}
    assert int64 == {("text_embed", "input_ids"), ("text_lm", "attention_mask"), ("text_lm", "position_ids"),
                     ("tts_lm", "input_types"), ("tts_lm", "attention_mask"), ("tts_lm", "position_ids")}


# --- every graph against Microsoft's code --------------------------------------------------------

def test_text_embed_rows_are_the_embedding_table(ctx, realtime_fixture_dir):
    engine_dir, manifest, _ = ctx
    from safetensors.numpy import load_file

    table = load_file(str(realtime_fixture_dir / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    ids = np.array([[0, 7, manifest["tokens"]["pad"], manifest["tokens"]["endoftext"]]], np.int64)
    (embeds,) = _session(engine_dir, "text_embed").run(None, {"input_ids": ids})
    np.testing.assert_array_equal(embeds[0], table[ids[0]])


def test_text_lm_reproduces_the_lower_lm_whole_and_in_windows(ctx):
    """Every position's hidden state without the final norm, prefilled at once or window by window."""
    engine_dir, manifest, ref = ctx
    lm = _session(engine_dir, "text_lm")
    embeds, expected = ref["lm.inputs_embeds"], ref["lm.last_hidden_state"]
    seq = embeds.shape[1]
    hidden, kv = lm.run(None, {"inputs_embeds": embeds, "attention_mask": np.ones((1, seq), np.int64),
                               "position_ids": np.arange(seq)[None], "past_kv": _empty_cache(manifest, "text_lm_layers")})
    _close(hidden, expected, 1e-4)
    assert kv.shape[4] == seq
    window = manifest["streaming"]["text_window"]
    cache, start = _empty_cache(manifest, "text_lm_layers"), 0
    while start < seq:
        stop = min(start + window, seq)
        hidden, new = lm.run(None, {"inputs_embeds": embeds[:, start:stop],
                                    "attention_mask": np.ones((1, stop), np.int64),
                                    "position_ids": np.arange(start, stop)[None], "past_kv": cache})
        _close(hidden, expected[:, start:stop], 1e-4)
        cache, start = np.concatenate([cache, new], axis=4), stop
    _close(cache, kv, 1e-4)


def test_tts_lm_reproduces_hidden_states_and_end_of_speech_logits(ctx):
    """Type embedding inside the graph, every position's normed hidden state and its eos logit, all positions
    in one call and one position at a time through the cache (as the loop steps speech frames)."""
    engine_dir, manifest, ref = ctx
    tts = _session(engine_dir, "tts_lm")
    embeds, types = ref["tts_lm.inputs_embeds"], ref["tts_lm.types"]
    expected, eos = ref["tts_lm.last_hidden_state"], ref["tts_lm.eos_logit"]
    assert set(np.unique(types)) == {0, 1}  # text and speech positions both
    seq = embeds.shape[1]
    hidden, logit, kv = tts.run(None, {"inputs_embeds": embeds, "input_types": types,
                                       "attention_mask": np.ones((1, seq), np.int64),
                                       "position_ids": np.arange(seq)[None],
                                       "past_kv": _empty_cache(manifest, "tts_lm_layers")})
    assert hidden.shape == expected.shape and logit.shape == eos.shape
    _close(hidden, expected, 1e-4)
    _close(logit, eos, 1e-4)
    _, _, cache = tts.run(None, {"inputs_embeds": embeds[:, :3], "input_types": types[:, :3],
                                 "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.arange(3)[None],
                                 "past_kv": _empty_cache(manifest, "tts_lm_layers")})
    for p in range(3, seq):
        hidden, logit, new = tts.run(None, {"inputs_embeds": embeds[:, p:p + 1], "input_types": types[:, p:p + 1],
                                            "attention_mask": np.ones((1, p + 1), np.int64),
                                            "position_ids": np.array([[p]]), "past_kv": cache})
        cache = np.concatenate([cache, new], axis=4)
        _close(hidden, expected[:, p:p + 1], 1e-4)
        _close(logit, eos[:, p:p + 1], 1e-4)
    _close(cache, kv, 1e-4)


def _tts_calls(engine_dir, manifest):
    """(prefill(embeds, types, n): the cache of the first n positions, step(embeds, types, mask, positions,
    cache): the tts_lm outputs) on the exported graph."""
    tts = _session(engine_dir, "tts_lm")

    def prefill(embeds, types, n):
        return tts.run(None, {"inputs_embeds": embeds[:, :n], "input_types": types[:, :n],
                              "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None],
                              "past_kv": _empty_cache(manifest, "tts_lm_layers")})[2]

    def step(e, t, mask, pos, cache):
        return tts.run(None, {"inputs_embeds": e, "input_types": t, "attention_mask": mask, "position_ids": pos,
                              "past_kv": cache})

    return prefill, step


def test_tts_lm_frame_and_text_window_in_one_call(ctx):
    """The loop's joined call: the positive row takes a frame then a 5-token text window, the negative row the
    frame then 5 zero inputs. The positive row's positions equal the frame step followed by the window alone,
    the negative row's frame equals its step alone (the zeros after it change nothing it returns)."""
    engine_dir, manifest, ref = ctx
    prefill, step = _tts_calls(engine_dir, manifest)
    embeds, types = ref["tts_lm.inputs_embeds"], ref["tts_lm.types"]
    cache = prefill(embeds, types, 1)
    frame, window = (embeds[:, 1:2], types[:, 1:2]), (embeds[:, 2:7], types[:, 2:7])
    alone_frame = step(*frame, np.ones((1, 2), np.int64), np.array([[1]]), cache)
    alone_window = step(*window, np.ones((1, 7), np.int64), np.arange(2, 7)[None],
                        np.concatenate([cache, alone_frame[2]], axis=4))
    negative = (np.concatenate([frame[0], np.zeros_like(window[0])], axis=1),
                np.concatenate([frame[1], np.zeros_like(window[1])], axis=1))
    joined = step(np.concatenate([embeds[:, 1:7], negative[0]]), np.concatenate([types[:, 1:7], negative[1]]),
                  np.ones((2, 7), np.int64), np.array([list(range(1, 7)), [1] * 6]), np.concatenate([cache, cache], 2))
    hidden, logit, new_kv = joined
    assert hidden.shape[:2] == logit.shape[:2] == (2, 6)
    _close(hidden[:1, :1], alone_frame[0], 1e-5)
    _close(logit[:1, :1], alone_frame[1], 1e-5)
    _close(hidden[:1, 1:], alone_window[0], 1e-5)
    _close(new_kv[:, :, :1], np.concatenate([alone_frame[2], alone_window[2]], axis=4), 1e-5)
    _close(hidden[1:, :1], alone_frame[0], 1e-5)
    _close(new_kv[:, :, 1:, :, :1], alone_frame[2], 1e-5)


def test_tts_lm_rows_of_different_lengths_equal_each_alone(ctx):
    """A positive row over a long cache and a negative-like row over a short one (its free slots masked)
    in one call: each row's outputs equal the row run alone."""
    engine_dir, manifest, ref = ctx
    prefill, step = _tts_calls(engine_dir, manifest)
    embeds, types = ref["tts_lm.inputs_embeds"], ref["tts_lm.types"]
    long, short = prefill(embeds, types, 6), prefill(embeds, types, 1)
    e, t = embeds[:, 6:7], types[:, 6:7]
    alone_long = step(e, t, np.ones((1, 7), np.int64), np.array([[6]]), long)
    alone_short = step(e, t, np.ones((1, 2), np.int64), np.array([[1]]), short)
    padded = np.concatenate([short, np.zeros_like(long[:, :, :, :, :5])], axis=4)  # 1 real slot, 5 free
    mask = np.array([[1] * 7, [1, 0, 0, 0, 0, 0, 1]], np.int64)
    both = step(np.concatenate([e, e]), np.concatenate([t, t]), mask, np.array([[6], [1]]),
                np.concatenate([long, padded], axis=2))
    for got, a, b in zip(both, alone_long, alone_short):
        _close(got[:1] if got.ndim < 6 else got[:, :, :1], a, 1e-5)
        _close(got[1:] if got.ndim < 6 else got[:, :, 1:], b, 1e-5)


def test_acoustic_decoder_streamed_frame_by_frame(ctx):
    engine_dir, manifest, ref = ctx
    m = manifest["model"]
    dec = _session(engine_dir, "acoustic_decoder")
    latents = ref["acoustic_decoder.latents"]
    state = np.zeros((1, m["decoder_state_size"]), np.float32)
    chunks = []
    for f in range(latents.shape[1]):
        # the graph takes diffusion-space latents (the sampler's): scaled as the original un-scales them
        scaled = (latents[:, f:f + 1] + m["latent_bias_factor"]) * m["latent_scaling_factor"]
        audio, state = dec.run(None, {"latent": scaled.astype(np.float32), "state": state})
        assert audio.shape == (1, 1, m["hop_length"])
        chunks.append(audio)
    streamed = np.concatenate(chunks, axis=-1)
    _close(streamed, ref["acoustic_decoder.audio_streamed"], 1e-4)
    _close(streamed, ref["acoustic_decoder.audio"], 1e-4)


def test_acoustic_connector(ctx):
    engine_dir, _, ref = ctx
    (out,) = _session(engine_dir, "acoustic_connector").run(None, {"latent": ref["acoustic_connector.in"]})
    _close(out, ref["acoustic_connector.out"], 1e-5)


@pytest.fixture(scope="module")
def loaded(realtime_fixture_dir):
    from vv_export.families import load_checkpoint

    return load_checkpoint(str(realtime_fixture_dir))


def test_prediction_head_through_a_one_step_sampler(loaded, realtime_reference, tmp_path):
    """The loaded head reproduces the original's evaluation; and a 1-step sampler graph (t = 999, the
    reference's first row) in ONNX Runtime gives it back: latent = ratio x + d0 (alpha x - sigma v)."""
    from vv_export.onnx_export import export_graph
    from vv_export.realtime import RealtimeContext
    from vv_export.specs import diffusion_sampler_spec

    ref = realtime_reference[1]
    noisy, t, cond = (ref[f"prediction_head.{k}"] for k in ("noisy", "t", "condition"))
    head = loaded.model.model.diffusion_head
    with torch.no_grad():
        out = head(torch.from_numpy(noisy), torch.from_numpy(t), torch.from_numpy(cond)).numpy()
    _close(out, ref["prediction_head.out"], 1e-5)

    one = RealtimeContext(loaded, diffusion_steps=1)
    c = one.coefficients
    assert c["timesteps"] == [int(t[0])]
    spec = diffusion_sampler_spec(one)
    export_graph(spec, one, tmp_path, "fp32")
    latent, _ = _session(tmp_path, spec.name).run(None, {
        "noise": noisy[:1], "pos_condition": cond[:1], "neg_condition": np.zeros_like(cond[:1]),
        "cfg_scale": np.array([1.0], np.float32)})  # cfg 1: the positive branch alone
    x = noisy[:1].astype(np.float64)
    v = (c["alpha"][0] * x - (latent - c["ratio"][0] * x) / c["d0"][0]) / c["sigma"][0]
    _close(v.astype(np.float32), ref["prediction_head.out"][:1], 1e-5)


def test_sampler_is_the_dpm_solver_loop_over_the_head(ctx, loaded):
    """The ENGINE_DIR's 5-step sampler with CFG equals the DPM-Solver++ loop of the manifest's coefficients
    over the head's own forward (transformers' module, not the exporter's re-wired copy)."""
    engine_dir, manifest, _ = ctx
    diffusion = manifest["diffusion"]
    c, steps, cfg = diffusion["coefficients"], diffusion["timesteps"], diffusion["default_cfg_scale"]
    gen = torch.Generator().manual_seed(3)
    H, A = manifest["model"]["hidden_size"], manifest["model"]["acoustic_vae_dim"]
    noise, pos, neg = torch.randn(2, A, generator=gen), torch.randn(2, H, generator=gen), torch.randn(2, H, generator=gen)
    latent, embed = _session(engine_dir, "diffusion_sampler").run(None, {
        "noise": noise.numpy(), "pos_condition": pos.numpy(), "neg_condition": neg.numpy(),
        "cfg_scale": np.array([cfg], np.float32)})
    head = loaded.model.model.diffusion_head
    x, prev = noise.double(), None
    with torch.no_grad():
        for k, t in enumerate(steps):
            both = head(torch.cat([x, x]).float(), torch.full((4,), float(t)), torch.cat([pos, neg])).double()
            v = both[2:] + cfg * (both[:2] - both[2:])
            x0 = c["alpha"][k] * x - c["sigma"][k] * v
            new = c["ratio"][k] * x + c["d0"][k] * x0
            if c["d1"][k]:
                new = new + c["d1"][k] * (x0 - prev)
            x, prev = new, x0
    _close(latent, x.float().numpy(), 1e-4)
    (connected,) = _session(engine_dir, "acoustic_connector").run(None, {"latent": latent[:, None]})
    _close(embed, connected[:, 0], 1e-5)


# --- checkpoints ---------------------------------------------------------------------------------

def _checkpoint_copy(realtime_fixture_dir, tmp_path, change_tensors=None, change_config=None) -> Path:
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(parents=True)
    shutil.copy(realtime_fixture_dir / "tokenizer.json", ckpt / "tokenizer.json")
    cfg = json.loads((realtime_fixture_dir / "config.json").read_text())
    if change_config:
        change_config(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(realtime_fixture_dir / "model.safetensors"))
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))
    return ckpt


def test_checkpoint_missing_a_required_tensor_is_one_line(realtime_fixture_dir, tmp_path):
    ckpt = _checkpoint_copy(realtime_fixture_dir, tmp_path,
                            change_tensors=lambda t: t.pop("tts_eos_classifier.fc2.weight"))
    out = tmp_path / "out"
    proc = _run_export("--model", ckpt, "--out", out)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("error: checkpoint lacks 1 tensors the model needs, e.g. 'tts_eos_classifier.fc2.weight'"), \
        proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_unused_tensors_are_skipped_and_foreign_ones_refused(realtime_fixture_dir, tmp_path):
    """An acoustic encoder (unused: voices are presets) loads; a semantic tokenizer (the 1.5B's) does not."""
    from vv_export.families import load_checkpoint
    from vv_export.errors import ExportError

    def add_encoder(t):
        t["model.acoustic_tokenizer.encoder.head.conv.conv.weight"] = torch.zeros(16, 64, 7)

    loaded = load_checkpoint(str(_checkpoint_copy(realtime_fixture_dir, tmp_path / "a", change_tensors=add_encoder)))
    assert loaded.family == "vibevoice_streaming"
    assert not any("encoder" in name for name in loaded.model.state_dict())

    def add_semantic(t):
        t["model.semantic_connector.fc1.weight"] = torch.zeros(64, 32)

    with pytest.raises(ExportError, match=r"1 tensors a vibevoice_streaming model does not know, e\.g\. "
                                          r"'model\.semantic_connector\.fc1\.weight'"):
        load_checkpoint(str(_checkpoint_copy(realtime_fixture_dir, tmp_path / "b", change_tensors=add_semantic)))


@pytest.mark.parametrize("layers", [0, 4, "2"])
def test_bad_layer_split_is_one_line(realtime_fixture_dir, tmp_path, layers):
    from vv_export.families import load_checkpoint
    from vv_export.errors import ExportError

    ckpt = tmp_path / "c"
    ckpt.mkdir()
    cfg = json.loads((realtime_fixture_dir / "config.json").read_text())
    cfg["tts_backbone_num_hidden_layers"] = layers
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="tts_backbone_num_hidden_layers .* must be at least 1 and below "
                                          "decoder_config.num_hidden_layers 4") as info:
        load_checkpoint(str(ckpt))
    assert "\n" not in str(info.value)


# --- quantization and random models ---------------------------------------------------------------

def test_quantize_int8_covers_the_streaming_lms(loaded, tmp_path):
    from vv_export.onnx_export import export_onnx
    from vv_export.quantize import TOLERANCES

    out = export_onnx(loaded, tmp_path / "q", progress=False, quantize="int8", quantize_select="all")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("text_lm", "tts_lm", "diffusion_sampler"):
        q = manifest["graphs"][name]["quantization"]
        assert q["status"] == "quantized" and q["bits"] == 8 and q["nodes_quantized"] > 0, (name, q)
        tol = TOLERANCES[8][name]
        assert all(t == tol for t in manifest["graphs"][name]["tolerance"].values())
        assert q["weight_bytes_after"] < q["weight_bytes_before"]
    assert manifest["graphs"]["text_embed"]["quantization"]["status"] == "fp32"  # a gather: nothing to quantize


def test_random_models_of_the_architecture(reference_dir):
    """The tiny random model's graphs run (PyTorch); the full-size config gives the shipped presets' shapes
    (lower LM 4 layers, TTS LM 20, 2 KV heads of 64, hidden 896) without allocating the weights."""
    from vv_export import realtime
    from vv_export.specs import sample_inputs

    tiny = realtime.tiny_random_realtime_model(seed=0)
    assert tiny.family == realtime.FAMILY and set(tiny.token_ids) == {"endoftext", "pad"}
    ctx = realtime.RealtimeContext(tiny)
    for spec in realtime.build_specs(ctx):
        dims = spec.shapes[0]
        feeds = sample_inputs(spec, ctx, dims, seed=0)
        with torch.no_grad():
            outs = spec.build(ctx)(*[feeds[io.name] for io in spec.inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert [tuple(o.shape) for o in outs] == [spec.concrete(io, dims) for io in spec.outputs], spec.name
        assert all(torch.isfinite(o).all() for o in outs)

    config = json.loads((reference_dir / "vibevoice-realtime-0.5b-config.json").read_text())
    kwargs = realtime.config_kwargs(config)
    with torch.device("meta"):
        net = realtime.build_model(kwargs)
    body = net.model
    assert (len(body.language_model.layers), len(body.tts_language_model.layers)) == (4, 20)
    k_proj = body.tts_language_model.layers[0].self_attn.k_proj
    assert tuple(k_proj.weight.shape) == (2 * 64, 896)
    assert body.tts_language_model.embed_tokens is None
    lm_params = sum(p.numel() for p in body.language_model.parameters()) + sum(
        p.numel() for p in body.tts_language_model.parameters())
    assert 490e6 < lm_params < 500e6  # Qwen2.5-0.5B: 494 M with its embedding
