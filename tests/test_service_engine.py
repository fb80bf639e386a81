"""vv_runtime.service_engine on the real tiny ENGINE_DIRs: voices, submit/stream, cancel, deadlines,
queue limits, draining, and results equal to Pipeline.generate with the same seed."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from vv_runtime.errors import BackendFault, RuntimeInputError
from vv_runtime.pipeline import Pipeline
from vv_runtime.service_engine import (Cancelled, EngineStopped, QueueFull, SpeechEngine, SpeechRequest,
                                      VoiceStore, parse_request_script)

SCRIPT = "Speaker 1: Hello world.\nSpeaker 1: This is a tiny test."


@pytest.fixture(scope="module")
def pipeline(tiny_engine_dir):
    pipe = Pipeline.from_engine_dir(tiny_engine_dir, backend="ort")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def forced(pipeline):
    """The tiny pipeline speaking until each request's step limit (2 x prompt length): long requests."""
    from conftest import load_benchmark

    forced_diffusion = load_benchmark("common").ForcedDiffusion  # the benchmarks' wrapper of the real backend
    column = pipeline.manifest["control_tokens"].index("speech_diffusion")
    return Pipeline(pipeline.engine_dir, pipeline.manifest, forced_diffusion(pipeline.backend, column))


@pytest.fixture(scope="module")
def voice_wav(fixture_reference):
    _, ref = fixture_reference
    return np.asarray(ref["generate.voice_wav_raw"], dtype=np.float32)


@pytest.fixture()
def engine(pipeline, voice_wav):
    eng = SpeechEngine(pipeline, max_batch=4, max_queue=8)
    eng.voices.add(voice_wav, name="alice")
    eng.start()
    yield eng
    eng.stop(drain=False, timeout=60)


