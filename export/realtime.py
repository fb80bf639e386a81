"""VibeVoice-Realtime-0.5B (`model_type: vibevoice_streaming`): the exporter's streaming model family.

Everything this family does differently from VibeVoice (1.5B / 7B) is here: reading its checkpoint, its
model built from transformers' modules, random models of its architecture, its graphs and its manifest
facts, registered in `vv_export.families` (which recognises the family by the config's `model_type`).

The model (Microsoft's `VibeVoiceStreamingForConditionalGenerationInference`) splits a Qwen2 decoder:

* the lower text LM (`model.language_model`, `decoder_config.num_hidden_layers -
  tts_backbone_num_hidden_layers` layers) encodes the text; its final norm is unused (the original sets it
  to the identity), so the `text_lm` graph returns the last layer's hidden states of every position;
* the upper TTS LM (`model.tts_language_model`, `tts_backbone_num_hidden_layers` layers, with its norm)
  takes those hidden states (text) or the connector's embedding of a generated latent (speech), plus the
  `tts_input_types` embedding of the position's type (1 text, 0 speech); its own token embedding is
  unused. The `tts_lm` graph returns every new position's normed hidden state (the last one is the
  diffusion condition) and the end-of-speech classifier's logit of each;
* the acoustic tokenizer's decoder (no encoder: voices come as prefilled caches), the acoustic connector
  and the diffusion head are the 1.5B's, exported by the same graph specs.

Checkpoint layout (the released `microsoft/VibeVoice-Realtime-0.5B`): the 1.5B's original names for the
shared parts (vv_export.layout) plus `model.tts_language_model.*`, `model.tts_input_types.weight` and
`tts_eos_classifier.fc{1,2}.*`. Acoustic-encoder tensors and the TTS LM's token embedding are unused and
skipped when present.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from . import specs, wrappers
from .checkpoint import (LoadedModel, byte_level_tokenizer_json, check_state, find_tokenizer, hash_files,
                         init_nonpersistent_buffers, lookup_token_ids, missing_tokenizer, perturb_, read_safetensors,
                         safetensors_files, tiny_original_config)
from .engine_dir import STREAMING_FAMILY
from .errors import ExportError
from .layout import (ORIGINAL, audio_config_kwargs, diffusion_head_config_kwargs, diffusion_settings,
                     original_to_transformers_name, text_config_kwargs)
from .specs import IO, ContextBase, GraphSpec, lm_sample, uniform_tolerance

FAMILY = STREAMING_FAMILY  # manifest["model_family"] of this family's ENGINE_DIRs
MODEL_TYPE = "vibevoice_streaming"  # config.json's model_type
DEFAULT_DIFFUSION_STEPS = 5  # the original's DPM-Solver++ steps for this model
DEFAULT_CFG_SCALE = 1.5  # ... and its classifier-free guidance scale
TEXT_WINDOW = 5  # text tokens fed per window (the original's TTS_TEXT_WINDOW_SIZE)
SPEECH_WINDOW = 6  # speech frames generated per window (TTS_SPEECH_WINDOW_SIZE)
DEFAULT_TTS_LAYERS = 20  # tts_backbone_num_hidden_layers when a config does not say (the original's default)
# Special tokens the streaming processor and loop use, by role: the prompt's placeholder and the
# negative (unconditional) prompt's one token is <|image_pad|> (the processor's pad id).
SPECIAL_TOKENS = {"endoftext": "<|endoftext|>", "pad": "<|image_pad|>"}
QWEN_TOKEN_IDS = {"endoftext": 151643, "pad": 151655}  # their ids in Qwen2.5's (full-size) vocabulary
# Tensors of released/original checkpoints this family never uses: the acoustic encoder (voices are
# prefilled presets) and the TTS LM's token embedding (its inputs are hidden states).
UNUSED_PREFIXES = ("model.acoustic_tokenizer.encoder.", "model.tts_language_model.embed_tokens.")
# Tensors of this family only, named the same in the checkpoint and in RealtimeModel.
OWN_PREFIXES = ("model.tts_language_model.", "model.tts_input_types.", "tts_eos_classifier.")
# RealtimeModel's names of the parts it shares with VibeVoice (mapped as the 1.5B's, vv_export.layout).
SHARED_PREFIXES = ("model.language_model.", "model.audio_tower.decoder.", "model.multi_modal_projector.",
                   "model.diffusion_head.", "model.latent_scaling_factor", "model.latent_bias_factor")


def is_realtime_config(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def config_kwargs(cfg: dict) -> dict:
    """The module configs of RealtimeModel from an original-layout config.json (one-line errors)."""
    for key in ("decoder_config", "acoustic_tokenizer_config", "diffusion_head_config"):
        if not isinstance(cfg.get(key), dict):
            raise ExportError(f"config.json: a {MODEL_TYPE} config needs a {key!r} object")
    text = text_config_kwargs(cfg)
    total = text.get("num_hidden_layers")
    tts = cfg.get("tts_backbone_num_hidden_layers", DEFAULT_TTS_LAYERS)
    if not isinstance(total, int) or not isinstance(tts, int) or not 1 <= tts < total:
        raise ExportError(f"config.json: tts_backbone_num_hidden_layers {tts!r} must be at least 1 and below "
                          f"decoder_config.num_hidden_layers {total!r} (the lower text LM keeps the rest)")
    return {"text_config": text, "text_lm_layers": total - tts, "tts_lm_layers": tts,
            "audio_config": audio_config_kwargs(cfg), "diffusion_head_config": diffusion_head_config_kwargs(cfg)}


# --- the model (transformers' modules) -------------------------------------------------------------

class EosClassifier(nn.Module):
    """The end-of-speech classifier: Linear-ReLU-Linear to one logit (speech ends where sigmoid > 0.5)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 1)

    def forward(self, hidden):
        return self.fc2(torch.relu(self.fc1(hidden)))


