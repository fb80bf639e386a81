"""`vv-export`: export VibeVoice to an ENGINE_DIR of ONNX graphs, then (on a GPU) to TensorRT engines."""

from __future__ import annotations

import sys

import click

from .errors import ExportError


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Export VibeVoice to ONNX graphs and TensorRT engines."""


@main.command("onnx")
@click.option("--model", "model", default=None, metavar="DIR|HUB_ID",
              help="Checkpoint directory or hub id (original or transformers layout; VibeVoice or VibeVoice-Realtime). "
                   "Without it: a tiny randomly initialised VibeVoice of the real architecture.")
@click.option("--out", "out", required=True, type=click.Path(), metavar="ENGINE_DIR", help="Directory to write.")
@click.option("--tokenizer", "tokenizer", default=None, metavar="DIR",
              help="Directory with tokenizer.json (original checkpoints ship none: use Qwen2.5's).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Storage dtype of the graphs' weights.")
@click.option("--diffusion-steps", type=click.IntRange(1, 100), default=None,
              help="DPM-Solver++ steps baked into the diffusion_sampler graph.  [default: the model's: 10 for "
                   "VibeVoice, 5 for VibeVoice-Realtime]")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check every graph in ONNX Runtime against PyTorch.")
@click.option("--force", is_flag=True, help="Replace an existing ENGINE_DIR.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="CPU path: block-wise int8/int4 weights (MatMulNBits) for each graph where it stays within "
                   "its stated tolerance and runs faster on this CPU (docs/QUANTIZATION.md).")
@click.option("--runtimes", default="ort", show_default=True, metavar="ort[,openvino]",
              help="CPU runtimes to choose from per graph: with openvino, each graph the loop calls is also tried "
                   "in OpenVINO (f32, bf16 where the CPU has it, int8 weights) and served by it where that is "
                   "faster here within its tolerance (needs the `openvino` extra; docs/QUANTIZATION.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random model (no --model).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def onnx_cmd(model, out, tokenizer, dtype, diffusion_steps, validate, force, quantize, runtimes, seed, debug):
    """Split the model into ONNX graphs, validate them and write a self-describing ENGINE_DIR."""
    try:
        from .checkpoint import tiny_random_model
        from .families import load_checkpoint
        from .onnx_export import check_out_path, export_onnx

        check_out_path(out, force)  # fail before the (long) model load
        if quantize != "none" and (not validate or dtype != "fp32"):
            raise ExportError("--quantize needs an fp32, validated export (no --no-validate, --dtype fp32)")
        if runtimes != "ort":
            from .openvino_candidates import check_export

            check_export(runtimes, validate, dtype)
        if model is None:
            click.echo(f"no --model given: exporting a tiny randomly initialised VibeVoice (seed {seed})", err=True)
            loaded = tiny_random_model(seed=seed)
        else:
            loaded = load_checkpoint(model, tokenizer_dir=tokenizer)
        path = export_onnx(loaded, out, dtype=dtype, validate=validate, force=force,
                           diffusion_steps=diffusion_steps, quantize=quantize, runtimes=runtimes)
        click.echo(f"wrote {path}", err=True)
    except (ExportError, OSError) as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


@main.command("trt")
@click.option("--engine-dir", "engine_dir", required=True, type=click.Path(), help="ENGINE_DIR from `vv-export onnx`.")
@click.option("--plan", default="default", show_default=True, help="Build plan name in trt_plans/.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32", "fp8", "int8wo"]), default=None,
              help="Override the plan's precision for every graph (fp32/fp16/bf16; fp8 and int8wo are chosen "
                   "per graph by --plan fp8 / --plan int8wo).")
@click.option("--force", is_flag=True, help="Rebuild engines that are up to date.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def trt_cmd(engine_dir, plan, precision, force, debug):
    """Build TensorRT engines for every graph of ENGINE_DIR from a plan in trt_plans/."""
    try:
        from .trt_build import build_engines

        build_engines(engine_dir, plan=plan, precision=precision, force=force,
                      progress=lambda line: click.echo(line, err=True))
    except (ExportError, OSError) as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo("interrupted: no half-written engine was kept", err=True)
        sys.exit(130)


@main.command("voices")
@click.option("--engine-dir", "engine_dir", required=True, type=click.Path(),
              help="A VibeVoice-Realtime ENGINE_DIR from `vv-export onnx`.")
@click.argument("files", nargs=-1, required=True, type=click.Path(), metavar="FILE.pt...")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def voices_cmd(engine_dir, files, debug):
    """Convert Microsoft's VibeVoice-Realtime voice presets (.pt) into ENGINE_DIR/voices/, named by file stem.

    The presets' pickles are read without running them: anything but tensors and the few transformers
    containers the released files hold is refused, and nothing is written.
    """
    try:
        from .voices import convert_voices

        convert_voices(engine_dir, files, progress=lambda line: click.echo(line, err=True))
    except (ExportError, OSError) as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo("interrupted: no half-written voice was kept", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
