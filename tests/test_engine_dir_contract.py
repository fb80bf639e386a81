"""The graph roles of the ENGINE_DIR contract (docs/ENGINE_DIR.md): written by the exporter, documented,
read by the runtime (which graphs a backend loads) and by the plans (which engines are built, in order).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

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
