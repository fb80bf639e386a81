"""The step-wise scheduler: a set of generation jobs advanced one step at a time, with jobs joining and
leaving between steps (continuous batching). It decides only WHEN things run: which waiting job is admitted,
the order of the phases of a step, and when a job leaves. WHAT a step computes is the model's (`ModelSteps`:
`vv_runtime.vibevoice_steps` for VibeVoice-1.5B/7B), and the shared LM cache's rows are a `KVRows`
(`vv_runtime.kv_rows`) that the model steps own.

    step():
      retire    cancelled jobs leave; their rows are free at once
      decode    model.decode(running): ONE batched LM call over the running jobs' rows
      admit     waiting jobs join (up to max_batch) while they fit: model.prefill(job) runs each ALONE
      choose    model.choose(decoded + admitted): each job's next move and its bookkeeping (done flags)
      diffuse   model.diffuse(...): the per-frame graphs; each frame is emitted as soon as it exists
      retire    finished jobs leave; the cache shrinks to the bucket of the jobs still running

Equal to alone: the model steps compute every job from its own inputs, rows, positions, mask, streaming
states and noise; other jobs change only the shapes of the shared calls (rows, slots), so a job's tokens are
those it gets alone and its audio equals its audio alone up to float reordering of the batched kernels
(docs/SCHEDULER.md; tests: 1e-4 of the peak).

Capacity (backends bound to optimisation profiles, TensorRT): a decode call must fit ONE decode profile in
rows AND slots (`backend.limits()["lm_decode_profiles"]`, e.g. 32 rows x 4096 slots and 2 rows x the whole
context). A waiting job joins only when the rows after its admission and the bucket of the largest cache any
running job or it can reach fit some profile; otherwise it waits, in order. It fails (CapacityError) only
when it cannot run even alone. A failure while one job is admitted fails that job only.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .kv_cache import bucket_slots
from .errors import CapacityError, RuntimeInputError
from .kv_rows import MIN_ROWS, KVRows, PrefixCache

__all__ = ["Job", "ModelSteps", "PrefixCache", "Scheduler", "StepOutput", "job_limit", "seeded_noise"]


def seeded_noise(seed: int | None, size: int) -> Callable[[int], np.ndarray]:
    """A job's own noise: its numpy generator from `seed`, one draw of `size` per frame, in frame order."""
    rng = np.random.default_rng(seed)
    drawn = [0]

    def draw(frame: int) -> np.ndarray:
        if frame != drawn[0]:
            raise RuntimeError(f"noise drawn for frame {frame}, expected frame {drawn[0]}")
        drawn[0] += 1
        return rng.standard_normal(size, dtype=np.float32)
    return draw


def job_limit(prompt_len: int, max_positions: int, max_new_frames: int | None) -> int:
    """Most steps of a job: the original's min(max_length - len, 2 len), max_length = the model's context
    or len + max_new_frames."""
    max_length = max_positions if max_new_frames is None else min(prompt_len + int(max_new_frames), max_positions)
    return max(0, min(max_length - prompt_len, 2 * prompt_len))


@dataclass(eq=False, kw_only=True)
class Job:
    """What the scheduler knows of a job; a model's job class adds its inputs and state."""
    cfg_scale: float = 1.3
    max_new_frames: int | None = None
    noise: Callable[[int], np.ndarray] | None = None      # frame -> [latent]; None: seeded_noise(seed)
    seed: int | None = None
    tag: object = None                                   # the caller's
    index: int = -1                  # admission order
    limit: int = 0                   # most steps (set by the model at add)
    steps: int = 0
    frames: int = 0
    tokens: list = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    error: BaseException | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(index={self.index}, steps={self.steps}, frames={self.frames}, "
                f"done={self.done}, cancelled={self.cancelled}, error={self.error!r}, tag={self.tag!r})")


