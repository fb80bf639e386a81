"""One spec per exported graph: I/O names, named dynamic dimensions, wrapper, sample inputs, tolerance.

Dimension names are defined once (`DIMS`) and reused for ONNX dynamic axes, the manifest (which the
TensorRT plans resolve profiles against) and the validation shapes.

Tolerances are checked as ``max|onnx - torch| <= atol + rtol * max|torch|`` per output, on the fp32
graphs that ONNX Runtime runs on the CPU. Both sides compute in fp32 with the same weights (for
--dtype fp16/bf16 the PyTorch reference uses the same rounded weights), so the differences come from
operator order and fused kernels only: ~1e-6 relative per op, growing with depth. The LM (up to 28
layers, softmax + RMSNorm) and the sampler (10 unrolled head evaluations, whose x0 steps amplify
differences by up to ~1/sigma_min) get the widest bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import wrappers
from .engine_dir import CONTROL_TOKENS, PROMPT
from .schedule import dpm_solver_coefficients

DIMS = {
    "batch": "rows of one call (for lm: positive and negative CFG rows together)",
    "seq": "new positions of an lm call (prompt length at prefill, 1 when decoding)",
    "past": "cached positions before this lm call",
    "total": "past + seq: the attention mask's length",
    "samples": "voice prompt samples (a multiple of the hop length)",
    "frames": "latent frames (samples / hop length)",
    "decode_frames": "consecutive latent frames of one job that one streaming acoustic_decoder call decodes",
    "decode_samples": "audio samples of those frames (decode_frames x hop length)",
}

# frames of one job the grouped acoustic_decoder (Realtime-0.5B) takes per call at most, by default: a speech
# window's, so the weights are read once per window (manifest streaming.decode_frames; vv-run --decode-frames)
DECODE_FRAMES = 6
DEFAULT_DIFFUSION_STEPS = 10  # VibeVoice's DPM-Solver++ steps
DEFAULT_CFG_SCALE = 1.3  # ... and its classifier-free guidance scale
SAMPLE_RATE = 24000  # Hz: the acoustic tokenizer's audio rate (hop_length samples per latent frame)


@dataclass
class IO:
    name: str
    shape: tuple  # ints and dimension names
    dtype: str = "float32"


@dataclass
class GraphSpec:
    name: str
    inputs: list[IO]
    outputs: list[IO]
    build: Callable  # (ctx) -> torch module
    # validation shapes: each a dict of dimension values
    shapes: list[dict]
    tolerance: dict  # output -> {"atol", "rtol"}
    sample: Callable | None = None  # (ctx, dims, generator) -> dict of tensors; default: random normal
    extra: dict = field(default_factory=dict)
    # how the generation loop uses the graph (vv_export.engine_dir.ROLES): "loop" (called outside the
    # per-frame path), "per-frame" (once per audio frame, CUDA-graph replayed), "auxiliary" (not called)
    role: str = "auxiliary"

    def dynamic_axes(self) -> dict:
        axes = {}
        for io in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(io.shape) if isinstance(d, str)}
            if named:
                axes[io.name] = named
        return axes

    def concrete(self, io: IO, dims: dict) -> tuple:
        return tuple(dims[d] if isinstance(d, str) else d for d in io.shape)

    def manifest_entry(self) -> dict:
        def one(io):
            return {"name": io.name, "dtype": io.dtype, "shape": list(io.shape)}

        return {"inputs": [one(i) for i in self.inputs], "outputs": [one(o) for o in self.outputs],
                "tolerance": self.tolerance, **self.extra}


class ContextBase:
    """What the graph specs of every model family need: the loaded model, the text LM's shape, the
    acoustic decoder's state, the latent scaling and the diffusion schedule.

    `body` holds transformers' modules under the names both families share (language_model, audio_tower
    with its decoder, multi_modal_projector, diffusion_head, latent_scaling_factor, latent_bias_factor);
    `text_config` is the Qwen2 config of its text LM.
    """

    def __init__(self, loaded, body, text_config, diffusion_steps: int):
        self.loaded = loaded
        self.net = loaded.model
        tc = text_config
        self.hidden = tc.hidden_size
        self.kv_heads = tc.num_key_value_heads
        self.heads = tc.num_attention_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.vocab = tc.vocab_size
        self.max_positions = tc.max_position_embeddings
        decoder_config = body.audio_tower.decoder.config
        self.acoustic_dim = decoder_config.hidden_size
        self.hop = int(torch.tensor(decoder_config.downsampling_ratios).prod())
        self.scale = body.latent_scaling_factor
        self.bias = body.latent_bias_factor
        self.steps = diffusion_steps
        settings = loaded.diffusion
        self.coefficients = dpm_solver_coefficients(diffusion_steps, settings["num_train_timesteps"],
                                                    settings["beta_schedule"])
        dec = wrappers.AcousticDecoderStep(body.audio_tower, self.scale, self.bias)
        self.decoder_state = dec.state_size
        self.decoder_layout = dec.layout

    def diffusion_facts(self, default_cfg_scale: float) -> dict:
        """The manifest's `diffusion` section: the schedule the sampler graph bakes in."""
        return {**self.loaded.diffusion, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero",
                "steps": self.steps, "timesteps": self.coefficients["timesteps"],
                "coefficients": {k: self.coefficients[k] for k in ("alpha", "sigma", "ratio", "d0", "d1")},
                "default_cfg_scale": default_cfg_scale}


