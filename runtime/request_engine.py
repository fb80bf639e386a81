"""What the speech engines of every model family share: requests in, audio chunks out, one background thread.

    engine = SomeEngine(...).start()          # SpeechEngine (VibeVoice-1.5B/7B), RealtimeEngine (Realtime-0.5B)
    handle = engine.submit(request)           # checked in the caller's thread, then queued
    for chunk in handle.chunks():             # float32 [hop] chunks as they are made
        ...
    engine.close()                            # drain, stop, close the pipeline

`submit` is where a request enters: the family's `check` normalises and validates it in the caller's thread
and raises `RuntimeInputError` (one line) before anything is queued; `QueueFull` when the queue holds
`max_queue` requests; `EngineStopped` when the engine does not accept requests (not started, draining,
stopped).

The engine thread drives ONE step-wise scheduler (`vv_runtime.scheduler`) over the family's model steps:
up to `max_batch` requests run together; a request joins the running batch at the next step and leaves when
it finishes, is cancelled or passes its deadline, freeing its cache rows at once. Graph calls are serialised
by one lock (`graph_lock`), so a backend never runs two graphs at once.

A family whose jobs can wait for input (the streaming model's text arriving while audio is made) says so
through `_waits_for_input`; when every running job waits, the thread sleeps until `_nudge` (new input, a new
request, a cancel, stop) or the nearest deadline, rather than spinning.

A family engine gives: `check(request)` (-> what its jobs are made from), `_job(handle)` (the scheduler job,
in the engine thread under the graph lock), `_unstarted_job(handle)` (a job that never runs: a request
cancelled or expired in the queue), `_new_scheduler()`, and optionally `_record` (figures of a finished
job on its handle), `_waits_for_input` and `_extra_stats`.
"""

from __future__ import annotations

import collections
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .errors import BackendFault, RuntimeInputError, one_line

__all__ = ["Cancelled", "EngineStopped", "Options", "QueueFull", "RequestEngine", "RequestHandle", "check_options",
           "error_kind", "request_error"]


class QueueFull(Exception):
    """Admission refused: the queue is full (a service answers 429)."""


class EngineStopped(Exception):
    """The engine does not accept requests: not started, draining or stopped (a service answers 503)."""


class Cancelled(Exception):
    """The request was cancelled (by its client, or because the engine stopped without draining)."""


# --- request options every family takes ----------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    cfg_scale: float
    seed: int | None
    max_new_frames: int | None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(request, default_cfg_scale: float) -> Options:
    """The generation options of a request (its `cfg_scale`, `seed`, `max_new_frames`, `timeout_s`), checked
    (RuntimeInputError, one line); cfg_scale None is the model's default."""
    cfg = default_cfg_scale if request.cfg_scale is None else request.cfg_scale
    try:
        cfg = float(cfg)
    except (TypeError, ValueError):
        raise RuntimeInputError(f"cfg_scale {request.cfg_scale!r}: not a number") from None
    if not math.isfinite(cfg):
        raise RuntimeInputError(f"cfg_scale {request.cfg_scale!r}: not a finite number")
    frames = request.max_new_frames
    if frames is not None and (not _is_int(frames) or frames < 1):
        raise RuntimeInputError(f"max_new_frames {frames!r}: must be an integer of at least 1")
    seed = request.seed
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RuntimeInputError(f"seed {seed!r}: must be a non-negative integer")
    timeout = request.timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise RuntimeInputError(f"timeout_s {timeout!r}: must be a positive number of seconds")
    return Options(cfg, None if seed is None else int(seed), None if frames is None else int(frames))


# --- handles ------------------------------------------------------------------------------------------

_END = object()


