#!/usr/bin/env bash
# GPU check, prepared for a session lent one GPU (H100/H200 class): samples/s, peak GPU memory
# and the student-only limit of ConaCLIP training at batch 256, bf16-mixed, 224 px, ViT-B/16
# teacher (random weights), live vs cached teacher vs student alone, eager vs torch.compile.
# Under 8 minutes (a hard limit below kills it at GPU_CHECK_TIMEOUT seconds); see
# docs/benchmarks.md, "GPU check", and benchmarks/gpu_check.py for what each phase measures.
#
#   bash benchmarks/gpu_check.sh            # the GPU run -> benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --tiny     # CPU, tiny models, batch 8, fp32 (~1-2 min)
#   bash benchmarks/gpu_check.sh --plan     # print the plan, run nothing
#
# Further options go to gpu_check.py (--steps, --batch, --no-compile, --fit-steps 0, --out, ...).
# The exit status is non-zero when any phase fails (gpu_check.py checks each one), when no
# GPU is visible (without --tiny), or when the time limit is hit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
tiny=0
for arg in "$@"; do
    if [[ $arg == --tiny ]]; then tiny=1; fi
done
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # nothing is downloaded

if [[ $tiny == 0 ]] && [[ " $* " != *" --plan "* ]]; then
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no CUDA device (use --tiny for the CPU run)")'
fi

if [[ $tiny == 1 ]]; then limit=${GPU_CHECK_TIMEOUT:-300}; else limit=${GPU_CHECK_TIMEOUT:-470}; fi
status=0
timeout --signal=INT --kill-after=30 "$limit" "$PY" benchmarks/gpu_check.py "$@" || status=$?
if [[ $status == 124 ]]; then
    echo "gpu_check: stopped at the ${limit} s limit (GPU_CHECK_TIMEOUT); the JSON holds the phases finished" >&2
fi
exit "$status"
