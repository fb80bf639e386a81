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

.PHONY: setup demo test test-slow test-gpu bench bench-export bench-gpu check-accuracy check-accuracy-quant gpu-preflight gpu-setup gpu-first-run trt clean

$(BIN)/vv-run: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch where no torch is installed yet (the CUDA build is several GB)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/vv-run browser

# Headless Chromium for the web page test (tests/test_serve_browser.py): installed with apt-get where it is
# missing and we are root with apt-get (CI); elsewhere a note, and that test skips (it fails under CI=true).
.PHONY: browser bench-serve bench-quant bench-realtime precision-report
browser:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromium ]; }; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else echo "note: chromium + chromium-driver missing (needs root and apt-get): the browser test will skip"; fi

demo: setup
	$(BIN)/vv-export onnx $(if $(MODEL),--model $(MODEL)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) --out $(ENGINES) --force
	$(BIN)/vv-run --engine-dir $(ENGINES) --script $(SCRIPT) $(foreach v,$(VOICES),--voice $(v)) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-slow: setup
	@# the Ray Serve test needs the `ray` extra (large: not part of the default set-up)
	$(BIN)/python -c "import ray.serve" 2>/dev/null || $(BIN)/pip install -q -e ".[dev,ray]"
	$(BIN)/python -m pytest -m slow -q

# GPU jobs (docs/GPU.md). First an NVIDIA GPU is looked for with the system's python3 alone: without one
# make stops within seconds with one line, having installed nothing. Then the pinned CUDA 12 stack of
# requirements-gpu.txt goes into the venv (one TensorRT, a CUDA 12 torch, onnxruntime-gpu alone) and is
# checked to see the GPU. VV_REQUIRE_GPU=1 makes pytest fail where a gpu test skipped or none ran.
test-gpu: gpu-setup
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q

bench: setup
	$(BIN)/python benchmarks/bench_runtime.py --out benchmarks/results

bench-serve: setup
	$(BIN)/python benchmarks/bench_serve.py --out benchmarks/results

bench-quant: setup
	$(BIN)/python benchmarks/bench_quant.py --model $(or $(QUANT_MODEL),mid) --work benchmarks/.cache/quant --out benchmarks/results

# VibeVoice-Realtime-0.5B (full-size random) on this CPU: ONNX Runtime fp32/int8 vs the PyTorch port of the
# loop; exports cached under benchmarks/.cache/realtime (first run: the exports, a few minutes each)
bench-realtime: setup
	$(BIN)/python benchmarks/bench_realtime.py --model full --out benchmarks/results

precision-report: setup
	$(BIN)/python benchmarks/precision_report.py

bench-export: setup
	$(BIN)/python benchmarks/bench_export.py --out benchmarks/results

bench-gpu: gpu-setup
	$(BIN)/python benchmarks/bench_gpu.py --plan bench --out benchmarks/results

check-accuracy: gpu-setup
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q tests/test_trt_accuracy.py

# The explicitly quantized engines (plans fp8 / int8wo: lm, diffusion_step, diffusion_sampler) of the fixture
# against ONNX Runtime with the plans' per-graph tolerances (tests/test_qdq.py; docs/QUANTIZATION.md). fp8
# needs compute capability 8.9+: below it those tests skip as "not applicable" and int8wo alone runs.
check-accuracy-quant: gpu-setup
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q tests/test_qdq.py

# What the first GPU run must confirm, in order (docs/GPU.md): the stack (gpu-setup's check), the backend's
# CUDA graphs and cache reuse, the engines against ONNX Runtime and whole generations, the quantized
# engines (kernels, sizes, accuracy), then the benchmark. Stops at the first step that fails.
gpu-first-run: gpu-setup
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q tests/test_trt_backend.py
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q tests/test_trt_accuracy.py
	VV_REQUIRE_GPU=1 $(BIN)/python -m pytest -m gpu -q tests/test_qdq.py
	$(BIN)/python benchmarks/bench_gpu.py --plan bench --out benchmarks/results

GPU_STAMP = $(VENV)/.gpu-stack
GPU_JOB   = make $(or $(firstword $(filter test-gpu bench-gpu check-accuracy check-accuracy-quant gpu-first-run,$(MAKECMDGOALS))),gpu-setup)
# $(call vv_one_line,COMMAND): print COMMAND's one line, or stop make with that line as its only message
vv_one_line = $(eval _vv_out := $(shell $(1) 2>&1; echo "rc=$$?"))$(if $(filter rc=0,$(lastword $(_vv_out))),echo "$(filter-out rc=%,$(_vv_out))",$(error $(filter-out rc=%,$(_vv_out))))

# NVIDIA's package index (the real TensorRT wheels; tools/gpu_preflight.py holds it), added to pip's extra
# indexes for the stack's install, after any the environment gives. PIP_NO_INDEX=1 with PIP_FIND_LINKS
# (a wheelhouse, docs/GPU.md) turns every index off, this one too.
NVIDIA_INDEX = $(shell $(PY) tools/gpu_preflight.py --index)

gpu-preflight:
	@$(call vv_one_line,$(PY) tools/gpu_preflight.py --job "$(GPU_JOB)" --venv "$(VENV)")

$(GPU_STAMP): requirements-gpu.txt pyproject.toml | gpu-preflight
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# the CUDA 12 torch first: `pip install -e .[dev]` then keeps it
	PIP_EXTRA_INDEX_URL="$${PIP_EXTRA_INDEX_URL:+$$PIP_EXTRA_INDEX_URL }$(NVIDIA_INDEX)" $(BIN)/pip install -q -r requirements-gpu.txt
	$(BIN)/pip install -q -e ".[dev]"
	@# .[dev] pulls in the CPU onnxruntime, which writes the same module as onnxruntime-gpu: keep one
	$(BIN)/pip uninstall -q -y onnxruntime
	$(BIN)/pip install -q --force-reinstall --no-deps "$$(grep -E '^onnxruntime-gpu' requirements-gpu.txt)"
	touch $(BIN)/vv-run $@

gpu-setup: $(GPU_STAMP)
	@$(call vv_one_line,$(BIN)/python tools/gpu_preflight.py --stack --job "$(GPU_JOB)")

trt: setup
	$(BIN)/vv-export trt --engine-dir $(ENGINES) $(if $(PLAN),--plan $(PLAN)) $(if $(PRECISION),--precision $(PRECISION))

clean:
	rm -rf engines out .pytest_cache