class AcousticDecoderOnly(nn.Module):
    """This family's acoustic tokenizer: transformers' decoder alone, as `.decoder` (like the 1.5B's
    `audio_tower`, so the 1.5B's decoder graph and tensor names apply)."""

    def __init__(self, audio_config):
        super().__init__()
        from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import (
            VibeVoiceAcousticTokenizerDecoderModel)

        self.decoder = VibeVoiceAcousticTokenizerDecoderModel(audio_config.decoder_config)


def _qwen2(text_kwargs: dict, layers: int):
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(**{**text_kwargs, "num_hidden_layers": layers})
    config._attn_implementation = "eager"
    return Qwen2Model(config)


class RealtimeBody(nn.Module):
    """`model.*` of VibeVoice-Realtime, with the 1.5B's transformers names for the shared parts."""

    def __init__(self, kwargs: dict):
        super().__init__()
        from transformers import VibeVoiceAcousticTokenizerConfig
        from transformers.models.vibevoice.configuration_vibevoice import VibeVoiceDiffusionHeadConfig
        from transformers.models.vibevoice.modeling_vibevoice import (VibeVoiceDiffusionHead,
                                                                      VibeVoiceMultiModalProjector)

        hidden = int(kwargs["text_config"]["hidden_size"])
        self.language_model = _qwen2(kwargs["text_config"], kwargs["text_lm_layers"])
        self.language_model.norm = nn.Identity()  # unused by the original: its hidden states are un-normed
        self.tts_language_model = _qwen2(kwargs["text_config"], kwargs["tts_lm_layers"])
        self.tts_language_model.embed_tokens = None  # unused: the TTS LM takes hidden states
        self.tts_input_types = nn.Embedding(2, hidden)
        audio_config = VibeVoiceAcousticTokenizerConfig(**{k: v for k, v in kwargs["audio_config"].items()
                                                           if k != "model_type"})
        self.audio_tower = AcousticDecoderOnly(audio_config)
        self.multi_modal_projector = VibeVoiceMultiModalProjector(audio_config.hidden_size, hidden)
        self.diffusion_head = VibeVoiceDiffusionHead(VibeVoiceDiffusionHeadConfig(**kwargs["diffusion_head_config"]))
        self.latent_scaling_factor = nn.Parameter(torch.tensor(1.0))
        self.latent_bias_factor = nn.Parameter(torch.tensor(0.0))


class RealtimeModel(nn.Module):
    """VibeVoice-Realtime in transformers' modules: `model` (RealtimeBody) and `tts_eos_classifier`."""

    def __init__(self, kwargs: dict):
        super().__init__()
        self.model = RealtimeBody(kwargs)
        self.tts_eos_classifier = EosClassifier(int(kwargs["text_config"]["hidden_size"]))


def build_model(kwargs: dict, seed: int | None = None) -> RealtimeModel:
    if seed is not None:
        torch.manual_seed(seed)
    return RealtimeModel(kwargs).float().eval()


# --- checkpoints --------------------------------------------------------------------------------

def map_state_dict_names(names) -> dict[str, str | None]:
    """Original name -> RealtimeModel name (None: an unused tensor, skipped); unknown names are an error."""
    mapping: dict[str, str | None] = {}
    unknown = []
    for name in names:
        if name.startswith(UNUSED_PREFIXES):
            mapping[name] = None
        elif name.startswith(OWN_PREFIXES):
            mapping[name] = name
        else:
            new = original_to_transformers_name(name)
            if new is None or not new.startswith(SHARED_PREFIXES):
                unknown.append(name)
            else:
                mapping[name] = new
    if unknown:
        raise ExportError(f"checkpoint has {len(unknown)} tensors a {MODEL_TYPE} model does not know, "
                          f"e.g. {unknown[0]!r}")
    return mapping


