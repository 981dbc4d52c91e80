#!/usr/bin/env bash
# Compile every csrc/**/*.cu to an object file with nvcc (sm_80 and sm_90), so the
# CUDA sources cannot rot on a CI machine without a GPU.  Skips (loudly) without nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s globstar nullglob
srcs=(csrc/**/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then echo "no .cu sources"; exit 0; fi
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then echo "nvcc not found: csrc compile check SKIPPED"; exit 0; fi
"$NVCC" --version | tail -n 1
out=$(mktemp -d)
for f in "${srcs[@]}"; do
  echo "nvcc -c $f"
  "$NVCC" -std=c++17 -O2 -c "$f" -o "$out/$(basename "$f").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -DDGG_COMPILE_CHECK_ONLY -Icsrc
done
echo "csrc compiles"
