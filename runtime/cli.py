"""`vv-run`: speak a script (or a batch of scripts) with the graphs of an ENGINE_DIR.

Both model families: VibeVoice-1.5B/7B (`Speaker N:` scripts, voices from audio files) and VibeVoice-Realtime-0.5B
(plain text, one voice preset of the ENGINE_DIR by name), chosen by the manifest's `model_family`; the defaults
(diffusion steps, CFG scale) are the manifest's. It drives the same step-wise scheduler as the speech service
(`vv_runtime.scheduler`): the scripts of a batch run together, each equal to itself run alone.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from pathlib import Path

import click

from .errors import RuntimeInputError, one_line
from .manifest import STREAMING_FAMILY



class _OneLineErrors(click.Command):
    """Usage errors as one `error: ...` line too (click prints usage + hint over several lines)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code if exc.exit_code else 1)
        except click.Abort:
            click.echo("interrupted: no output written", err=True)
            sys.exit(130)


def batch_outputs(out: Path, count: int) -> list[Path]:
    """--out a/b.wav with N scripts -> a/b_0.wav ... a/b_{N-1}.wav."""
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def read_batch_file(path: Path) -> list[str]:
    """One script per line (a .txt path, relative to the batch file's folder); blank lines and # comments
    are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"--batch-file {path}: unreadable ({exc.__class__.__name__})") from exc
    scripts = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        script = Path(line) if Path(line).is_absolute() else path.parent / line
        if not script.is_file():
            raise RuntimeInputError(f"--batch-file {path}: line {number}: script {line} not found")
        if script.suffix != ".txt":
            raise RuntimeInputError(f"--batch-file {path}: line {number}: {line} is not a .txt script")
        scripts.append(str(script))
    if not scripts:
        raise RuntimeInputError(f"--batch-file {path}: lists no scripts")
    return scripts


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine-dir", required=True, type=click.Path(), metavar="ENGINE_DIR",
              help="Directory written by `vv-export onnx`.")
@click.option("--script", default=None, metavar="FILE.txt|TEXT",
              help="A .txt script file, or the script itself ('Speaker 1: Hello.' lines).")
@click.option("--voice", "voices", multiple=True, type=click.Path(), metavar="AUDIO|PRESET",
              help="VibeVoice: voice prompt audio, one per speaker in order (Speaker 1 = first --voice), "
                   "repeatable. VibeVoice-Realtime: the name of one voice preset of ENGINE_DIR.")
@click.option("--out", required=True, type=click.Path(), metavar="OUT.wav", help="Output wav file (24 kHz mono).")
@click.option("--cfg-scale", type=float, default=None,
              help="Classifier-free guidance scale [default: the manifest's: 1.3 VibeVoice, 1.5 Realtime].")
@click.option("--seed", type=int, default=None,
              help="Seed of the diffusion noise [default: random, reported]; script i of a --batch-file uses "
                   "SEED + i, so each output equals its script run alone with that seed.")
@click.option("--max-new-frames", type=click.IntRange(min=1), default=None,
              help="Cap on generation steps (each makes at most one 3200-sample frame per script).")
@click.option("--stream", is_flag=True,
              help="Write audio frames to OUT as they are produced (a growing file a player can follow; "
                   "removed if the run fails).")
@click.option("--batch-file", type=click.Path(), default=None, metavar="FILE",
              help="Generate several scripts together: one .txt script path per line; writes OUT_0.wav, "
                   "OUT_1.wav, ... (the --voice files serve every script).")
@click.option("--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True,
              help="auto: TensorRT engines when ENGINE_DIR has usable ones, else ONNX Runtime.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--decode-frames", type=click.IntRange(min=1), default=None,
              help="VibeVoice-Realtime: most frames of a script the acoustic decoder takes per call (its weights "
                   "read once for all of them; each frame is still written as it is decoded) [default: the "
                   "ENGINE_DIR's, a speech window: 6]. 1 decodes every frame at once: the steadiest stream where "
                   "generation is barely faster than real time.")
@click.option("--pcm16", is_flag=True, help="Write 16-bit PCM instead of 32-bit float.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's figures as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(engine_dir, script, voices, out, cfg_scale, seed, max_new_frames, stream, batch_file, backend, threads,
         decode_frames, pcm16, as_json, debug):
    """Generate speech for SCRIPT with the voices given, into OUT."""
    try:
        summary = _run(engine_dir, script, voices, out, cfg_scale, seed, max_new_frames, stream, batch_file,
                       backend, threads, pcm16, decode_frames)
    except KeyboardInterrupt:
        click.echo("interrupted: no output written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- every failure is one line unless --debug
        if debug:
            raise
        if isinstance(exc, (RuntimeInputError, OSError)):
            click.echo(f"error: {one_line(exc)}", err=True)
        else:
            click.echo(f"error: {type(exc).__name__}: {one_line(exc)} (run with --debug for details)", err=True)
        sys.exit(1)
    _report(summary, as_json)


def _run(engine_dir, script, voices, out, cfg_scale, seed, max_new_frames, stream, batch_file, backend, threads,
         pcm16, decode_frames=None) -> dict:
    from .manifest import load_manifest

    if (script is None) == (batch_file is None):
        raise RuntimeInputError("give exactly one of --script and --batch-file")
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise RuntimeInputError(f"--out {out}: must be a .wav file")
    if batch_file is not None:
        scripts = read_batch_file(Path(batch_file))
        outputs = batch_outputs(out, len(scripts))
    else:
        scripts, outputs = [script], [out]
    if seed is None:
        seed = secrets.randbelow(2 ** 31)

    started = time.perf_counter()
    # inputs first (cheap, no graph loaded), then the output files, then the graphs
    manifest = load_manifest(engine_dir)
    if manifest.get("model_family") == STREAMING_FAMILY:
        summary = _run_realtime(engine_dir, manifest, scripts, outputs, list(voices), cfg_scale, seed, max_new_frames,
                                stream, backend, threads, pcm16, started, decode_frames)
    elif decode_frames is not None:
        from .realtime_steps import decode_frames_not_grouped

        raise decode_frames_not_grouped(engine_dir)
    else:
        summary = _run_vibevoice(engine_dir, manifest, scripts, outputs, list(voices), cfg_scale, seed,
                                 max_new_frames, stream, backend, threads, pcm16, started)
    summary["stream"] = bool(stream)
    return summary


@contextlib.contextmanager
def _outputs(paths: list[Path], sample_rate: int, pcm16: bool, live: bool):
    """One WavWriter per path: all committed when the block ends normally, all removed when it fails."""
    from .audio import WavWriter

    writers = []
    try:
        for path in paths:
            writers.append(WavWriter(path, sample_rate, "PCM_16" if pcm16 else "FLOAT", live=live))
        yield writers
        for writer in writers:
            writer.commit()
        writers = []
    finally:
        for writer in writers:
            writer.abort()


class _Progress:
    """A progress bar on stderr, opened at the first step (`total` None: steps counted, no end known)."""

    def __init__(self):
        self.bar = None

    def step(self, total: int | None = None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="generating", unit="step", file=sys.stderr, leave=False, disable=None,
                            dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _figures(outputs, audio, frames, steps, sample_rate, wall, load, first_chunk, backend, seed, cfg_scale) -> dict:
    files = [{"path": str(path), "frames": n, "audio_seconds": round(len(a) / sample_rate, 4), "steps": s}
             for path, a, n, s in zip(outputs, audio, frames, steps)]
    audio_seconds = sum(len(a) for a in audio) / sample_rate
    return {
        "outputs": files,
        "frames": sum(frames),
        "audio_seconds": round(audio_seconds, 4),
        "wall_seconds": round(wall, 4),
        "load_seconds": round(load, 4),
        "real_time_factor": round(wall / audio_seconds, 4) if audio_seconds > 0 else None,
        "first_chunk_seconds": None if first_chunk is None else round(first_chunk, 4),
        "backend": backend.describe(),
        "seed": seed,
        "cfg_scale": cfg_scale,
    }


def _run_vibevoice(engine_dir, manifest, scripts, outputs, voices, cfg_scale, seed, max_new_frames, stream, backend,
                   threads, pcm16, started) -> dict:
    """VibeVoice-1.5B/7B: `Speaker N:` scripts, one voice audio file per speaker."""
    from .backend import select_backend
    from .pipeline import Pipeline, prepare_rows
    from .prompt import PromptBuilder

    for voice in voices:
        if not Path(voice).is_file():
            raise RuntimeInputError(f"--voice {voice}: file not found")
    prompts = PromptBuilder.from_manifest(engine_dir, manifest)
    rows = prepare_rows(prompts, scripts, voices, int(manifest["model"]["max_position_embeddings"]))
    sample_rate = int(manifest["model"].get("sample_rate", 24000))

    progress = _Progress()
    pipeline = None
    try:
        with _outputs(outputs, sample_rate, pcm16, stream) as writers:
            pipeline = Pipeline(engine_dir, manifest, select_backend(engine_dir, manifest, backend, threads=threads),
                                prompts=prompts)
            loaded = time.perf_counter()
            gen_start = time.perf_counter()
            first_chunk = None
            gen = pipeline.generate(rows, cfg_scale=cfg_scale, max_new_frames=max_new_frames, seed=seed,
                                    stream=True, on_step=lambda step, total: progress.step(total))
            while True:
                try:
                    row, chunk = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                if first_chunk is None:
                    first_chunk = time.perf_counter() - gen_start
                if stream:
                    writers[row].write(chunk)
            if not stream:
                for writer, audio in zip(writers, result.audio):
                    writer.write(audio)
            wall = time.perf_counter() - gen_start
    finally:
        progress.close()
        if pipeline is not None:
            pipeline.close()

    summary = _figures(outputs, result.audio, result.frames, [len(t) for t in result.tokens], pipeline.sample_rate,
                       wall, loaded - started, first_chunk, pipeline.backend, seed,
                       pipeline.default_cfg_scale if cfg_scale is None else cfg_scale)
    summary["steps"] = result.steps
    return summary


def _run_realtime(engine_dir, manifest, scripts, outputs, voices, cfg_scale, seed, max_new_frames, stream, backend,
                  threads, pcm16, started, decode_frames=None) -> dict:
    """VibeVoice-Realtime-0.5B: plain text (a `.txt` file's or the argument itself), one voice preset by name.
    Script i of a batch uses seed + i; the scripts run together, each equal to itself alone."""
    import numpy as np

    from .backend import select_backend
    from .realtime_pipeline import RealtimePipeline
    from .realtime_steps import check_text_context
    from .scheduler import Scheduler
    from .script import load_text

    if len(voices) != 1:
        presets = ", ".join(sorted(manifest.get("voices") or {})) or "none: add some with `vv-export voices`"
        raise RuntimeInputError(f"{engine_dir} holds a VibeVoice-Realtime model: give one --voice PRESET, the name "
                                f"of one of its voice presets ({presets}); {len(voices)} given")
    # the tokenizer and the presets check the inputs before any graph loads (the backend comes after the outputs)
    pipeline = RealtimePipeline(engine_dir, manifest, backend=None)
    pipeline.decode_frames = decode_frames
    jobs = []
    for i, script in enumerate(scripts):
        label = f"script {i}: " if len(scripts) > 1 else ""
        try:
            job = pipeline.job(load_text(script), voices[0], cfg_scale=cfg_scale, seed=seed + i,
                               max_new_frames=max_new_frames, tag=i)
            check_text_context(job.preset.positions, job.text.available(), pipeline.max_positions)
        except RuntimeInputError as exc:
            raise RuntimeInputError(f"{label}{exc}") from exc
        jobs.append(job)

    progress = _Progress()
    audio = [[] for _ in jobs]
    try:
        with _outputs(outputs, pipeline.sample_rate, pcm16, stream) as writers:
            pipeline.backend = select_backend(engine_dir, manifest, backend, threads=threads)
            loaded = time.perf_counter()
            gen_start = time.perf_counter()
            first_chunk = None
            sched = Scheduler(pipeline.new_steps(), max_batch=len(jobs))
            for job in jobs:
                sched.add(job)
            while sched.busy:
                out = sched.step()
                for job, chunk in out.chunks:
                    if first_chunk is None:
                        first_chunk = time.perf_counter() - gen_start
                    audio[job.tag].append(chunk)
                    if stream:
                        writers[job.tag].write(chunk)
                for job in out.finished:
                    if job.error is not None:
                        raise job.error
                progress.step()
            audio = [np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32) for parts in audio]
            if not stream:
                for writer, samples in zip(writers, audio):
                    writer.write(samples)
            wall = time.perf_counter() - gen_start
    finally:
        progress.close()
        if pipeline.backend is not None:
            pipeline.close()

    summary = _figures(outputs, audio, [job.frames for job in jobs], [job.steps for job in jobs], pipeline.sample_rate,
                       wall, loaded - started, first_chunk, pipeline.backend, seed, jobs[0].cfg_scale)
    summary["steps"] = sched.steps
    summary["model_family"] = STREAMING_FAMILY
    summary["voice"] = voices[0]
    for entry, job in zip(summary["outputs"], jobs):
        entry["text_tokens"] = job.text.available()
    return summary


def _report(summary: dict, as_json: bool) -> None:
    for entry in summary["outputs"]:
        note = "" if entry["frames"] else " (no audio: the model spoke no frame)"
        click.echo(f"wrote {entry['path']}: {entry['frames']} frames, {entry['audio_seconds']:.2f} s{note}", err=True)
    rtf = summary["real_time_factor"]
    first = summary["first_chunk_seconds"]
    click.echo(f"{summary['frames']} frames, {summary['audio_seconds']:.2f} s of audio in {summary['wall_seconds']:.2f} s "
               f"({summary['steps']} steps, {summary['backend']}); real-time factor "
               f"{'n/a' if rtf is None else f'{rtf:.3f}'}; first audio after "
               f"{'n/a' if first is None else f'{first:.3f} s'}; seed {summary['seed']}", err=True)
    if as_json:
        click.echo(json.dumps(summary))


if __name__ == "__main__":  # pragma: no cover
    main()
