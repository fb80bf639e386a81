"""Load test of vv-serve: a real server on 127.0.0.1, 1, 2, 4, 8, 16 concurrent clients.

    python benchmarks/bench_serve.py --out benchmarks/results [--models tiny,mid] [--clients 1,2,4,8,16]
                                     [--requests 4] [--frames 32] [--threads N]

For each model an ENGINE_DIR is exported here and a server is started on it as a child process
(`--max-batch` = the largest client count, so no request is refused), then driven over HTTP:

- `tiny` (natural): the README's tiny random model served by `vv-serve` itself; the model chooses its
  tokens, so requests end after 20-30 frames, depending on their seed;
- `mid` (forced): the 104 M-parameter random model of bench_runtime.py. Left to itself it says eos at
  its first step (no audio), so, as in bench_runtime's forced runs, its server is this script's
  `--serve-forced` harness: the same app (`create_app`) and engine (`SpeechEngine`) over a Pipeline whose
  `lm` control logits always pick speech_diffusion; every request then makes exactly `--frames` frames.

- reference pass: every distinct request (same text and voice, seeds 0..S-1, at most `--frames` steps)
  once, alone, streamed: its audio bytes are what that request must return under load (a request's audio
  does not depend on what runs beside it);
- for each client count C: C clients start together; each sends `--requests` streamed requests
  (`response_format` pcm) one after the other, request k of client c with seed (c * requests + k) mod S.

Figures per client count:
- failed / lost / incomplete: non-200 answers, transport errors (including a stream cut before its end),
  and streams whose length differs from the reference of their seed (all must be 0);
- differ_from_alone / max_diff_pcm16_steps: complete streams whose samples differ from the same request
  alone, and the largest difference in 16-bit steps (batched fp32 kernels may round differently);
- ttfa_p50_s / ttfa_p95_s: time from sending a request to its first audio bytes, at the client;
- audio_seconds_per_second: seconds of audio received by all clients / wall time of the level (first send
  to last byte);
- ratio_to_one_at_a_time: audio_seconds_per_second / the same figure with one client;
- the server's own figures from /metrics (frames, errors by kind, time-to-first-audio histogram count).

Soak (`--soak N`, tiny model, after the levels): a fresh server serves N streamed requests from
`--soak-clients` concurrent clients (the same requests as the levels, seeds cycling); the server's resident
memory (RSS, from /proc) is sampled every `--soak-every` requests served. Reported: the samples (requests
served, RSS in MB), RSS at the start and end, and the growth per request over the first and second half of
the run after the first sample (the warm-up: a server whose memory stays flat grows by ~0 in the second
half). `--soak 0` skips it.

Writes `<out>/bench_serve_cpu.json` and `<out>/bench_serve_cpu.png` (throughput and latency vs clients),
and `<out>/bench_serve_soak_cpu.png` (RSS vs requests served).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import load_average, provenance, write_result  # noqa: E402

RESULT_NAME = "bench_serve_cpu.json"
PLOT_NAME = "bench_serve_cpu.png"
SOAK_PLOT_NAME = "bench_serve_soak_cpu.png"
SAMPLE_RATE = 24000
TEXT = "Hello there, and welcome to the show. Today we talk about streaming speech."
SEEDS = 8


def export_model(name: str, out: Path) -> Path:
    """ENGINE_DIR of `name` (tiny: the README demo model; mid: bench_runtime's mid-size random model)."""
    from vv_export.onnx_export import export_onnx

    if name == "tiny":
        from vv_export.checkpoint import tiny_random_model

        loaded = tiny_random_model(seed=0)
    elif name == "mid":
        import bench_runtime

        loaded = bench_runtime.load_model("mid")
    else:
        raise ValueError(f"unknown model {name!r}: tiny or mid")
    target = out / name
    export_onnx(loaded, target, progress=False)
    return target


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def scrape(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def one_request(client, body: dict) -> dict:
    """A streamed request: status, bytes, time to first bytes and to the end (client side)."""
    started = time.perf_counter()
    record = {"seed": body["seed"], "status": None, "bytes": b"", "ttfa_s": None, "total_s": None, "error": None}
    try:
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            record["status"] = response.status_code
            parts = []
            async for data in response.aiter_bytes():
                if data and record["ttfa_s"] is None:
                    record["ttfa_s"] = time.perf_counter() - started
                parts.append(data)
            record["bytes"] = b"".join(parts)
    except Exception as exc:  # noqa: BLE001 -- a transport error is a lost request, counted
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["total_s"] = time.perf_counter() - started
    return record


def request_body(seed: int, frames: int) -> dict:
    return {"input": TEXT, "voice": "voice_a", "seed": seed, "max_new_frames": frames, "stream": True,
            "response_format": "pcm"}


async def run_level(url: str, clients: int, requests: int, frames: int) -> tuple[list[dict], float]:
    import httpx

    async def client_loop(c: int) -> list[dict]:
        out = []
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for k in range(requests):
                out.append(await one_request(client, request_body((c * requests + k) % SEEDS, frames)))
        return out

    started = time.perf_counter()
    results = await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - started
    return [r for per_client in results for r in per_client], wall


def summarise(records: list[dict], wall: float, reference: dict[int, bytes]) -> dict:
    failed = sum(1 for r in records if r["error"] is None and r["status"] != 200)
    lost = sum(1 for r in records if r["error"] is not None)
    incomplete = sum(1 for r in records if r["status"] == 200 and len(r["bytes"]) != len(reference[r["seed"]]))
    # same length; are the samples those of the request alone? (fp32 kernels may round differently at
    # another batch size: counted and measured in PCM16 steps, not hidden)
    diffs = [int(np.abs(np.frombuffer(r["bytes"], "<i2").astype(np.int32)
                        - np.frombuffer(reference[r["seed"]], "<i2").astype(np.int32)).max(initial=0))
             for r in records if r["status"] == 200 and len(r["bytes"]) == len(reference[r["seed"]])]
    ttfa = [r["ttfa_s"] for r in records if r["ttfa_s"] is not None]
    audio_s = sum(len(r["bytes"]) for r in records) / 2 / SAMPLE_RATE
    return {
        "requests": len(records), "failed": failed, "lost": lost, "incomplete": incomplete,
        "differ_from_alone": sum(1 for d in diffs if d), "max_diff_pcm16_steps": max(diffs, default=0),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "ttfa_p50_s": round(percentile(ttfa, 50), 4) if ttfa else None,
        "ttfa_p95_s": round(percentile(ttfa, 95), 4) if ttfa else None,
        "ttfa_mean_s": round(statistics.fmean(ttfa), 4) if ttfa else None,
        "request_p50_s": round(percentile([r["total_s"] for r in records], 50), 4),
        "audio_seconds": round(audio_s, 3),
        "wall_s": round(wall, 3),
        "audio_seconds_per_second": round(audio_s / wall, 4),
        "load_average_1min": load_average(),
    }


MODES = {"tiny": "natural", "mid": "forced"}


def bench_model(name: str, engine_dir: Path, client_counts: list[int], requests: int, frames: int,
                threads: int | None, voices: Path, log, mode: str = "natural") -> dict:
    from serve_process import ServerProcess

    args = ["--engine-dir", engine_dir, "--voices", voices, "--max-batch", str(max(client_counts)),
            "--max-queue", str(4 * max(client_counts))]
    if threads:
        args += ["--threads", str(threads)]
    if mode == "forced":
        server = ServerProcess(args, startup_timeout=600,
                               command=[sys.executable, str(Path(__file__).resolve()), "--serve-forced"]).start()
    else:
        server = ServerProcess(args + ["--log-level", "warning"], startup_timeout=600).start()
    try:
        url = server.url
        reference: dict[int, bytes] = {}
        alone = []
        for seed in range(SEEDS):
            record = asyncio.run(run_level_single(url, seed, frames))
            if record["status"] != 200 or record["error"]:
                raise RuntimeError(f"reference request seed {seed} failed: {record}")
            reference[seed] = record["bytes"]
            alone.append(record)
        log(f"{name}: reference audio {[len(b) // 2 // 3200 for b in reference.values()]} frames per seed")
        if not all(reference.values()):
            raise RuntimeError(f"{name}: some reference requests made no audio (the model said eos at once): "
                               f"a load test needs speech")
        levels = []
        for clients in client_counts:
            before = scrape(url)
            records, wall = asyncio.run(run_level(url, clients, requests, frames))
            after = scrape(url)
            entry = {"clients": clients, **summarise(records, wall, reference)}
            entry["server"] = {
                "frames": int(after["vv_frames_total"] - before["vv_frames_total"]),
                "engine_errors": {k.split('"')[1]: int(v - before.get(k, 0)) for k, v in after.items()
                                  if k.startswith("vv_engine_errors_total{") and v - before.get(k, 0)},
                "http_errors": {k.split('"')[1]: int(v - before.get(k, 0)) for k, v in after.items()
                                if k.startswith("vv_http_errors_total{") and v - before.get(k, 0)},
                "ttfa_observed": int(after["vv_time_to_first_audio_seconds_count"]
                                     - before["vv_time_to_first_audio_seconds_count"]),
            }
            levels.append(entry)
            log(f"{name}: {clients:>2} clients: {entry['audio_seconds_per_second']:.2f} s of audio/s, "
                f"ttfa p50 {entry['ttfa_p50_s']} s p95 {entry['ttfa_p95_s']} s, failed {entry['failed']}, "
                f"lost {entry['lost']}, incomplete {entry['incomplete']}, differ from alone {entry['differ_from_alone']} "
                f"(max {entry['max_diff_pcm16_steps']} PCM16 steps)")
        base = levels[0]["audio_seconds_per_second"] if levels and levels[0]["clients"] == 1 else None
        for entry in levels:
            entry["ratio_to_one_at_a_time"] = round(entry["audio_seconds_per_second"] / base, 3) if base else None
        code = server.stop(timeout=300)
        return {
            "engine_dir_manifest_model": json.loads((Path(engine_dir) / "manifest.json").read_text()).get("model", {}),
            "mode": mode, "requests_per_client": requests, "max_new_frames": frames, "seeds": SEEDS, "text": TEXT,
            # paths as the scratch directory's names only: no machine paths in committed results
            "server_args": [Path(a).name if "/" in str(a) else str(a) for a in args], "server_exit_status": code,
            "alone": [{"seed": r["seed"], "ttfa_s": round(r["ttfa_s"], 4), "total_s": round(r["total_s"], 4),
                       "audio_seconds": round(len(r["bytes"]) / 2 / SAMPLE_RATE, 3)} for r in alone],
            "levels": levels,
        }
    finally:
        server.kill()


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def growth_kb_per_request(samples: list[list[float]]) -> float | None:
    """Least-squares slope of RSS (MB) against requests served, in KB per request."""
    if len(samples) < 3:
        return None
    served, rss = np.array(samples, dtype=np.float64).T
    return round(float(np.polyfit(served, rss, 1)[0]) * 1024, 3)


async def soak_requests(url: str, pid: int, total: int, clients: int, every: int, frames: int) -> dict:
    """`total` streamed requests from `clients` concurrent clients; RSS sampled every `every` served."""
    import httpx

    samples = [[0, round(rss_mb(pid), 2)]]
    served = failed = 0
    next_index = 0

    async def client_loop() -> None:
        nonlocal served, failed, next_index
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while next_index < total:
                index = next_index
                next_index += 1
                record = await one_request(client, request_body(index % SEEDS, frames))
                served += 1
                failed += record["status"] != 200 or record["error"] is not None or not record["bytes"]
                if served % every == 0 or served == total:
                    samples.append([served, round(rss_mb(pid), 2)])

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return {"samples": samples, "failed": failed, "wall_s": round(time.perf_counter() - started, 2)}


def soak(engine_dir: Path, voices: Path, total: int, clients: int, every: int, frames: int, threads: int | None,
         log) -> dict:
    """A fresh vv-serve serving `total` requests; its RSS against requests served."""
    from serve_process import ServerProcess

    args = ["--engine-dir", engine_dir, "--voices", voices, "--max-batch", str(clients),
            "--max-queue", str(4 * clients), "--log-level", "warning"]
    if threads:
        args += ["--threads", str(threads)]
    server = ServerProcess(args, startup_timeout=600).start()
    try:
        run = asyncio.run(soak_requests(server.url, server.proc.pid, total, clients, every, frames))
        samples = run["samples"]
        # the first `every` requests warm the server up (the graphs' first allocations): growth is measured after
        warm = samples[1:]
        first = [s for s in warm if s[0] <= total / 2]
        half = [s for s in warm if s[0] >= total / 2]
        entry = {"requests": total, "clients": clients, "sample_every": every, "max_new_frames": frames,
                 "failed": run["failed"], "wall_s": run["wall_s"], "samples": samples,
                 "rss_start_mb": samples[0][1], "rss_warm_mb": warm[0][1] if warm else None,
                 "rss_end_mb": samples[-1][1],
                 "growth_kb_per_request_first_half": growth_kb_per_request(first),
                 "growth_kb_per_request_second_half": growth_kb_per_request(half),
                 "load_average_1min": load_average()}
        entry["server_exit_status"] = server.stop(timeout=300)
        log(f"soak: {total} requests, RSS {entry['rss_start_mb']:.1f} MB, {entry['rss_warm_mb']} MB after "
            f"{every} requests, {entry['rss_end_mb']:.1f} MB at the end, "
            f"{entry['growth_kb_per_request_first_half']} KB/request in the first half, "
            f"{entry['growth_kb_per_request_second_half']} in the second, failed {entry['failed']}")
        return entry
    finally:
        server.kill()


def plot_soak(entry: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    served, rss = zip(*entry["samples"])
    fig, axis = plt.subplots(figsize=(7, 4))
    axis.plot(served, rss, marker=".")
    axis.set_xlabel("requests served")
    axis.set_ylabel("server RSS (MB)")
    axis.set_title(f"vv-serve memory over {entry['requests']} requests ({entry['clients']} clients, tiny model)")
    axis.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run_level_single(url: str, seed: int, frames: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await one_request(client, request_body(seed, frames))


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, model in result["models"].items():
        xs = [e["clients"] for e in model["levels"]]
        left.plot(xs, [e["audio_seconds_per_second"] for e in model["levels"]], marker="o", label=name)
        for e in model["levels"]:
            if e.get("ratio_to_one_at_a_time"):
                left.annotate(f"{e['ratio_to_one_at_a_time']:.1f}x", (e["clients"], e["audio_seconds_per_second"]),
                              textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        right.plot(xs, [e["ttfa_p50_s"] for e in model["levels"]], marker="o", label=f"{name} p50")
        right.plot(xs, [e["ttfa_p95_s"] for e in model["levels"]], marker="x", linestyle="--", label=f"{name} p95")
    counts = result["client_counts"]
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts)
        axis.set_xticklabels([str(c) for c in counts])
        axis.set_xlabel("concurrent clients")
        axis.grid(True, alpha=0.3)
        axis.legend()
    left.set_ylim(bottom=0)
    left.set_ylabel("seconds of audio per second (all clients)")
    left.set_title("vv-serve aggregate throughput")
    right.set_ylabel("time to first audio (s)")
    right.set_yscale("log")
    right.set_title("time to first audio at the client")
    cpu = result["machine"].get("cpu_count")
    fig.suptitle(f"vv-serve load test, CPU ({cpu} cores), ONNX Runtime", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_benchmark(out_dir: Path | None, models: list[str], client_counts: list[int], requests: int, frames: int,
                  threads: int | None, log=print, soak_requests_total: int = 0, soak_clients: int = 4,
                  soak_every: int = 25) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        voices = work / "voices"
        voices.mkdir()
        shutil.copy(REPO / "examples" / "voice_a.wav", voices / "voice_a.wav")
        result = {"benchmark": "vv-serve load test", "client_counts": client_counts, "models": {}}
        for name in models:
            log(f"{name}: exporting")
            engine_dir = export_model(name, work / "engines")
            result["models"][name] = bench_model(name, engine_dir, client_counts, requests, frames, threads,
                                                 voices, log, MODES[name])
            shutil.rmtree(engine_dir, ignore_errors=True)
        if soak_requests_total:
            engine_dir = export_model("tiny", work / "engines")
            result["soak"] = soak(engine_dir, voices, soak_requests_total, soak_clients, soak_every, frames,
                                  threads, log)
        result["all_complete"] = all(e["failed"] == e["lost"] == e["incomplete"] == 0
                                     for m in result["models"].values() for e in m["levels"]) and (
            not soak_requests_total or result["soak"]["failed"] == 0)
        result["git_commit"] = git_commit()
        result.update(provenance(ort_threads=threads))
        if out_dir is not None:
            write_result(out_dir, RESULT_NAME, result)
            plot(result, Path(out_dir) / PLOT_NAME)
            if soak_requests_total:
                plot_soak(result["soak"], Path(out_dir) / SOAK_PLOT_NAME)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def serve_forced(argv: list[str]) -> int:
    """The `mid` server: vv-serve's app and engine over a Pipeline whose LM always picks speech_diffusion."""
    from common import ForcedDiffusion

    from vv_runtime.manifest import CONTROL_TOKENS
    from vv_runtime.pipeline import Pipeline
    from vv_runtime.serve import Limits, create_app
    from vv_runtime.serve.cli import draining_server, listening_socket
    from vv_runtime.service_engine import SpeechEngine, VoiceStore

    import uvicorn

    parser = argparse.ArgumentParser()
    for flag in ("--engine-dir", "--voices"):
        parser.add_argument(flag, required=True)
    for flag in ("--max-batch", "--max-queue", "--threads", "--port"):
        parser.add_argument(flag, type=int, default=None)
    args = parser.parse_args(argv)
    sock = listening_socket("127.0.0.1", args.port or 0)
    pipeline = Pipeline.from_engine_dir(args.engine_dir, backend="ort", threads=args.threads)
    pipeline.backend = ForcedDiffusion(pipeline.backend, CONTROL_TOKENS.index("speech_diffusion"))
    limits = Limits()
    voices = VoiceStore(pipeline, max_seconds=limits.max_voice_seconds)
    voices.load_dir(args.voices)
    engine = SpeechEngine(pipeline, max_batch=args.max_batch or 8, max_queue=args.max_queue or 64,
                          voices=voices).start()
    app = create_app(engine, limits)
    server = draining_server(uvicorn.Config(app, log_level="warning", lifespan="off"), app.state.service)
    print(f"vv-serve: listening on http://127.0.0.1:{sock.getsockname()[1]} (forced speech_diffusion)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve-forced"]:
        return serve_forced(argv[1:])
    # SIGTERM ends the run through `finally` blocks (the server child is stopped, the temp dir removed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_serve_cpu.json/.png")
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, mid")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each count")
    parser.add_argument("--frames", type=int, default=32, help="max_new_frames of every request")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the server")
    parser.add_argument("--soak", type=int, default=800, help="requests of the memory soak (0: none)")
    parser.add_argument("--soak-clients", type=int, default=4, help="concurrent clients of the soak")
    parser.add_argument("--soak-every", type=int, default=25, help="sample the server's RSS every N requests")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not counts or min(counts) < 1 or args.requests < 1 or args.frames < 1:
            raise ValueError("client counts, --requests and --frames must be positive")
        if args.soak < 0 or args.soak_clients < 1 or args.soak_every < 1:
            raise ValueError("--soak must be 0 or more, --soak-clients and --soak-every positive")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = run_benchmark(args.out, models, counts, args.requests, args.frames, args.threads,
                           log=lambda m: print(m, file=sys.stderr, flush=True), soak_requests_total=args.soak,
                           soak_clients=args.soak_clients, soak_every=args.soak_every)
    print(json.dumps({name: [{k: e[k] for k in ("clients", "audio_seconds_per_second", "ratio_to_one_at_a_time",
                                                 "ttfa_p50_s", "ttfa_p95_s", "failed", "lost", "incomplete")}
                             for e in model["levels"]] for name, model in result["models"].items()}, indent=1))
    return 0 if result["all_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
