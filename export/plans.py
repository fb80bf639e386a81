"""TensorRT build plans: load ``trt_plans/<name>.toml`` and resolve it against an ENGINE_DIR manifest.

A plan is declarative (see ``trt_plans/default.toml``): settings, builder options, per-precision
tolerances, default dimension ranges and one section per graph with its precision and optimisation
profiles as min/opt/max per *named* dynamic dimension. Resolving a plan against a manifest turns every
profile into concrete min/opt/max shapes per graph input (the manifest's I/O shapes are lists of ints
and dimension names) and validates everything; any problem is one line naming the plan, the place
and the fix.

Precisions: fp32, fp16, bf16 (the whole engine at that float precision, keep_fp32 layers aside) and the
explicitly quantized fp8 and int8wo (vv_export.qdq: FP8 E4M3 weights and activations of the weight
MatMuls, the rest bf16; INT8 weight-only, the rest bf16). A graph at fp8/int8wo needs a tolerance of its
own for that precision (its error is the graph's, measured by the CPU emulation: docs/QUANTIZATION.md);
`precision=` (`vv-export trt --precision`) overrides with fp32/fp16/bf16 only.

Hashes: ``GraphPlan.hash`` covers everything that changes the engine of one graph (concrete profile
shapes, precision, builder options; for fp8/int8wo the Q/DQ rewrite's format) and nothing else, so
editing the lm section never rebuilds the decoder, and editing a tolerance rebuilds nothing.
``Plan.hash`` combines the graph hashes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import operator
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .engine_dir import DERIVED_DIMS
from .errors import ExportError, one_line
from .graph_rules import ACTIVATION_PRECISION, CACHE_DTYPES, KEEP_FP32_OPS, QDQ_FORMAT, QDQ_PRECISIONS

# Graph names a plan may have sections for (the exporter's graphs of both model families: text_lm and tts_lm
# are VibeVoice-Realtime's); what is built is the manifest's graphs, in the manifest's order.
PLAN_GRAPHS = ("text_embed", "lm", "text_lm", "tts_lm", "acoustic_encoder", "acoustic_decoder",
               "semantic_encoder", "acoustic_connector", "semantic_connector", "diffusion_step", "diffusion_sampler")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8wo")
# what `precision=` may set for every graph at once: fp8/int8wo are chosen per graph (some graphs have no
# weight MatMul, and each needs its own measured tolerance): plans fp8 / int8wo
OVERRIDE_PRECISIONS = ("fp32", "fp16", "bf16")
# Dimensions whose range may include 0 (the prefill profile has no past).
ZERO_OK_DIMS = ("past",)
# Dimensions that count positions (cache slots, new inputs): at most max_position_embeddings each.
POSITION_DIMS = ("past", "seq")
PLAN_FORMAT = 1  # bumped when the meaning of a plan field changes: every engine's hash changes

_TOP_KEYS = {"name", "description", "extends", "settings", "builder", "tolerance", "dims", "graphs"}
_GRAPH_KEYS = {"precision", "profiles", "builder", "tolerance", "description"}
_BUILDER_DEFAULTS = {
    "optimization_level": 3,
    "workspace_mib": 8192,
    "timing_cache": True,
    "tf32": False,
    "typing": "auto",
    "keep_fp32": [],
    "keep_fp32_names": [],
    "precision_constraints": "obey",
    "cache_dtype": "fp32",  # an LM engine's cache I/O (past_kv, new_kv): graph_rules.CACHE_DTYPES
}
_TYPINGS = ("auto", "weak", "strong")
_CONSTRAINTS = ("obey", "prefer", "none")
# Manifest constants usable in plan expressions: name -> manifest["model"] key
_MODEL_CONSTANTS = {"hop": "hop_length", "sample_rate": "sample_rate", "hidden_size": "hidden_size",
                    "max_position_embeddings": "max_position_embeddings"}


class PlanError(ExportError):
    """A plan that cannot be loaded or does not fit the manifest (one line)."""


@dataclass(frozen=True)
class Profile:
    """One optimisation profile, resolved: dimension ranges and concrete input shapes."""

    name: str
    dims: dict  # dim name -> (min, opt, max), derived dims included
    shapes: dict  # input name -> (min shape, opt shape, max shape), each a tuple of ints

    def to_json(self) -> dict:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()},
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    def contains(self, shapes: dict) -> bool:
        """Whether concrete input shapes (name -> tuple) lie within this profile's min..max."""
        for name, (lo, _, hi) in self.shapes.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(lo):
                return False
            if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                return False
        return True


