#!/usr/bin/env bash
# The GPU window in one command: the carried wheels (--no-index), then the GPU suite, everything under OUT_DIR.
#   bash bench/gpu_window.sh OUT_DIR [suite options, e.g. --tiny]
# GPU_PY: the python to use (default python3, the image's); GPU_WHEELS: the carried wheels (default .whl, filled by
# `make gpu-wheels`; absent: nothing installed, and the parts needing them are skipped, named in one line).
set -uo pipefail
export GPU_SUITE_T0="${GPU_SUITE_T0:-$(date +%s)}"  # the suite's 480 s count from here, the install included
out="${1:?usage: bash bench/gpu_window.sh OUT_DIR [suite options]}"
shift
py="${GPU_PY:-python3}"
wheels="${GPU_WHEELS:-.whl}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, as it travels: nothing is pip-installed
if [ -d "$wheels" ]; then
  "$py" -m pip install -q --no-index --find-links "$wheels" -r bench/gpu_wheels.txt >"$out/wheels.log" 2>&1 \
    || echo "gpu_window: the carried wheels did not install (see $out/wheels.log)" >&2
fi
"$py" -m bench.gpu_suite --out-dir "$out" "$@" 2>&1 | tee "$out/suite.log"
exit "${PIPESTATUS[0]}"