class ExportContext(ContextBase):
    """The loaded VibeVoice (1.5B / 7B) plus the constants the specs need."""

    def __init__(self, loaded, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS):
        net = loaded.model
        super().__init__(loaded, net.model, net.config.text_config, diffusion_steps)
        self.layers = net.config.text_config.num_hidden_layers
        self.semantic_dim = net.config.semantic_model_config.hidden_size
        self.control_ids = [loaded.token_ids[k] for k in CONTROL_TOKENS]
        sem = wrappers.SemanticEncoderStep(net.model.semantic_tokenizer_encoder, net.model.semantic_connector)
        self.semantic_state = sem.state_size
        self.semantic_layout = sem.layout


def uniform_tolerance(atol, rtol, *names):
    """The same {atol, rtol} for every output named."""
    return {n: {"atol": atol, "rtol": rtol} for n in names}


def lm_sample(ctx, dims, gen, layers=None):
    """Inputs of an lm-like graph (DecoderStep) of `layers` layers (default: ctx.layers)."""
    b, s, p = dims["batch"], dims["seq"], dims["past"]
    embeds = torch.randn(b, s, ctx.hidden, generator=gen) * 0.5
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.zeros(b, s, dtype=torch.int64)
    for row in range(b):
        # a different pattern per row: left padding / dropped slots, positions counted over valid slots
        if row % 2 == 1 and p + s > 2:
            mask[row, : min(2, p)] = 0
        if row % 3 == 2 and p > 3:
            mask[row, p - 2] = 0
        valid_before = int(mask[row, :p].sum())
        pos[row] = torch.arange(s) + valid_before
    kv = torch.randn(ctx.layers if layers is None else layers, 2, b, ctx.kv_heads, p, ctx.head_dim, generator=gen)
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, "past_kv": kv}


def _ids_sample(ctx, dims, gen):
    return {"input_ids": torch.randint(0, ctx.vocab, (dims["batch"], dims["seq"]), generator=gen)}


def _audio_sample(ctx, dims, gen):
    return {"audio": torch.randn(dims["batch"], 1, dims["frames"] * ctx.hop, generator=gen) * 0.1}


def _decoder_sample(ctx, dims, gen):
    return {"latent": torch.randn(dims["batch"], dims.get("decode_frames", 1), ctx.acoustic_dim, generator=gen),
            "state": torch.randn(dims["batch"], ctx.decoder_state, generator=gen) * 0.1}


def _semantic_sample(ctx, dims, gen):
    return {"audio": torch.randn(dims["batch"], 1, ctx.hop, generator=gen) * 0.1,
            "state": torch.randn(dims["batch"], ctx.semantic_state, generator=gen) * 0.1}


def _step_sample(ctx, dims, gen):
    b = dims["batch"]
    return {"sample": torch.randn(b, ctx.acoustic_dim, generator=gen),
            "timestep": torch.randint(0, 1000, (b,), generator=gen).float(),
            "pos_condition": torch.randn(b, ctx.hidden, generator=gen),
            "neg_condition": torch.randn(b, ctx.hidden, generator=gen),
            "cfg_scale": torch.tensor([1.3])}


def _sampler_sample(ctx, dims, gen):
    b = dims["batch"]
    return {"noise": torch.randn(b, ctx.acoustic_dim, generator=gen),
            "pos_condition": torch.randn(b, ctx.hidden, generator=gen),
            "neg_condition": torch.randn(b, ctx.hidden, generator=gen),
            "cfg_scale": torch.tensor([1.3])}


