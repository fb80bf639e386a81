"""The step-wise scheduler: every job equals the same job generated alone, whatever runs beside it.

Tokens must be exactly equal. Audio: the only difference allowed is float reordering inside the
batched kernels (a job's rows sit in calls of other row counts and cache lengths), so the tolerance
is the one of tests/test_runtime_generate.py, 1e-4 of the signal's peak; a logic error (a wrong
frame, state, noise draw or neighbour's slot) changes samples by the order of the peak.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vv_runtime.errors import RuntimeInputError
from vv_runtime.pipeline import Pipeline
from vv_runtime.scheduler import PrefixCache, Scheduler
from vv_runtime.vibevoice_steps import VibeVoiceJob as Job

AUDIO_RTOL_OF_PEAK = 1e-4

SCRIPTS = [
    "Speaker 1: Hello world.\nSpeaker 1: This is a tiny test.",
    "Speaker 0: One two three.\nSpeaker 1: Four five.",
    "Speaker 1: The quick brown fox jumps over the lazy dog.",
    "Speaker 2: Hi.\nSpeaker 1: Yo.",
]


@pytest.fixture(scope="module")
def pipeline(tiny_engine_dir):
    pipe = Pipeline.from_engine_dir(tiny_engine_dir, backend="ort")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def voices(fixture_reference):
    _, ref = fixture_reference
    wav = ref["generate.voice_wav_raw"]
    other = (0.5 * wav + 0.01 * np.sin(np.arange(wav.shape[0]) * 0.37)).astype(np.float32)[:5000]
    return [wav, other]


def assert_audio_close(actual, expected):
    assert actual.shape == expected.shape
    if expected.size:
        peak = float(np.max(np.abs(expected)))
        err = float(np.max(np.abs(actual - expected)))
        assert err <= AUDIO_RTOL_OF_PEAK * peak, f"max abs error {err:.3g} vs peak {peak:.3g}"


def make_job(pipe, script, voices, seed, cfg_scale=1.3, max_new_frames=None, tag=None):
    row = pipe.prepare(script, voices)[0]
    return Job(row.prompt, voice_audio=row.voices, cfg_scale=cfg_scale, max_new_frames=max_new_frames,
               seed=seed, prefix_key=tuple(hashlib.sha1(v.tobytes()).hexdigest() for v in row.voices), tag=tag)


def alone(pipe, script, voices, seed, cfg_scale=1.3, max_new_frames=None):
    result = pipe.generate(script, voices, seed=seed, cfg_scale=cfg_scale, max_new_frames=max_new_frames)
    return result.tokens[0], result.audio[0]


def drive(sched, arrivals, cancels=(), max_steps=500):
    """arrivals: {step: [jobs]}, cancels: {step: [jobs]} -> (audio per job, shapes seen, running counts)."""
    audio: dict[Job, list] = {}
    shapes, running, finished_at = [], [], {}
    step = 0
    while step <= max(arrivals) or sched.busy:
        for job in arrivals.get(step, []):
            sched.add(job)
            audio[job] = []
        for job in dict(cancels).get(step, []):
            sched.cancel(job)
        out = sched.step()
        for job, chunk in out.chunks:
            assert chunk.shape == (3200,) and chunk.dtype == np.float32
            audio.setdefault(job, []).append(chunk)
        for job in out.finished:
            finished_at[job] = step
        shapes.append(sched.shape)
        running.append(len(sched.jobs))
        step += 1
        assert step < max_steps
    joined = {job: np.concatenate(parts) if parts else np.zeros(0, np.float32) for job, parts in audio.items()}
    return joined, shapes, running, finished_at


def test_staggered_arrivals_equal_alone(pipeline, voices):
    specs = [(0, 0, 1), (0, 2, 2), (2, 1, 1), (3, 3, 0), (5, 2, 5), (6, 0, 2), (6, 3, 1), (9, 1, 3)]
    sched = Scheduler(pipeline, max_batch=4)
    jobs, arrivals = [], {}
    for arrive, which, seed in specs:
        job = make_job(pipeline, SCRIPTS[which], voices, seed, tag=(which, seed))
        jobs.append(job)
        arrivals.setdefault(arrive, []).append(job)
    audio, shapes, running, finished_at = drive(sched, arrivals)

    lengths = {len(j.prompt.input_ids) for j in jobs}
    assert len(lengths) == 4, "different prompt lengths"
    assert max(running) == 4, "the batch filled up (and later arrivals waited)"
    assert len(set(finished_at.values())) >= 4, "jobs finished at different steps"
    for job in jobs:
        which, seed = job.tag
        tokens, expected = alone(pipeline, SCRIPTS[which], voices, seed)
        assert job.tokens == tokens, job.tag
        assert job.frames * 3200 == expected.size
        assert_audio_close(audio[job], expected)
        assert job.error is None and job.done
    # buckets: powers of two in rows and slots, rows reused (never more than 2 * max_batch)
    for rows, slots in shapes:
        if rows:
            assert rows & (rows - 1) == 0 and slots & (slots - 1) == 0
            assert rows <= 8
    assert {r for r, _ in shapes if r} >= {2, 8}, "the rows bucket grew and shrank"


def test_cancelled_neighbour_frees_rows_at_once(pipeline, voices):
    keep = make_job(pipeline, SCRIPTS[2], voices, 2)        # runs 51 steps alone
    gone = make_job(pipeline, SCRIPTS[2], voices, 2)
    late = make_job(pipeline, SCRIPTS[0], voices, 1)
    sched = Scheduler(pipeline, max_batch=2)
    sched.add(keep)
    sched.add(gone)
    sched.add(late)                                          # waits for a free pair of rows
    for _ in range(4):
        out = sched.step()
    assert sched.rows_in_use == 4 and late in sched.waiting
    sched.cancel(gone)
    out = sched.step()
    assert gone in out.finished and gone.cancelled and gone.done
    assert late in out.admitted and sched.rows_in_use == 4   # its rows went to the waiting job in the same step
    assert gone.rows[0] in late.rows or gone.rows[1] in late.rows
    audio, _, _, _ = drive(sched, {0: []})
    for job, seed, script in ((keep, 2, SCRIPTS[2]), (late, 1, SCRIPTS[0])):
        tokens, expected = alone(pipeline, script, voices, seed)
        assert job.tokens == tokens
    assert len(gone.tokens) == 4 and gone.tokens == keep.tokens[:4]  # 4 steps, then cancelled


def test_cfg_scales_and_step_limits_mixed(pipeline, voices):
    specs = [(SCRIPTS[0], 1, 1.3, None), (SCRIPTS[2], 2, 2.0, None), (SCRIPTS[1], 1, 1.0, 4), (SCRIPTS[2], 2, 1.3, 7)]
    sched = Scheduler(pipeline, max_batch=4)
    jobs = [make_job(pipeline, s, voices, seed, cfg, mnf) for s, seed, cfg, mnf in specs]
    audio, _, _, _ = drive(sched, {0: jobs[:2], 1: jobs[2:]})
    for job, (script, seed, cfg, mnf) in zip(jobs, specs):
        tokens, expected = alone(pipeline, script, voices, seed, cfg, mnf)
        assert job.tokens == tokens
        assert_audio_close(audio[job], expected)
    assert len(jobs[2].tokens) == 4 and len(jobs[3].tokens) == 7


def test_compaction_keeps_running_jobs_exact(random_engine_dir):
    """Rows and slots shrink into smaller buckets while a long job runs on; it stays equal to alone."""
    pipe = Pipeline.from_engine_dir(random_engine_dir, backend="ort")
    try:
        long_ = Job(pipe.prepare("Speaker 1: A long one that keeps talking for a while.")[0].prompt, seed=7,
                    max_new_frames=120)
        short = [Job(pipe.prepare(f"Speaker 1: Short {i}.")[0].prompt, seed=i, max_new_frames=3) for i in range(4)]
        sched = Scheduler(pipe, max_batch=5)
        audio, shapes, _, _ = drive(sched, {0: [long_] + short})
        rows_seen = [r for r, _ in shapes if r]
        assert rows_seen[0] == 16 and 2 in rows_seen, rows_seen
        ref = pipe.generate("Speaker 1: A long one that keeps talking for a while.", seed=7, max_new_frames=120)
        assert long_.tokens == ref.tokens[0] and long_.frames > 20
        assert_audio_close(audio[long_], ref.audio[0])
    finally:
        pipe.close()


def test_prefix_reuse_equals_full_prefill(pipeline, voices):
    cache = PrefixCache()
    sched = Scheduler(pipeline, max_batch=4, reuse_prefix=True, prefix_cache=cache)
    specs = [(SCRIPTS[0], 1), (SCRIPTS[2], 2), (SCRIPTS[1], 1), (SCRIPTS[3], 0)]  # 1, 1, 2, 2 speakers
    jobs = [make_job(pipeline, script, voices, seed) for script, seed in specs]
    one, two = jobs[0].prompt.prefix_len, jobs[2].prompt.prefix_len
    assert one == jobs[1].prompt.prefix_len and two == jobs[3].prompt.prefix_len and one < two
    for job in jobs:
        P = job.prompt.prefix_len
        np.testing.assert_array_equal(job.prompt.input_ids[:P], (jobs[0] if P == one else jobs[2]).prompt.input_ids[:P])
        assert not job.prompt.speech_input_mask[P:].any()
    audio, _, _, _ = drive(sched, {0: [jobs[0]], 2: [jobs[1], jobs[2]], 3: [jobs[3]]})
    assert [j.prefix_reused for j in jobs] == [False, True, False, True]
    assert len(cache) == 2 and cache.hits == 2
    # each prefix was prefilled once; every job prefilled its text only
    texts = sum(len(j.prompt.input_ids) - j.prompt.prefix_len for j in jobs)
    assert sched.prefill_tokens == one + two + texts
    for job, (script, seed) in zip(jobs, specs):
        tokens, expected = alone(pipeline, script, voices, seed)
        assert job.tokens == tokens
        assert_audio_close(audio[job], expected)


def test_generate_with_prefix_reuse_is_token_exact(pipeline, fixture_reference):
    meta, ref = fixture_reference
    gen = meta["generate"]
    result = pipeline.generate(gen["script"], [ref["generate.voice_wav_raw"]], cfg_scale=gen["cfg_scale"],
                               max_new_frames=gen["max_new_tokens"], noise=ref["generate.noise"], reuse_prefix=True)
    assert result.tokens[0] == gen["generated_tokens"]


class LimitedBackend:
    """The real ORT backend behind a profile-like limit: lm calls with seq above `max_seq` do not fit."""

    def __init__(self, backend, max_seq):
        self.backend = backend
        self.max_seq = max_seq

    def check_fits(self, graph, dims):
        if graph == "lm" and dims.get("seq", 1) > self.max_seq:
            raise RuntimeInputError(f"lm seq {dims['seq']} exceeds the profile maximum {self.max_seq}")

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_check_fits_refuses_one_job_only(pipeline, voices):
    lengths = [len(pipeline.prepare(s, voices)[0].prompt.input_ids) for s in SCRIPTS]
    limit = sorted(lengths)[1]
    limited = Pipeline(pipeline.engine_dir, pipeline.manifest, LimitedBackend(pipeline.backend, limit))
    sched = Scheduler(limited, max_batch=4)
    jobs = [make_job(limited, s, voices, 1) for s in SCRIPTS]
    drive(sched, {0: jobs})
    for job, n, script in zip(jobs, lengths, SCRIPTS):
        if n > limit:
            assert isinstance(job.error, RuntimeInputError) and "profile maximum" in str(job.error)
            assert job.tokens == []
        else:
            assert job.error is None and job.tokens == alone(pipeline, script, voices, 1)[0]


def test_vv_run_batch_rows_equal_runs_alone(tiny_engine_dir, voices, tmp_path):
    """vv-run drives the same scheduler: script i of a batch file equals that script run alone with
    seed + i (tokens -> same frame count; audio within the tolerance above)."""
    import json

    import soundfile as sf
    from click.testing import CliRunner

    from vv_runtime.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    voice = tmp_path / "voice.wav"
    sf.write(voice, voices[0], 24000, subtype="FLOAT")
    names = []
    for i, script in enumerate([SCRIPTS[0], SCRIPTS[2]]):
        (tmp_path / f"s{i}.txt").write_text(script + "\n")
        names.append(f"s{i}.txt")
    (tmp_path / "batch.lst").write_text("\n".join(names) + "\n")
    batch = run("--engine-dir", tiny_engine_dir, "--batch-file", tmp_path / "batch.lst", "--voice", voice,
                "--out", tmp_path / "batch" / "out.wav", "--seed", 1, "--json")
    for i, name in enumerate(names):
        single = run("--engine-dir", tiny_engine_dir, "--script", tmp_path / name, "--voice", voice,
                     "--out", tmp_path / f"alone_{i}.wav", "--seed", 1 + i, "--json")
        assert batch["outputs"][i]["steps"] == single["outputs"][0]["steps"]
        assert batch["outputs"][i]["frames"] == single["outputs"][0]["frames"] > 0
        together, _ = sf.read(batch["outputs"][i]["path"], dtype="float32")
        alone_, _ = sf.read(single["outputs"][0]["path"], dtype="float32")
        assert_audio_close(together, alone_)
