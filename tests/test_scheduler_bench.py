"""benchmarks/bench_scheduler.py runs (tiny fixture, a few points) and writes what its figures need."""

from __future__ import annotations

from conftest import load_benchmark


def test_bench_scheduler_parts_run(tiny_engine_dir, tmp_path):
    bench = load_benchmark("bench_scheduler")
    logs = []
    prefix = bench.bench_prefix(tiny_engine_dir, threads=1, repeats=1, log=logs.append)
    for entry in prefix["by_text"].values():
        assert entry["prefix_tokens"] + entry["text_tokens"] == entry["prompt_tokens"]
        assert set(entry["time_to_first_audio_s"]) == {"reuse", "full", "raw"}
        assert all(len(runs) == 1 and runs[0] > 0 for runs in entry["runs_s"].values())
    batching = bench.bench_batching(tiny_engine_dir, threads=1, counts=[2], frames=2, log=logs.append)
    row = batching["by_concurrency"]["2"]
    assert row["batched"]["audio_s_per_s"] > 0 and row["throughput_ratio"] > 0
    long_ = bench.bench_long_context(tiny_engine_dir, threads=1, contexts=[128, 256, 512], steps=1, log=logs.append)
    assert [r["cache_slots"] for r in long_["rows"]] == [128, 256, 512]
    assert all(r["rows"] == 2 and r["lm_s"] > 0 for r in long_["rows"])
    bench.plot_long_context(long_, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert len(logs) == 2 + 1 + 3