def load_realtime_checkpoint(model: str, directory: Path, cfg: dict, tokenizer_dir: str | None = None) -> LoadedModel:
    """A VibeVoice-Realtime checkpoint (original layout) in `directory` as RealtimeModel (fp32, eval)."""
    config_path = directory / "config.json"
    kwargs = config_kwargs(cfg)
    files = safetensors_files(directory)
    tokenizer_file = find_tokenizer(directory, tokenizer_dir)
    if tokenizer_file is None:
        raise missing_tokenizer(directory)
    token_ids = lookup_token_ids(SPECIAL_TOKENS, tokenizer_file)
    tensors = read_safetensors(files)
    mapping = map_state_dict_names(tensors)
    state = {new: tensors[old] for old, new in mapping.items() if new is not None}
    try:
        with torch.device("meta"):
            net = build_model(kwargs)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{config_path}: cannot build a VibeVoice-Realtime model from this config ({exc})") from exc
    net = net.to_empty(device="cpu")
    check_state(net.state_dict(), state)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    init_nonpersistent_buffers(net)
    return LoadedModel(model=net.float().eval(), layout=ORIGINAL, source=str(model), tokenizer_file=tokenizer_file,
                       weights_sha256=hash_files(files), diffusion=diffusion_settings(cfg, ORIGINAL),
                       token_ids=token_ids, family=FAMILY)


# --- random models -------------------------------------------------------------------------------

def tiny_config(vocab_size: int) -> dict:
    """An original-layout config of the architecture at toy width (like the shared realtime fixture)."""
    cfg = tiny_original_config(vocab_size)
    for key in ("semantic_vae_dim", "semantic_tokenizer_config"):
        cfg.pop(key)
    cfg["model_type"] = MODEL_TYPE
    cfg["decoder_config"].update(num_hidden_layers=4, max_position_embeddings=8192)
    cfg["tts_backbone_num_hidden_layers"] = 2
    return cfg


def random_realtime_model(original_config: dict, seed: int = 0, tokenizer_json: str | None = None,
                          source: str = "random") -> LoadedModel:
    """A randomly initialised VibeVoice-Realtime of the architecture an original-layout config describes
    (e.g. the full-size VibeVoice-Realtime-0.5B config, for benchmarks)."""
    kwargs = config_kwargs(original_config)
    net = build_model(kwargs, seed=seed)
    if kwargs["text_config"]["hidden_size"] <= 256:
        perturb_(net, seed)
    token_ids = dict(QWEN_TOKEN_IDS) if tokenizer_json is None else lookup_token_ids(SPECIAL_TOKENS, None, tokenizer_json)
    digest = hashlib.sha256(json.dumps(original_config, sort_keys=True).encode() + str(seed).encode()).hexdigest()
    return LoadedModel(model=net, layout=ORIGINAL, source=source, tokenizer_file=None, weights_sha256=digest,
                       diffusion=diffusion_settings(original_config, ORIGINAL), token_ids=token_ids,
                       tokenizer_json=tokenizer_json, family=FAMILY)


def tiny_random_realtime_model(seed: int = 0) -> LoadedModel:
    """The architecture at toy width with random weights and a byte-level tokenizer (no files needed)."""
    tokenizer_json = byte_level_tokenizer_json(extra_special=(SPECIAL_TOKENS["pad"],))
    vocab = json.loads(tokenizer_json)
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    return random_realtime_model(tiny_config(size), seed=seed, tokenizer_json=tokenizer_json,
                                 source=f"random-realtime-tiny(seed={seed})")


# --- graphs --------------------------------------------------------------------------------------

class TextLMStep(wrappers.DecoderStep):
    """The lower text LM over new positions (DecoderStep): every position's hidden state, no final norm."""

    def forward(self, inputs_embeds, attention_mask, position_ids, past_kv):
        return self.decode(inputs_embeds, attention_mask, position_ids, past_kv)


class TtsLMStep(wrappers.DecoderStep):
    """The TTS LM over new positions (DecoderStep) with the type embedding added to its inputs: every new
    position's final-normed hidden state and the end-of-speech logit of it. (The loop reads the last position
    of a text window, and, where a speech frame and the next text window share one call, the frame's position
    as well: the negative row's condition and the end-of-speech check.)"""

    def __init__(self, tts_language_model, tts_input_types: nn.Embedding, eos_classifier: EosClassifier):
        super().__init__(tts_language_model)
        self.norm = tts_language_model.norm
        self.input_types = tts_input_types
        self.eos_classifier = eos_classifier

    def forward(self, inputs_embeds, input_types, attention_mask, position_ids, past_kv):
        hidden, new_kv = self.decode(inputs_embeds + self.input_types(input_types), attention_mask, position_ids,
                                     past_kv)
        normed = self.norm(hidden)
        return normed, self.eos_classifier(normed), new_kv


