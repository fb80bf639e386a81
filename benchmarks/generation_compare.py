"""Whole generations of two ENGINE_DIRs compared on ONNX Runtime (same script, voices and noise).

Used by benchmarks/precision_report.py and tests/test_reduced_precision.py to judge an emulated
reduced-precision ENGINE_DIR (vv_export.precision.write_emulated_engine_dir) against the fp32 one:

* ``compare_generations``: token agreement, the first differing token, frames and audio error;
* ``decision_margins``: the top-2 control-logit margin of every token decision of one fp32 generation
  (a decision whose margin is within the LM's tolerance may flip at reduced precision);
* ``token_agreement``, ``audio_snr_db``: the two measures on their own.

The runtime (vv_runtime) is imported inside the functions.
"""

from __future__ import annotations

import numpy as np


def token_agreement(tokens: list, reference: list) -> float:
    """Fraction of reference positions where the tokens agree (a length difference counts as disagreement)."""
    n = max(len(tokens), len(reference))
    if n == 0:
        return 1.0
    return sum(1 for a, b in zip(tokens, reference) if a == b) / n


def audio_snr_db(audio: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(|ref|^2 / |audio - ref|^2) over the common length (inf when equal)."""
    n = min(len(audio), len(reference))
    ref = reference[:n].astype(np.float64)
    err = float(np.sum((audio[:n].astype(np.float64) - ref) ** 2))
    sig = float(np.sum(ref ** 2))
    if err == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(sig / err)) if sig > 0 else float("-inf")


def compare_generations(reference_dir, emulated_dir, script, voices, noise, cfg_scale=None, max_new_frames=None) -> dict:
    """Generate one script on both ENGINE_DIRs (ONNX Runtime, same noise): token agreement and audio error."""
    from vv_runtime.pipeline import Pipeline

    results = []
    for directory in (reference_dir, emulated_dir):
        pipe = Pipeline.from_engine_dir(directory, backend="ort")
        try:
            results.append(pipe.generate(script, voices, cfg_scale=cfg_scale, max_new_frames=max_new_frames,
                                         noise=noise))
        finally:
            pipe.close()
    ref, got = results
    ref_tokens, got_tokens = list(ref.tokens[0]), list(got.tokens[0])
    ref_audio, got_audio = ref.audio[0], got.audio[0]
    first_diff = next((i for i, (a, b) in enumerate(zip(got_tokens, ref_tokens)) if a != b),
                      None if len(got_tokens) == len(ref_tokens) else min(len(got_tokens), len(ref_tokens)))
    n = min(len(ref_audio), len(got_audio))
    peak = float(np.max(np.abs(ref_audio))) if len(ref_audio) else 0.0
    return {
        "tokens": len(ref_tokens), "tokens_emulated": len(got_tokens),
        "token_agreement": token_agreement(got_tokens, ref_tokens), "first_token_difference": first_diff,
        "frames": int(ref.frames[0]), "frames_emulated": int(got.frames[0]),
        "audio_max_abs_error": float(np.max(np.abs(got_audio[:n] - ref_audio[:n]))) if n else 0.0,
        "audio_peak": peak, "audio_snr_db": audio_snr_db(got_audio, ref_audio),
        "audio_finite": bool(np.all(np.isfinite(got_audio))),
    }


class DecisionRecorder:
    """A real backend that also keeps the positive row's control logits of every token decision (batch 1)."""

    def __init__(self, backend):
        self.backend = backend
        self.logits = []
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, graph, feeds):
        out = self.backend.run(graph, feeds)
        if graph == "lm":
            self.calls += 1
            # the second lm call of a generation is the negative rows' prefill ([speech_start], no past)
            if not (self.calls > 1 and feeds["past_kv"].shape[4] == 0):
                self.logits.append(np.array(out["control_logits"][0]))
        return out


def decision_margins(engine_dir, script, voices, noise, cfg_scale=None, max_new_frames=None):
    """(tokens, top-2 control-logit margin of each token decision) of one fp32 generation (batch 1)."""
    from vv_runtime.backend import OrtBackend
    from vv_runtime.manifest import load_manifest
    from vv_runtime.pipeline import Pipeline

    manifest = load_manifest(engine_dir)
    recorder = DecisionRecorder(OrtBackend(engine_dir, manifest))
    pipe = Pipeline(engine_dir, manifest, recorder)
    try:
        result = pipe.generate(script, voices, cfg_scale=cfg_scale, max_new_frames=max_new_frames, noise=noise)
    finally:
        pipe.close()
    tokens = list(result.tokens[0])
    margins = [float(np.sort(lg)[-1] - np.sort(lg)[-2]) for lg in recorder.logits]
    return tokens, margins[:len(tokens)]
