"""The original -> transformers layout mapping, checked at full size without weights."""

import json

import pytest

from vv_export.errors import ExportError
from vv_export.layout import (ORIGINAL, TRANSFORMERS, detect_layout, map_state_dict_names,
                              original_config_to_transformers)


def _load(reference_dir, name):
    return json.loads((reference_dir / name).read_text())


def test_every_full_size_tensor_maps_with_equal_shape(reference_dir):
    original = _load(reference_dir, "vibevoice-1.5b-original-layout.json")
    hf = _load(reference_dir, "vibevoice-1.5b-transformers-layout.json")
    mapping = map_state_dict_names(original)
    assert len(mapping) == len(original) == 1205
    assert sorted(mapping.values()) == sorted(hf), "mapping must hit every transformers tensor exactly once"
    mismatched = {k: (original[k], hf[v]) for k, v in mapping.items() if original[k] != hf[v]}
    assert not mismatched


@pytest.mark.parametrize("config_name", ["vibevoice-1.5b-original-config.json", "vibevoice-7b-original-config.json"])
def test_converted_config_builds_the_transformers_layout(reference_dir, config_name):
    """original config -> transformers config -> model (meta device): same tensors as the released layout."""
    import torch

    from vv_export.checkpoint import build_model

    cfg = _load(reference_dir, config_name)
    with torch.device("meta"):
        model = build_model(original_config_to_transformers(cfg))
    state = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("timestep_embedding.freq")}
    if config_name.startswith("vibevoice-1.5b"):
        hf = _load(reference_dir, "vibevoice-1.5b-transformers-layout.json")
        assert state == hf
    else:  # 7B: untied head, a lm_head of its own
        assert cfg["decoder_config"]["tie_word_embeddings"] is False
        assert state["lm_head.weight"] == [cfg["decoder_config"]["vocab_size"], cfg["decoder_config"]["hidden_size"]]


def test_detect_layout():
    assert detect_layout({"decoder_config": {}, "acoustic_tokenizer_config": {}}) == ORIGINAL
    assert detect_layout({"model_type": "vibevoice", "text_config": {}, "audio_config": {}}) == TRANSFORMERS
    with pytest.raises(ExportError, match="not a VibeVoice config"):
        detect_layout({"model_type": "llama"})


def test_unknown_tensor_is_an_error():
    with pytest.raises(ExportError, match="no known mapping"):
        map_state_dict_names(["model.something_else.weight"])