class RealtimeContext(ContextBase):
    """The loaded VibeVoice-Realtime plus the constants its specs need."""

    def __init__(self, loaded: LoadedModel, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS):
        body = loaded.model.model
        super().__init__(loaded, body, body.language_model.config, diffusion_steps)
        self.text_layers = body.language_model.config.num_hidden_layers
        self.tts_layers = body.tts_language_model.config.num_hidden_layers
        self.intermediate = body.language_model.config.intermediate_size


def _text_lm_sample(ctx, dims, gen):
    return lm_sample(ctx, dims, gen, layers=ctx.text_layers)


def _tts_lm_sample(ctx, dims, gen):
    feeds = lm_sample(ctx, dims, gen, layers=ctx.tts_layers)
    feeds["input_types"] = torch.randint(0, 2, (dims["batch"], dims["seq"]), generator=gen)
    return feeds


# one text window over a (voice preset's) cache, one step of several rows, a short window of several rows: the
# loop's calls (it never prefills: its caches start from a preset), within the TensorRT plans' profiles
LM_SHAPES = [{"batch": 1, "seq": TEXT_WINDOW, "past": 9}, {"batch": 2, "seq": 1, "past": 7},
             {"batch": 3, "seq": 3, "past": 5}]


def _lm_inputs(H: int, layers: int, KV: int, D: int, with_types: bool) -> list[IO]:
    types = [IO("input_types", ("batch", "seq"), "int64")] if with_types else []
    return [IO("inputs_embeds", ("batch", "seq", H)), *types, IO("attention_mask", ("batch", "total"), "int64"),
            IO("position_ids", ("batch", "seq"), "int64"), IO("past_kv", (layers, 2, "batch", KV, "past", D))]


def build_specs(ctx: RealtimeContext) -> list[GraphSpec]:
    H, KV, D = ctx.hidden, ctx.kv_heads, ctx.head_dim
    Lt, Ls = ctx.text_layers, ctx.tts_layers
    body = ctx.net.model
    return [
        specs.text_embed_spec(ctx),
        GraphSpec(
            "text_lm",
            _lm_inputs(H, Lt, KV, D, with_types=False),
            [IO("hidden", ("batch", "seq", H)), IO("new_kv", (Lt, 2, "batch", KV, "seq", D))],
            lambda c: TextLMStep(body.language_model),
            LM_SHAPES,
            uniform_tolerance(1e-5, 1e-4, "hidden", "new_kv"),
            sample=_text_lm_sample,
            role="loop",
        ),
        GraphSpec(
            "tts_lm",
            _lm_inputs(H, Ls, KV, D, with_types=True),
            [IO("hidden", ("batch", "seq", H)), IO("eos_logit", ("batch", "seq", 1)), IO("new_kv", (Ls, 2, "batch", KV, "seq", D))],
            lambda c: TtsLMStep(body.tts_language_model, body.tts_input_types, c.net.tts_eos_classifier),
            LM_SHAPES,
            uniform_tolerance(1e-5, 1e-4, "hidden", "eos_logit", "new_kv"),
            sample=_tts_lm_sample,
            role="loop",
        ),
        specs.acoustic_decoder_spec(ctx, grouped=True),
        specs.acoustic_connector_spec(ctx),
        specs.diffusion_sampler_spec(ctx),
    ]


def manifest_facts(ctx: RealtimeContext) -> dict:
    """The manifest sections of this family (docs/ENGINE_DIR.md): model, tokens, streaming, diffusion."""
    return {
        "model": {
            "hidden_size": ctx.hidden, "text_lm_layers": ctx.text_layers, "tts_lm_layers": ctx.tts_layers,
            "num_attention_heads": ctx.heads, "num_kv_heads": ctx.kv_heads, "head_dim": ctx.head_dim,
            "intermediate_size": ctx.intermediate, "vocab_size": ctx.vocab,
            "max_position_embeddings": ctx.max_positions, "acoustic_vae_dim": ctx.acoustic_dim,
            "hop_length": ctx.hop, "sample_rate": specs.SAMPLE_RATE,
            "latent_scaling_factor": float(ctx.scale.item()), "latent_bias_factor": float(ctx.bias.item()),
            "decoder_state_size": ctx.decoder_state,
        },
        "tokens": dict(ctx.loaded.token_ids),
        "streaming": {"text_window": TEXT_WINDOW, "speech_window": SPEECH_WINDOW,
                      "decode_frames": specs.DECODE_FRAMES},
        "diffusion": ctx.diffusion_facts(DEFAULT_CFG_SCALE),
    }
