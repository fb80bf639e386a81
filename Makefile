# vibevoice-trt: export VibeVoice to ONNX/TensorRT and run it.
#   make demo   -- the main job: export a model (tiny random one when MODEL is unset) and speak a script
#   make test   -- the default test suite (CPU, well under 15 minutes)
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
MODEL   ?=
TOKENIZER ?=
ENGINES ?= engines/$(if $(MODEL),model,tiny-random)
SCRIPT  ?= examples/podcast.txt
VOICES  ?= examples/voice_a.wav examples/voice_b.wav
OUT     ?= out/demo.wav

.PHONY: setup demo test test-slow test-gpu bench bench-export bench-gpu check-accuracy trt clean

$(BIN)/vv-run: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch where no torch is installed yet (the CUDA build is several GB)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/vv-run

demo: setup
	$(BIN)/vv-export onnx $(if $(MODEL),--model $(MODEL)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) --out $(ENGINES) --force
	$(BIN)/vv-run --engine-dir $(ENGINES) --script $(SCRIPT) $(foreach v,$(VOICES),--voice $(v)) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

test-gpu: setup
	$(BIN)/python -m pytest -m gpu -q

bench: setup
	$(BIN)/python benchmarks/bench_runtime.py --out benchmarks/results

bench-export: setup
	$(BIN)/python benchmarks/bench_export.py --out benchmarks/results

bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py --out benchmarks/results

check-accuracy: setup
	$(BIN)/python -m pytest -m gpu -q tests/test_trt_accuracy.py

trt: setup
	$(BIN)/vv-export trt --engine-dir $(ENGINES) $(if $(PLAN),--plan $(PLAN)) $(if $(PRECISION),--precision $(PRECISION))

clean:
	rm -rf engines out .pytest_cache