class RequestHandle:
    """One submitted request: its chunks as they are made, its tokens and figures, cancel()."""

    def __init__(self, request_id: str, request, prepared, wake: Callable[[], None] | None = None):
        self.id = request_id
        self.request = request
        self.prepared = prepared
        self.done = False
        self.tokens: list[int] = []
        self.frames = 0
        self.first_audio_s: float | None = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.deadline = None if request.timeout_s is None else self.submitted + float(request.timeout_s)
        self._wake = wake
        self._chunks: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._finished = threading.Event()

    # engine side
    def _emit(self, chunk: np.ndarray) -> None:
        if self.first_audio_s is None:
            self.first_audio_s = time.monotonic() - self.submitted
        self.frames += 1
        self._chunks.put(chunk)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.error = error
        self.done = True
        self._chunks.put(_END)
        self._finished.set()

    # client side
    def chunks(self, timeout: float | None = None) -> Iterator[np.ndarray]:
        """float32 [hop] chunks as they are made; ends when the request is done, raising its error if it
        failed. `timeout`: most seconds to wait for the next chunk (TimeoutError past that)."""
        while True:
            try:
                item = self._chunks.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no audio within {timeout:g} s") from None
            if item is _END:
                self._chunks.put(_END)  # a second iteration ends too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def audio(self, timeout: float | None = None) -> np.ndarray:
        """Wait for the whole request; its audio (raises its error)."""
        parts = list(self.chunks(timeout=timeout))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Stop the request; its rows are freed at the engine's next step."""
        self._cancel.set()
        if self._wake is not None:
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


# --- the engine ---------------------------------------------------------------------------------------

