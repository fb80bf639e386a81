"""The two checkpoint layouts of VibeVoice and the mapping between them.

The *original* layout is Microsoft's release (`microsoft/VibeVoice-1.5B`, `VibeVoice-Large`):
`config.json` with `decoder_config` / `acoustic_tokenizer_config` / `semantic_tokenizer_config` /
`diffusion_head_config`, tensors named `model.acoustic_tokenizer.encoder.downsample_layers...`,
`model.prediction_head...`, `model.acoustic_connector...`.

The *transformers* layout is `VibeVoiceForConditionalGeneration` (`audio_tower`, `diffusion_head`,
`multi_modal_projector`, `semantic_tokenizer_encoder`). The exporter has one model definition, the
transformers one; an original checkpoint is converted here, config and tensor names both.

Tokenizer-stack correspondence (encoder; the decoder is the same with `upsample_layers`/`convtr`)::

    original                                     transformers
    downsample_layers.0.0.conv.conv.*      ->    stem.conv.conv.*
    downsample_layers.i.0.conv.conv.*      ->    conv_layers.{i-1}.conv.conv.*
    stages.0.j.<block>                     ->    stem.stage.j.<block>
    stages.i.j.<block>                     ->    conv_layers.{i-1}.stage.j.<block>
    <block>.mixer.conv.conv.conv.*         ->    <block>.mixer.conv.*
    head.conv.conv.*                       ->    head.conv.*
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ExportError

ORIGINAL = "original"
TRANSFORMERS = "transformers"


def detect_layout(config: dict) -> str:
    """Tell the layout of a checkpoint from its config.json contents."""
    if "decoder_config" in config and "acoustic_tokenizer_config" in config:
        return ORIGINAL
    if "text_config" in config and ("audio_config" in config or config.get("model_type") == "vibevoice"):
        return TRANSFORMERS
    raise ExportError(
        "config.json is not a VibeVoice config: expected 'decoder_config' and 'acoustic_tokenizer_config' "
        "(original layout) or 'text_config' and 'audio_config' (transformers layout)"
    )


def _depths(value: Any) -> list[int]:
    if isinstance(value, str):
        return [int(d) for d in value.split("-")]
    return [int(d) for d in value]


def _tokenizer_config(tok: dict, name: str, hidden_size: int) -> dict:
    """Map an original acoustic/semantic tokenizer config onto transformers' tokenizer config."""
    enc_depths = _depths(tok.get("encoder_depths", "3-3-3-3-3-3-8"))
    dec_depths = tok.get("decoder_depths")
    if dec_depths is not None and _depths(dec_depths) != list(reversed(enc_depths)):
        raise ExportError(f"{name}: decoder_depths other than the reversed encoder depths are not supported")
    if tok.get("decoder_ratios") not in (None, tok.get("encoder_ratios")):
        raise ExportError(f"{name}: decoder_ratios different from encoder_ratios are not supported")
    if tok.get("decoder_n_filters") not in (None, tok.get("encoder_n_filters")):
        raise ExportError(f"{name}: decoder_n_filters different from encoder_n_filters are not supported")
    for key, expected in (("layernorm", "RMSNorm"), ("mixer_layer", "depthwise_conv"), ("conv_norm", "none"),
                          ("causal", True), ("disable_last_norm", True), ("conv_bias", True)):
        if key in tok and tok[key] != expected:
            raise ExportError(f"{name}: {key}={tok[key]!r} is not supported (expected {expected!r})")
    return {
        "channels": int(tok.get("channels", 1)),
        "hidden_size": int(hidden_size),
        "kernel_size": 7,
        "rms_norm_eps": float(tok.get("layernorm_eps", 1e-5)),
        "layer_scale_init_value": float(tok.get("layer_scale_init_value", 1e-6)),
        "num_filters": int(tok.get("encoder_n_filters", 32)),
        # the original encoder reverses its ratios; transformers stores them in encoder order
        "downsampling_ratios": list(reversed([int(r) for r in tok.get("encoder_ratios", [8, 5, 5, 4, 2, 2])])),
        "depths": enc_depths,
        "hidden_act": "gelu",
        "ffn_expansion": 4,
        # sigma-VAE: the original draws std ~ N(0, fix_std / 0.8) per item
        "vae_std": float(tok.get("fix_std", 0.5)) / 0.8,
    }


