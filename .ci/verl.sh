#!/usr/bin/env bash
# The verl integration tests, in their own virtual environment: verl 0.9.1 pins transformers<5.11,
# while the main environment (.ci/run) has TRL's transformers 5.23.
#
# A fresh venv each run (a temporary folder), unless DGG_VERL_VENV names one that already exists,
# which is reused as it is (for local reruns).  Fails when a test fails and when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$SECONDS

venv="${DGG_VERL_VENV:-}"
if [ -n "$venv" ] && [ -x "$venv/bin/python" ]; then
  echo "== verl venv: reusing $venv"
else
  venv="${venv:-$(mktemp -d)/verl-venv}"
  echo "== verl venv: creating $venv"
  python3 -m venv "$venv"
  # torch pinned in the same command, so pip keeps the CPU build and does not pull CUDA wheels.
  # uvicorn/fastapi: imported by verl.workers.engine_workers, not declared by verl.
  # transferqueue/cachetools: imported by verl's v1 trainer (verl's "verl-core" extra), for the
  # trainer registration test.  triton/hypothesis: imported by the test suite's conftest and helpers.
  "$venv/bin/python" -m pip install -q torch==2.13.0 verl==0.9.1 transferqueue==0.1.11 cachetools==8.0.2 \
    uvicorn fastapi pytest hypothesis numpy triton
  "$venv/bin/python" -m pip install -q --no-deps -e .
fi
"$venv/bin/python" -c "import torch, transformers, verl, dgg_kernels; print('torch', torch.__version__, \
'verl', verl.__version__, 'transformers', transformers.__version__, 'dgg_kernels', dgg_kernels.__version__)"
echo "== venv ready after $((SECONDS - start)) s"

echo "== verl integration tests (world size 1 and 2, CPU, gloo)"
set +e
"$venv/bin/python" -m pytest -q tests/test_integrations_verl.py
rc=$?
set -e
echo "== verl step: $((SECONDS - start)) s"
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
