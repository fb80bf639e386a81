"""Torch modules with the exact I/O contract of each exported graph (see docs/ENGINE_DIR.md).

They reuse transformers' VibeVoice submodules (projections, norms, MLPs, conv stacks, diffusion head)
and only re-wire them: explicit KV-cache tensors and position ids for the LM, explicit flattened
convolution states for the streaming tokenizers, an unrolled DPM-Solver++ loop for the sampler.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEmbed(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed = embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


# Finite attention-mask bias (see LMStep._attention_bias): far below any real score, exactly zero weight
# after the softmax in fp32 (exp(-30000) underflows to 0), and representable in fp16 with room to spare:
# bias + score stays above -65504 (fp16's largest magnitude) for any score above -35000, so a masked
# score never overflows to -inf in an fp16/bf16 engine. -30000 is exact in fp16 and -29952 in bf16.
MASK_BIAS = -30000.0
# Initializers the exporter stores in fp32 whatever --dtype says (the RoPE table: values that must stay
# exact; 32 MiB at the 1.5B).
FP32_STORAGE_PREFIXES = ("rope_table.",)


class RopeTable(nn.Module):
    """fp32 RoPE cos/sin of every position the model supports, computed once at export, gathered by position.

    Angles `position * inv_freq` and their Sin/Cos lose everything in reduced precision (bf16 holds the
    positions 256..511 only every 2 steps, and an angle of ~8000 rad to within ~32 rad); gathered from an
    fp32 table, a reduced-precision engine only rounds the cos/sin values themselves (relative 2^-9 in
    bf16), like any other activation. The values are the rotary module's own (same formula, same fp32
    arithmetic), so fp32 results do not change. Size: 2 x max_positions x head_dim/2 fp32 values
    (32 MiB at VibeVoice-1.5B: 65536 positions, head_dim 128). Positions beyond the table are outside
    the model's max_position_embeddings, which the runtime never passes.
    """

    def __init__(self, rotary: nn.Module, max_positions: int, head_dim: int):
        super().__init__()
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            from .errors import ExportError

            raise ExportError(f"RoPE type {rope_type!r} depends on the sequence length: not exportable as a table")
        half = head_dim // 2
        with torch.no_grad():
            positions = torch.arange(int(max_positions), dtype=torch.int64)[None]
            cos, sin = rotary(torch.zeros((), dtype=torch.float32), positions)
        cos, sin = cos[0].float(), sin[0].float()
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            raise AssertionError("RoPE table: the two halves of cos/sin differ (unexpected rotary layout)")
        self.register_buffer("cos_half", cos[:, :half].contiguous().clone())
        self.register_buffer("sin_half", sin[:, :half].contiguous().clone())

    def forward(self, position_ids):
        cos = self.cos_half[position_ids]
        sin = self.sin_half[position_ids]
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


class SoftmaxFp32(nn.Module):
    """Attention probabilities `softmax(scores * scaling + mask bias)` from scores computed outside: one module
    per layer whose ONNX nodes are named `/attn_softmax_fp32.<i>/...`, kept in fp32 by the TensorRT plans
    (`keep_fp32_names` "*_fp32*"), while the q k^T products before it run in the engine's precision.
    Grouped-query attention without repeated keys: scores [B, KV, groups, seq, total], bias
    [B, 1, 1, seq, total]."""

    def __init__(self, scaling: float):
        super().__init__()
        self.scaling = scaling

    def forward(self, scores, bias):
        return torch.softmax(scores * self.scaling + bias, dim=-1)


class DecoderStep(nn.Module):
    """Qwen2 decoder layers over new positions, with the cache of earlier positions as one input tensor.

    past_kv [L, 2, B, KV, past, D] -> new_kv [L, 2, B, KV, seq, D]: the graph returns only the keys and
    values of the new positions; the caller owns the cache. The attention mask covers past + seq slots
    and is combined with causality, so masked (padding, dropped or reset) slots get exactly zero weight.
    A query always attends its own slot, so a padded query never has every key masked (its softmax
    stays finite; real rows never depend on it). `decode` returns the last layer's hidden states of
    every new position, before the model's final norm; the graphs built on it pick their outputs.

    The cache is read where it lives, never copied: the cached and the new keys are scored apart (q K_past^T
    and q k_new^T), only the scores are concatenated (past + seq per query: small) for one softmax, and the
    output is P_past V_past + P_new v_new. (Concatenating the cache with the new positions in every layer
    would read the cache twice and write it once per call.) The caller writes `new_kv` into its cache
    (vv_runtime.kv_cache.KVCache.write_rows: one batched index write per decode step).

    Reduced precision (docs/PRECISION.md): RoPE cos/sin come from an fp32 table (RopeTable), the mask
    bias is finite (MASK_BIAS), and the softmax (with its scale and mask bias) lives in `attn_softmax_fp32.<i>`,
    the only part of the attention kept in fp32: the q k^T and P V products run in the engine's precision.
    """

    def __init__(self, language_model):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb
        self.layers = language_model.layers
        cfg = language_model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope_table = RopeTable(language_model.rotary_emb, cfg.max_position_embeddings, self.head_dim)
        self.attn_softmax_fp32 = nn.ModuleList([SoftmaxFp32(float(layer.self_attn.scaling))
                                                for layer in self.layers])

    def _attention_bias(self, attention_mask, past: int, seq: int):
        """[B, 1, seq, past + seq] additive bias: 0 where a query attends a key, MASK_BIAS elsewhere."""
        device = attention_mask.device
        q_pos = torch.arange(seq, device=device) + past
        k_pos = torch.arange(past + seq, device=device)
        causal = (k_pos[None, :] <= q_pos[:, None])[None, None]
        own = (k_pos[None, :] == q_pos[:, None])[None, None]
        allowed = causal & ((attention_mask[:, None, None, :] > 0) | own)
        return torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), MASK_BIAS, dtype=torch.float32))

    def _grouped(self, q, bsz, seq):
        """Queries [B, heads, seq, D] as [B, KV, groups, seq, D]: query head h = j * groups + g uses key/value
        head j, so the keys and values of a group are broadcast over its queries (MatMul batch
        broadcasting), never repeated in memory."""
        return q.reshape(bsz, self.num_kv, self.num_heads // self.num_kv, seq, self.head_dim)

    def _attend(self, i: int, q, k, v, past_kv, bias, bsz, seq):
        """Layer i's attention output [B, KV, groups, seq, D] of queries q [B, heads, seq, D] over the cached
        keys/values (past_kv[i], read in place) and the new ones k, v [B, KV, seq, D]."""
        q = self._grouped(q, bsz, seq)
        past = past_kv.shape[4]
        past_keys, past_values = past_kv[i, 0].unsqueeze(2), past_kv[i, 1].unsqueeze(2)  # [B, KV, 1, past, D]
        new_keys, new_values = k.unsqueeze(2), v.unsqueeze(2)                            # [B, KV, 1, seq, D]
        scores = torch.cat([torch.matmul(q, past_keys.transpose(-2, -1)),
                            torch.matmul(q, new_keys.transpose(-2, -1))], dim=-1)        # [B, KV, G, seq, total]
        probs = self.attn_softmax_fp32[i](scores, bias)
        return torch.matmul(probs[..., :past], past_values) + torch.matmul(probs[..., past:], new_values)

    def decode(self, inputs_embeds, attention_mask, position_ids, past_kv):
        """(hidden [B, seq, H] of the last layer, no final norm; new_kv [L, 2, B, KV, seq, D])."""
        bsz, seq, _ = inputs_embeds.shape
        past = past_kv.shape[4]
        cos, sin = self.rope_table(position_ids)
        bias = self._attention_bias(attention_mask, past, seq).unsqueeze(2)  # [B, 1, 1, seq, total]
        hidden = inputs_embeds
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, seq, self.num_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(bsz, seq, self.num_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            new_keys.append(k)
            new_values.append(v)
            out = self._attend(i, q, k, v, past_kv, bias, bsz, seq).reshape(bsz, self.num_heads, seq, self.head_dim)
            out = out.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        new_kv = torch.stack([torch.stack(new_keys, 0), torch.stack(new_values, 0)], 1)
        return hidden, new_kv


class LMStep(DecoderStep):
    """VibeVoice's LM step (DecoderStep): the last position's final-normed hidden state and the logits of
    the 4 control tokens only."""

    def __init__(self, language_model, lm_head_weight: torch.Tensor, control_ids: list[int]):
        super().__init__(language_model)
        self.norm = language_model.norm
        self.control_weight = nn.Parameter(lm_head_weight.detach()[control_ids].clone(), requires_grad=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_kv):
        hidden, new_kv = self.decode(inputs_embeds, attention_mask, position_ids, past_kv)
        hidden = self.norm(hidden)
        last = hidden[:, -1, :]
        logits = torch.matmul(last, self.control_weight.t())
        return last, logits, new_kv


class AcousticEncoder(nn.Module):
    def __init__(self, audio_tower, projector, scale, bias):
        super().__init__()
        self.encoder = audio_tower.encoder
        self.projector = projector
        self.register_buffer("scale", scale.detach().reshape(()).clone())
        self.register_buffer("bias", bias.detach().reshape(()).clone())

    def forward(self, audio):
        mean = self.encoder(audio).latents
        return mean, self.projector((mean + self.bias) * self.scale)


# --- streaming convolution states -----------------------------------------------------------

def conv_state_layout(stack: nn.Module) -> list[dict]:
    """Every causal (transposed) convolution of a tokenizer stack with the context it carries."""
    layout = []
    for name, module in stack.named_modules():
        if hasattr(module, "left_pad") and hasattr(module, "cache_key"):
            layout.append({"name": name, "channels": int(module.in_channels), "length": int(module.left_pad),
                           "module": module})
    return layout


class _ExplicitStateCache:
    """Duck-types transformers' padding cache: states come in as tensors and go out as tensors."""

    def __init__(self, states: dict[int, torch.Tensor]):
        self.states = states
        self.new: dict[int, torch.Tensor] = {}

    def update(self, hidden_states, cache_key, conv_module):
        key = id(conv_module)
        pad = conv_module.left_pad
        if pad == 0:
            self.new[key] = hidden_states[:, :, :0]
            return hidden_states
        full = torch.cat([self.states[key], hidden_states], dim=-1)
        self.new[key] = full[:, :, -pad:]
        if isinstance(getattr(conv_module, "convtr", None), nn.ConvTranspose1d):
            # a transposed convolution keeps only its last `time * stride` outputs, which depend on the
            # last time + (kernel - 1) // stride input frames alone: the older cached frames would be
            # multiplied by the whole weight for outputs that are thrown away (16x the work at the
            # decoder's first upsampling). Same values.
            needed = hidden_states.shape[-1] + (conv_module.convtr.kernel_size[0] - 1) // conv_module.convtr.stride[0]
            return full[:, :, -needed:]
        return full