@dataclass
class GraphPlan:
    graph: str
    precision: str
    profiles: list  # of Profile
    builder: dict
    tolerance: dict  # precision -> output -> {"atol", "rtol"} ("" = default for other outputs)
    outputs: list = field(default_factory=list)

    def hash_payload(self) -> dict:
        payload = {"format": PLAN_FORMAT, "graph": self.graph, "precision": self.precision,
                   "profiles": [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                                for p in self.profiles],
                   "builder": self.builder}
        if self.precision in QDQ_PRECISIONS:
            payload["qdq_format"] = QDQ_FORMAT  # the engine is built from vv_export.qdq's rewrite
            payload["activations"] = ACTIVATION_PRECISION[self.precision]  # ... and the type of its float parts
        return payload

    @property
    def hash(self) -> str:
        return _sha256_json(self.hash_payload())

    def tolerance_for(self, precision: str | None = None) -> dict:
        """Per-output {"atol", "rtol"} for TensorRT (at `precision`) against ONNX Runtime fp32."""
        table = self.tolerance.get(precision or self.precision, {})
        default = table.get("")
        result = {}
        for out in self.outputs:
            tol = table.get(out, default)
            if tol is None:
                raise PlanError(f"plan: graph {self.graph!r} has no {precision or self.precision} tolerance "
                                f"for output {out!r}")
            result[out] = dict(tol)
        return result

    def to_json(self) -> dict:
        return {"precision": self.precision, "profiles": [p.to_json() for p in self.profiles],
                "builder": self.builder, "hash": self.hash}


@dataclass
class Plan:
    name: str
    description: str
    sources: list  # plan files, base first
    settings: dict  # resolved integer settings (after the manifest caps)
    notes: list  # human-readable remarks (caps applied)
    graphs: dict  # graph name -> GraphPlan

    @property
    def hash(self) -> str:
        return _sha256_json({"format": PLAN_FORMAT, "graphs": {g: p.hash for g, p in sorted(self.graphs.items())}})

    def to_json(self) -> dict:
        return {"name": self.name, "hash": self.hash, "settings": self.settings,
                "graphs": {g: p.to_json() for g, p in self.graphs.items()}}


# --- loading ------------------------------------------------------------------------------------

def plans_dir() -> Path:
    from vv_plans import PLANS_DIR

    return PLANS_DIR


def available_plans() -> list[str]:
    return sorted(p.stem for p in plans_dir().glob("*.toml"))


