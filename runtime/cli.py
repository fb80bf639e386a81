"""`vv-run`: speak a script (or a batch of scripts) with the graphs of an ENGINE_DIR.

It drives the same step-wise scheduler as the speech service (`Pipeline.generate` ->
`vv_runtime.scheduler`): the scripts of a batch run together, each equal to itself run alone.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import click

from .errors import RuntimeInputError, one_line


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
@click.option("--voice", "voices", multiple=True, type=click.Path(), metavar="AUDIO",
              help="Voice prompt audio, one per speaker in order (Speaker 1 = first --voice). Repeatable.")
@click.option("--out", required=True, type=click.Path(), metavar="OUT.wav", help="Output wav file (24 kHz mono).")
@click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance scale [default: 1.3].")
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
@click.option("--pcm16", is_flag=True, help="Write 16-bit PCM instead of 32-bit float.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's figures as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(engine_dir, script, voices, out, cfg_scale, seed, max_new_frames, stream, batch_file, backend, threads,
         pcm16, as_json, debug):
    """Generate speech for SCRIPT with the voices given, into OUT."""
    try:
        summary = _run(engine_dir, script, voices, out, cfg_scale, seed, max_new_frames, stream, batch_file,
                       backend, threads, pcm16)
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
         pcm16) -> dict:
    from .audio import WavWriter
    from .backend import select_backend
    from .manifest import load_manifest
    from .pipeline import Pipeline, prepare_rows
    from .prompt import PromptBuilder

    if (script is None) == (batch_file is None):
        raise RuntimeInputError("give exactly one of --script and --batch-file")
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise RuntimeInputError(f"--out {out}: must be a .wav file")
    for voice in voices:
        if not Path(voice).is_file():
            raise RuntimeInputError(f"--voice {voice}: file not found")
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
    prompts = PromptBuilder.from_manifest(engine_dir, manifest)
    rows = prepare_rows(prompts, scripts, list(voices), int(manifest["model"]["max_position_embeddings"]))
    sample_rate = int(manifest["model"].get("sample_rate", 24000))

    writers = []
    progress = None
    pipeline = None
    try:
        for path in outputs:
            writers.append(WavWriter(path, sample_rate, "PCM_16" if pcm16 else "FLOAT", live=stream))
        pipeline = Pipeline(engine_dir, manifest, select_backend(engine_dir, manifest, backend, threads=threads),
                            prompts=prompts)
        loaded = time.perf_counter()

        def on_step(step, total):
            nonlocal progress
            if progress is None:
                from tqdm import tqdm

                progress = tqdm(total=total, desc="generating", unit="step", file=sys.stderr, leave=False,
                                disable=None, dynamic_ncols=True)
            progress.update(1)

        gen_start = time.perf_counter()
        first_chunk = None
        gen = pipeline.generate(rows, cfg_scale=cfg_scale, max_new_frames=max_new_frames, seed=seed,
                                stream=True, on_step=on_step)
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
        for writer in writers:
            writer.commit()
        writers = []
    finally:
        if progress is not None:
            progress.close()
        for writer in writers:
            writer.abort()
        if pipeline is not None:
            pipeline.close()

    rate = pipeline.sample_rate
    files = []
    for path, audio, frames, tokens in zip(outputs, result.audio, result.frames, result.tokens):
        files.append({"path": str(path), "frames": frames, "audio_seconds": round(len(audio) / rate, 4),
                      "steps": len(tokens)})
    audio_seconds = sum(len(a) for a in result.audio) / rate
    return {
        "outputs": files,
        "frames": sum(result.frames),
        "audio_seconds": round(audio_seconds, 4),
        "steps": result.steps,
        "wall_seconds": round(wall, 4),
        "load_seconds": round(loaded - started, 4),
        "real_time_factor": round(wall / audio_seconds, 4) if audio_seconds > 0 else None,
        "first_chunk_seconds": None if first_chunk is None else round(first_chunk, 4),
        "backend": pipeline.backend.describe(),
        "seed": seed,
        "cfg_scale": pipeline.default_cfg_scale if cfg_scale is None else cfg_scale,
        "stream": bool(stream),
    }


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