class _StreamingStack(nn.Module):
    def __init__(self, stack: nn.Module):
        super().__init__()
        self.stack = stack
        self.layout = [{k: v for k, v in e.items() if k != "module"} for e in conv_state_layout(stack)]
        self._modules_in_order = [e["module"] for e in conv_state_layout(stack)]
        self.state_size = sum(e["channels"] * e["length"] for e in self.layout)

    def _split(self, state):
        states, offset = {}, 0
        for entry, module in zip(self.layout, self._modules_in_order):
            size = entry["channels"] * entry["length"]
            states[id(module)] = state[:, offset:offset + size].reshape(-1, entry["channels"], entry["length"])
            offset += size
        return states

    def _join(self, cache: _ExplicitStateCache, batch):
        parts = [cache.new[id(m)].reshape(batch, -1) for m in self._modules_in_order]
        return torch.cat(parts, dim=1)

    def run(self, hidden, state):
        cache = _ExplicitStateCache(self._split(state))
        out = self.stack(hidden, padding_cache=cache)
        return out, self._join(cache, hidden.shape[0])


class AcousticDecoderStep(_StreamingStack):
    """One latent frame (diffusion space) + conv state -> hop samples + new state."""

    def __init__(self, audio_tower, scale, bias):
        super().__init__(audio_tower.decoder)
        self.register_buffer("scale", scale.detach().reshape(()).clone())
        self.register_buffer("bias", bias.detach().reshape(()).clone())

    def forward(self, latent, state):
        z = latent / self.scale - self.bias
        out, new_state = self.run(z.permute(0, 2, 1), state)
        return out.audio, new_state