class ModelSteps(Protocol):
    """What a model family gives the scheduler (vv_runtime.vibevoice_steps.VibeVoiceSteps is one)."""
    kv: KVRows                       # the cache of the batched decode call (admission sizes it)
    decode_graph: str                # the graph of that call (its profiles bound the batch)
    max_positions: int               # the model's context
    latent_dim: int                  # noise size per frame
    prefill_tokens: int              # positions prefilled so far (figures)

    def set_capacity(self, slots: int) -> None: ...
    def job_limit(self, job: Job) -> int: ...
    def check_context(self, job: Job, capacity: int) -> None: ...
    def reach(self, job: Job) -> int: ...
    def compact(self, running: list[Job]) -> None: ...
    def prefill(self, job: Job, running: int) -> None: ...
    def decode(self, jobs: list[Job]) -> list[Job]: ...
    def choose(self, jobs: list[Job]) -> None: ...
    def diffuse(self, jobs: list[Job], emit) -> list[tuple[Job, np.ndarray]]: ...
    def release(self, job: Job) -> None: ...


@dataclass
class StepOutput:
    chunks: list                     # [(job, float32 [hop])] in job admission order
    finished: list                   # jobs that left at this step (done, cancelled or failed)
    admitted: list                   # jobs that joined at this step
    frames: int = 0                  # frames made at this step (their audio may come at a later step)

    @property
    def idle(self) -> bool:
        """No job made a frame or audio, left or joined: every running job waits for input."""
        return not (self.frames or self.chunks or self.finished or self.admitted)