def plan_path(plan: str, relative_to: Path | None = None) -> Path:
    """The file of a plan given by name (a packaged plan) or by path to a .toml file."""
    if plan.endswith(".toml") or "/" in plan or "\\" in plan:
        path = Path(plan).expanduser()
        if not path.is_absolute() and relative_to is not None and not path.exists():
            path = relative_to / path
        if not path.is_file():
            raise PlanError(f"plan {plan}: no such file")
        return path
    for base in ([relative_to] if relative_to is not None else []) + [plans_dir()]:
        path = base / f"{plan}.toml"
        if path.is_file():
            return path
    raise PlanError(f"plan {plan!r}: unknown (available: {', '.join(available_plans())}; or give a path to a .toml file)")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_plan_data(plan: str) -> tuple[dict, list[Path]]:
    """The raw plan table with its `extends` chain merged in (base first), and the files read."""
    chain: list[Path] = []
    tables: list[dict] = []
    current, relative_to = plan, None
    while current is not None:
        path = plan_path(current, relative_to)
        if path.resolve() in [p.resolve() for p in chain]:
            raise PlanError(f"plan {plan}: `extends` cycle through {path.name}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan {path}: unreadable ({one_line(exc)})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PlanError(f"plan {path}: invalid TOML ({one_line(exc)})") from exc
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise PlanError(f"plan {path.name}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        chain.append(path)
        tables.append(data)
        parent = data.get("extends")
        if parent is not None and not isinstance(parent, str):
            raise PlanError(f"plan {path.name}: `extends` must be a plan name")
        current, relative_to = parent, path.parent
    merged: dict = {}
    for data in reversed(tables):
        merged = _merge(merged, {k: v for k, v in data.items() if k != "extends"})
    if "name" not in merged or tables[0].get("name") is None:
        merged["name"] = chain[0].stem
    return merged, list(reversed(chain))


# --- expressions --------------------------------------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_FUNCS = {"min": min, "max": max}


def evaluate(expr, names: dict, where: str) -> int:
    """An int, or an expression over `names` with + - * // min() max(); anything else is an error."""
    if isinstance(expr, bool):
        raise PlanError(f"{where}: expected an integer or an expression, got {expr!r}")
    if isinstance(expr, int):
        return expr
    if isinstance(expr, float) and expr.is_integer():
        return int(expr)
    if not isinstance(expr, str):
        raise PlanError(f"{where}: expected an integer or an expression, got {expr!r}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise PlanError(f"{where}: cannot parse {expr!r}") from exc

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                known = ", ".join(sorted(names))
                raise PlanError(f"{where}: unknown name {node.id!r} in {expr!r} (known: {known})")
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.FloorDiv) and right == 0:
                raise PlanError(f"{where}: division by zero in {expr!r}")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and node.args and not node.keywords):
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise PlanError(f"{where}: unsupported expression {expr!r} (integers, names, + - * //, min(), max())")

    return int(ev(tree))


def _range(value, names: dict, where: str) -> tuple[int, int, int]:
    if isinstance(value, dict):
        extra = sorted(set(value) - {"min", "opt", "max"})
        if extra or not {"min", "max"} <= set(value):
            raise PlanError(f"{where}: a range is [min, opt, max] or {{min = .., opt = .., max = ..}}")
        items = [value["min"], value.get("opt", value["min"]), value["max"]]
    elif isinstance(value, list) and len(value) == 3:
        items = value
    elif isinstance(value, (int, str)) and not isinstance(value, bool):
        items = [value] * 3  # a fixed value
    else:
        raise PlanError(f"{where}: a range is [min, opt, max] or {{min = .., opt = .., max = ..}}, got {value!r}")
    lo, opt, hi = (evaluate(v, names, where) for v in items)
    if not lo <= opt <= hi:
        raise PlanError(f"{where}: needs min <= opt <= max, got [{lo}, {opt}, {hi}]")
    return lo, opt, hi


# --- resolution ---------------------------------------------------------------------------------

def _model_constants(manifest: dict) -> dict:
    model = manifest.get("model") or {}
    consts = {}
    for name, key in _MODEL_CONSTANTS.items():
        if isinstance(model.get(key), int):
            consts[name] = model[key]
    return consts


def _graph_dims(entry: dict, side: str = "inputs") -> list[str]:
    dims: list[str] = []
    for io in entry.get(side) or []:
        for d in io.get("shape") or []:
            if isinstance(d, str) and d not in dims:
                dims.append(d)
    return dims


def _builder(raw: dict | None, base: dict, where: str) -> dict:
    out = dict(base)
    for key, value in (raw or {}).items():
        if key not in _BUILDER_DEFAULTS:
            raise PlanError(f"{where}: unknown builder option {key!r} (known: {', '.join(sorted(_BUILDER_DEFAULTS))})")
        out[key] = value
    lvl = out["optimization_level"]
    if isinstance(lvl, bool) or not isinstance(lvl, int) or not 0 <= lvl <= 5:
        raise PlanError(f"{where}: optimization_level must be an integer 0..5, got {lvl!r}")
    ws = out["workspace_mib"]
    if isinstance(ws, bool) or not isinstance(ws, int) or ws <= 0:
        raise PlanError(f"{where}: workspace_mib must be a positive integer, got {ws!r}")
    for key in ("timing_cache", "tf32"):
        if not isinstance(out[key], bool):
            raise PlanError(f"{where}: {key} must be true or false, got {out[key]!r}")
    if out["typing"] not in _TYPINGS:
        raise PlanError(f"{where}: typing must be one of {', '.join(_TYPINGS)}, got {out['typing']!r}")
    if out["precision_constraints"] not in _CONSTRAINTS:
        raise PlanError(f"{where}: precision_constraints must be one of {', '.join(_CONSTRAINTS)}, "
                        f"got {out['precision_constraints']!r}")
    if out["cache_dtype"] not in CACHE_DTYPES:
        raise PlanError(f"{where}: cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {out['cache_dtype']!r}")
    for key in ("keep_fp32", "keep_fp32_names"):
        if not isinstance(out[key], list) or not all(isinstance(x, str) for x in out[key]):
            raise PlanError(f"{where}: {key} must be a list of strings")
        out[key] = list(out[key])
    for op in out["keep_fp32"]:
        if op not in KEEP_FP32_OPS:
            raise PlanError(f"{where}: keep_fp32: unknown op type {op!r} (known: {', '.join(KEEP_FP32_OPS)})")
    return out


def _tolerance_entry(value, where: str) -> dict:
    if not isinstance(value, dict) or set(value) - {"atol", "rtol"} or not value:
        raise PlanError(f"{where}: a tolerance is {{atol = .., rtol = ..}}")
    out = {}
    for key in ("atol", "rtol"):
        v = value.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise PlanError(f"{where}: {key} must be a number >= 0, got {v!r}")
        out[key] = float(v)
    return out


def _tolerances(global_tol: dict, graph_tol: dict | None, outputs: list[str], where: str) -> dict:
    result: dict = {}
    for prec, tol in (global_tol or {}).items():
        if prec not in PRECISIONS:
            raise PlanError(f"plan tolerance: unknown precision {prec!r} (known: {', '.join(PRECISIONS)})")
        result[prec] = {"": _tolerance_entry(tol, f"plan tolerance.{prec}")}
    for prec, tol in (graph_tol or {}).items():
        w = f"{where}.tolerance.{prec}"
        if prec not in PRECISIONS:
            raise PlanError(f"{w}: unknown precision {prec!r} (known: {', '.join(PRECISIONS)})")
        if not isinstance(tol, dict):
            raise PlanError(f"{w}: expected a table")
        table = result.setdefault(prec, {})
        if set(tol) <= {"atol", "rtol"}:
            table[""] = _tolerance_entry(tol, w)
            continue
        for out, entry in tol.items():
            if out and out not in outputs:
                raise PlanError(f"{w}: unknown output {out!r} (outputs: {', '.join(outputs)})")
            table[out] = _tolerance_entry(entry, f"{w}.{out or '(default)'}")
    return result


def resolve_plan(plan: str | dict = "default", manifest: dict | None = None, precision: str | None = None,
                 graphs: list[str] | None = None) -> Plan:
    """Load (by name, path or an already merged table) and resolve a plan against a manifest.

    `precision` (fp32/fp16/bf16) overrides every graph's precision. `graphs` restricts the result to
    those graphs (each must be in both the plan and the manifest). A graph at fp8/int8wo must have a
    tolerance for that precision for every output.
    """
    if manifest is None or not isinstance(manifest.get("graphs"), dict):
        raise PlanError("plan: the manifest has no graphs")
    if isinstance(plan, dict):
        data, sources = copy.deepcopy(plan), []
    else:
        data, sources = load_plan_data(plan)
    pname = str(data.get("name") or (plan if isinstance(plan, str) else "plan"))
    where0 = f"plan {pname!r}"
    if precision is not None and precision not in OVERRIDE_PRECISIONS:
        extra = (f" ({precision} is chosen per graph by a plan: --plan {precision})"
                 if precision in QDQ_PRECISIONS else "")
        raise PlanError(f"--precision {precision}: expected one of {', '.join(OVERRIDE_PRECISIONS)}{extra}")

    # settings, in order, each may use the manifest constants and earlier settings
    names = _model_constants(manifest)
    settings: dict = {}
    for key, value in (data.get("settings") or {}).items():
        if key in _MODEL_CONSTANTS:
            raise PlanError(f"{where0}: setting {key!r} shadows a manifest constant")
        settings[key] = evaluate(value, {**names, **settings}, f"{where0}: settings.{key}")
    notes = []
    max_pos = names.get("max_position_embeddings")
    if "max_context" in settings and max_pos is not None and settings["max_context"] > max_pos:
        notes.append(f"max_context {settings['max_context']} capped to the model's max_position_embeddings {max_pos}")
        settings["max_context"] = max_pos
    if "max_prompt" in settings and "max_context" in settings and settings["max_prompt"] > settings["max_context"]:
        notes.append(f"max_prompt {settings['max_prompt']} capped to max_context {settings['max_context']}")
        settings["max_prompt"] = settings["max_context"]
    names = {**names, **settings}

    base_builder = _builder(data.get("builder"), _BUILDER_DEFAULTS, f"{where0}: builder")

    manifest_graphs = manifest["graphs"]
    known_dims = set(manifest.get("dims") or {})
    for entry in manifest_graphs.values():
        known_dims.update(_graph_dims(entry, "inputs"))
        known_dims.update(_graph_dims(entry, "outputs"))
    default_dims = data.get("dims") or {}
    for dim in default_dims:
        if dim not in known_dims:
            raise PlanError(f"{where0}: dims.{dim}: unknown dim {dim!r} (the manifest's dims: {', '.join(sorted(known_dims))})")
        if dim in DERIVED_DIMS:
            raise PlanError(f"{where0}: dims.{dim}: {dim} is derived as {' + '.join(DERIVED_DIMS[dim])}, do not give it")

    plan_graphs = data.get("graphs") or {}
    for g in plan_graphs:
        if g not in PLAN_GRAPHS and g not in manifest_graphs:
            raise PlanError(f"{where0}: unknown graph {g!r} (the contract's graphs: {', '.join(PLAN_GRAPHS)})")
    for g in manifest_graphs:
        if g not in plan_graphs:
            raise PlanError(f"{where0}: no section [graphs.{g}] for the manifest's graph {g!r}")
    selected = list(manifest_graphs)  # the manifest's graphs, in its (build) order
    if graphs is not None:
        for g in graphs:
            if g not in selected:
                raise PlanError(f"{where0}: graph {g!r} is not in both the plan and the manifest "
                                f"(available: {', '.join(selected)})")
        selected = [g for g in selected if g in graphs]

    resolved: dict = {}
    for g in selected:
        section = plan_graphs[g]
        where = f"{where0}: graphs.{g}"
        if not isinstance(section, dict):
            raise PlanError(f"{where}: expected a table")
        unknown = sorted(set(section) - _GRAPH_KEYS)
        if unknown:
            raise PlanError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_GRAPH_KEYS))})")
        prec = precision or section.get("precision", "fp32")
        if prec not in PRECISIONS:
            raise PlanError(f"{where}.precision: {prec!r} is not one of {', '.join(PRECISIONS)}")
        entry = manifest_graphs[g]
        inputs = entry.get("inputs") or []
        outputs = [o["name"] for o in entry.get("outputs") or []]
        graph_dims = _graph_dims(entry, "inputs")
        givable = [d for d in graph_dims if d not in DERIVED_DIMS]
        raw_profiles = section.get("profiles")
        if raw_profiles is None:
            raw_profiles = [{"name": "all"}]
        if not isinstance(raw_profiles, list) or not raw_profiles:
            raise PlanError(f"{where}.profiles: expected a non-empty list of profiles")
        profiles = []
        for i, raw in enumerate(raw_profiles):
            pw = f"{where}.profiles[{i}]"
            if not isinstance(raw, dict):
                raise PlanError(f"{pw}: expected a table")
            pname_i = str(raw.get("name", f"profile{i}"))
            pw = f"{pw} ({pname_i})"
            ranges = {}
            for dim, value in raw.items():
                if dim == "name":
                    continue
                if dim in DERIVED_DIMS:
                    raise PlanError(f"{pw}: {dim} is derived as {' + '.join(DERIVED_DIMS[dim])}, do not give it")
                if dim not in givable:
                    raise PlanError(f"{pw}: unknown dim {dim!r} ({g}'s inputs have "
                                    f"{', '.join(givable) or 'no named dims'})")
                ranges[dim] = _range(value, names, f"{pw}.{dim}")
            for dim in givable:
                if dim not in ranges:
                    if dim not in default_dims:
                        raise PlanError(f"{pw}: no range for dim {dim!r} (give it here or in [dims])")
                    ranges[dim] = _range(default_dims[dim], names, f"{where0}: dims.{dim}")
            for dim in givable:
                lo = ranges[dim][0]
                if lo < (0 if dim in ZERO_OK_DIMS else 1):
                    raise PlanError(f"{pw}.{dim}: min {lo} is below {0 if dim in ZERO_OK_DIMS else 1}")
            for dim, parts in DERIVED_DIMS.items():
                if dim in graph_dims:
                    missing = [p for p in parts if p not in ranges]
                    if missing:
                        raise PlanError(f"{pw}: cannot derive {dim} without {missing[0]!r}")
                    ranges[dim] = tuple(sum(ranges[p][k] for p in parts) for k in range(3))
            # A cache never holds more slots than the model has positions, nor does one call add more. The
            # mask (`total` = past + seq) may be one longer: the runtime's largest cache bucket holds
            # max_position_embeddings slots (the free ones masked) when a decode step adds its one input.
            for dim in POSITION_DIMS:
                if dim in ranges and max_pos is not None and ranges[dim][2] > max_pos:
                    raise PlanError(f"{pw}: {dim} max {ranges[dim][2]} exceeds the model's "
                                    f"max_position_embeddings {max_pos}")
            shapes = {}
            for io in inputs:
                triple = []
                for k in range(3):
                    shape = []
                    for d in io["shape"]:
                        if isinstance(d, str):
                            shape.append(ranges[d][k])
                        elif isinstance(d, int) and not isinstance(d, bool):
                            shape.append(d)
                        else:
                            raise PlanError(f"manifest: graph {g!r} input {io['name']!r} has a bad dimension {d!r}")
                    triple.append(tuple(shape))
                shapes[io["name"]] = tuple(triple)
            ordered = {d: ranges[d] for d in graph_dims}
            profiles.append(Profile(pname_i, ordered, shapes))
        names_seen = [p.name for p in profiles]
        if len(set(names_seen)) != len(names_seen):
            raise PlanError(f"{where}.profiles: duplicate profile names {names_seen}")
        builder = _builder(section.get("builder"), base_builder, f"{where}.builder")
        if builder["cache_dtype"] == "bf16" and ACTIVATION_PRECISION.get(prec, prec) != "bf16":
            # a bf16 cache changes nothing only where the engine computes in bf16 (an fp16 one has more mantissa)
            builder["cache_dtype"] = "fp32"
            notes.append(f"graphs.{g}: cache_dtype bf16 with {prec} compute: the cache stays fp32")
        tolerance = _tolerances(data.get("tolerance") or {}, section.get("tolerance"), outputs, where)
        if prec in QDQ_PRECISIONS:
            table = tolerance.get(prec, {})
            missing = [o for o in outputs if o not in table and "" not in table]
            if missing:
                raise PlanError(f"{where}: precision {prec} has no tolerance for output {missing[0]!r}; add "
                                f"[graphs.{g}.tolerance.{prec}] sized from the CPU emulation (docs/QUANTIZATION.md)")
        resolved[g] = GraphPlan(g, prec, profiles, builder, tolerance, outputs)
    return Plan(name=pname, description=str(data.get("description", "")), sources=[str(s) for s in sources],
                settings=settings, notes=notes, graphs=resolved)


