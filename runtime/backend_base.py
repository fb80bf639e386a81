"""What every execution backend shares: the `Backend` interface and the plan limits.

    backend.run(graph, feeds) -> outputs        numpy in, numpy out (see vv_runtime.backend)
    backend.kv_cache(shape)                     the LM cache the loop writes new_kv into
    backend.limits() -> dict | None             the largest call the backend can run (None: unlimited)
    backend.check_fits(graph, shapes)           RuntimeInputError (one line) when a call would not fit

`OrtBackend` (vv_runtime.backend) and `TrtBackend` (vv_runtime.trt_backend) both build on this module
and on nothing of each other, so there is no import circle; `vv_runtime.backend` re-exports these names.
The LM cache types (`KVCache`, `HostKVCache`, `bucket_slots`) live in `vv_runtime.kv_cache`.

`PlanLimits` is the pure (CPU-only) logic behind TrtBackend's limits: it reads the optimisation profiles
`vv-export trt` recorded in ``manifest["trt"]["engines"][graph]["profiles"]`` (min/opt/max per named
dimension and per input), so a scheduler can refuse a request that no engine profile covers before it
starts, with the plan's limit and the fix in the message.
"""

from __future__ import annotations

import numpy as np

from .errors import CapacityError, RuntimeInputError
from .kv_cache import HostKVCache, KVCache, bucket_slots  # noqa: F401 (re-exported: the backends' cache types)
from .manifest import DERIVED_DIMS

SMALL_GRAPH_BYTES = 64 << 20  # below this many weight bytes a graph runs on one intra-op thread by default


def graph_threads(entry: dict, threads: int | None) -> int | None:
    """Intra-op threads of a CPU runtime for the graph of manifest entry `entry`: `threads` when given, else one
    for a small graph (thread hand-offs cost more than they save: 6x on the tiny model), else None (every core).
    The fp32 size decides: a quantized graph's work per call stays that of its fp32 original."""
    if threads:
        return int(threads)
    fp32_bytes = (entry.get("quantization") or {}).get("weight_bytes_before") or entry.get("weight_bytes", 0)
    return 1 if fp32_bytes < SMALL_GRAPH_BYTES else None


class Backend:
    name = "base"
    # whether one call of the loop may take several steps of a job, reading the graph's weights once for all
    # of them (the CPU runtimes): Realtime-0.5B's grouped acoustic_decoder (several frames' latents) and its
    # TTS LM call of a speech frame together with the next text window. A backend that replays one CUDA graph
    # per shape of a context says no: every call of the loop keeps the shape of one step.
    groups_steps = True

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def kv_cache(self, shape: tuple[int, ...]) -> KVCache:
        """A preallocated LM cache of `shape` ([L, 2, rows, KV, capacity, D]) for the loop: host memory
        here; a backend whose `run` takes device tensors returns a cache on that device."""
        return HostKVCache(shape)

    def limits(self) -> dict | None:
        """The largest calls this backend can run (see PlanLimits.limits), or None when it has no such
        limits (ONNX Runtime: any shape the graph accepts, memory permitting)."""
        return None

    def check_fits(self, graph: str, shapes: dict) -> None:
        """Raise RuntimeInputError (one line: the limit and the fix) when a call of `graph` with these
        dimensions ({"batch": 4, "seq": 1, "past": 4096}) or input shapes ({"inputs_embeds": (4, 1, H),
        ...}) cannot run on this backend; return None when it can. Unlimited backends accept everything."""
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


# --- limits of profile-bound backends (TensorRT) ---------------------------------------------------