class SemanticEncoderStep(_StreamingStack):
    """hop samples + conv state -> semantic features, their LM embedding, new state."""

    def __init__(self, semantic_encoder, connector):
        super().__init__(semantic_encoder)
        self.connector = connector

    def forward(self, audio, state):
        out, new_state = self.run(audio, state)
        features = out.latents
        return features, self.connector(features), new_state


class Connector(nn.Module):
    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, x):
        return self.projector(x)


# --- diffusion -----------------------------------------------------------------------------------

class FinalNorm(nn.Module):
    """The diffusion head final layer's parameter-free RMSNorm, as a module: its ONNX nodes are named
    `/final_norm/...` (kept in fp32 by the plans' "*norm*"), including the `+ eps` of the statistic."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, hidden):
        return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), eps=self.eps)


def _final_layer(final_layer, final_norm, hidden, condition):
    """transformers' VibeVoiceDiffusionHeadFinalLayer.forward with the norm in `final_norm`."""
    shift, scale = final_layer.linear_1(final_layer.act_fn(condition)).chunk(final_layer.num_chunks, dim=-1)
    return final_layer.linear_2(final_norm(hidden) * (1 + scale) + shift)


def _cfg(velocity, cfg_scale):
    pair = velocity.reshape(2, -1, velocity.shape[-1])
    pos, neg = pair[0], pair[1]
    return neg + cfg_scale * (pos - neg)


