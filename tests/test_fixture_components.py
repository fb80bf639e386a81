"""Every component output of the original implementation, reproduced by the exported graphs under ORT.

Reference: ../shared/fixtures/vibevoice-tiny-original/reference_outputs.safetensors, computed by
Microsoft's implementation. Tolerances: the graphs compute in fp32 like the reference, so only
operator order differs; errors are bounded relative to each tensor's peak magnitude:
- 1e-5 x peak for shallow graphs (connectors, diffusion head, conv stacks),
- 1e-4 x peak for the LM (softmax/RMSNorm over layers) and the decoder fed latents through the
  latent scale/bias round trip (the graph takes diffusion-space latents and un-scales them).
"""

import numpy as np
import onnxruntime as ort
import pytest

CONTROL = ("speech_start", "speech_end", "speech_diffusion", "eos")


def _session(engine_dir, name):
    return ort.InferenceSession(str(engine_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _close(got, ref, rel):
    peak = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert got.shape == ref.shape
    assert err <= rel * peak + 1e-6, f"max error {err:.3g} > {rel:g} x peak {peak:.3g}"


@pytest.fixture(scope="module")
def ctx(tiny_engine_dir, fixture_reference):
    import json

    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    return tiny_engine_dir, manifest, fixture_reference[1]


def test_lm_prefill_and_decode_reproduce_hidden_states_and_control_logits(ctx):
    engine_dir, manifest, ref = ctx
    lm = _session(engine_dir, "lm")
    m = manifest["model"]
    embeds = ref["lm.inputs_embeds"]
    seq = embeds.shape[1]
    control = [manifest["tokens"][k] for k in CONTROL]
    assert manifest["control_tokens"] == list(CONTROL)
    empty = np.zeros((m["num_layers"], 2, 1, m["num_kv_heads"], 0, m["head_dim"]), np.float32)
    # prefill of the whole sequence
    hidden, logits, kv = lm.run(None, {"inputs_embeds": embeds, "attention_mask": np.ones((1, seq), np.int64),
                                       "position_ids": np.arange(seq)[None], "past_kv": empty})
    _close(hidden, ref["lm.last_hidden_state"][:, -1], 1e-4)
    _close(logits, ref["lm.logits"][:, -1, control], 1e-4)
    # prefill 3 positions, then decode one position at a time through the cache
    _, _, cache = lm.run(None, {"inputs_embeds": embeds[:, :3], "attention_mask": np.ones((1, 3), np.int64),
                                "position_ids": np.arange(3)[None], "past_kv": empty})
    for p in range(3, seq):
        hidden, logits, new = lm.run(None, {"inputs_embeds": embeds[:, p:p + 1],
                                            "attention_mask": np.ones((1, p + 1), np.int64),
                                            "position_ids": np.array([[p]]), "past_kv": cache})
        cache = np.concatenate([cache, new], axis=4)
        _close(hidden, ref["lm.last_hidden_state"][:, p], 1e-4)
        _close(logits, ref["lm.logits"][:, p, control], 1e-4)


def test_text_embed_rows_are_the_lm_inputs_of_the_tokens(ctx, fixture_dir):
    engine_dir, manifest, ref = ctx
    from safetensors.numpy import load_file

    table = load_file(str(fixture_dir / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    ids = np.array([[0, 5, manifest["tokens"]["speech_start"], manifest["tokens"]["eos"]]], np.int64)
    (embeds,) = _session(engine_dir, "text_embed").run(None, {"input_ids": ids})
    np.testing.assert_array_equal(embeds[0], table[ids[0]].astype(np.float32))


def test_acoustic_encoder_mean_and_voice_embeddings(ctx):
    engine_dir, manifest, ref = ctx
    mean, embeds = _session(engine_dir, "acoustic_encoder").run(None, {"audio": ref["acoustic_encoder.audio"]})
    _close(mean, ref["acoustic_encoder.mean"], 1e-5)
    m = manifest["model"]
    (connected,) = _session(engine_dir, "acoustic_connector").run(
        None, {"latent": (ref["acoustic_encoder.mean"] + m["latent_bias_factor"]) * m["latent_scaling_factor"]})
    _close(embeds, connected, 1e-5)


def test_acoustic_decoder_streamed_frame_by_frame(ctx):
    engine_dir, manifest, ref = ctx
    m = manifest["model"]
    dec = _session(engine_dir, "acoustic_decoder")
    latents = ref["acoustic_decoder.latents"]
    state = np.zeros((1, m["decoder_state_size"]), np.float32)
    chunks = []
    for f in range(latents.shape[1]):
        scaled = (latents[:, f:f + 1] + m["latent_bias_factor"]) * m["latent_scaling_factor"]
        audio, state = dec.run(None, {"latent": scaled.astype(np.float32), "state": state})
        assert audio.shape == (1, 1, m["hop_length"])
        chunks.append(audio)
    streamed = np.concatenate(chunks, axis=-1)
    _close(streamed, ref["acoustic_decoder.audio_streamed"], 1e-4)
    _close(streamed, ref["acoustic_decoder.audio"], 1e-4)  # causal: streaming == whole-sequence decoding


def test_semantic_encoder_streamed_chunk_by_chunk(ctx):
    engine_dir, manifest, ref = ctx
    m = manifest["model"]
    sem = _session(engine_dir, "semantic_encoder")
    audio = ref["acoustic_encoder.audio"]  # the same audio as the semantic reference (shared/README.md)
    state = np.zeros((1, m["semantic_state_size"]), np.float32)
    feats, embeds = [], []
    for f in range(audio.shape[-1] // m["hop_length"]):
        chunk = audio[:, :, f * m["hop_length"]:(f + 1) * m["hop_length"]]
        features, embed, state = sem.run(None, {"audio": chunk, "state": state})
        feats.append(features)
        embeds.append(embed)
    features = np.concatenate(feats, axis=1)
    _close(features, ref["semantic_encoder.mean_streamed"], 1e-5)
    _close(features, ref["semantic_encoder.mean"], 1e-5)
    (connected,) = _session(engine_dir, "semantic_connector").run(None, {"features": features})
    _close(np.concatenate(embeds, axis=1), connected, 1e-5)


def test_connectors(ctx):
    engine_dir, _, ref = ctx
    (a,) = _session(engine_dir, "acoustic_connector").run(None, {"latent": ref["acoustic_connector.in"]})
    _close(a, ref["acoustic_connector.out"], 1e-5)
    (s,) = _session(engine_dir, "semantic_connector").run(None, {"features": ref["semantic_connector.in"]})
    _close(s, ref["semantic_connector.out"], 1e-5)


def test_diffusion_head_through_the_cfg_step(ctx):
    """With cfg_scale 1 the guided output is the positive branch: the head evaluation itself."""
    engine_dir, _, ref = ctx
    cond = ref["prediction_head.condition"]
    (out,) = _session(engine_dir, "diffusion_step").run(None, {
        "sample": ref["prediction_head.noisy"], "timestep": ref["prediction_head.t"].astype(np.float32),
        "pos_condition": cond, "neg_condition": np.zeros_like(cond), "cfg_scale": np.array([1.0], np.float32)})
    _close(out, ref["prediction_head.out"], 1e-5)