# --- the graphs both families share (the streaming family's are in vv_export.realtime) -------------

def text_embed_spec(ctx: ContextBase) -> GraphSpec:
    net = ctx.net.model
    return GraphSpec(
        "text_embed",
        [IO("input_ids", ("batch", "seq"), "int64")],
        [IO("inputs_embeds", ("batch", "seq", ctx.hidden))],
        lambda c: wrappers.TextEmbed(net.language_model.embed_tokens),
        [{"batch": 1, "seq": 5}, {"batch": 3, "seq": 2}],
        uniform_tolerance(0.0, 0.0, "inputs_embeds"),  # a gather: exact
        sample=_ids_sample,
        role="loop",
    )


def acoustic_decoder_spec(ctx: ContextBase, grouped: bool = False) -> GraphSpec:
    """The streaming acoustic decoder: one latent frame per call, or (grouped) any number of consecutive
    frames of a job in one call (`decode_frames` latents -> `decode_samples` = decode_frames x hop samples:
    the values of one call per frame, the conv states carrying over exactly), which reads the weights once
    for all of them. Grouped suits a loop whose next step does not need this frame's audio (Realtime-0.5B);
    VibeVoice-1.5B encodes every frame's audio before its next LM step."""
    net = ctx.net.model
    time, samples = ("decode_frames", "decode_samples") if grouped else (1, ctx.hop)
    return GraphSpec(
        "acoustic_decoder",
        [IO("latent", ("batch", time, ctx.acoustic_dim)), IO("state", ("batch", ctx.decoder_state))],
        [IO("audio", ("batch", 1, samples)), IO("new_state", ("batch", ctx.decoder_state))],
        lambda c: wrappers.AcousticDecoderStep(net.audio_tower, c.scale, c.bias),
        [{"batch": b, "decode_frames": f, "decode_samples": f * ctx.hop} for b, f in ((1, 1), (3, 1), (2, DECODE_FRAMES))]
        if grouped else [{"batch": 1}, {"batch": 3}],
        uniform_tolerance(1e-5, 1e-4, "audio", "new_state"),
        sample=_decoder_sample,
        extra={"state_layout": ctx.decoder_layout},
        role="per-frame",
    )


def acoustic_connector_spec(ctx: ContextBase) -> GraphSpec:
    net = ctx.net.model
    return GraphSpec(
        "acoustic_connector",
        [IO("latent", ("batch", "frames", ctx.acoustic_dim))],
        [IO("embeds", ("batch", "frames", ctx.hidden))],
        lambda c: wrappers.Connector(net.multi_modal_projector),
        [{"batch": 1, "frames": 4}, {"batch": 2, "frames": 1}],
        uniform_tolerance(1e-5, 1e-5, "embeds"),
        role="auxiliary",
    )


def diffusion_sampler_spec(ctx: ContextBase) -> GraphSpec:
    net = ctx.net.model
    H, A = ctx.hidden, ctx.acoustic_dim
    return GraphSpec(
        "diffusion_sampler",
        [IO("noise", ("batch", A)), IO("pos_condition", ("batch", H)), IO("neg_condition", ("batch", H)),
         IO("cfg_scale", (1,))],
        [IO("latent", ("batch", A)), IO("acoustic_embed", ("batch", H))],
        lambda c: wrappers.DiffusionSampler(net.diffusion_head, net.multi_modal_projector, c.coefficients),
        [{"batch": 1}, {"batch": 3}],
        uniform_tolerance(1e-4, 1e-3, "latent", "acoustic_embed"),
        sample=_sampler_sample,
        extra={"steps": ctx.steps},
        role="per-frame",
    )


