"""Checkpoint loading: both layouts, sharded weights, tied/untied heads, tokenizer resolution."""

import json
import shutil

import numpy as np
import pytest
import torch

from vv_export.checkpoint import resolve_special_tokens
from vv_export.families import load_checkpoint
from vv_export.errors import ExportError


def _same_lm(a, b):
    x = torch.randn(1, 5, a.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ha = a.model.language_model(inputs_embeds=x).last_hidden_state
        hb = b.model.language_model(inputs_embeds=x).last_hidden_state
    return torch.equal(ha, hb)


def test_transformers_layout_directory_loads_the_same_model(fixture_dir, tmp_path):
    original = load_checkpoint(str(fixture_dir))
    hf_dir = tmp_path / "hf"
    original.model.save_pretrained(hf_dir)
    shutil.copy(fixture_dir / "tokenizer.json", hf_dir / "tokenizer.json")
    loaded = load_checkpoint(str(hf_dir))
    assert loaded.layout == "transformers"
    assert loaded.token_ids == original.token_ids
    sa, sb = original.model.state_dict(), loaded.model.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _same_lm(original.model, loaded.model)


def test_sharded_original_checkpoint_with_index(fixture_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(fixture_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(fixture_dir / name, tmp_path / name)
    sharded = load_checkpoint(str(tmp_path))
    assert _same_lm(sharded.model, load_checkpoint(str(fixture_dir)).model)
    # a shard named in the index but missing is reported by name
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(str(tmp_path))


def test_untied_head_uses_its_own_lm_head(fixture_dir, tmp_path):
    """A 7B-style checkpoint (untied head): the LM graph's control logits come from lm_head, not embeddings."""
    from safetensors.torch import load_file, save_file

    from vv_export.specs import ExportContext
    from vv_export.wrappers import LMStep

    cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg["decoder_config"]["tie_word_embeddings"] = False
    tensors = load_file(str(fixture_dir / "model.safetensors"))
    head = torch.randn_like(tensors["model.language_model.embed_tokens.weight"])
    tensors["lm_head.weight"] = head
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(fixture_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    loaded = load_checkpoint(str(tmp_path))
    net = loaded.model
    assert not torch.equal(net.lm_head.weight, net.model.language_model.embed_tokens.weight)
    ctx = ExportContext(loaded)
    step = LMStep(net.model.language_model, net.lm_head.weight, ctx.control_ids)
    assert torch.equal(step.control_weight, head[ctx.control_ids])


def test_original_checkpoint_without_tokenizer_needs_tokenizer_option(fixture_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(fixture_dir / name)
    with pytest.raises(ExportError, match="--tokenizer"):
        load_checkpoint(str(tmp_path))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(fixture_dir / "tokenizer.json", tok_dir / "tokenizer.json")
    assert load_checkpoint(str(tmp_path), tokenizer_dir=str(tok_dir)).token_ids["speech_diffusion"] == 319


def test_special_tokens_are_resolved_by_their_strings(fixture_dir, tmp_path):
    ids = resolve_special_tokens(fixture_dir / "tokenizer.json")
    ref = json.loads((fixture_dir / "reference.json").read_text())["special_tokens"]
    assert {k: ids[k] for k in ref} == ref
    tok = json.loads((fixture_dir / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|vision_pad|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportError, match=r"<\|vision_pad\|>"):
        resolve_special_tokens(tmp_path / "tokenizer.json")


def test_hub_id_that_cannot_be_downloaded_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="no such directory, and the hub download failed"):
        load_checkpoint("nonexistent-org/nonexistent-model")


def test_storage_dtype_halves_weights_and_keeps_graph_io_fp32(fixture_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    from vv_export.onnx_export import export_onnx

    out = export_onnx(load_checkpoint(str(fixture_dir)), tmp_path / "bf16", dtype="bf16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bf16"
    model = onnx.load(str(out / "acoustic_decoder.onnx"))
    kinds = {init.data_type for init in model.graph.initializer if np.prod(init.dims) >= 1024}
    assert kinds == {onnx.TensorProto.BFLOAT16}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    sess = ort.InferenceSession(str(out / "acoustic_decoder.onnx"), providers=["CPUExecutionProvider"])
    audio, _ = sess.run(None, {"latent": np.zeros((1, 1, 16), np.float32),
                               "state": np.zeros((1, manifest["model"]["decoder_state_size"]), np.float32)})
    assert np.isfinite(audio).all()