class RequestEngine:
    """The queue, the engine thread and the figures of a speech engine (see the module docstring)."""

    family = ""                       # the model family served (vv_engine_dir.FAMILIES)
    handle_class = RequestHandle
    thread_name = "vv-speech-engine"
    idle_wait_s = 0.5                 # longest sleep of an idle engine thread (deadlines are checked after it)
    job_stage = "preparing the job"   # what failed when `_job` raises (the request fails with it)

    def __init__(self, pipeline, max_batch: int = 8, max_queue: int = 64, graph_lock=None):
        if int(max_batch) < 1:
            raise RuntimeInputError(f"max_batch {max_batch}: must be at least 1")
        if int(max_queue) < 0:
            raise RuntimeInputError(f"max_queue {max_queue}: must be at least 0")
        self.pipeline = pipeline
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.graph_lock = graph_lock if graph_lock is not None else threading.RLock()
        self.sample_rate = pipeline.sample_rate
        self.hop = pipeline.hop
        self.accepting = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._nudged = False          # input arrived (or a request, a cancel) since the thread last looked
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._active: list[RequestHandle] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._ids = itertools.count(1)
        self._stats = {"frames_total": 0, "requests_total": 0, "audio_seconds_total": 0.0}
        self._errors: collections.Counter = collections.Counter()
        self._ttfa: collections.deque = collections.deque(maxlen=256)
        self._active_rows = 0
        self.fatal: BaseException | None = None

    # --- what a family gives --------------------------------------------------------------------------

    def check(self, request):
        """Normalise and validate a request (RuntimeInputError, one line): what its job is made from."""
        raise NotImplementedError

    def _job(self, handle: RequestHandle):
        """The scheduler job of an admitted request (engine thread, under the graph lock)."""
        raise NotImplementedError

    def _unstarted_job(self, handle: RequestHandle):
        """A job of the request that will never run (it leaves the scheduler at once); no graph call."""
        raise NotImplementedError

    def _new_scheduler(self):
        raise NotImplementedError

    def _record(self, handle: RequestHandle, job) -> None:
        """The figures of a job that left, onto its handle."""
        handle.tokens = list(job.tokens)

    def _waits_for_input(self, sched, out) -> bool:
        """After a step (`out`) of a busy scheduler: whether every running job waits for input that has not
        arrived (the thread then sleeps until `_nudge`)."""
        return False

    def _extra_stats(self) -> dict:
        return {}

    # --- control --------------------------------------------------------------------------------------

    def start(self):
        with self._lock:
            if self._thread is not None:
                return self
            self._stopping = False
            self.accepting = True
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admission; with drain, let queued and in-flight requests finish, else cancel them."""
        with self._lock:
            self.accepting = False
            self._stopping = True
            self._drain = self._drain and drain
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return
        with self._lock:
            pending = list(self._queue) + list(self._active)
            self._queue.clear()
            self._active.clear()
        for handle in pending:
            handle._finish(EngineStopped("the engine stopped"))

    def close(self, timeout: float | None = 60) -> None:
        """Stop with drain (queued and in-flight requests finish), then close the pipeline."""
        self.stop(drain=True, timeout=timeout)
        self.pipeline.close()

    def _nudge(self) -> None:
        """Wake the engine thread: input arrived for a job, a request was queued or cancelled."""
        with self._lock:
            self._nudged = True
            self._wake.notify_all()

    # --- admission ------------------------------------------------------------------------------------

    def submit(self, request) -> RequestHandle:
        if not self.accepting:
            raise EngineStopped("the engine is not accepting requests")
        prepared = self.check(request)
        with self._lock:
            if not self.accepting:
                raise EngineStopped("the engine is not accepting requests")
            # requests about to start (free places in the batch) do not count against max_queue
            if len(self._queue) >= self.max_queue + max(0, self.max_batch - len(self._active)):
                raise QueueFull(f"the queue holds {self.max_queue} requests")
            handle = self.handle_class(f"req-{next(self._ids)}", request, prepared, wake=self._nudge)
            self._queue.append(handle)
            self._nudged = True
            self._wake.notify_all()
        return handle

    # --- figures --------------------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            stats = {
                "queue_depth": len(self._queue),
                "active_requests": len(self._active),
                "active_rows": self._active_rows,
                "frames_total": self._stats["frames_total"],
                "audio_seconds_total": self._stats["audio_seconds_total"],
                "requests_total": self._stats["requests_total"],
                "errors": dict(self._errors),
                "ttfa_seconds": list(self._ttfa),
            }
        stats.update(self._extra_stats())
        return stats

    def _count_frame(self, handle: RequestHandle) -> None:
        with self._lock:
            self._stats["frames_total"] += 1
            self._stats["audio_seconds_total"] += self.hop / self.sample_rate
            if handle.frames == 1 and handle.first_audio_s is not None:
                self._ttfa.append(handle.first_audio_s)

    def _retire(self, handle: RequestHandle, error: BaseException | None) -> None:
        with self._lock:
            if handle in self._active:
                self._active.remove(handle)
            self._stats["requests_total"] += 1
            if error is not None:
                self._errors[error_kind(error)] += 1
        handle._finish(error)

    # --- the engine thread: the step-wise scheduler ----------------------------------------------------

    def _run(self) -> None:
        sched = self._new_scheduler()
        # why a running job was cancelled (its request cancelled or past its deadline) is kept on the job
        # itself (job.error), so no table can outlive its job
        try:
            while True:
                with self._lock:
                    while not self._queue and not sched.busy and not self._stopping:
                        self._wake.wait(self.idle_wait_s)
                    if self._stopping and not self._drain:
                        break
                    if self._stopping and not self._queue and not sched.busy:
                        break
                    self._nudged = False
                    now = time.monotonic()
                    # queued requests cancelled or past their deadline leave the queue at once
                    expired = [h for h in self._queue
                               if h.cancelled or (h.deadline is not None and now > h.deadline)]
                    for handle in expired:
                        self._queue.remove(handle)
                    moved = []
                    while self._queue and len(sched.jobs) + len(sched.waiting) < self.max_batch:
                        moved.append(self._queue.popleft())
                    self._active.extend(moved + expired)
                for handle in expired:
                    self._retire(handle, self._placeholder(handle).error)
                for handle in moved:
                    if handle.cancelled or (handle.deadline is not None and now > handle.deadline):
                        sched.add(self._placeholder(handle))  # leaves at once, through the same path
                    else:
                        try:
                            with self.graph_lock:
                                sched.add(self._job(handle))
                        except Exception as exc:  # noqa: BLE001 -- one bad request fails alone
                            self._retire(handle, request_error(exc, self.job_stage))
                for job in list(sched.jobs) + list(sched.waiting):
                    handle = job.tag
                    if job.cancelled:
                        continue
                    if handle.cancelled:
                        job.error = job.error or Cancelled(f"request {handle.id} cancelled")
                        sched.cancel(job)
                    elif handle.deadline is not None and now > handle.deadline:
                        job.error = job.error or TimeoutError(f"request {handle.id}: past its timeout of "
                                                              f"{handle.request.timeout_s:g} s")
                        sched.cancel(job)
                try:
                    with self.graph_lock:
                        out = sched.step(emit=self._deliver)
                except Exception as exc:  # noqa: BLE001 -- a failed shared call fails the requests in it
                    # every active request belonged to the broken scheduler (running, waiting, or left in
                    # this very step: cancelled, timed out, failed at admission): finish them all
                    known = {id(j.tag): j for j in list(sched.jobs) + list(sched.waiting) + list(sched.failed)}
                    sched = self._new_scheduler()
                    self._active_rows = 0
                    with self._lock:
                        failed = list(self._active)
                    error = request_error(exc, "a batch step")
                    for handle in failed:
                        job = known.get(id(handle))
                        own = job.error if job is not None and job.error is not None else None
                        if own is None and handle.cancelled:
                            own = Cancelled(f"request {handle.id} cancelled")
                        self._retire(handle, request_error(own, "admission") if own is not None else error)
                    continue
                self._active_rows = sched.rows_in_use
                for job in out.finished:
                    handle = job.tag
                    self._record(handle, job)
                    error = None if job.error is None else request_error(job.error, "admission")
                    if error is None and job.cancelled:
                        error = Cancelled(f"request {handle.id} cancelled")
                    self._retire(handle, error)
                if sched.busy and self._waits_for_input(sched, out):
                    self._await_input()
        except BaseException as exc:  # noqa: BLE001 -- the engine itself broke: fail every request, once
            self.fatal = exc
            raise
        finally:
            with self._lock:
                self.accepting = False
                pending = list(self._queue) + [h for h in self._active]
                self._queue.clear()
            self._active_rows = 0
            for handle in pending:
                error = self.fatal if self.fatal is not None else Cancelled("the engine stopped without draining")
                self._retire(handle, error)

    def _await_input(self) -> None:
        """Sleep until `_nudge` (or stop), at most until the nearest deadline of a request in flight."""
        with self._lock:
            deadlines = [h.deadline for h in self._active + list(self._queue) if h.deadline is not None]
            wait = self.idle_wait_s
            if deadlines:
                wait = min(wait, max(0.0, min(deadlines) - time.monotonic()) + 0.001)
            if not self._nudged and not self._stopping:
                self._wake.wait(wait)

    def _deliver(self, job, chunk: np.ndarray) -> None:
        """A frame, to its client as soon as the decoder made it (see Scheduler.step)."""
        job.tag._emit(chunk)
        self._count_frame(job.tag)

    def _placeholder(self, handle: RequestHandle):
        """A job that is cancelled before it starts (its request was cancelled or timed out in the queue)."""
        job = self._unstarted_job(handle)
        job.cancelled = True
        if handle.cancelled:
            job.error = Cancelled(f"request {handle.id} cancelled")
        else:
            job.error = TimeoutError(f"request {handle.id}: past its timeout of {handle.request.timeout_s:g} s "
                                     f"(still queued)")
        return job


def request_error(exc: BaseException, where: str) -> BaseException:
    """The error a request fails with: input errors (CapacityError included) as they are, anything else
    as a one-line BackendFault (not the request's fault; the engine goes on)."""
    if isinstance(exc, (RuntimeInputError, BackendFault, Cancelled, TimeoutError, EngineStopped)):
        return exc
    fault = BackendFault(f"{where} failed: {type(exc).__name__}: {one_line(exc)}")
    fault.__cause__ = exc
    return fault


def error_kind(error: BaseException) -> str:
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, RuntimeInputError):
        return "input"
    if isinstance(error, EngineStopped):
        return "stopped"
    return "internal"
