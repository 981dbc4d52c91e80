#!/usr/bin/env bash
# Compile every csrc/**/*.cu to an object file with nvcc (sm_80 and sm_90), and
# syntax-check the torch binding (csrc/**/*.cpp) with the host compiler
# against torch's headers, so the CUDA sources cannot rot on a CI machine
# without a GPU.  Skips (loudly) without nvcc; fails on any compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s globstar nullglob
srcs=(csrc/**/*.cu)
cpps=(csrc/**/*.cpp)
if [ ${#srcs[@]} -eq 0 ]; then echo "no .cu sources"; exit 0; fi
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then echo "nvcc not found: csrc compile check SKIPPED"; exit 0; fi
"$NVCC" --version | tail -n 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${srcs[@]}"; do
  echo "nvcc -c $f"
  "$NVCC" -std=c++17 -O2 -c "$f" -o "$out/$(basename "$f").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -DDGG_COMPILE_CHECK_ONLY -Icsrc -Xcompiler -Wall -Werror all-warnings
done

if [ ${#cpps[@]} -gt 0 ]; then
  CXX=${CXX:-$(command -v g++ || command -v c++ || true)}
  if [ -z "$CXX" ]; then echo "no host C++ compiler: binding syntax check SKIPPED"; echo "csrc compiles"; exit 0; fi
  if ! python3 -c "import torch" 2>/dev/null; then
    echo "torch not importable: binding syntax check SKIPPED"; echo "csrc (.cu) compiles"; exit 0
  fi
  # Torch's include dirs, Python's, and the CUDA toolkit's (next to nvcc).
  mapfile -t incs < <(python3 -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)
print(sysconfig.get_paths()['include'])
")
  cuda_inc="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
  [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
  # A CPU build of torch ships c10/cuda headers but not the one header its CUDA
  # build generates; stand in for it (it only defines the shared-library macro).
  mkdir -p "$out/shim/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  flags=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
         -DDGG_COMPILE_CHECK_ONLY -Icsrc)
  for d in "${incs[@]}"; do flags+=(-isystem "$d"); done
  flags+=(-isystem "$cuda_inc" -idirafter "$out/shim")
  for f in "${cpps[@]}"; do
    echo "$(basename "$CXX") -fsyntax-only $f (torch headers)"
    "$CXX" "${flags[@]}" "$f"
  done
fi
echo "csrc compiles"
