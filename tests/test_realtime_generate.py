"""VibeVoice-Realtime-0.5B's windowed loop on the exported tiny fixture against Microsoft's streaming `generate`
(recorded noise), streaming text in, and continuous batching.

Reference: ../shared/fixtures/vibevoice-realtime-tiny-original (README there): one whole generation, 42 text
tokens, 56 frames, the end-of-speech logit of every frame drawn (the smallest |logit| is 0.18, far above fp32
noise, so a faithful loop ends on the same frame).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vv_runtime.backend import OrtBackend
from vv_runtime.realtime_pipeline import RealtimePipeline, TextStream
from vv_runtime.scheduler import Scheduler


@pytest.fixture(scope="module")
def realtime(realtime_voiced_engine_dir):
    from vv_runtime.manifest import load_manifest

    engine_dir = realtime_voiced_engine_dir
    manifest = load_manifest(engine_dir)
    pipe = RealtimePipeline(engine_dir, manifest, OrtBackend(engine_dir, manifest))
    yield pipe
    pipe.close()


def test_fixture_generation_matches_the_original(realtime, realtime_reference):
    """Same text tokens, the same 56 frames (speech ends on the same frame), the end-of-speech logits of every
    frame, and the audio: within 1e-4 of the peak over the first 8 frames, 2e-3 over all 56.

    Why not 1e-4 over all 56: the loop amplifies rounding. Fed back through 56 frames (the TTS LM, the sampler's
    5 x-prediction steps), a relative change of 1e-7 of the recorded noise (below fp32's resolution of 1.2e-7)
    moves the audio by 5.8e-5 of the peak, 1e-6 by 1.1e-3 (`test_the_loop_amplifies_rounding` below); this loop
    and the original differ only in operation order (frame 1: 1.4e-6 of the peak, frame 56: ~7e-4)."""
    settings, ref = realtime_reference
    text = settings["generate"]["script"]
    assert realtime.text_tokens(text) == ref["generate.tts_text_ids"][0].tolist()
    result = realtime.generate(text, "en-Tiny_man", cfg_scale=settings["generate"]["cfg_scale"],
                               noise=ref["generate.noise"])
    want = ref["generate.audio"][0]
    assert result.frames == settings["generate"]["frames"] == 56
    assert result.audio.shape == want.shape
    peak = float(np.abs(want).max())
    error = np.abs(result.audio - want).reshape(56, -1).max(axis=1) / peak
    assert error[:8].max() <= 1e-4, error[:8]
    assert error.max() <= 2e-3, error
    # the end-of-speech logits of the frames fed, as the original computed them
    np.testing.assert_allclose(result.eos_logits, ref["generate.eos_logits"][:result.frames], atol=2e-3)
    assert result.eos_logits[-1] > 0 and max(result.eos_logits[:-1]) < 0


def test_the_loop_amplifies_rounding(realtime, realtime_reference):
    """The measurement behind the tolerance above: the same loop with the recorded noise changed by 1e-6
    relative moves the audio by about 1e-3 of the peak by the end, far more than at the start."""
    settings, ref = realtime_reference
    text = settings["generate"]["script"]
    noise = ref["generate.noise"]
    base = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=noise)
    nudged = noise * (1 + 1e-6 * np.random.default_rng(0).standard_normal(noise.shape).astype(np.float32))
    moved = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=nudged)
    n = min(base.frames, moved.frames)
    peak = float(np.abs(base.audio).max())
    drift = np.abs(moved.audio[: n * 3200] - base.audio[: n * 3200]).reshape(n, -1).max(axis=1) / peak
    assert drift[0] < 1e-5 and drift.max() > 2e-4, drift


def test_streamed_text_equals_text_given_at_once(realtime, realtime_reference):
    settings, ref = realtime_reference
    text = settings["generate"]["script"]
    alone = realtime.generate(text, "en-Tiny_man", seed=11, max_new_frames=30)
    rng = np.random.default_rng(0)
    for trial in range(3):
        stream = realtime.text_stream()
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=8, replace=False).tolist())
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]

        def produce():
            for piece in pieces:
                time.sleep(0.01)
                stream.append(piece)
            stream.close()

        producer = threading.Thread(target=produce)
        producer.start()
        streamed = realtime.generate(stream, "en-Tiny_man", seed=11, max_new_frames=30)
        producer.join()
        assert stream.feed.tokens == realtime.text_tokens(text)
        assert streamed.frames == alone.frames
        np.testing.assert_array_equal(streamed.audio, alone.audio)
    assert streamed.stalled_s > 0  # the text came slower than the frames: the loop waited for it


def test_text_stream_releases_only_final_tokens(realtime):
    text = "Hello there,  general Kenobi! It's 42 o'clock; don't\twait."
    want = realtime.text_tokens(text)
    for step in (1, 2, 3, 7):
        stream = TextStream(realtime.encode)
        for i in range(0, len(text), step):
            stream.append(text[i:i + step])
            released = list(stream.feed.tokens)
            assert want[: len(released)] == released
        stream.close()
        assert stream.feed.tokens == want


def test_jobs_batched_equal_themselves_alone(realtime):
    texts = ["Hello world, one two three four five six.", "A second voice speaks here, a little longer text.",
             "Short one."]
    alone = [realtime.generate(t, "en-Tiny_man", seed=i, max_new_frames=14 + 3 * i) for i, t in enumerate(texts)]
    sched = Scheduler(realtime.new_steps(), max_batch=4)
    jobs = [sched.add(realtime.job(t, "en-Tiny_man", seed=i, max_new_frames=14 + 3 * i))
            for i, t in enumerate(texts)]
    audio = {job.index: [] for job in jobs}
    while sched.busy:
        out = sched.step()
        for job, chunk in out.chunks:
            audio[job.index].append(chunk)
        for job in out.finished:
            assert job.error is None, job.error
    for i, job in enumerate(jobs):
        got = np.concatenate(audio[job.index])
        assert job.frames == alone[i].frames and got.shape == alone[i].audio.shape
        peak = float(np.abs(alone[i].audio).max())
        assert float(np.abs(got - alone[i].audio).max()) <= 1e-4 * peak


def test_unknown_preset_is_one_line(realtime):
    from vv_runtime.errors import RuntimeInputError

    with pytest.raises(RuntimeInputError, match="voice 'nobody': not a preset of this ENGINE_DIR"):
        realtime.generate("Hello.", "nobody")


class _CallSizes:
    """The backend's own run, recording the latents per acoustic_decoder call (`sizes`) and the (rows, seq) of
    every tts_lm call (`tts_lm`); the graphs run unchanged."""

    def __init__(self, pipeline):
        self.pipeline, self.sizes, self.tts_lm = pipeline, [], []
        self._run = pipeline.backend.run

    def __enter__(self):
        def run(graph, feeds):
            if graph == "acoustic_decoder":
                self.sizes.append(int(feeds["latent"].shape[1]))
            if graph == "tts_lm":
                self.tts_lm.append(tuple(int(n) for n in feeds["inputs_embeds"].shape[:2]))
            return self._run(graph, feeds)
        self.pipeline.backend.run = run
        return self

    def __exit__(self, *exc):
        del self.pipeline.backend.run  # the instance attribute: the class's run again


def test_grouped_decoding_equals_one_frame_a_call(realtime, realtime_reference):
    """The decoder takes a job's latents in groups (1, 2, 3, then up to a speech window's, never across one,
    the rest at the end): the same frames and audio as one frame per call, within fp32 reordering, and each
    frame still emitted as its own hop."""
    settings, ref = realtime_reference
    text, noise = settings["generate"]["script"], ref["generate.noise"]
    assert realtime.facts.decode_frames == 6  # the manifest's: the exported decoder takes decode_frames
    realtime.decode_frames = 1
    try:
        with _CallSizes(realtime) as single:
            one = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=noise)
    finally:
        realtime.decode_frames = None
    with _CallSizes(realtime) as grouped:
        gen = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=noise, stream=True)
        chunks = []
        while True:
            try:
                chunks.append(next(gen))
            except StopIteration as stop:
                result = stop.value
                break
    assert single.sizes == [1] * 56
    # windows of 6 frames: [1, 2, 3] [4, 2] [6] x 7, then the 2 frames of the last window when speech ends
    assert grouped.sizes == [1, 2, 3, 4, 2] + [6] * 7 + [2] and sum(grouped.sizes) == result.frames == 56
    assert len(chunks) == 56 and all(c.shape == (3200,) for c in chunks)
    peak = float(np.abs(one.audio).max())
    assert float(np.abs(result.audio - one.audio).max()) <= 1e-5 * peak
    assert result.eos_logits == one.eos_logits   # the loop itself never sees the audio


def test_decode_frames_bounds(realtime):
    from vv_runtime.errors import RuntimeInputError
    from vv_runtime.realtime_steps import RealtimeSteps

    assert RealtimeSteps(realtime.backend, realtime.facts, decode_frames=50).decode_frames == 6  # a window
    assert RealtimeSteps(realtime.backend, realtime.facts, decode_frames=3).decode_frames == 3
    with pytest.raises(RuntimeInputError, match="decode_frames 0: must be at least 1"):
        RealtimeSteps(realtime.backend, realtime.facts, decode_frames=0)


def test_a_decoder_of_one_frame_a_call_is_not_grouped(realtime):
    """An ENGINE_DIR whose acoustic_decoder takes one frame (latent [batch, 1, A]) decodes frame by frame,
    whatever its streaming section says."""
    import copy

    from vv_runtime.realtime_steps import RealtimeFacts, RealtimeSteps

    manifest = copy.deepcopy(realtime.manifest)
    latent = next(io for io in manifest["graphs"]["acoustic_decoder"]["inputs"] if io["name"] == "latent")
    latent["shape"][1] = 1
    facts = RealtimeFacts.from_manifest(manifest)
    assert facts.decode_frames == 1 and manifest["streaming"]["decode_frames"] == 6
    assert RealtimeSteps(realtime.backend, facts, decode_frames=6).decode_frames == 1


def test_a_backend_of_one_shape_per_frame_call_is_not_grouped(realtime):
    """TensorRT replays one CUDA graph per shape of a per-frame context (TrtBackend.groups_steps is False):
    there the decoder takes one frame per call."""
    from vv_runtime.realtime_steps import RealtimeSteps
    from vv_runtime.trt_backend import TrtBackend

    assert TrtBackend.groups_steps is False and realtime.backend.groups_steps is True
    realtime.backend.groups_steps = False
    try:
        assert RealtimeSteps(realtime.backend, realtime.facts, decode_frames=6).decode_frames == 1
    finally:
        del realtime.backend.groups_steps


def test_text_windows_join_the_frame_before_them(realtime, realtime_reference):
    """Where a speech window ends and a text window follows, the frame and the window share one tts_lm call (the
    positive row 1 + 5 positions, the negative row 1): only a job's first window runs alone. The same frames,
    end-of-speech logits and audio as every window alone (the original's order of calls), within fp32
    reordering as the loop amplifies it (`test_the_loop_amplifies_rounding`)."""
    settings, ref = realtime_reference
    text, noise = settings["generate"]["script"], ref["generate.noise"]
    assert realtime.facts.every_position and realtime.new_steps().joins_windows
    realtime.decode_frames = 1      # as a backend of one shape per step decodes: the audio's calls alike
    try:
        with _CallSizes(realtime) as joined:
            result = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=noise)
        realtime.backend.groups_steps = False
        assert not realtime.new_steps().joins_windows
        with _CallSizes(realtime) as alone:
            want = realtime.generate(text, "en-Tiny_man", cfg_scale=1.5, noise=noise)
    finally:
        realtime.decode_frames = None
        realtime.backend.__dict__.pop("groups_steps", None)
    tokens = len(ref["generate.tts_text_ids"].reshape(-1))   # 42: 8 windows of 5 and one of 2
    windows = -(-tokens // 5)
    assert alone.tts_lm.count((1, 5)) == windows - 1 and (1, tokens % 5) in alone.tts_lm
    assert alone.tts_lm.count((2, 1)) == result.frames == want.frames == 56
    assert joined.tts_lm[0] == (1, 5) and joined.tts_lm.count((2, 6)) == windows - 2
    assert (2, 1 + tokens % 5) in joined.tts_lm and len(joined.tts_lm) == 1 + 56
    np.testing.assert_allclose(result.eos_logits, want.eos_logits, atol=1e-4)
    peak = float(np.abs(want.audio).max())
    error = np.abs(result.audio - want.audio).reshape(56, -1).max(axis=1) / peak
    assert error[:6].max() == 0          # the first speech window: the same calls
    assert error[:8].max() <= 1e-5 and error.max() <= 1e-3, error


def test_a_call_of_some_rows_reads_those_rows_only(realtime):
    """KVRows.run_rows (the joined call): the listed rows' cached slots, copied and each masked to its own, in
    the order given, adjacent or not. The outputs and the keys/values written equal those of the same two rows
    in a cache that holds nothing else, exactly (what makes a job's joined call the same batched or alone)."""
    from vv_runtime.kv_rows import KVRows

    f = realtime.facts
    rng = np.random.default_rng(0)

    def noise(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    pos, neg = noise(f.tts_lm_layers, 2, 1, f.kv_heads, 9, f.head_dim), noise(f.tts_lm_layers, 2, 1, f.kv_heads, 4, f.head_dim)
    embeds = [noise(3, f.hidden), noise(1, f.hidden)]
    types = np.array([[0, 1, 1], [0, 0, 0]], dtype=np.int64)

    def rows_holding(contents: dict, jobs: int) -> KVRows:
        kv = KVRows(realtime.backend, f.tts_lm_layers, f.kv_heads, f.head_dim, 64)
        for i in range(jobs):
            kv.take(object(), i, 16)
        for row, kv_slots in contents.items():
            kv.write(row, 0, kv_slots)
            kv.mask[row, :kv_slots.shape[4]] = 1
        return kv

    crowded = rows_holding({3: pos, 0: neg, 1: noise(*pos.shape), 2: noise(*pos.shape)}, jobs=2)
    alone = rows_holding({0: pos, 1: neg}, jobs=1)
    got = crowded.run_rows("tts_lm", (3, 0), (9, 4), embeds, f.hidden, input_types=types)
    want = alone.run_rows("tts_lm", (0, 1), (9, 4), embeds, f.hidden, input_types=types)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(crowded.cache.data[:, :, 3, :, :12], alone.cache.data[:, :, 0, :, :12])
    np.testing.assert_array_equal(crowded.cache.data[:, :, 0, :, :5], alone.cache.data[:, :, 1, :, :5])
    assert crowded.mask[3, :12].all() and not crowded.mask[3, 12:].any()
    assert crowded.mask[0, :5].all() and not crowded.mask[0, 5:].any()   # the negative row: its frame only


def test_an_engine_dir_whose_tts_lm_returns_the_last_position_runs_every_window_alone(realtime):
    """An ENGINE_DIR exported before tts_lm returned every position (hidden [batch, H], eos_logit [batch, 1]):
    its windows are never joined, and its outputs are read as one position."""
    import copy

    from vv_runtime.realtime_steps import RealtimeFacts, RealtimeSteps, _every_position

    manifest = copy.deepcopy(realtime.manifest)
    outputs = {io["name"]: io for io in manifest["graphs"]["tts_lm"]["outputs"]}
    outputs["hidden"]["shape"] = ["batch", realtime.facts.hidden]
    outputs["eos_logit"]["shape"] = ["batch", 1]
    facts = RealtimeFacts.from_manifest(manifest)
    assert not facts.every_position and not RealtimeSteps(realtime.backend, facts).joins_windows
    hidden, eos = _every_position({"hidden": np.ones((4, facts.hidden)), "eos_logit": np.arange(4.0)[:, None]})
    assert hidden.shape == (4, 1, facts.hidden) and eos.tolist() == [[0.0], [1.0], [2.0], [3.0]]