def wav_bytes(audio: np.ndarray, rate: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# --- voices -------------------------------------------------------------------------------------------

def test_voice_store_encodes_once_and_lists(pipeline, voice_wav, tmp_path):
    store = VoiceStore(pipeline)
    vid = store.add(voice_wav, name="alice")
    assert vid == "alice"
    voice = store.get("alice")
    rows = pipeline.prepare(SCRIPT, [voice_wav])
    np.testing.assert_array_equal(voice.audio, rows[0].voices[0])  # exactly what vv-run feeds the encoder
    assert voice.frames == rows[0].prompt.voice_frames[0]
    np.testing.assert_array_equal(voice.embeds, pipeline.voice_embeds(rows[0].voices[0], voice.frames))
    assert store.list() == [{"id": "alice", "name": "alice", "seconds": round(voice_wav.size / 24000, 3)}]

    # bytes of a sound file at another rate: resampled to 24 kHz, id from the content
    other = store.add(wav_bytes(voice_wav[::2].copy(), rate=12000))
    assert other != "alice" and other == store.add(wav_bytes(voice_wav[::2].copy(), rate=12000))
    assert abs(store.get(other).seconds - voice_wav.size / 24000) < 0.01

    sf.write(tmp_path / "bob.wav", voice_wav, 24000)
    sf.write(tmp_path / "carol.flac", voice_wav[:12000], 24000)
    (tmp_path / "notes.txt").write_text("not a voice")
    assert store.load_dir(tmp_path) == ["bob", "carol"]
    assert {v["id"] for v in store.list()} == {"alice", other, "bob", "carol"}


@pytest.mark.parametrize("audio,message", [
    (b"", "empty upload"),
    (b"RIFF0000WAVEjunk", "unreadable audio"),
    (np.zeros(4800, np.float32), "silent"),
    (np.zeros(0, np.float32), "no audio samples"),
    (np.full(100, np.nan, np.float32), "non-finite"),
    (np.ones((2, 2, 2), np.float32), "shape"),
    (12, "expected a file path"),
])
def test_voice_store_bad_audio(pipeline, audio, message):
    store = VoiceStore(pipeline)
    with pytest.raises(RuntimeInputError, match=message) as info:
        store.add(audio)
    assert "\n" not in str(info.value)
    assert store.list() == []


def test_voice_store_limits_and_unknown(pipeline, voice_wav):
    store = VoiceStore(pipeline, max_seconds=0.1)
    with pytest.raises(RuntimeInputError, match="more than the limit of 0.1 s"):
        store.add(voice_wav)
    with pytest.raises(RuntimeInputError, match="unknown voice 'nobody'"):
        store.get("nobody")
    with pytest.raises(RuntimeInputError, match="voice name"):
        store.add(voice_wav, name="../etc")


# --- requests ---------------------------------------------------------------------------------------

def test_submit_streams_the_same_as_generate(engine, pipeline, voice_wav):
    handle = engine.submit(SpeechRequest(SCRIPT, voices=["alice"], seed=11, max_new_frames=40))
    chunks = list(handle.chunks(timeout=60))
    assert handle.done and handle.error is None
    alone = pipeline.generate(SCRIPT, [voice_wav], seed=11, max_new_frames=40)
    assert handle.tokens == alone.tokens[0]
    assert handle.frames == len(chunks) == alone.frames[0] > 0
    assert all(c.shape == (engine.hop,) and c.dtype == np.float32 for c in chunks)
    # the engine reuses the stored voice's prompt-prefix cache: the LM attends the prefix as cached positions,
    # summed apart from the text's (DecoderStep reads its cache in place), which rounds differently from one
    # prefill over the whole prompt -- the same tokens, the audio within fp32 reordering
    peak = float(np.abs(alone.audio[0]).max())
    assert float(np.abs(np.concatenate(chunks) - alone.audio[0]).max()) <= 1e-5 * peak
    assert handle.first_audio_s is not None and handle.first_audio_s > 0
    stats = engine.stats()
    assert stats["requests_total"] == 1 and stats["frames_total"] == handle.frames
    assert stats["audio_seconds_total"] == pytest.approx(handle.frames * engine.hop / engine.sample_rate)
    assert stats["ttfa_seconds"] == [handle.first_audio_s]
    assert stats["queue_depth"] == 0 and stats["active_requests"] == 0 and stats["errors"] == {}


def test_plain_text_and_raw_voice(engine, pipeline, voice_wav):
    handle = engine.submit(SpeechRequest("Hello world.\nThis is a tiny test.", voices=[voice_wav], seed=11,
                                         max_new_frames=40))
    audio = handle.audio(timeout=60)
    alone = pipeline.generate(SCRIPT, [voice_wav], seed=11, max_new_frames=40)
    assert handle.tokens == alone.tokens[0]
    np.testing.assert_array_equal(audio, alone.audio[0])


def test_plain_text_request_has_no_speaker_lines(engine):
    """plain_text (the HTTP `input`): every line is the first voice's, one that starts with "Speaker N:"
    too, and any line break ends a line; the same text as a script is read as speaker lines."""
    plain = engine.check(SpeechRequest("Speaker 2: hi\u2028 there \n\n", voices=["alice"], plain_text=True))
    assert plain.parsed == [(0, " Speaker 2: hi"), (0, " there")]
    assert parse_request_script("Speaker 2: hi\nSpeaker 3: there") == [(1, " hi"), (2, " there")]
    assert parse_request_script("hi\nthere") == [(0, " hi"), (0, " there")]


def test_engine_from_engine_dir_with_a_voices_dir(tiny_engine_dir, tmp_path, voice_wav):
    sf.write(tmp_path / "bob.wav", voice_wav, 24000)
    (tmp_path / "notes.md").write_text("not a voice")
    engine = SpeechEngine.from_engine_dir(tiny_engine_dir, backend="ort", max_batch=2, voices_dir=tmp_path).start()
    try:
        assert [v["id"] for v in engine.voices.list()] == ["bob"] and engine.max_batch == 2
        handle = engine.submit(SpeechRequest("Hi.", voices=["bob"], seed=0, max_new_frames=2, plain_text=True))
        assert handle.wait(60) and handle.error is None
    finally:
        engine.close()
    assert not engine.accepting
    with pytest.raises(RuntimeInputError, match="voice bob: .* more than the limit"):
        SpeechEngine.from_engine_dir(tiny_engine_dir, backend="ort", voices_dir=tmp_path, max_voice_seconds=0.01)


def test_concurrent_requests_all_complete(engine, pipeline, voice_wav):
    requests = [SpeechRequest(SCRIPT, voices=["alice"], seed=s, max_new_frames=12) for s in range(3)]
    handles = [None] * 3

    def client(i):
        handles[i] = engine.submit(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h, req in zip(handles, requests):
        audio = h.audio(timeout=120)
        alone = pipeline.generate(SCRIPT, [voice_wav], seed=req.seed, max_new_frames=12)
        assert h.tokens == alone.tokens[0]
        np.testing.assert_allclose(audio, alone.audio[0], rtol=0, atol=1e-4 * np.abs(alone.audio[0]).max())
    assert len({h.id for h in handles}) == 3
    assert engine.stats()["requests_total"] == 3


@pytest.mark.parametrize("request_,message", [
    (SpeechRequest("", voices=[]), "script is empty"),
    (SpeechRequest("Speaker 1: a\nno prefix", voices=[]), "no 'Speaker N:' prefix"),
    (SpeechRequest("Speaker 1: a\nSpeaker 2: b", voices=["alice"]), "2 speakers but 1 voices"),
    (SpeechRequest("Speaker 1: a", voices=["nobody"]), "unknown voice"),
    (SpeechRequest("Speaker 1: a", voices=[np.zeros(0, np.float32)]), "no audio samples"),
    (SpeechRequest("Speaker 1: " + "hello world " * 3000, voices=[]), "longer than the model's context"),
    (SpeechRequest("Speaker 1: a", max_new_frames=0), "max_new_frames"),
    (SpeechRequest("Speaker 1: a", seed=-1), "seed"),
    (SpeechRequest("Speaker 1: a", cfg_scale=float("nan")), "cfg_scale"),
    (SpeechRequest("Speaker 1: a", timeout_s=0), "timeout_s"),
    (SpeechRequest("/etc/passwd.txt", voices=[]), None),  # text, never a file to read
])
def test_bad_requests_refused_before_queueing(engine, request_, message):
    if message is None:
        handle = engine.submit(SpeechRequest(request_.script, max_new_frames=2, seed=0))
        handle.audio(timeout=60)
        return
    with pytest.raises(RuntimeInputError, match=message) as info:
        engine.submit(request_)
    assert "\n" not in str(info.value)
    stats = engine.stats()
    assert stats["queue_depth"] == 0 and stats["requests_total"] == 0


def test_cancel_and_timeout(forced, voice_wav):
    engine = SpeechEngine(forced, max_batch=4, max_queue=8)
    engine.voices.add(voice_wav, name="alice")
    engine.start()
    try:
        _cancel_and_timeout(engine)
    finally:
        engine.stop(drain=False, timeout=60)


def _cancel_and_timeout(engine):
    long = SpeechRequest(SCRIPT, voices=["alice"], seed=1, max_new_frames=2000)  # ~2 x 120 frames
    handle = engine.submit(long)
    it = handle.chunks(timeout=60)
    next(it)
    handle.cancel()
    with pytest.raises(Cancelled):
        for _ in it:
            pass
    assert handle.done and isinstance(handle.error, Cancelled)
    assert handle.frames < 200

    slow = engine.submit(SpeechRequest(SCRIPT, voices=["alice"], seed=1, max_new_frames=60, timeout_s=1e-6))
    with pytest.raises(TimeoutError, match="timeout"):
        slow.audio(timeout=60)
    ok = engine.submit(SpeechRequest(SCRIPT, voices=["alice"], seed=2, max_new_frames=5))
    ok.audio(timeout=60)
    assert ok.error is None and len(ok.tokens) == 5  # the engine goes on
    errors = engine.stats()["errors"]
    assert errors == {"cancelled": 1, "timeout": 1}


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _serves_a_short_request(eng, forced, frames: int) -> None:
    """After a failure or timeout, the engine still serves: a short request comes back whole and equal to the
    same request run alone."""
    ok = eng.submit(SpeechRequest("Speaker 1: Short.", seed=1, max_new_frames=frames))
    ok.audio(timeout=60)
    assert ok.error is None and ok.frames == frames
    assert ok.tokens == forced.generate("Speaker 1: Short.", seed=1, max_new_frames=frames).tokens[0]


def test_queue_full_and_drain(forced):
    eng = SpeechEngine(forced, max_batch=1, max_queue=1)
    with pytest.raises(EngineStopped):
        eng.submit(SpeechRequest("Speaker 1: a"))  # not started
    eng.start()
    try:
        first = eng.submit(SpeechRequest(SCRIPT, seed=3, max_new_frames=150))
        assert _wait_for(lambda: eng.stats()["active_requests"] == 1)
        second = eng.submit(SpeechRequest(SCRIPT, seed=4, max_new_frames=40))
        with pytest.raises(QueueFull):
            eng.submit(SpeechRequest(SCRIPT, seed=5, max_new_frames=40))
        eng.stop(drain=True, timeout=120)
        assert not eng.accepting
        with pytest.raises(EngineStopped):
            eng.submit(SpeechRequest("Speaker 1: a"))
        for h, frames in ((first, 150), (second, 40)):  # both finished, none cut
            assert h.done and h.error is None and h.frames == frames
    finally:
        eng.stop(drain=False, timeout=60)


def test_stop_without_drain_cancels(forced):
    eng = SpeechEngine(forced, max_batch=1, max_queue=4).start()
    running = eng.submit(SpeechRequest(SCRIPT, seed=3, max_new_frames=2000))
    queued = eng.submit(SpeechRequest(SCRIPT, seed=4, max_new_frames=60))
    assert _wait_for(lambda: running.frames > 0)
    eng.stop(drain=False, timeout=60)
    assert running.done and queued.done
    assert isinstance(running.error, Cancelled) and running.frames < 200
    assert isinstance(queued.error, (Cancelled, EngineStopped))
    with pytest.raises((Cancelled, EngineStopped)):
        queued.audio(timeout=1)


# --- continuous batching through the engine --------------------------------------------------------

TWO_SPEAKERS = ["Speaker 0: One two three.\nSpeaker 1: Four five.", "Speaker 2: Hi.\nSpeaker 1: Yo."]
ONE_SPEAKER = [SCRIPT, "Speaker 1: The quick brown fox jumps over the lazy dog."]


def _assert_close(actual, expected):
    assert actual.shape == expected.shape
    if expected.size:
        peak = float(np.abs(expected).max())
        assert float(np.abs(actual - expected).max()) <= 1e-4 * peak


def test_staggered_requests_equal_alone(pipeline, voice_wav):
    """Each request joins while the previous one streams; a neighbour is cancelled mid-way. Every
    request's tokens equal generating it alone (same seed); audio within 1e-4 of the peak."""
    other = (0.5 * voice_wav + 0.01 * np.sin(np.arange(voice_wav.shape[0]) * 0.37)).astype(np.float32)[:5000]
    eng = SpeechEngine(pipeline, max_batch=3, max_queue=8)
    eng.voices.add(voice_wav, name="alice")
    eng.voices.add(other, name="bob")
    eng.start()
    try:
        plan = [(ONE_SPEAKER[1], ["alice"], 2), (TWO_SPEAKERS[0], ["alice", "bob"], 1),
                (ONE_SPEAKER[0], ["alice"], 1), ("victim", ["alice"], 2), (TWO_SPEAKERS[1], ["bob", other], 1),
                (ONE_SPEAKER[1], [other], 0)]
        handles, streams, audio, busiest = [], [], [], 0
        for script, voices, seed in plan:
            victim = script == "victim"
            req = SpeechRequest(ONE_SPEAKER[1] if victim else script, voices=voices, seed=seed)
            handles.append(eng.submit(req))
            streams.append(handles[-1].chunks(timeout=60))
            audio.append([])
            if victim:
                handles[-1].cancel()
            # the next request arrives once the running ones have made one more frame
            for i, it in enumerate(streams):
                if not handles[i].done:
                    chunk = next(it, None)
                    if chunk is not None:
                        audio[i].append(chunk)
            busiest = max(busiest, eng.stats()["active_requests"])
        for i, it in enumerate(streams):
            try:
                audio[i].extend(it)
            except Cancelled:
                assert plan[i][0] == "victim"
        assert busiest >= 2
        for (script, voices, seed), handle, parts in zip(plan, handles, audio):
            if script == "victim":
                assert isinstance(handle.error, Cancelled)
                continue
            raw = [v if isinstance(v, np.ndarray) else voice_wav if v == "alice" else other for v in voices]
            alone = pipeline.generate(script, raw, seed=seed)
            assert handle.error is None and handle.tokens == alone.tokens[0], script
            _assert_close(np.concatenate(parts) if parts else np.zeros(0, np.float32), alone.audio[0])
        stats = eng.stats()
        assert stats["active_rows"] == 0 and stats["errors"] == {"cancelled": 1}
        # preset voices: prefixes computed at add (one per voice), then reused by one-speaker requests
        assert stats["prefix_cache"]["hits"] >= 2
    finally:
        eng.stop(drain=False, timeout=60)


def test_timeout_mid_stream_frees_rows(forced):
    eng = SpeechEngine(forced, max_batch=2).start()
    try:
        handle = eng.submit(SpeechRequest(SCRIPT, seed=7, max_new_frames=2000, timeout_s=0.3))
        with pytest.raises(TimeoutError, match="timeout of 0.3 s"):
            handle.audio(timeout=120)
        limit = 2 * len(handle.prepared.prompt.input_ids)  # the request would speak this many frames
        assert handle.frames < limit
        assert _wait_for(lambda: eng.stats()["active_rows"] == 0)
        _serves_a_short_request(eng, forced, 4)
    finally:
        eng.stop(drain=False, timeout=60)


def test_queued_request_cancelled_or_expired_leaves_the_queue(forced):
    eng = SpeechEngine(forced, max_batch=1, max_queue=2).start()
    try:
        busy = eng.submit(SpeechRequest(SCRIPT, seed=7, max_new_frames=2000))  # ~2 x 117 frames
        assert _wait_for(lambda: eng.stats()["active_requests"] == 1)
        queued = eng.submit(SpeechRequest("Speaker 1: Next.", seed=1))
        expiring = eng.submit(SpeechRequest("Speaker 1: Later.", seed=1, timeout_s=0.05))
        queued.cancel()
        with pytest.raises(Cancelled):
            queued.audio(timeout=60)
        with pytest.raises(TimeoutError, match="still queued"):
            expiring.audio(timeout=60)
        assert not busy.done, "both left the queue while the first request was still running"
        assert eng.stats()["queue_depth"] == 0
        busy.cancel()
        with pytest.raises(Cancelled):
            busy.audio(timeout=60)
        assert eng.stats()["errors"] == {"cancelled": 2, "timeout": 1}
    finally:
        eng.stop(drain=False, timeout=60)


class Failing:
    """The forced backend, raising (an execution failure) on the calls `when(graph, feeds)` picks while armed."""

    def __init__(self, backend, when):
        self.backend = backend
        self.when = when
        self.armed = False

    def run(self, graph, feeds):
        if self.armed and self.when(graph, feeds):
            self.armed = False
            raise RuntimeError("injected execution failure\non two lines")
        return self.backend.run(graph, feeds)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_failed_step_finishes_every_request_and_the_engine_goes_on(forced):
    # the decode call after a cancelled neighbour left (2 rows, one job) fails
    failing = Failing(forced.backend, lambda g, f: g == "lm" and f["inputs_embeds"].shape == (2, 1, forced.hidden))
    pipe = Pipeline(forced.engine_dir, forced.manifest, failing)
    eng = SpeechEngine(pipe, max_batch=2).start()
    try:
        a = eng.submit(SpeechRequest(SCRIPT, seed=1, max_new_frames=2000))
        b = eng.submit(SpeechRequest(SCRIPT, seed=2, max_new_frames=2000))
        assert _wait_for(lambda: eng.stats()["active_rows"] == 4)
        failing.armed = True
        b.cancel()
        with pytest.raises(Cancelled):
            b.audio(timeout=60)
        with pytest.raises(BackendFault, match="a batch step failed") as err:
            a.audio(timeout=60)
        assert "\n" not in str(err.value)
        assert not failing.armed, "the injected failure happened"
        assert _wait_for(lambda: eng.stats()["active_requests"] == 0)
        assert eng.fatal is None
        _serves_a_short_request(eng, forced, 3)
    finally:
        eng.stop(drain=False, timeout=60)


def test_voice_encoding_failure_fails_that_request_only(forced, voice_wav):
    failing = Failing(forced.backend, lambda g, f: g == "acoustic_encoder")
    pipe = Pipeline(forced.engine_dir, forced.manifest, failing)
    eng = SpeechEngine(pipe, max_batch=2).start()
    try:
        failing.armed = True
        bad = eng.submit(SpeechRequest(SCRIPT, voices=[voice_wav], seed=1, max_new_frames=3))
        with pytest.raises(BackendFault, match="voice encoding failed"):
            bad.audio(timeout=60)
        ok = eng.submit(SpeechRequest("Speaker 1: Short.", seed=1, max_new_frames=3))
        ok.audio(timeout=60)
        assert ok.error is None and eng.fatal is None and eng.accepting
        assert eng.stats()["errors"] == {"internal": 1}
    finally:
        eng.stop(drain=False, timeout=60)


def test_max_queue_zero_still_serves_free_places(forced):
    eng = SpeechEngine(forced, max_batch=1, max_queue=0).start()
    try:
        first = eng.submit(SpeechRequest(SCRIPT, seed=3, max_new_frames=2000))  # idle: it starts at once
        assert _wait_for(lambda: eng.stats()["active_requests"] == 1)
        with pytest.raises(QueueFull):
            eng.submit(SpeechRequest(SCRIPT, seed=4, max_new_frames=4))       # no free place, no queue
        first.cancel()
        with pytest.raises(Cancelled):
            first.audio(timeout=60)
        assert _wait_for(lambda: eng.stats()["active_requests"] == 0)
        again = eng.submit(SpeechRequest("Speaker 1: Short.", seed=1, max_new_frames=2))
        again.audio(timeout=60)
        assert again.error is None and again.frames == 2
    finally:
        eng.stop(drain=False, timeout=60)
