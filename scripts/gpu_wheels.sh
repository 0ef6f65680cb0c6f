#!/usr/bin/env bash
# Fetch, here, the wheels the lent GPU machine lacks for bench/gpu_check.py's service section, into .whl/
# (git-ignored; the device tool carries it: BENCHMARKS.md, "GPU acceptance run").
#
# That machine runs Python 3.12 on x86-64 with torch 2.11, pillow, numpy, safetensors, httpx, anyio, h11,
# click, idna and typing-extensions already installed, and cannot reach a registry. The service also needs
# the packages below: the versions this project's tests run with, each one once (two versions of a package
# stop the install there). typing-extensions is carried too: pydantic 2.14 needs a newer one than some
# images have, and fastapi 0.165 requires opentelemetry-api. Usage: scripts/gpu_wheels.sh [DEST] (default .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
packages=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    fastapi==0.165.0
    annotated-doc==0.0.7
    starlette==1.10.0
    uvicorn==0.55.0
    python-multipart==0.0.34
    fastapi-offline==1.7.7
    opentelemetry-api==1.45.3
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${packages[@]}"
# One version of each: drop wheels of these packages left by an earlier run with other versions.
for wheel in "$dest"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1-2)
    keep=0
    for p in "${packages[@]}"; do
        [[ "${name,,}" == "$(echo "${p%%==*}" | tr - _)-${p##*==}" ]] && keep=1
    done
    [[ $keep == 1 ]] || { echo "removing $wheel (not in the list)"; rm -f "$wheel"; }
done
size=$(du -sm "$dest" | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, ${size} MiB in $dest (the device tool carries at most 64 MiB with the tree)"