def text_config_kwargs(cfg: dict) -> dict:
    """The Qwen2 config kwargs (transformers) of an original-layout config's `decoder_config`."""
    text_config = {k: v for k, v in cfg["decoder_config"].items()
                   if k not in ("torch_dtype", "_attn_implementation_autoset")}
    text_config["model_type"] = "qwen2"
    return text_config


def acoustic_dim(cfg: dict) -> int:
    """The acoustic latent size of an original-layout config."""
    return int(cfg.get("acoustic_vae_dim", cfg["acoustic_tokenizer_config"].get("vae_dim", 64)))


def audio_config_kwargs(cfg: dict) -> dict:
    """transformers' acoustic tokenizer config kwargs of an original-layout `acoustic_tokenizer_config`."""
    return {"model_type": "vibevoice_acoustic_tokenizer",
            **_tokenizer_config(cfg["acoustic_tokenizer_config"], "acoustic_tokenizer_config", acoustic_dim(cfg))}


def diffusion_head_config_kwargs(cfg: dict) -> dict:
    """transformers' diffusion head config kwargs of an original-layout `diffusion_head_config`."""
    head = cfg["diffusion_head_config"]
    hidden = int(cfg["decoder_config"]["hidden_size"])
    if int(head.get("hidden_size", hidden)) != hidden:
        raise ExportError("diffusion_head_config.hidden_size differs from the LM hidden size")
    if head.get("prediction_type", "v_prediction") != "v_prediction":
        raise ExportError(f"diffusion prediction_type {head.get('prediction_type')!r} is not supported")
    return {
        "hidden_size": hidden,
        "latent_size": acoustic_dim(cfg),
        "num_hidden_layers": int(head.get("head_layers", 4)),
        "intermediate_size": int(round(hidden * float(head.get("head_ffn_ratio", 3.0)))),
        "rms_norm_eps": float(head.get("rms_norm_eps", 1e-5)),
        "hidden_act": "silu",
    }


def original_config_to_transformers(cfg: dict) -> dict:
    """Build the `VibeVoiceConfig` kwargs (transformers) from an original-layout config.json."""
    sc = cfg["semantic_tokenizer_config"]
    semantic_dim = int(cfg.get("semantic_vae_dim", sc.get("vae_dim", 128)))
    diffusion_head = diffusion_head_config_kwargs(cfg)
    semantic = _tokenizer_config(sc, "semantic_tokenizer_config", semantic_dim)
    semantic.pop("vae_std")
    return {
        "text_config": text_config_kwargs(cfg),
        "audio_config": audio_config_kwargs(cfg),
        "semantic_model_config": {"model_type": "vibevoice_acoustic_tokenizer_encoder", **semantic},
        "diffusion_head_config": diffusion_head,
    }