class TimestepEmbeddingFp32(nn.Module):
    """The head's sinusoidal timestep embedding, [B] -> [B, F] = [cos(t * freq), sin(t * freq)].

    The angles reach 999 rad (t up to 999, freq up to 1): in bf16 t = 999 is already 1000 and a rounded
    angle is off by up to 2 rad, in fp16 by 0.25 rad. So the angles and their Sin/Cos are computed here,
    in nodes named `/timestep_fp32/...` that the TensorRT plans keep in fp32 (`keep_fp32_names`), straight
    from the fp32 `timestep` input: the product `freq[F/2, 1] * t[B]` broadcasts without reshaping t, so
    no data-movement node (which a plan cannot pin) sits between the input and the kept nodes. The
    values equal the head's own (`t[:, None] * freq[None]`, one fp32 product each).
    """

    def __init__(self, sinusoidal: nn.Module):
        super().__init__()
        self.register_buffer("freq_col", sinusoidal.freq.detach().float().reshape(-1, 1).clone())

    def forward(self, timestep):
        angles = self.freq_col * timestep  # [F/2, B]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=0).t()


class DiffusionStep(nn.Module):
    """One head evaluation of [positive; negative] conditions, combined with classifier-free guidance.

    The head's forward, re-wired only so that the timestep embedding comes from TimestepEmbeddingFp32
    (computed once per row, then duplicated for the two branches) and the final layer's norm is a named
    module (FinalNorm).
    """

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.timestep_fp32 = TimestepEmbeddingFp32(head.timestep_embedding)
        self.final_norm = FinalNorm(head.final_layer.rms_norm_eps)

    def forward(self, sample, timestep, pos_condition, neg_condition, cfg_scale):
        head = self.head
        x = torch.cat([sample, sample], 0)
        c = torch.cat([pos_condition, neg_condition], 0)
        emb = self.timestep_fp32(timestep)
        t_embed = head.timestep_proj(torch.cat([emb, emb], 0))
        condition = head.cond_proj(c) + t_embed
        hidden = head.noisy_images_proj(x)
        for layer in head.layers:
            hidden = layer(hidden, condition)
        return _cfg(_final_layer(head.final_layer, self.final_norm, hidden, condition), cfg_scale)


class DiffusionSampler(nn.Module):
    """The whole N-step DPM-Solver++ loop with CFG: noise + conditions -> latent (+ its LM embedding).

    The condition projection is computed once and each step's timestep embedding is a constant, so every
    step's condition is known before the first step: the adaLN modulations of all steps (each layer's
    shift/scale/gate and the final layer's shift/scale, ~30 % of the head's weights) are computed for all
    steps in one product per layer, reading those weights once per call instead of once per step. Only
    the feed-forward layers, which depend on the sample, run step by step. Same values as the head's own
    forward (the same products, batched).
    """

    def __init__(self, head, projector, coefficients: dict):
        super().__init__()
        self.head = head
        self.projector = projector
        self.final_norm = FinalNorm(head.final_layer.rms_norm_eps)
        self.coef = coefficients
        with torch.no_grad():
            t = torch.tensor(coefficients["timesteps"], dtype=torch.float32)
            temb = head.timestep_proj(head.timestep_embedding(t))
        self.register_buffer("t_embed", temb.detach().clone())

    def _modulations(self, cond):
        """[steps, 2B, H] conditions -> per layer (shift, scale, gate) and the final (shift, scale), each
        [steps, 2B, H]."""
        conditions = cond.unsqueeze(0) + self.t_embed.unsqueeze(1)
        layers = [layer.linear(layer.act_fn(conditions)).chunk(layer.num_chunks, dim=-1) for layer in self.head.layers]
        final = self.head.final_layer
        return layers, final.linear_1(final.act_fn(conditions)).chunk(final.num_chunks, dim=-1)

    def _velocity(self, x, k, layer_mods, final_mod):
        hidden = self.head.noisy_images_proj(torch.cat([x, x], 0))
        for layer, (shift, scale, gate) in zip(self.head.layers, layer_mods):
            hidden = hidden + gate[k] * layer.ffn(layer.norm(hidden) * (1 + scale[k]) + shift[k])
        shift, scale = final_mod
        return self.head.final_layer.linear_2(self.final_norm(hidden) * (1 + scale[k]) + shift[k])

    def forward(self, noise, pos_condition, neg_condition, cfg_scale):
        cond = self.head.cond_proj(torch.cat([pos_condition, neg_condition], 0))
        layer_mods, final_mod = self._modulations(cond)
        x = noise
        prev_x0 = None
        c = self.coef
        for k in range(len(c["timesteps"])):
            v = _cfg(self._velocity(x, k, layer_mods, final_mod), cfg_scale)
            x0 = c["alpha"][k] * x - c["sigma"][k] * v
            new_x = c["d0"][k] * x0
            if c["ratio"][k] != 0.0:
                new_x = c["ratio"][k] * x + new_x
            if c["d1"][k] != 0.0:
                new_x = new_x + c["d1"][k] * (x0 - prev_x0)
            prev_x0 = x0
            x = new_x
        return x, self.projector(x)
