"""Prometheus text exposition (format 0.0.4) of vv-serve's figures, written without a client library.

The engine's own counters (frames, audio seconds, requests, errors by kind) and gauges (queue depth,
active requests and rows) are read from `SpeechEngine.stats()` at scrape time; the service adds what
only it sees: HTTP responses by route and status, refusals and errors by type, client disconnects,
and a cumulative histogram of the time to first audio (from admission to the first audio bytes
being sent), observed once per request that produced audio.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time

TTFA_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class ServiceMetrics:
    """Counters and the time-to-first-audio histogram of the HTTP layer (thread-safe)."""

    def __init__(self, buckets=TTFA_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._ttfa_counts = [0] * (len(self.buckets) + 1)   # last one: +Inf only
        self._ttfa_sum = 0.0
        self._responses: collections.Counter = collections.Counter()   # (route, status) -> n
        self._errors: collections.Counter = collections.Counter()      # error type -> n
        self._disconnects = 0
        self._speech_ok = 0
        self._last_rate: tuple[float, int] | None = None                # (time, frames) at the last scrape
        self.started = time.time()

    def observe_ttfa(self, seconds: float) -> None:
        with self._lock:
            self._ttfa_counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._ttfa_sum += float(seconds)

    def response(self, route: str, status: int) -> None:
        with self._lock:
            self._responses[(route, int(status))] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def disconnect(self) -> None:
        with self._lock:
            self._disconnects += 1

    def speech_done(self) -> None:
        with self._lock:
            self._speech_ok += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"errors": dict(self._errors), "disconnects": self._disconnects,
                    "speech_completed": self._speech_ok, "ttfa_count": sum(self._ttfa_counts)}

    def render(self, engine: dict, extra: dict | None = None) -> str:
        """The whole exposition: engine figures (`SpeechEngine.stats()`) plus the service's own."""
        lines: list[str] = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")

        now = time.time()
        frames = int(engine.get("frames_total", 0))
        with self._lock:
            previous = self._last_rate
            self._last_rate = (now, frames)
            responses = sorted(self._responses.items())
            errors = sorted(self._errors.items())
            disconnects = self._disconnects
            completed = self._speech_ok
            counts = list(self._ttfa_counts)
            ttfa_sum = self._ttfa_sum
        if previous is None:
            since, before = self.started, 0
        else:
            since, before = previous
        rate = (frames - before) / (now - since) if now > since else 0.0

        metric("vv_queue_depth", "gauge", "Requests admitted and waiting for rows.",
               [({}, int(engine.get("queue_depth", 0)))])
        metric("vv_active_requests", "gauge", "Requests being generated.",
               [({}, int(engine.get("active_requests", 0)))])
        metric("vv_active_rows", "gauge", "LM rows in use (two per request: the CFG pair).",
               [({}, int(engine.get("active_rows", 0)))])
        metric("vv_frames_total", "counter", "Audio frames generated.", [({}, frames)])
        metric("vv_frames_per_second", "gauge", "Audio frames generated per second since the previous scrape.",
               [({}, round(rate, 4))])
        metric("vv_audio_seconds_total", "counter", "Seconds of audio generated.",
               [({}, float(engine.get("audio_seconds_total", 0.0)))])
        metric("vv_engine_requests_total", "counter", "Requests the engine finished (successfully or not).",
               [({}, int(engine.get("requests_total", 0)))])
        metric("vv_engine_errors_total", "counter", "Requests the engine ended with an error, by kind.",
               [({"kind": kind}, int(n)) for kind, n in sorted((engine.get("errors") or {}).items())])
        metric("vv_speech_completed_total", "counter", "Speech responses sent completely.", [({}, completed)])
        metric("vv_client_disconnects_total", "counter", "Speech requests abandoned by their client (cancelled).",
               [({}, disconnects)])
        metric("vv_http_errors_total", "counter", "Error responses by type.",
               [({"type": kind}, n) for kind, n in errors])
        metric("vv_http_responses_total", "counter", "HTTP responses by route and status code.",
               [({"route": route, "code": str(code)}, n) for (route, code), n in responses])
        cumulative, samples = 0, []
        for bound, count in zip(self.buckets, counts):
            cumulative += count
            samples.append(({"le": _num(float(bound))}, cumulative))
        cumulative += counts[-1]
        samples.append(({"le": "+Inf"}, cumulative))
        lines.append("# HELP vv_time_to_first_audio_seconds Time from admission to the first audio sent.")
        lines.append("# TYPE vv_time_to_first_audio_seconds histogram")
        for labels, value in samples:
            lines.append(f'vv_time_to_first_audio_seconds_bucket{{le="{labels["le"]}"}} {value}')
        lines.append(f"vv_time_to_first_audio_seconds_sum {_num(ttfa_sum)}")
        lines.append(f"vv_time_to_first_audio_seconds_count {cumulative}")
        for name, (kind, help_text, value) in (extra or {}).items():
            metric(name, kind, help_text, [({}, value)])
        return "\n".join(lines) + "\n"
