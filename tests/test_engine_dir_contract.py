"""The ENGINE_DIR contract (docs/ENGINE_DIR.md, vv_engine_dir): the graph roles, written by the exporter,
documented, read by the runtime (which graphs a backend loads) and by the plans (which engines are built, in
order); the model families and the voice presets table, documented and checked by the one reader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import vv_engine_dir
from vv_export import engine_dir as export_engine_dir
from vv_export.errors import ExportError
from vv_runtime import manifest as runtime_manifest
from vv_runtime.errors import RuntimeInputError

DOC = Path(__file__).resolve().parents[1] / "docs" / "ENGINE_DIR.md"
EXPECTED_ROLES = {
    "text_embed": "loop", "lm": "loop", "acoustic_encoder": "loop",
    "acoustic_decoder": "per-frame", "semantic_encoder": "per-frame", "diffusion_sampler": "per-frame",
    "acoustic_connector": "auxiliary", "semantic_connector": "auxiliary", "diffusion_step": "auxiliary",
}


@pytest.fixture()
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


@pytest.fixture()
def engine_copy(tiny_engine_dir, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, out, ignore=shutil.ignore_patterns("validation"))
    return out


def _rewrite(path: Path, change) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))
    return m


def test_exporter_writes_every_role(manifest):
    assert {g: e.get("role") for g, e in manifest["graphs"].items()} == EXPECTED_ROLES
    assert export_engine_dir.ROLES == runtime_manifest.ROLES == ("loop", "per-frame", "auxiliary")
    assert export_engine_dir.graph_roles(manifest) == runtime_manifest.graph_roles(manifest) == EXPECTED_ROLES
    # both sides fall back to the same roles for manifests written before the field existed
    for g, role in EXPECTED_ROLES.items():
        assert export_engine_dir.DEFAULT_ROLES[g] == role
        assert runtime_manifest.DEFAULT_ROLES.get(g, "auxiliary") == role


def test_roles_are_documented():
    text = DOC.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\w+) \| (loop|per-frame|auxiliary) \|", text, flags=re.M))
    assert rows == EXPECTED_ROLES, "docs/ENGINE_DIR.md's roles table differs from the exporter's roles"
    assert '"role"' in text


def test_runtime_reads_roles(engine_copy, manifest):
    loaded = runtime_manifest.load_manifest(engine_copy)
    assert runtime_manifest.required_graphs(loaded) == [g for g, r in EXPECTED_ROLES.items() if r != "auxiliary"]
    assert runtime_manifest.graphs_with_role(loaded, "per-frame") == ["acoustic_decoder", "semantic_encoder",
                                                                      "diffusion_sampler"]
    # without roles (an older manifest): the fallback gives the same graphs
    _rewrite(engine_copy, lambda m: [e.pop("role") for e in m["graphs"].values()])
    old = runtime_manifest.load_manifest(engine_copy)
    assert runtime_manifest.graph_roles(old) == EXPECTED_ROLES
    assert sorted(runtime_manifest.required_graphs(old)) == sorted(runtime_manifest.REQUIRED_GRAPHS)
    # a graph the loop needs becomes required through its role
    _rewrite(engine_copy, lambda m: m["graphs"]["diffusion_step"].update(role="per-frame"))
    assert "diffusion_step" in runtime_manifest.required_graphs(runtime_manifest.load_manifest(engine_copy))


@pytest.mark.parametrize("graph,role,message", [
    ("diffusion_step", "sometimes", "role 'sometimes'"),
    ("lm", "auxiliary", "graph 'lm' has role 'auxiliary', but the generation loop calls it"),
])
def test_bad_roles_are_refused_in_one_line(engine_copy, graph, role, message):
    _rewrite(engine_copy, lambda m: m["graphs"][graph].update(role=role))
    with pytest.raises(RuntimeInputError) as info:
        runtime_manifest.load_manifest(engine_copy)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_exporter_reader_checks_roles(engine_copy):
    assert export_engine_dir.read_manifest(engine_copy)["graphs"]["lm"]["role"] == "loop"
    _rewrite(engine_copy, lambda m: m["graphs"]["lm"].update(role="often"))
    with pytest.raises(ExportError, match="graph 'lm' has role 'often'"):
        export_engine_dir.read_manifest(engine_copy)


def test_plans_build_the_manifests_graphs_in_its_order(manifest):
    from vv_export.plans import resolve_plan

    assert list(resolve_plan("default", manifest).graphs) == list(manifest["graphs"])
    reordered = {**manifest, "graphs": dict(reversed(list(manifest["graphs"].items())))}
    assert list(resolve_plan("default", reordered).graphs) == list(reversed(list(manifest["graphs"])))


# --- model families and voice presets ---------------------------------------------------------------

def _streaming_engine_dir(path: Path, **changes) -> Path:
    """A minimal ENGINE_DIR of the vibevoice_streaming family (empty graph files: the reader opens none)."""
    graphs = {name: {"file": f"{name}.onnx", "role": role, "inputs": [], "outputs": []}
              for name, role in vv_engine_dir.FAMILIES["vibevoice_streaming"].graph_roles.items()}
    manifest = {"format": vv_engine_dir.FORMAT, "format_version": vv_engine_dir.FORMAT_VERSION,
                "model_family": "vibevoice_streaming", "model": {}, "tokens": {"endoftext": 0, "pad": 1},
                "streaming": {"text_window": 5, "speech_window": 6}, "diffusion": {"steps": 5}, "graphs": graphs}
    manifest.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    for graph in graphs.values():
        (path / graph["file"]).write_bytes(b"")
    (path / "tokenizer.json").write_text("{}")
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _refusal(engine_dir: Path) -> str:
    """The one-line message of the reader, the same on the contract's, the runtime's and the exporter's side."""
    with pytest.raises(vv_engine_dir.EngineDirError) as contract:
        vv_engine_dir.read_manifest(engine_dir)
    with pytest.raises(RuntimeInputError) as runtime:
        runtime_manifest.load_manifest(engine_dir)
    with pytest.raises(ExportError) as exporter:
        export_engine_dir.read_manifest(engine_dir)
    message = str(contract.value)
    assert str(runtime.value) == str(exporter.value) == message and "\n" not in message
    return message


