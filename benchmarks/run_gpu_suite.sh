#!/usr/bin/env bash
# The GPU check in device calls of at most 10 minutes each (no network):
#   GPU tests (pytest -m gpu), compute-sanitizer, benchmarks/host_time.py,
#   benchmarks/overhead.py, benchmarks/train_step.py, benchmarks/sweep_triton.py,
# each bounded in time, with logs and results written under $OUT (at most 8
# files come back from a call, so the full results travel as one tarball).
#
#   bash benchmarks/run_gpu_suite.sh        # from the repo root, on the device machine
#
# Where things go (nothing lands in the checkout but the in-place csrc build):
#   $OUT            summary.txt, build/test/sanitizer logs, one Markdown summary per
#                   benchmark (host_time.md, overhead.md, train_step.md,
#                   sweep_triton.md) and results.tgz (default /tmp/dgg_out; the
#                   device tool sets it)
#   $DGG_BENCH_OUT  the folder the benchmark scripts write their json/md/png and
#                   logs into, passed to them as --out (default: a fresh
#                   /tmp/dgg_results.XXXX); results.tgz packs it, with
#                   auto_table.py: backend="auto"'s table rebuilt from this run's
#                   overhead json, to compare with dgg_kernels/backends/auto_table.py
#
# Optional packages (zclip, transformers and its dependencies, matplotlib) travel
# as wheels in .whl/ at the repo root; they are installed without network into
# /tmp/site.  Without them the ZClip row is n/a, train_step falls back to the
# built-in decoder, and no PNG is drawn: everything else still runs.
# Time budgets (seconds) can be overridden: T_BUILD, T_TESTS, T_HOST, T_OVERHEAD,
# T_TRAIN, T_SWEEP.
# PHASES picks what runs (default: all, more than one call):
#   PHASES="build tests sanitize" bash benchmarks/run_gpu_suite.sh            # call 1: correctness
#   PHASES="build hosttime overhead train" bash benchmarks/run_gpu_suite.sh   # call 2: every goal number (~8.5 min)
#   PHASES="build sweep" bash benchmarks/run_gpu_suite.sh                     # call 3: the Triton launch sweep
# (build is a no-op when the machine is still warm from an earlier call.)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dgg_out}
mkdir -p "$OUT"
RES=${DGG_BENCH_OUT:-$(mktemp -d /tmp/dgg_results.XXXX)}
mkdir -p "$RES"
PHASES=${PHASES:-build tests sanitize hosttime overhead train sweep}
want() { [[ " $PHASES " == *" $1 "* ]]; }
T_BUILD=${T_BUILD:-240}
T_TESTS=${T_TESTS:-150}
T_HOST=${T_HOST:-60}
T_OVERHEAD=${T_OVERHEAD:-240}
T_TRAIN=${T_TRAIN:-150}
T_SWEEP=${T_SWEEP:-300}
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
# Their logs go into $RES (so into results.tgz); summary.txt gets each log's last lines.
run_bench() {  # name, limit, script args...
  local name=$1 limit=$2
  shift 2
  stamp "$name (limit ${limit}s)"
  timeout -k 10 "$limit" python3 "$@" --out "$RES" > "$RES/$name.log" 2>&1
  local rc=$?
  stamp "$name exit $rc : $(tail -n 1 "$RES/$name.log")"
}

if want hosttime; then
  run_bench host_time "$T_HOST" benchmarks/host_time.py --budget-s $(( T_HOST - 15 ))
fi

if want overhead; then
  run_bench overhead "$T_OVERHEAD" benchmarks/overhead.py --budget-s $(( T_OVERHEAD - 45 ))
  # backend="auto"'s table as this run would make it (compare before replacing the packaged one)
  json=$(ls -t "$RES"/overhead_*.json 2>/dev/null | head -n 1)
  if [ -n "$json" ]; then
    python3 benchmarks/make_auto_table.py "$json" --out "$RES/auto_table.py" >> "$SUMMARY" 2>&1 \
      && stamp "auto_table.py rebuilt from $(basename "$json")" || stamp "make_auto_table.py failed"
  fi
fi

if want train; then
  run_bench train_step "$T_TRAIN" benchmarks/train_step.py --budget-s $(( T_TRAIN - 30 ))
fi

if want sweep; then
  run_bench sweep_triton "$T_SWEEP" benchmarks/sweep_triton.py --budget-s $(( T_SWEEP - 30 ))
fi

# The Markdown summaries come back as files to read at once; everything
# (json, md, png, logs) also goes in one tarball to unpack into benchmarks/results/.
for name in host_time overhead train_step sweep_triton; do
  md=$(ls -t "$RES"/${name}_*.md 2>/dev/null | head -n 1)
  [ -n "$md" ] && cp "$md" "$OUT/$name.md"
done
tar -czf "$OUT/results.tgz" -C "$RES" . && stamp "results.tgz: $(ls "$RES" | tr '\n' ' ')"
stamp "done: logs and summaries in $OUT, benchmark results in $RES"
