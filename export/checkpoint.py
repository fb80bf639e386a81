"""Load a VibeVoice checkpoint (either layout, local directory or hub id) into transformers' model.

Also builds randomly initialised models of the real architecture: the tiny default the README's demo
uses when no checkpoint is given, and full-size ones from a config for tests and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError
from .layout import (ORIGINAL, detect_layout, diffusion_settings, map_state_dict_names,
                     original_config_to_transformers)

SPECIAL_TOKENS = {
    "speech_start": "<|vision_start|>",
    "speech_end": "<|vision_end|>",
    "speech_diffusion": "<|vision_pad|>",
    "eos": "<|endoftext|>",
}
VIBEVOICE = "vibevoice"  # LoadedModel.family (and manifest "model_family") of VibeVoice 1.5B / 7B


@dataclass
class LoadedModel:
    model: object  # fp32, eval: transformers VibeVoiceForConditionalGeneration, or vv_export.realtime.RealtimeModel
    layout: str
    source: str
    tokenizer_file: Path | None
    weights_sha256: str
    diffusion: dict
    token_ids: dict = field(default_factory=dict)
    tokenizer_json: str | None = None  # in-memory tokenizer for random models
    family: str = VIBEVOICE  # the model family: VIBEVOICE, or vv_export.realtime.FAMILY


def _is_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory, downloading a hub id through huggingface_hub when needed."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"--model {model}: not a directory")
        return path
    if not _is_hub_id(model):
        raise ExportError(f"--model {model}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # network, auth, unknown repo
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"--model {model}: no such directory, and the hub download failed ({first})") from exc


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ExportError(f"{index}: malformed safetensors index ({exc})") from exc
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ExportError(f"{directory}: shard {missing[0]} named in the index is missing")
        return files
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{directory}: no *.safetensors weights found")
    return files


def read_safetensors(files: list[Path]) -> dict:
    """All tensors of the given files, with a clear error for a truncated or corrupt file."""
    from safetensors import safe_open

    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as exc:
            raise ExportError(f"{f}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from exc
    return tensors


def hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 23), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_model(hf_kwargs: dict, seed: int | None = None):
    """A VibeVoiceForConditionalGeneration from transformers-layout config kwargs (random weights)."""
    import torch
    from transformers import VibeVoiceConfig, VibeVoiceForConditionalGeneration

    config = VibeVoiceConfig(**hf_kwargs)
    config._attn_implementation = "eager"
    if seed is not None:
        torch.manual_seed(seed)
    model = VibeVoiceForConditionalGeneration(config)
    return model.float().eval()


def find_tokenizer(model_dir: Path | None, tokenizer_dir: str | None) -> Path | None:
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir).expanduser()
        cand = tdir if tdir.is_file() else tdir / "tokenizer.json"
        if not cand.exists():
            raise ExportError(f"--tokenizer {tokenizer_dir}: no tokenizer.json there")
        return cand
    if model_dir is not None and (model_dir / "tokenizer.json").exists():
        return model_dir / "tokenizer.json"
    return None


def missing_tokenizer(directory: Path) -> ExportError:
    return ExportError(f"{directory} ships no tokenizer.json: original checkpoints use the Qwen2.5 tokenizer, pass it "
                       "with --tokenizer DIR")


def lookup_token_ids(tokens: dict, tokenizer_file: Path | None, tokenizer_json: str | None = None) -> dict:
    """role -> id of each special token (role -> string) in the tokenizer; one-line error for a missing one."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json) if tokenizer_json else Tokenizer.from_file(str(tokenizer_file))
    ids = {}
    for role, text in tokens.items():
        tid = tok.token_to_id(text)
        if tid is None:
            raise ExportError(f"tokenizer has no {text} token (needed as {role}); is it a Qwen2.5 tokenizer?")
        ids[role] = int(tid)
    return ids


def resolve_special_tokens(tokenizer_file: Path | None, tokenizer_json: str | None = None) -> dict:
    """Ids of VibeVoice's special tokens, looked up by their strings in the tokenizer."""
    ids = lookup_token_ids(SPECIAL_TOKENS, tokenizer_file, tokenizer_json)
    ids["pad"] = ids["eos"]
    return ids