def test_families_are_documented():
    text = DOC.read_text(encoding="utf-8")
    families = {name: (fields, tokens) for name, fields, tokens in
                re.findall(r"^\| (\w+) \| [^|]+ \| ([\w, ]+) \| ([\w, ]+) \|$", text, flags=re.M)}
    assert families == {name: (", ".join(f.fields), ", ".join(f.tokens))
                        for name, f in vv_engine_dir.FAMILIES.items()}, "docs/ENGINE_DIR.md's families table"
    roles: dict[str, dict[str, str]] = {"vibevoice": EXPECTED_ROLES}
    for family, graph, role in re.findall(r"^\| (\w+) \| (\w+) \| (loop|per-frame|auxiliary) \|", text, flags=re.M):
        roles.setdefault(family, {})[graph] = role
    assert roles == {name: f.graph_roles for name, f in vv_engine_dir.FAMILIES.items()}
    assert vv_engine_dir.FAMILIES["vibevoice"].control_tokens == vv_engine_dir.CONTROL_TOKENS
    assert vv_engine_dir.FAMILIES["vibevoice_streaming"].control_tokens is None
    assert '"model_family"' in text and '"voices"' in text


def test_a_manifest_without_family_is_vibevoice(engine_copy, manifest):
    assert manifest["model_family"] == "vibevoice"  # the exporter writes it
    _rewrite(engine_copy, lambda m: m.pop("model_family"))
    loaded = vv_engine_dir.read_manifest(engine_copy)
    assert vv_engine_dir.model_family(loaded).name == "vibevoice"
    assert vv_engine_dir.required_graphs(loaded) == [g for g, r in EXPECTED_ROLES.items() if r != "auxiliary"]


def test_unknown_family_is_refused_naming_the_known_ones(engine_copy):
    _rewrite(engine_copy, lambda m: m.update(model_family="vibevoice_9000"))
    message = _refusal(engine_copy)
    assert "unknown model_family 'vibevoice_9000' (known: vibevoice, vibevoice_streaming)" in message


def test_streaming_family_has_its_own_graphs_and_fields(tmp_path):
    engine_dir = _streaming_engine_dir(tmp_path / "streaming")
    loaded = vv_engine_dir.read_manifest(engine_dir)  # no control_tokens, no prompt, no lm
    assert vv_engine_dir.required_graphs(loaded) == ["text_embed", "text_lm", "tts_lm", "diffusion_sampler",
                                                     "acoustic_decoder"]
    # roles not recorded: the family's roles
    _rewrite(engine_dir, lambda m: [entry.pop("role") for entry in m["graphs"].values()])
    assert vv_engine_dir.graph_roles(vv_engine_dir.read_manifest(engine_dir)) == \
        vv_engine_dir.FAMILIES["vibevoice_streaming"].graph_roles
    only_embed = {"text_embed": {"file": "text_embed.onnx", "inputs": [], "outputs": []}}
    assert "graph 'text_lm' not listed" in _refusal(_streaming_engine_dir(tmp_path / "no-lms", graphs=only_embed))
    no_windows = _streaming_engine_dir(tmp_path / "no-windows")
    _rewrite(no_windows, lambda m: m.pop("streaming"))
    assert "missing field 'streaming'" in _refusal(no_windows)
    assert "tokens.endoftext missing" in _refusal(_streaming_engine_dir(tmp_path / "no-eot", tokens={"pad": 1}))


def test_voice_presets_table_is_checked(tmp_path):
    voices = {"en-Carter_man": {"file": "voices/en-Carter_man.safetensors",
                                "positions": {"text_lm": 8, "tts_lm": 12, "neg_text_lm": 1, "neg_tts_lm": 1}}}
    engine_dir = _streaming_engine_dir(tmp_path / "streaming", voices=voices)
    assert "voices/en-Carter_man.safetensors: file of voice 'en-Carter_man' is missing" in _refusal(engine_dir)
    (engine_dir / "voices").mkdir()
    (engine_dir / "voices" / "en-Carter_man.safetensors").write_bytes(b"")
    assert vv_engine_dir.read_manifest(engine_dir)["voices"] == voices
    _rewrite(engine_dir, lambda m: m["voices"].update(other={"positions": {}}))
    assert "voice 'other' names no file" in _refusal(engine_dir)
    _rewrite(engine_dir, lambda m: m.update(voices=["en-Carter_man"]))
    assert "voices is not a table of voice presets" in _refusal(engine_dir)
