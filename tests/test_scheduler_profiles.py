"""The scheduler on a profile-bound backend (TensorRT-like): the real ONNX Runtime graphs of the tiny
fixture behind the default plan's lm decode profiles (`decode`: many rows, a short cache; `decode_long`:
2 rows, a long cache), computed by the real PlanLimits; every lm call is checked against them as an
engine would (a call that fits no profile fails). Also: compaction, per-job failures, pinned prefixes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vv_runtime.backend_base import PlanLimits, bucket_slots
from vv_runtime.errors import CapacityError
from vv_runtime.pipeline import Pipeline
from vv_runtime.scheduler import PrefixCache, Scheduler
from vv_runtime.vibevoice_steps import VibeVoiceJob as Job

LONG = "Speaker 1: Hello world.\nSpeaker 1: This is a tiny test."
SHORT = "Speaker 1: Short."


def lm_records(decode_rows, decode_past, long_past, extend_past=4096, prefill_seq=4096):
    def p(name, batch, seq, past):
        return {"name": name, "dims": {"batch": list(batch), "seq": list(seq), "past": list(past),
                                       "total": [seq[0] + past[0], seq[1] + past[1], seq[2] + past[2]]}}
    return {"lm": {"profiles": [
        p("prefill", (1, 1, 16), (1, 64, prefill_seq), (0, 0, 0)),
        p("decode", (1, 2, decode_rows), (1, 1, 1), (1, 64, decode_past)),
        p("extend", (1, 1, 1), (2, 16, prefill_seq), (1, 64, extend_past)),
        p("decode_long", (1, 2, 2), (1, 1, 1), (1, 64, long_past)),
    ]}}


class Profiled:
    """The real backend behind recorded profiles: limits()/check_fits() from PlanLimits, and every lm call
    refused (as a TensorRT engine would fail) when it fits no profile. `speech`: the control column the
    LM is forced to (requests speak until their step limit); `fail`: predicate(feeds) -> raise."""

    def __init__(self, backend, records, speech=None, fail=None):
        self.backend = backend
        self.plan = PlanLimits(records, "test")
        self.speech = speech
        self.fail = fail
        self.lm_calls = []

    def limits(self):
        return self.plan.limits()

    def check_fits(self, graph, shapes):
        self.plan.check_fits(graph, shapes)

    def run(self, graph, feeds):
        if graph == "lm":
            dims = {"batch": feeds["inputs_embeds"].shape[0], "seq": feeds["inputs_embeds"].shape[1],
                    "past": feeds["past_kv"].shape[4]}
            self.lm_calls.append(dims)
            self.plan.check_fits("lm", dims)  # RuntimeInputError: no engine profile runs this call
        if self.fail is not None and self.fail(graph, feeds):
            raise RuntimeError("injected execution failure")
        out = self.backend.run(graph, feeds)
        if graph == "lm" and self.speech is not None:
            out = dict(out)
            logits = np.array(out["control_logits"], dtype=np.float32, copy=True)
            logits[:, self.speech] = np.abs(logits).max() + 1e4
            out["control_logits"] = logits
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def base(tiny_engine_dir):
    pipe = Pipeline.from_engine_dir(tiny_engine_dir, backend="ort")
    yield pipe
    pipe.close()


def speech_column(pipe):
    return pipe.manifest["control_tokens"].index("speech_diffusion")


def profiled(base, records, fail=None, forced=True):
    return Pipeline(base.engine_dir, base.manifest,
                    Profiled(base.backend, records, speech_column(base) if forced else None, fail))


def forced_alone(base, script, seed, max_new_frames=None):
    pipe = profiled(base, lm_records(32, 1 << 16, 1 << 16))
    return pipe.generate(script, seed=seed, max_new_frames=max_new_frames).tokens[0]


def job(pipe, script, seed, max_new_frames=None, **kw):
    return Job(pipe.prepare(script)[0].prompt, seed=seed, max_new_frames=max_new_frames, **kw)


def drive(sched, max_steps=2000):
    shapes, finished_at, step = [], {}, 0
    while sched.busy and step < max_steps:
        out = sched.step()
        shapes.append((sched.shape, len(sched.jobs), len(sched.waiting)))
        for j in out.finished:
            finished_at[j] = step
        step += 1
    assert not sched.busy
    return shapes, finished_at


def test_long_job_runs_on_decode_long_and_short_ones_wait(base):
    n_long = len(base.prepare(LONG)[0].prompt.input_ids)
    n_short = len(base.prepare(SHORT)[0].prompt.input_ids)
    short_slots = bucket_slots(n_short + 3, 1 << 16)
    long_slots = bucket_slots(3 * n_long, 1 << 16)
    assert long_slots > short_slots
    pipe = profiled(base, lm_records(8, short_slots, long_slots))
    sched = Scheduler(pipe, max_batch=4)
    assert sched.decode_profiles == [(8, short_slots), (2, long_slots)]
    assert sched.max_batch == 4 and sched.cap == min(long_slots, base.max_positions)
    long_ = sched.add(job(pipe, LONG, 7))
    shorts = [sched.add(job(pipe, SHORT, s, max_new_frames=3)) for s in (1, 2)]
    sched.step()
    assert sched.jobs == [long_] and list(sched.waiting) == shorts, "the short ones wait, they do not fail"
    assert all(j.error is None for j in shorts)
    shapes, finished_at = drive(sched)
    for j in [long_] + shorts:
        assert j.error is None and j.done, j
    assert long_.steps == 2 * n_long                    # spoke to its limit on the long profile
    assert min(finished_at[s] for s in shorts) > finished_at[long_] - 1
    assert ((4, short_slots), 2, 0) in shapes, "the two short ones ran together on the decode profile"
    assert long_.tokens == forced_alone(base, LONG, 7)
    for s, seed in zip(shorts, (1, 2)):
        assert s.tokens == forced_alone(base, SHORT, seed, 3)
    # every lm decode call fitted a profile (the wrapper raises otherwise): check the long ones ran at 2 rows
    assert all(c["batch"] <= 2 for c in pipe.backend.lm_calls if c["seq"] == 1 and c["past"] > short_slots)


def test_short_jobs_beside_a_long_cache_wait_then_join(base):
    """A short job arriving while a long job runs is admitted once that job has left, never failed."""
    n_long = len(base.prepare(LONG)[0].prompt.input_ids)
    long_slots = bucket_slots(3 * n_long, 1 << 16)
    pipe = profiled(base, lm_records(8, 64, long_slots))
    sched = Scheduler(pipe, max_batch=4)
    long_ = sched.add(job(pipe, LONG, 3))
    for _ in range(5):
        sched.step()
    late = sched.add(job(pipe, SHORT, 5, max_new_frames=2))
    sched.step()
    assert late in sched.waiting and late.error is None
    drive(sched)
    assert late.error is None and late.tokens == forced_alone(base, SHORT, 5, 2)
    assert long_.error is None


def test_job_that_fits_no_profile_alone_fails_with_capacity_error(base):
    huge = "\n".join([LONG] * 4)
    n_huge = len(base.prepare(huge)[0].prompt.input_ids)
    small = bucket_slots(len(base.prepare(SHORT)[0].prompt.input_ids) + 2, 1 << 16)
    assert small <= n_huge                       # a context shorter than the huge prompt
    pipe = profiled(base, lm_records(8, small, small))
    sched = Scheduler(pipe, max_batch=4)
    bad = sched.add(job(pipe, huge, 1))
    ok = sched.add(job(pipe, SHORT, 2, max_new_frames=2))
    drive(sched)
    assert isinstance(bad.error, CapacityError) and "\n" not in str(bad.error)
    assert ok.error is None and ok.tokens == forced_alone(base, SHORT, 2, 2)


def test_rows_shrink_at_one_job_and_after_a_cancellation(base):
    pipe = profiled(base, lm_records(32, 1 << 16, 1 << 16))
    sched = Scheduler(pipe, max_batch=4)
    keep = sched.add(job(pipe, LONG, 1))
    brief = sched.add(job(pipe, SHORT, 2, max_new_frames=2))
    gone = sched.add(job(pipe, SHORT, 3))
    sched.step()
    assert sched.shape[0] == 8
    while not brief.done:
        sched.step()
    assert sched.shape[0] == 4                      # two jobs left: 4 rows
    sched.cancel(gone)
    out = sched.step()
    assert gone in out.finished and sched.shape[0] == 2  # one job: 2 rows (compacted after the cancel)
    drive(sched)
    assert keep.tokens == forced_alone(base, LONG, 1)


def test_prefill_failure_fails_that_job_only(base):
    n_short = len(base.prepare(SHORT)[0].prompt.input_ids)
    pipe = profiled(base, lm_records(32, 1 << 16, 1 << 16),
                    fail=lambda g, f: g == "lm" and f["inputs_embeds"].shape[1] == n_short)
    sched = Scheduler(pipe, max_batch=4)
    ok = sched.add(job(pipe, LONG, 4, max_new_frames=5))
    bad = sched.add(job(pipe, SHORT, 1))
    drive(sched)
    assert isinstance(bad.error, RuntimeError) and bad.done and bad not in sched.jobs
    assert ok.error is None and ok.tokens == forced_alone(base, LONG, 4, 5)


def test_extend_beyond_its_profile_falls_back_to_a_full_prefill(base, fixture_reference):
    _, ref = fixture_reference
    wav = np.asarray(ref["generate.voice_wav_raw"], dtype=np.float32)
    script = "Speaker 1: Hello world."
    results = {}
    for extend_past in (1, 1 << 16):
        pipe = profiled(base, lm_records(32, 1 << 16, 1 << 16, extend_past=extend_past), forced=False)
        cache = PrefixCache()
        sched = Scheduler(pipe, max_batch=2, reuse_prefix=True, prefix_cache=cache)
        row = pipe.prepare(script, [wav])[0]
        key = (hashlib.sha1(row.voices[0].tobytes()).hexdigest(),)
        jobs = [sched.add(Job(row.prompt, voice_audio=row.voices, seed=s, prefix_key=key, max_new_frames=4))
                for s in (1, 2)]
        drive(sched)
        assert all(j.error is None for j in jobs)
        results[extend_past] = ([j.tokens for j in jobs], [j.prefix_reused for j in jobs], len(cache))
    assert results[1][1] == [False, False] and results[1][2] == 0      # no extend call fits: full prefills
    assert results[1 << 16][1] == [False, True] and results[1 << 16][2] == 1
    assert results[1][0] == results[1 << 16][0]


def test_prefix_cache_keeps_pinned_entries():
    cache = PrefixCache(max_bytes=3000)
    cache.put("preset", np.zeros(250, np.float32), pin=True)   # 1000 bytes
    cache.put("a", np.zeros(250, np.float32))
    cache.put("b", np.zeros(250, np.float32))
    cache.put("c", np.zeros(250, np.float32))                  # 4000 bytes: evict the oldest derived one
    assert cache.get("preset") is not None and cache.get("a") is None and len(cache) == 3
    cache.put("d", np.zeros(500, np.float32))
    assert cache.get("preset") is not None and cache.pinned == 1
    assert sum(v.nbytes for v in cache._items.values()) <= 3000