def diffusion_settings(cfg: dict, layout: str) -> dict:
    """The noise-schedule settings of the checkpoint (train steps, beta schedule, prediction type)."""
    if layout == ORIGINAL:
        head = cfg.get("diffusion_head_config", {})
        schedule = head.get("ddpm_beta_schedule", "cosine")
        return {
            "num_train_timesteps": int(head.get("ddpm_num_steps", 1000)),
            "beta_schedule": "squaredcos_cap_v2" if schedule == "cosine" else schedule,
            "prediction_type": head.get("prediction_type", "v_prediction"),
        }
    return {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


# --- tensor names -------------------------------------------------------------------------------

_STACKS = (
    ("model.acoustic_tokenizer.encoder.", "model.audio_tower.encoder.", "downsample_layers", "conv"),
    ("model.acoustic_tokenizer.decoder.", "model.audio_tower.decoder.", "upsample_layers", None),
    ("model.semantic_tokenizer.encoder.", "model.semantic_tokenizer_encoder.", "downsample_layers", "conv"),
)

_SIMPLE = [
    (r"^model\.speech_scaling_factor$", "model.latent_scaling_factor"),
    (r"^model\.speech_bias_factor$", "model.latent_bias_factor"),
    (r"^model\.acoustic_connector\.fc1\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.acoustic_connector\.norm\.", "model.multi_modal_projector.act."),
    (r"^model\.acoustic_connector\.fc2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.semantic_connector\.fc1\.", "model.semantic_connector.linear_1."),
    (r"^model\.semantic_connector\.norm\.", "model.semantic_connector.act."),
    (r"^model\.semantic_connector\.fc2\.", "model.semantic_connector.linear_2."),
    (r"^model\.prediction_head\.t_embedder\.mlp\.0\.", "model.diffusion_head.timestep_proj.fc1."),
    (r"^model\.prediction_head\.t_embedder\.mlp\.2\.", "model.diffusion_head.timestep_proj.fc2."),
    (r"^model\.prediction_head\.layers\.(\d+)\.adaLN_modulation\.1\.", r"model.diffusion_head.layers.\1.linear."),
    (r"^model\.prediction_head\.final_layer\.adaLN_modulation\.1\.", "model.diffusion_head.final_layer.linear_1."),
    (r"^model\.prediction_head\.final_layer\.linear\.", "model.diffusion_head.final_layer.linear_2."),
    (r"^model\.prediction_head\.", "model.diffusion_head."),
    (r"^model\.language_model\.", "model.language_model."),
    (r"^lm_head\.", "lm_head."),
]


def _map_stack(rest: str, sampling: str, kind: str | None) -> str | None:
    m = re.match(rf"^{sampling}\.(\d+)\.0\.(conv|convtr)\.(conv|convtr)\.(weight|bias)$", rest)
    if m:
        i, mod, _, param = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if i == 0:
            return f"stem.conv.conv.{param}"
        return f"conv_layers.{i - 1}.{mod}.{mod}.{param}"
    m = re.match(r"^stages\.(\d+)\.(\d+)\.(.+)$", rest)
    if m:
        i, j, block = int(m.group(1)), int(m.group(2)), m.group(3)
        block = re.sub(r"^mixer\.conv\.conv\.conv\.", "mixer.conv.", block)
        prefix = "stem.stage" if i == 0 else f"conv_layers.{i - 1}.stage"
        return f"{prefix}.{j}.{block}"
    m = re.match(r"^head\.conv\.conv\.(weight|bias)$", rest)
    if m:
        return f"head.conv.{m.group(1)}"
    return None


def original_to_transformers_name(name: str) -> str | None:
    """The transformers-layout name of an original-layout tensor, or None when it has none."""
    for orig_prefix, hf_prefix, sampling, kind in _STACKS:
        if name.startswith(orig_prefix):
            mapped = _map_stack(name[len(orig_prefix):], sampling, kind)
            return None if mapped is None else hf_prefix + mapped
    for pattern, repl in _SIMPLE:
        if re.search(pattern, name):
            return re.sub(pattern, repl, name, count=1)
    return None


def map_state_dict_names(names, *, strict: bool = True) -> dict[str, str]:
    """Map every original name to its transformers name; unknown names are an error when strict."""
    mapping: dict[str, str] = {}
    unknown = []
    for name in names:
        new = original_to_transformers_name(name)
        if new is None:
            unknown.append(name)
        else:
            mapping[name] = new
    if unknown and strict:
        raise ExportError(f"{len(unknown)} tensors of the checkpoint have no known mapping, e.g. {unknown[0]!r}")
    return mapping
