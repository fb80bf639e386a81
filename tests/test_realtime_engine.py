"""vv_runtime.realtime_engine on the exported tiny realtime fixture (its preset `en-Tiny_man`): text at once and
streamed, continuous batching equal to alone, the wait for text (no spinning, cancel and deadline while waiting)
and the refusals before anything is queued."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vv_runtime.errors import RuntimeInputError
from vv_runtime.realtime_engine import RealtimeEngine, RealtimeRequest
from vv_runtime.realtime_pipeline import RealtimePipeline
from vv_runtime.request_engine import Cancelled
from vv_runtime.service_engine import SpeechRequest

VOICE = "en-Tiny_man"
TEXT = "Hello world, this is a tiny test of the realtime model speaking slowly."
TEXTS = ["Hello world, one two three four five six.", "A second voice speaks here, a little longer text.",
         "Short one."]


@pytest.fixture(scope="module")
def engine(realtime_voiced_engine_dir):
    pipeline = RealtimePipeline.from_engine_dir(realtime_voiced_engine_dir, backend="ort", threads=1)
    eng = RealtimeEngine(pipeline, max_batch=4, max_queue=8).start()
    yield eng
    eng.close()


def feed(stream, text: str, pieces: int, pause: float, seed: int = 0) -> threading.Thread:
    """A producer thread: `text` cut at random places into `pieces` pieces, one every `pause` s, then close."""
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, len(text)), size=pieces - 1, replace=False).tolist())
    parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]

    def run():
        for part in parts:
            time.sleep(pause)
            stream.append(part)
        stream.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def close_to(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and want.size > 0
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


def test_streamed_text_equals_text_at_once(engine):
    alone = engine.submit(RealtimeRequest(TEXT, VOICE, seed=1, max_new_frames=40))
    want = alone.audio(timeout=60)
    assert alone.frames == 40 and alone.text_tokens > 5 and alone.first_audio_after_text_s is not None

    stream = engine.text_stream()
    handle = engine.submit(RealtimeRequest(stream, VOICE, seed=1, max_new_frames=40))
    producer = feed(stream, TEXT, pieces=12, pause=0.05)
    first_audio = None
    parts = []
    for chunk in handle.chunks(timeout=60):
        if first_audio is None:
            first_audio = time.monotonic()
            still_streaming = producer.is_alive()
        parts.append(chunk)
    producer.join()
    assert still_streaming  # audio came while the text was still arriving
    np.testing.assert_array_equal(np.concatenate(parts), want)
    assert handle.frames == 40 and handle.text_tokens == alone.text_tokens
    assert handle.stalled_s > 0  # the text came slower than the frames: the job waited for it
    assert 0 <= handle.first_audio_after_text_s < handle.first_audio_s
    assert engine.stats()["stalled_seconds_total"] >= handle.stalled_s


def test_concurrent_requests_equal_themselves_alone(engine):
    alone = [engine.submit(RealtimeRequest(t, VOICE, seed=i, max_new_frames=20 + 5 * i)).audio(timeout=60)
             for i, t in enumerate(TEXTS)]
    streams = [engine.text_stream() for _ in TEXTS[:2]]
    handles = [engine.submit(RealtimeRequest(s, VOICE, seed=i, max_new_frames=20 + 5 * i))
               for i, s in enumerate(streams)]
    handles.append(engine.submit(RealtimeRequest(TEXTS[2], VOICE, seed=2, max_new_frames=30)))
    producers = [feed(s, TEXTS[i], pieces=6, pause=0.03, seed=i) for i, s in enumerate(streams)]
    got = [h.audio(timeout=60) for h in handles]
    for producer in producers:
        producer.join()
    for i in range(3):
        close_to(got[i], alone[i])


def test_a_speech_request_names_a_preset(engine):
    want = engine.submit(RealtimeRequest("Hello there.", VOICE, seed=3, max_new_frames=12)).audio(timeout=60)
    got = engine.submit(SpeechRequest("Hello there.", voices=[VOICE], seed=3, max_new_frames=12, plain_text=True))
    np.testing.assert_array_equal(got.audio(timeout=60), want)
    assert [v["id"] for v in engine.voices.list()] == [VOICE]


def test_waiting_for_text_sleeps_and_can_be_cancelled_or_expire(engine):
    stream = engine.text_stream()
    handle = engine.submit(RealtimeRequest(stream, VOICE, seed=0))
    stream.append("Hi there")               # one released token, less than a text window: the job waits
    time.sleep(0.3)
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.3  # the engine thread sleeps while its only job waits for text
    assert handle.frames == 0 and not handle.done
    started = time.monotonic()
    handle.cancel()
    with pytest.raises(Cancelled):
        handle.audio(timeout=10)
    assert time.monotonic() - started < 0.4  # the cancel woke the engine thread

    expiring = engine.text_stream()
    handle = engine.submit(RealtimeRequest(expiring, VOICE, seed=0, timeout_s=0.5))
    with pytest.raises(TimeoutError, match="past its timeout"):
        handle.audio(timeout=10)
    assert time.monotonic() - handle.submitted < 1.2
    assert engine.stats()["active_requests"] == 0


@pytest.mark.parametrize("request_, message", [
    (RealtimeRequest("Hello.", "nobody"), "voice 'nobody': not a preset of this ENGINE_DIR"),
    (RealtimeRequest("Hello.", 3), "voice: expected a preset name"),
    (RealtimeRequest(b"Hello.", VOICE), "text: expected a str or a TextStream"),
    (RealtimeRequest("   ", VOICE), "text is empty"),
    (RealtimeRequest("word " * 9000, VOICE), "longer than the model's context of 8192 positions"),
    (RealtimeRequest("Hello.", VOICE, seed=-1), "seed -1"),
    (RealtimeRequest("Hello.", VOICE, cfg_scale=float("nan")), "cfg_scale"),
    (RealtimeRequest("Hello.", VOICE, max_new_frames=0), "max_new_frames"),
    (SpeechRequest("Hello.", voices=[VOICE, VOICE]), "one preset voice; 2 given"),
    (SpeechRequest("Speaker 1: Hi.\nSpeaker 2: Hello.", voices=[VOICE]), "no 'Speaker N:' lines"),
    ("Hello.", "expected a RealtimeRequest"),
])
def test_bad_requests_refused_before_queueing(engine, request_, message):
    before = engine.stats()["requests_total"]
    with pytest.raises(RuntimeInputError, match=message) as err:
        engine.submit(request_)
    assert "\n" not in str(err.value)
    stats = engine.stats()
    assert stats["queue_depth"] == 0 and stats["requests_total"] == before


def test_streamed_text_beyond_the_context_is_refused_as_it_comes(engine):
    stream = engine.text_stream()
    handle = engine.submit(RealtimeRequest(stream, VOICE, seed=0, max_new_frames=5))
    stream.append("Hello there, ")
    with pytest.raises(RuntimeInputError, match="longer than the model's context"):
        stream.append("word " * 9000)
    assert stream.text == "Hello there, "     # the refused piece left the stream as it was
    stream.close()
    assert handle.audio(timeout=60).shape[0] == 5 * engine.hop