class Scheduler:
    """The generation state of a set of jobs, advanced by `step()` (see the module docstring).

    `model`: the model steps, or a pipeline, whose `new_steps(**options)` makes fresh ones (options:
    the model's, e.g. VibeVoice's reuse_prefix / prefix_cache / batch_noise)."""

    def __init__(self, model, max_batch: int = 8, **options):
        self.model: ModelSteps = model.new_steps(**options) if hasattr(model, "new_steps") else model
        self.backend = self.model.kv.backend
        self.max_batch = int(max_batch)
        self.cap = int(self.model.max_positions)   # positions the loaded engines hold (<= the model's)
        # (rows, past) maxima of each decode profile (TensorRT); None: any decode shape runs
        self.decode_profiles: list[tuple[int, int]] | None = None
        limits = getattr(self.backend, "limits", None)
        limits = limits() if limits is not None else None
        if isinstance(limits, dict):
            self._bound_by(limits)
        self.model.set_capacity(self.cap)
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: list[Job] = []      # running, in admission order
        self.failed: list[Job] = []    # failed at admission, reported by the next retire_finished()
        self.steps = 0
        self._indices = itertools.count()

    def _bound_by(self, limits: dict) -> None:
        """Context and batch of a profile-bound backend: within its decode profiles."""
        rows_per_job = self.model.kv.rows_per_job
        profiles = limits.get("lm_decode_profiles")
        if isinstance(profiles, list):
            self.decode_profiles = [(int(p["rows"]), int(p["past"])) for p in profiles
                                    if isinstance(p, dict) and isinstance(p.get("rows"), int)
                                    and isinstance(p.get("past"), int)]
        if self.decode_profiles:
            self.cap = min(self.cap, max(past for _, past in self.decode_profiles))
            most_rows = max(rows for rows, _ in self.decode_profiles)
            self.max_batch = max(1, min(self.max_batch, most_rows // rows_per_job))
            return
        if isinstance(limits.get("lm_decode_past"), int):
            self.cap = min(self.cap, int(limits["lm_decode_past"]))
        if isinstance(limits.get("lm_decode_rows"), int):
            self.max_batch = max(1, min(self.max_batch, int(limits["lm_decode_rows"]) // rows_per_job))

    # --- the caller's interface -----------------------------------------------------------------

    def add(self, job: Job) -> Job:
        """Queue a job; it joins at the next step with room (at most max_batch jobs run together)."""
        job.index = next(self._indices)
        job.limit = self.model.job_limit(job)
        if job.noise is None:
            job.noise = seeded_noise(job.seed, self.model.latent_dim)
        self.waiting.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """The job leaves at the next step (its rows are freed then)."""
        job.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.jobs or self.waiting)

    @property
    def rows_in_use(self) -> int:
        return self.model.kv.rows_per_job * len(self.jobs)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, slots) of the decode cache now (0, 0 before the first admission)."""
        return self.model.kv.shape

    @property
    def prefill_tokens(self) -> int:
        return self.model.prefill_tokens

    def step(self, emit: Callable[[Job, np.ndarray], None] | None = None) -> StepOutput:
        """One step of every running job (and the admission of waiting ones).

        emit(job, chunk), when given, receives each frame as soon as the model made it (earlier first audio
        for a streaming caller); the frames are in the returned StepOutput too."""
        left = self.retire_cancelled()
        stepped = self.model.decode([job for job in self.jobs if not job.done])
        admitted = self.admit()
        stepped += admitted
        self.model.choose(stepped)
        before = sum(job.frames for job in stepped)
        chunks = self.model.diffuse(stepped, emit)
        frames = sum(job.frames for job in stepped) - before
        chunks.sort(key=lambda item: item[0].index)
        left += self.retire_finished()
        self.steps += 1
        return StepOutput(chunks, left, admitted, frames)

    # --- phases ---------------------------------------------------------------------------------

    def retire_cancelled(self) -> list[Job]:
        left = []
        for job in list(self.waiting):
            if job.cancelled:
                self.waiting.remove(job)
                job.done = True
                left.append(job)
        running = [job for job in self.jobs if job.cancelled]
        for job in running:
            self._free(job)
            left.append(job)
        if running:
            self._compact()
        return left

    def retire_finished(self) -> list[Job]:
        left = [job for job in self.jobs if job.done]
        for job in left:
            self._free(job)
        left, self.failed = self.failed + left, []
        if left:
            self._compact()
        return left

    def admit(self) -> list[Job]:
        """Prefill waiting jobs alone, up to max_batch running, while they fit."""
        admitted = []
        while self.waiting and len(self.jobs) < self.max_batch:
            job = self.waiting[0]
            try:
                if not self._room_for(job):
                    break  # fits alone, not beside the running jobs: it waits (in order) for them to leave
                self.waiting.popleft()
                self.model.prefill(job, running=len(self.jobs))
            except Exception as exc:  # noqa: BLE001 -- one job's failure fails that job only
                if self.waiting and self.waiting[0] is job:
                    self.waiting.popleft()
                self._drop(job, exc)
                continue
            self.jobs.append(job)
            admitted.append(job)
        return admitted

    def _drop(self, job: Job, exc: BaseException) -> None:
        """A job that failed at admission leaves (its rows, if it took any, are freed)."""
        self.model.release(job)
        job.error = exc
        job.done = True
        self.failed.append(job)

    def _free(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        self.model.release(job)
        job.done = True

    def _compact(self) -> None:
        self.model.compact(self.jobs)

    # --- capacity (the decode profiles of a profile-bound backend) -------------------------------

    def rows_for(self, jobs: int) -> int:
        """The cache rows bucket of `jobs` jobs."""
        return self.model.kv.rows_for(jobs)

    def decode_fits(self, rows: int, slots: int) -> bool:
        """Whether a decode call of `rows` rows over `slots` cache slots fits one decode profile (always
        true on a backend without profiles)."""
        if self.decode_profiles is not None and not any(rows <= r and slots <= p for r, p in self.decode_profiles):
            return False
        fits = getattr(self.backend, "check_fits", None)
        if fits is None:
            return True
        try:
            fits(self.model.decode_graph, {"batch": int(rows), "seq": 1, "past": int(slots)})
        except RuntimeInputError:
            return False
        return True

    def _room_for(self, job: Job) -> bool:
        """True: the job can join now (rows after its admission and the largest cache any running job, or
        it, can reach fit one decode profile). False: it fits alone but not now (it waits).
        CapacityError: it cannot run even alone. RuntimeInputError: a prompt beyond the model's context."""
        self.model.check_context(job, self.cap)
        own = bucket_slots(self.model.reach(job), self.cap)
        if not self.decode_fits(MIN_ROWS, own):
            raise CapacityError(f"a request of up to {job.limit} steps needs an LM cache of {own} slots, beyond "
                                f"every decode profile of the loaded engines ({self._profiles_text()}); rebuild "
                                f"the engines with a larger plan or ask for fewer frames (max_new_frames)")
        if not self.jobs:
            return True
        kv = self.model.kv
        rows = kv.shape[0] if kv.free_rows() >= kv.rows_per_job else self.rows_for(len(self.jobs) + 1)
        need = max([self.model.reach(j) for j in self.jobs] + [self.model.reach(job), kv.shape[1]])
        return self.decode_fits(rows, bucket_slots(need, self.cap))

    def _profiles_text(self) -> str:
        if not self.decode_profiles:
            return "no decode profile"
        return ", ".join(f"{r} rows x {p} slots" for r, p in self.decode_profiles)