# --- device memory estimate -----------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "int64": 8,
                "int32": 4, "bool": 1, "fp8": 1, "int8wo": 1}  # fp8/int8wo: their weights (scales negligible)


def _activation_bytes(precision: str) -> int:
    """Bytes per activation an engine of `precision` computes in (fp8/int8wo: fp16/bf16 outside the GEMMs)."""
    return _DTYPE_BYTES[ACTIVATION_PRECISION.get(precision, precision)]
INT32_ELEMENTS = 2**31 - 1  # bindings are kept below this many elements (32-bit volumes in kernels)
GPU_HEADROOM = 0.85  # share of a plan's gpu_memory_gb the estimate may use (CUDA context, allocator, tactics)


def _shape_at(io: dict, dims: dict, k: int) -> tuple:
    return tuple(dims[d][k] if isinstance(d, str) else int(d) for d in io["shape"])


def _lm_intermediate(model: dict, lm_weight_elems: int, layers: int) -> int:
    """The MLP width: from the manifest, else from the lm weights (per layer: q/o, k/v, 3 MLP matrices)."""
    if isinstance(model.get("intermediate_size"), int):
        return model["intermediate_size"]
    H, L = model["hidden_size"], layers
    heads, kv, d = model.get("num_attention_heads", 1), model["num_kv_heads"], model["head_dim"]
    attn = 2 * H * heads * d + 2 * H * kv * d
    return max(1, (lm_weight_elems // L - attn) // (3 * H))


def memory_estimate(plan: Plan, manifest: dict) -> dict:
    """Rough device memory of a resolved plan's engines at their largest shapes, in bytes.

    - weights: every graph's ONNX weights (`weight_bytes` at the manifest's dtype) at its engine precision
      (1 byte each at fp8/int8wo, for all of the graph's weights: an under-estimate by the few that are no
      MatMul weights and stay float, norm scales and the lm's RoPE table, < 1 % of the 1.5B lm's bytes);
    - per optimisation profile, at its max shapes: the graph's inputs and outputs (the I/O stays fp32 /
      int64), and for an lm (a graph with a `past_kv` input: the lm, VibeVoice-Realtime's text_lm and
      tts_lm) the activations of one layer (layers run one after another): attention
      scores and probabilities in fp32 (rows x heads x seq x total x 4 x 2; softmax inputs are kept in
      fp32), the MLP's gate/up/product at the engine's activation precision (rows x seq x intermediate x
      3; fp16/bf16 at fp8/int8wo), the
      layer's keys/values over the whole mask (2 x rows x kv_heads x total x head_dim x 4), the residual
      stream and its normed copy and q/k/v (rows x seq x hidden x 4 x 6); for the acoustic encoder the
      first stage's activations (rows x samples x 32 channels x 4 x 2);
    - the builder's workspace (tactic scratch) once.

    total = weights + the largest lm profile + the largest profile of the other graphs + workspace: what
    runs at once when the loop alternates between graphs (each engine's activations are reused across
    its profiles). It ignores the CUDA context and allocator slack, hence `fits` compares against
    GPU_HEADROOM x settings.gpu_memory_gb. `over_int32` lists bindings of 2^31 elements or more.
    """
    model = manifest.get("model") or {}
    storage = _DTYPE_BYTES.get(str(manifest.get("dtype", "fp32")), 4)
    weights, profiles, over = {}, {}, []
    lm_layers = {}  # lm-like graph -> its layers (past_kv: [layers, 2, batch, kv_heads, past, head_dim])
    for g in plan.graphs:
        for io in manifest["graphs"][g].get("inputs") or []:
            if io["name"] == "past_kv":
                lm_layers[g] = io["shape"][0]
    for g, gp in plan.graphs.items():
        entry = manifest["graphs"][g]
        elems = int(entry.get("weight_bytes", 0)) // storage
        weights[g] = elems * _DTYPE_BYTES[gp.precision]
        for prof in gp.profiles:
            io_bytes = 0
            dims = dict(prof.dims)
            if "samples" in dims and "frames" not in dims and model.get("hop_length"):
                dims["frames"] = tuple(v // model["hop_length"] for v in dims["samples"])  # the encoder's output
            if "decode_frames" in dims and model.get("hop_length"):
                dims["decode_samples"] = tuple(v * model["hop_length"] for v in dims["decode_frames"])  # decoder's audio
            for io in (entry.get("inputs") or []) + (entry.get("outputs") or []):
                shape = _shape_at(io, dims, 2)
                n = 1
                for d in shape:
                    n *= d
                if n > INT32_ELEMENTS:
                    over.append(f"{g}/{prof.name}:{io['name']} {list(shape)} = {n} elements")
                io_bytes += n * _DTYPE_BYTES.get(io.get("dtype", "float32"), 4)
            act = 0
            if g in lm_layers and {"hidden_size", "num_kv_heads", "head_dim"} <= set(model):
                rows, seq, past = (prof.dims[d][2] for d in ("batch", "seq", "past"))
                total = past + seq
                H, kv, d = model["hidden_size"], model["num_kv_heads"], model["head_dim"]
                heads = model.get("num_attention_heads", kv)
                inter = _lm_intermediate(model, elems, lm_layers[g])
                cache = _DTYPE_BYTES[gp.builder["cache_dtype"]]
                act = (rows * heads * seq * total * 4 * 2 + rows * seq * inter * _activation_bytes(gp.precision) * 3
                       + 2 * rows * kv * total * d * cache + rows * seq * H * 4 * 6)
            elif g == "acoustic_encoder" and "samples" in prof.dims:
                act = prof.dims["batch"][2] * prof.dims["samples"][2] * 32 * 4 * 2
            profiles[f"{g}/{prof.name}"] = {"io_bytes": io_bytes, "activation_bytes": act, "bytes": io_bytes + act}
    lm = {k: v for k, v in profiles.items() if k.split("/")[0] in lm_layers}
    other = {k: v for k, v in profiles.items() if k.split("/")[0] not in lm_layers}
    largest_lm = max(lm, key=lambda k: lm[k]["bytes"]) if lm else None
    largest_other = max(other, key=lambda k: other[k]["bytes"]) if other else None
    workspace = max((gp.builder["workspace_mib"] for gp in plan.graphs.values()), default=0) << 20
    total = (sum(weights.values()) + (lm[largest_lm]["bytes"] if largest_lm else 0)
             + (other[largest_other]["bytes"] if largest_other else 0) + workspace)
    budget_gb = plan.settings.get("gpu_memory_gb")
    result = {"weights_bytes": weights, "profiles": profiles, "largest_lm_profile": largest_lm,
              "largest_other_profile": largest_other, "workspace_bytes": workspace, "total_bytes": total,
              "over_int32": over, "gpu_memory_gb": budget_gb, "headroom": GPU_HEADROOM}
    if budget_gb is not None:
        result["fits"] = total <= GPU_HEADROOM * budget_gb * 1e9 and not over
    return result


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