def build_specs(ctx: ExportContext) -> list[GraphSpec]:
    H, A, S = ctx.hidden, ctx.acoustic_dim, ctx.semantic_dim
    L, KV, D = ctx.layers, ctx.kv_heads, ctx.head_dim
    net = ctx.net.model
    return [
        text_embed_spec(ctx),
        GraphSpec(
            "lm",
            [IO("inputs_embeds", ("batch", "seq", H)), IO("attention_mask", ("batch", "total"), "int64"),
             IO("position_ids", ("batch", "seq"), "int64"), IO("past_kv", (L, 2, "batch", KV, "past", D))],
            [IO("hidden", ("batch", H)), IO("control_logits", ("batch", 4)), IO("new_kv", (L, 2, "batch", KV, "seq", D))],
            lambda c: wrappers.LMStep(net.language_model, c.net.lm_head.weight, c.control_ids),
            [{"batch": 1, "seq": 6, "past": 0}, {"batch": 2, "seq": 1, "past": 7}, {"batch": 3, "seq": 3, "past": 5}],
            uniform_tolerance(1e-5, 1e-4, "hidden", "control_logits", "new_kv"),
            sample=lm_sample,
            role="loop",
        ),
        GraphSpec(
            "acoustic_encoder",
            [IO("audio", ("batch", 1, "samples"))],
            [IO("latent_mean", ("batch", "frames", A)), IO("voice_embeds", ("batch", "frames", H))],
            lambda c: wrappers.AcousticEncoder(net.audio_tower, net.multi_modal_projector, c.scale, c.bias),
            [{"batch": 1, "frames": 2}, {"batch": 2, "frames": 3}],
            uniform_tolerance(1e-5, 1e-4, "latent_mean", "voice_embeds"),
            sample=_audio_sample,
            role="loop",
        ),
        acoustic_decoder_spec(ctx),
        GraphSpec(
            "semantic_encoder",
            [IO("audio", ("batch", 1, ctx.hop)), IO("state", ("batch", ctx.semantic_state))],
            [IO("features", ("batch", 1, S)), IO("semantic_embed", ("batch", 1, H)),
             IO("new_state", ("batch", ctx.semantic_state))],
            lambda c: wrappers.SemanticEncoderStep(net.semantic_tokenizer_encoder, net.semantic_connector),
            [{"batch": 1}, {"batch": 2}],
            uniform_tolerance(1e-5, 1e-4, "features", "semantic_embed", "new_state"),
            sample=_semantic_sample,
            extra={"state_layout": ctx.semantic_layout},
            role="per-frame",
        ),
        acoustic_connector_spec(ctx),
        GraphSpec(
            "semantic_connector",
            [IO("features", ("batch", "frames", S))],
            [IO("embeds", ("batch", "frames", H))],
            lambda c: wrappers.Connector(net.semantic_connector),
            [{"batch": 1, "frames": 4}, {"batch": 2, "frames": 1}],
            uniform_tolerance(1e-5, 1e-5, "embeds"),
            role="auxiliary",
        ),
        GraphSpec(
            "diffusion_step",
            [IO("sample", ("batch", A)), IO("timestep", ("batch",)), IO("pos_condition", ("batch", H)),
             IO("neg_condition", ("batch", H)), IO("cfg_scale", (1,))],
            [IO("guided", ("batch", A))],
            lambda c: wrappers.DiffusionStep(net.diffusion_head),
            [{"batch": 1}, {"batch": 4}],
            uniform_tolerance(1e-5, 1e-4, "guided"),
            sample=_step_sample,
            role="auxiliary",
        ),
        diffusion_sampler_spec(ctx),
    ]


def sample_inputs(spec: GraphSpec, ctx: ContextBase, dims: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if spec.sample is not None:
        return spec.sample(ctx, dims, gen)
    return {io.name: torch.randn(spec.concrete(io, dims), generator=gen) for io in spec.inputs}




def manifest_facts(ctx: ExportContext) -> dict:
    """The manifest sections of VibeVoice (1.5B / 7B): model, tokens, control_tokens, prompt, diffusion."""
    tc = ctx.net.config.text_config
    return {
        "model": {
            "hidden_size": ctx.hidden, "num_layers": ctx.layers, "num_attention_heads": ctx.heads,
            "num_kv_heads": ctx.kv_heads, "head_dim": ctx.head_dim, "vocab_size": ctx.vocab,
            "max_position_embeddings": ctx.max_positions, "acoustic_vae_dim": ctx.acoustic_dim,
            "semantic_vae_dim": ctx.semantic_dim, "hop_length": ctx.hop, "sample_rate": SAMPLE_RATE,
            "latent_scaling_factor": float(ctx.scale.item()), "latent_bias_factor": float(ctx.bias.item()),
            "vae_std": float(ctx.net.config.audio_config.vae_std),
            "tie_word_embeddings": bool(getattr(tc, "tie_word_embeddings", False)),
            "decoder_state_size": ctx.decoder_state, "semantic_state_size": ctx.semantic_state,
        },
        "tokens": dict(ctx.loaded.token_ids),
        "control_tokens": list(CONTROL_TOKENS),
        "prompt": dict(PROMPT),
        "diffusion": ctx.diffusion_facts(DEFAULT_CFG_SCALE),
    }
