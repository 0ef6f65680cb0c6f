#!/usr/bin/env bash
# The GPU acceptance run on the lent machine, in one command (BENCHMARKS.md, "GPU acceptance run"):
# install the carried wheels (fetched here by scripts/gpu_wheels.sh) to a temporary path, then run
# bench/gpu_check.py with OpenMP's threads passive and Python unbuffered; its table is written to
# $OUT/gpu_check.txt (runs/gpu_check/ without the device tool), its log to gpu_check.stderr.
# Arguments go to gpu_check.py. Exit status: gpu_check's (1: a failed row), 3: the wheels did not install.
set -uo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d /tmp/gpu-run-site.XXXXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "the wheels in .whl/ did not install (run scripts/gpu_wheels.sh here first)" >&2; exit 3; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
python3 bench/gpu_check.py "$@" 2>"$out/gpu_check.stderr" | tee "$out/gpu_check.txt"
exit "${PIPESTATUS[0]}"
