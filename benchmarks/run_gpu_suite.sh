#!/usr/bin/env bash
# The whole GPU check in ONE device call (10-minute limit, no network):
#   GPU tests (pytest -m gpu), benchmarks/overhead.py, benchmarks/train_step.py,
# each bounded in time, with logs and results written under $OUT (at most 8
# files come back, so the full results travel as one tarball).
#
#   bash benchmarks/run_gpu_suite.sh        # from the repo root, on the device machine
#
# Where things go (nothing lands in the checkout but the in-place csrc build):
#   $OUT            summary, logs, overhead.md, train_step.md, results.tgz
#                   (default /tmp/dgg_out; the device tool sets it)
#   $DGG_BENCH_OUT  the folder overhead.py and train_step.py write their
#                   json/md/png into, passed to them as --out (default: a fresh
#                   /tmp/dgg_results.XXXX); results.tgz packs it
#
# Optional packages (zclip, transformers and its dependencies, matplotlib) travel
# as wheels in .whl/ at the repo root; they are installed without network into
# /tmp/site.  Without them the ZClip row is n/a, train_step falls back to the
# built-in decoder, and no PNG is drawn: everything else still runs.
# Time budgets (seconds) can be overridden: T_BUILD, T_TESTS, T_OVERHEAD, T_TRAIN.
# PHASES picks what runs (default: all, about 11 minutes, more than one call):
#   PHASES="build tests sanitize" bash benchmarks/run_gpu_suite.sh   # call 1
#   PHASES="build overhead train" bash benchmarks/run_gpu_suite.sh   # call 2 (build is a no-op when warm)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dgg_out}
mkdir -p "$OUT"
RES=${DGG_BENCH_OUT:-$(mktemp -d /tmp/dgg_results.XXXX)}
mkdir -p "$RES"
PHASES=${PHASES:-build tests sanitize overhead train}
want() { [[ " $PHASES " == *" $1 "* ]]; }
T_BUILD=${T_BUILD:-240}
T_TESTS=${T_TESTS:-150}
T_OVERHEAD=${T_OVERHEAD:-240}
T_TRAIN=${T_TRAIN:-150}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SUMMARY="$OUT/summary.txt"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$SUMMARY"; }

{
  echo "== dgg-kernels GPU suite $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
} > "$SUMMARY"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$SUMMARY" 2>&1 \
    && stamp "installed wheels: $(ls .whl | tr '\n' ' ')" || stamp "wheel install failed (see above)"
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  stamp "no .whl/ folder: zclip/transformers/matplotlib rows fall back (n/a, built-in decoder, no plot)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - >> "$SUMMARY" 2>&1 <<'EOF'
import importlib, importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "zclip", "transformers", "matplotlib"):
    try:
        importlib.import_module(m)
        print(m, importlib.metadata.version(m))
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, e)
EOF

if want build; then
  # The csrc extension, ahead of time and in place (dgg_kernels/_C*.so is git-ignored,
  # so a warm machine keeps it between calls); without it backend="cuda" would
  # spend the test budget on a just-in-time build.
  stamp "build csrc (limit ${T_BUILD}s)"
  MAX_JOBS=16 timeout -k 10 "$T_BUILD" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  stamp "build exit $? : $(ls dgg_kernels/_C*.so 2>/dev/null || echo 'no _C built')"
fi

if want tests; then
  stamp "GPU tests (limit ${T_TESTS}s)"
  timeout -k 10 "$T_TESTS" python3 -m pytest -m gpu -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
  stamp "pytest -m gpu exit $? : $(tail -n 1 "$OUT/pytest_gpu.log")"
fi

if want sanitize; then
  stamp "compute-sanitizer memcheck on a short cuda-backend run"
  timeout -k 10 120 compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize_cuda.py \
    > "$OUT/sanitizer.log" 2>&1
  stamp "memcheck exit $? : $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1)"
fi

# Each script stops starting new work at its --budget-s and still writes its results.
if want overhead; then
  stamp "overhead.py (limit ${T_OVERHEAD}s)"
  timeout -k 10 "$T_OVERHEAD" python3 benchmarks/overhead.py --budget-s $(( T_OVERHEAD - 45 )) --out "$RES" \
    > "$OUT/overhead.log" 2>&1
  stamp "overhead.py exit $?"
fi

if want train; then
  stamp "train_step.py (limit ${T_TRAIN}s)"
  timeout -k 10 "$T_TRAIN" python3 benchmarks/train_step.py --budget-s $(( T_TRAIN - 30 )) --out "$RES" \
    > "$OUT/train_step.log" 2>&1
  stamp "train_step.py exit $?"
fi

# The two Markdown summaries come back as files to read at once; everything
# (json, md, png) also goes in one tarball to unpack into benchmarks/results/.
cp "$RES"/overhead_*.md "$OUT/overhead.md" 2>/dev/null || true
cp "$RES"/train_step_*.md "$OUT/train_step.md" 2>/dev/null || true
tar -czf "$OUT/results.tgz" -C "$RES" . && stamp "results.tgz: $(ls "$RES" | tr '\n' ' ')"
stamp "done: logs and summaries in $OUT, benchmark results in $RES"