class PlanLimits:
    """The calls a set of TensorRT engines can run, from their recorded optimisation profiles.

    ``records``: graph -> engine record as `vv-export trt` writes it (``profiles``: a list of
    ``{"name", "dims": {dim: [min, opt, max]}, "shapes": {input: [min, opt, max]}}``); ``plan``: the
    plan name recorded beside them; ``engine_dir``: for the fix in messages. Needs no GPU.
    """

    def __init__(self, records: dict, plan: str | None = None, engine_dir=None, per_frame=()):
        self.records = dict(records)
        self.plan = plan or "?"
        self.engine_dir = engine_dir
        self.per_frame = tuple(per_frame)

    def profiles(self, graph: str) -> list[dict]:
        rec = self.records.get(graph)
        if rec is None:
            raise RuntimeInputError(f"no TensorRT engine is loaded for graph {graph!r}")
        profiles = rec.get("profiles") or []
        if not profiles:
            raise RuntimeInputError(f"the TensorRT engine record of {graph!r} lists no optimisation profiles "
                                    f"(rebuild with `vv-export trt`)")
        return profiles

    @staticmethod
    def _dim(profile: dict, dim: str) -> tuple[int, int, int] | None:
        value = (profile.get("dims") or {}).get(dim)
        return tuple(int(v) for v in value) if value is not None else None

    def _max(self, graph: str, dim: str, where=lambda p: True) -> int | None:
        if graph not in self.records:
            return None
        values = [r[2] for p in self.profiles(graph) if where(p) and (r := self._dim(p, dim)) is not None]
        return max(values) if values else None

    def _is_prefill(self, p: dict) -> bool:
        past = self._dim(p, "past")
        return past is not None and past[0] == 0

    def _is_decode(self, p: dict) -> bool:
        past, seq = self._dim(p, "past"), self._dim(p, "seq")
        return past is not None and seq is not None and seq[0] <= 1 <= seq[2] and past[2] >= 1

    def limits(self) -> dict:
        """The largest call per kind: lm prefill rows/seq, lm decode rows/past (and the (rows, past) maxima
        of each decode profile), max context, voice samples of acoustic_encoder, rows of text_embed and
        of the per-frame graphs (the smallest of their maxima). A kind whose engine is not loaded is None.
        Each is a maximum over the profiles of that kind (the most rows and the longest past may come from
        different profiles); `check_fits` is the exact test of one call."""
        per_frame = [m for g in self.per_frame if (m := self._max(g, "batch")) is not None]
        return {
            "plan": self.plan,
            "lm_prefill_rows": self._max("lm", "batch", self._is_prefill),
            "lm_prefill_seq": self._max("lm", "seq", self._is_prefill),
            "lm_decode_rows": self._max("lm", "batch", self._is_decode),
            "lm_decode_past": self._max("lm", "past", self._is_decode),
            # per decode profile (rows, past) maxima: the largest rows at a long context may be fewer
            "lm_decode_profiles": ([{"name": p.get("name"), "rows": self._dim(p, "batch")[2],
                                     "past": self._dim(p, "past")[2]}
                                    for p in self.profiles("lm") if self._is_decode(p)]
                                   if "lm" in self.records else None),
            "max_context": self._max("lm", "total"),
            "text_embed_rows": self._max("text_embed", "batch"),
            "text_embed_seq": self._max("text_embed", "seq"),
            "acoustic_encoder_rows": self._max("acoustic_encoder", "batch"),
            "acoustic_encoder_samples": self._max("acoustic_encoder", "samples"),
            "per_frame_rows": min(per_frame) if per_frame else None,
        }

    def fitting_profile(self, graph: str, shapes: dict) -> int:
        """Index of the first recorded profile of `graph` that contains the call, else RuntimeInputError.

        `shapes`: named dimensions (int values; ``total`` is derived from past + seq when not given) or
        input shapes (tuple values, checked against the recorded per-input min/max shapes)."""
        profiles = self.profiles(graph)
        if not shapes:
            raise ValueError("check_fits: no dimensions or shapes given")
        by_input = all(isinstance(v, (tuple, list)) for v in shapes.values())
        if not by_input and not all(isinstance(v, int) and not isinstance(v, bool) for v in shapes.values()):
            raise ValueError(f"check_fits({graph!r}): give either dimension sizes (int) or input shapes (tuples)")
        if by_input:
            want = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        else:
            want = dict(shapes)
            for dim, parts in DERIVED_DIMS.items():
                if dim not in want and all(p in want for p in parts):
                    want[dim] = sum(want[p] for p in parts)
        for i, p in enumerate(profiles):
            if by_input:
                table = p.get("shapes") or {}
                unknown = [k for k in want if k not in table]
                if unknown:
                    raise ValueError(f"check_fits({graph!r}): {unknown[0]!r} is not an input of its engine "
                                     f"({', '.join(table)})")
                if all(len(want[k]) == len(table[k][0]) and
                       all(lo <= s <= hi for lo, s, hi in zip(table[k][0], want[k], table[k][2])) for k in want):
                    return i
            else:
                dims = p.get("dims") or {}
                unknown = [k for k in want if k not in dims]
                if unknown:
                    raise ValueError(f"check_fits({graph!r}): dimension {unknown[0]!r} is not one of its engine's "
                                     f"({', '.join(dims)})")
                if all(dims[k][0] <= v <= dims[k][2] for k, v in want.items()):
                    return i
        raise CapacityError(self._refusal(graph, want, profiles, by_input))

    def _refusal(self, graph: str, want: dict, profiles: list[dict], by_input: bool) -> str:
        if by_input:
            got = ", ".join(f"{k} {list(v)}" for k, v in want.items())
            ranges = "; ".join(f"{p.get('name', i)}: " + ", ".join(
                f"{k} {list((p.get('shapes') or {})[k][0])}..{list((p.get('shapes') or {})[k][2])}"
                for k in want if k in (p.get("shapes") or {})) for i, p in enumerate(profiles))
        else:
            got = ", ".join(f"{k} {v}" for k, v in want.items())
            ranges = "; ".join(f"{p.get('name', i)}: " + ", ".join(
                f"{k} {(p.get('dims') or {})[k][0]}..{(p.get('dims') or {})[k][2]}"
                for k in want if k in (p.get("dims") or {})) for i, p in enumerate(profiles))
        where = f" --engine-dir {self.engine_dir}" if self.engine_dir is not None else ""
        return (f"{graph}: {got} is beyond the TensorRT plan {self.plan!r} ({ranges}); rebuild the engines with a "
                f"plan that covers it (`vv-export trt{where} --plan <plan>` with larger settings) or make the "
                f"request smaller")

    def check_fits(self, graph: str, shapes: dict) -> None:
        self.fitting_profile(graph, shapes)