def init_nonpersistent_buffers(net) -> None:
    """Recompute the buffers that checkpoints do not hold (the model was built on the meta device)."""
    import torch

    persistent = set(net.state_dict())
    for mod_name, module in net.named_modules():
        for buf_name, _ in list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{buf_name}" if mod_name else buf_name
            if full in persistent:
                continue
            if buf_name in ("inv_freq", "original_inv_freq"):
                if module.rope_type != "default":
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                    inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
                else:
                    inv_freq, _ = module.compute_default_rope_parameters(module.config)
                setattr(module, buf_name, inv_freq.to(torch.float32))
            elif buf_name == "freq" and hasattr(module, "compute_default_freq"):
                module.freq = module.compute_default_freq(module.config)
            else:
                raise ExportError(f"internal: do not know how to initialise buffer {full}")


def check_state(expected: dict, state: dict, optional=lambda name: False) -> None:
    """One-line errors for a state dict that lacks a tensor the model needs (unless `optional(name)`), has one
    it does not know, or has one of another shape."""
    missing = [k for k in expected if k not in state and not optional(k)]
    if missing:
        raise ExportError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]!r}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ExportError(f"checkpoint has {len(unexpected)} tensors the model does not know, e.g. {unexpected[0]!r}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ExportError(f"tensor {k}: shape {tuple(v.shape)} in the checkpoint, model expects "
                              f"{tuple(expected[k].shape)}")


def load_vibevoice_checkpoint(model: str, directory: Path, cfg: dict, tokenizer_dir: str | None = None) -> LoadedModel:
    """A VibeVoice-1.5B / 7B checkpoint (either layout) in `directory`, its config `cfg`, as transformers'
    VibeVoiceForConditionalGeneration (fp32, eval)."""
    import torch

    config_path = directory / "config.json"
    layout = detect_layout(cfg)
    files = safetensors_files(directory)
    tokenizer_file = find_tokenizer(directory, tokenizer_dir)
    if tokenizer_file is None:
        raise missing_tokenizer(directory)
    token_ids = resolve_special_tokens(tokenizer_file)
    tensors = read_safetensors(files)

    if layout == ORIGINAL:
        hf_kwargs = original_config_to_transformers(cfg)
        mapping = map_state_dict_names(tensors)
        state = {mapping[k]: v for k, v in tensors.items()}
    else:
        hf_kwargs = {k: v for k, v in cfg.items() if k in ("text_config", "audio_config", "semantic_model_config",
                                                            "diffusion_head_config")}
        state = tensors
    try:
        with torch.device("meta"):
            net = build_model(hf_kwargs)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{config_path}: cannot build a VibeVoice model from this config ({exc})") from exc
    net = net.to_empty(device="cpu")
    tied = bool(getattr(net.config.text_config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    check_state(net.state_dict(), state,
                optional=lambda k: (tied and k == "lm_head.weight") or k.endswith("timestep_embedding.freq"))
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    init_nonpersistent_buffers(net)
    if tied:
        net.lm_head.weight = net.model.language_model.embed_tokens.weight
    net = net.float().eval()
    net.config._attn_implementation = "eager"
    return LoadedModel(
        model=net,
        layout=layout,
        source=str(model),
        tokenizer_file=tokenizer_file,
        weights_sha256=hash_files(files),
        diffusion=diffusion_settings(cfg, layout),
        token_ids=token_ids,
    )


# --- random models -----------------------------------------------------------------------------

def tiny_original_config(vocab_size: int) -> dict:
    """An original-layout config of the real architecture at toy width (like the shared fixture)."""
    tok = {
        "causal": True, "channels": 1, "conv_bias": True, "conv_norm": "none", "decoder_depths": None,
        "decoder_n_filters": 4, "decoder_ratios": [8, 5, 5, 4, 2, 2], "disable_last_norm": True,
        "encoder_depths": "1-1-1-1-1-1-2", "encoder_n_filters": 4, "encoder_ratios": [8, 5, 5, 4, 2, 2],
        "layer_scale_init_value": 1e-06, "layernorm": "RMSNorm", "layernorm_elementwise_affine": True,
        "layernorm_eps": 1e-05, "mixer_layer": "depthwise_conv", "pad_mode": "constant",
    }
    return {
        "model_type": "vibevoice", "acoustic_vae_dim": 16, "semantic_vae_dim": 32,
        "acoustic_tokenizer_config": {**tok, "vae_dim": 16, "fix_std": 0.5, "std_dist_type": "gaussian"},
        "semantic_tokenizer_config": {**tok, "vae_dim": 32, "fix_std": 0, "std_dist_type": "none"},
        "decoder_config": {
            "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
            "max_position_embeddings": 4096, "num_attention_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "tie_word_embeddings": True, "vocab_size": vocab_size,
        },
        "diffusion_head_config": {
            "ddpm_beta_schedule": "cosine", "ddpm_num_steps": 1000, "head_ffn_ratio": 3.0, "head_layers": 2,
            "hidden_size": 64, "latent_size": 16, "prediction_type": "v_prediction", "rms_norm_eps": 1e-05,
        },
    }


def byte_level_tokenizer_json(extra_special: tuple = ()) -> str:
    """A tiny byte-level BPE tokenizer (no merges) with VibeVoice's four special tokens (then `extra_special`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SPECIAL_TOKENS[k] for k in ("eos", "speech_start", "speech_end", "speech_diffusion")]
                           + list(extra_special))
    return tok.to_str()


def perturb_(model, seed: int, scale: float = 0.05) -> None:
    """Move every parameter off its initial value so that every path of the model matters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            if name.endswith(("gamma", "ffn_gamma")):
                p.copy_(0.3 + noise)  # layer scales: make the blocks contribute
            elif p.dim() <= 1:
                p.add_(noise)
            else:
                p.add_(noise * p.std().clamp(min=1e-3) / scale * 0.5)
        model.model.latent_scaling_factor.fill_(0.5)
        model.model.latent_bias_factor.fill_(0.1)


def random_model(original_config: dict, seed: int = 0, tokenizer_json: str | None = None,
                 source: str = "random") -> LoadedModel:
    """A randomly initialised VibeVoice of the architecture described by an original-layout config."""
    hf_kwargs = original_config_to_transformers(original_config)
    net = build_model(hf_kwargs, seed=seed)
    if hf_kwargs["text_config"]["hidden_size"] <= 256:
        perturb_(net, seed)
    if getattr(net.config.text_config, "tie_word_embeddings", False):
        net.lm_head.weight = net.model.language_model.embed_tokens.weight
    token_ids = {}
    if tokenizer_json is not None:
        token_ids = resolve_special_tokens(None, tokenizer_json)
    else:
        # Qwen2.5 ids of the special tokens (the full-size vocabulary)
        token_ids = {"eos": 151643, "speech_start": 151652, "speech_end": 151653, "speech_diffusion": 151654,
                     "pad": 151643}
    digest = hashlib.sha256(json.dumps(original_config, sort_keys=True).encode() + str(seed).encode()).hexdigest()
    return LoadedModel(model=net, layout=ORIGINAL, source=source, tokenizer_file=None, weights_sha256=digest,
                       diffusion=diffusion_settings(original_config, ORIGINAL), token_ids=token_ids,
                       tokenizer_json=tokenizer_json)


def _favour_speech(loaded: LoadedModel, seed: int, strength: float = 5.0) -> None:
    """Point the (untied) speech_diffusion row of lm_head along the mean final hidden state.

    A random LM picks one control token almost always (often speech_start, so a demo would stay silent).
    Text positions all project positively on that mean direction, fed-back speech frames about half
    the time: the demo model then speaks frames and sometimes ends, starts or stops a speech segment,
    exercising every path of the loop. Only lm_head changes; the input embeddings stay as they were.
    """
    import torch

    net = loaded.model
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, net.config.text_config.vocab_size, (4, 64), generator=gen)
    with torch.no_grad():
        hidden = net.model.language_model(input_ids=ids).last_hidden_state.reshape(-1, net.config.text_config.hidden_size)
        direction = hidden.mean(0)
        net.lm_head.weight[loaded.token_ids["speech_diffusion"]] = strength * direction / direction.norm()


def tiny_random_model(seed: int = 0) -> LoadedModel:
    """The README demo's model: the real architecture at toy width, random weights, byte-level tokenizer."""
    tokenizer_json = byte_level_tokenizer_json()
    vocab = json.loads(tokenizer_json)
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = tiny_original_config(size)
    config["decoder_config"]["tie_word_embeddings"] = False  # an untied head, like the 7B
    loaded = random_model(config, seed=seed, tokenizer_json=tokenizer_json, source=f"random-tiny(seed={seed})")
    _favour_speech(loaded, seed)
    return loaded

