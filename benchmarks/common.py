"""Shared pieces of the benchmarks: device/version stamp, timing, host-sync counting, results, plots.

Both benchmark scripts run in two modes:
- GPU mode (a CUDA device): times with CUDA events (triton.testing.do_bench for
  kernels, synchronized wall clock for whole training steps) and counts host
  syncs with torch.cuda.set_sync_debug_mode("warn").
- CPU mode (no CUDA, the default here and in CI): small sizes, perf_counter
  timing, and a host-read *proxy* count (Tensor.item/bool/float/int/tolist/cpu/
  numpy are wrapped and counted) because sync debug mode exists only on CUDA.
  CPU numbers check that the code paths run and the files are well formed;
  they say nothing about the GPU goals.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

# Without CUDA the Triton backend can only run under the interpreter, and that
# must be decided before triton is first imported (as tests/conftest.py does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dgg_kernels import _cli  # noqa: E402  (after TRITON_INTERPRET is decided)

# The flag checks every command line shares, the demo's too (they live in dgg_kernels/_cli.py because the demo is
# installed without the benchmarks): argparse types that refuse a bad value naming the flag, and the --out check.
integer, number, fraction, names, int_list = _cli.integer, _cli.number, _cli.fraction, _cli.names, _cli.int_list
writable_dir, writable_file, readable_file = _cli.writable_dir, _cli.writable_file, _cli.readable_file
check_device = _cli.device
new_parser = _cli.parser

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"  # the committed results: write here only on purpose (--out)
NOT_MEASURED_CPU = "not measured (no GPU this session)"


TEMP_OUT = Path(tempfile.gettempdir()) / "dgg-kernels-bench"


def default_out_dir() -> Path:
    """Where results go without --out: $DGG_BENCH_OUT if set, else TEMP_OUT.

    Outside the source tree, so a run never leaves untracked files in a checkout
    or overwrites the committed results by accident.
    """
    return Path(os.environ.get("DGG_BENCH_OUT") or TEMP_OUT)


def base_parser(doc: str, quick_help: str, budget_what: str, reserve_s: float):
    """The flags every benchmark script shares: --device, --quick, --out, --budget-s, --reserve-s.

    No abbreviations (a --quick preset must never win over a flag the user meant to give); parse the command
    line with ``parse``, which also checks --device and --out before any work.
    """
    ap = _cli.parser(doc)
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu; default), cuda or cpu")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    add_out_argument(ap)
    ap.add_argument("--budget-s", type=number(0, lo_open=True), default=None,
                    help=f"stop starting new {budget_what} after this many seconds (> 0; default: no limit)")
    ap.add_argument("--reserve-s", type=number(0), default=reserve_s,
                    help=f"seconds of the budget kept back for writing results (>= 0; default {reserve_s:g})")
    return ap


def add_out_argument(ap) -> None:
    """The --out flag every benchmark script takes (--out-dir: its older name)."""
    ap.add_argument("--out", "--out-dir", dest="out", type=Path, default=default_out_dir(), metavar="DIR",
                    help=f"folder for the results, created (and test-written) before any work if missing (default: "
                         f"$DGG_BENCH_OUT if set, else {TEMP_OUT}); pass {RESULTS_DIR.relative_to(REPO)} to replace "
                         "the committed ones")


def parse(ap, argv=None):
    """``ap.parse_args(argv)``, then the checks that need more than one flag's text, all before any work:
    --device names a device this machine has, and the --out folder exists (created) and takes a file.
    Any problem exits with status 2 and a message naming the flag."""
    args = ap.parse_args(argv)
    if hasattr(args, "device"):
        check_device(ap, args.device, auto=True)
    if hasattr(args, "out"):
        args.out = writable_dir(ap, args.out)
    return args


def analysed(json_path: Path, payload: dict, key: str, fn: Callable[[], object]):
    """``payload[key] = fn()`` and the JSON at ``json_path`` rewritten with it.

    Write the raw results to ``json_path`` first: when ``fn`` (an analysis: goals, a best pick) raises, the
    raw results stay on disk, the log says where, and the error propagates (a non-zero exit).
    """
    try:
        payload[key] = fn()
    except Exception:
        log(f"computing {key!r} failed; the raw results are kept in {json_path}")
        raise
    write_json(json_path, payload)
    return payload[key]


# ----------------------------------------------------------------------------- stamp
def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:  # triton absent or broken: the stamp says so instead of failing
        return None


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"CPU ({proc}, {os.cpu_count()} logical cores)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe device tag: 'nvidia-h100-80gb-hbm3', or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def stamp(device: torch.device, mode: str) -> dict:
    """Who/what/when of a run; written at the top of every results file."""
    now = _dt.datetime.now(_dt.timezone.utc)
    import dgg_kernels

    s = {
        "device": device_name(device),
        "device_type": device.type,
        "mode": mode,
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dgg_kernels": dgg_kernels.__version__,
        "git": git_commit(),
        "zclip": package_version("zclip"),
        "transformers": package_version("transformers"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        s["sm_count"] = props.multi_processor_count
        s["gpu_mem_GiB"] = round(props.total_memory / 2**30, 1)
        s["l2_MB"] = round(getattr(props, "L2_cache_size", 0) / 1e6, 1)
    return s


def pick_device(arg: str) -> torch.device:
    """The device --device names (already checked by ``parse``)."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return dev


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
             cpu_reps: int = 10, cpu_warmup: int = 2) -> float:
    """Median milliseconds of one call of ``fn``.

    CUDA: triton.testing.do_bench (CUDA events around each call, an L2 flush
    between calls, median).  A peer that reads the host inside ``fn`` leaves the
    GPU idle until it has enqueued the end event, so its time includes that
    round trip: the cost it puts on a training step.
    CPU: perf_counter around each call, median of ``cpu_reps``.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(cpu_warmup):
        fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def wall_ms_per_call(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Synchronized wall clock of ``n`` back-to-back calls, per call (whole training steps)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / n


def read_bandwidth_GBps(device: torch.device, nbytes: int) -> tuple[float, float]:
    """The read-bandwidth floor of this run: bytes of a big fp32 tensor / median time of tensor.sum().

    Random data (zeros could be special-cased by no one, but we never time on zeros).
    Returns (GB/s, bytes used).
    """
    n = nbytes // 4
    x = torch.rand(n, device=device)
    ms = bench_ms(lambda: x.sum(), device, warmup_ms=50, rep_ms=300, cpu_reps=5)
    x = None  # frees it before empty_cache; rebound, not del'd: the lambda above shares it
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n * 4 / (ms * 1e-3) / 1e9, n * 4


def bootstrap_ci(xs: list[float], stat: Callable[[list[float]], float] = statistics.median, n: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``stat`` over ``xs`` (resampled with replacement, fixed seed)."""
    if not xs:
        return (math.nan, math.nan)
    if len(xs) == 1:
        return (xs[0], xs[0])
    rng = random.Random(seed)
    k = len(xs)
    reps = sorted(stat([xs[rng.randrange(k)] for _ in range(k)]) for _ in range(n))
    tail = (1 - level) / 2
    return reps[int(tail * n)], reps[min(n - 1, int((1 - tail) * n))]


def gate_open_threshold() -> float:
    """A threshold that keeps a gate open on finite gradients: float("inf") (the observer mode) where GateConfig
    takes it, else 1e9, which no z in these benchmarks comes near."""
    from dgg_kernels.config import GateConfig

    try:
        GateConfig(threshold=float("inf"))
        return float("inf")
    except ValueError:
        return 1e9


# ----------------------------------------------------------------------------- host syncs
_HOST_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def _count_host_reads_cpu(counter: list):
    """Wrap the Tensor methods that copy a value to the host and count their calls.

    Only a proxy for CPU runs (there is no device to sync with): it sees the
    same Python-level reads that would each be a sync on CUDA.  Reads made inside
    C++ (none in the code measured here) would not be seen.
    """
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READ_METHODS if hasattr(torch.Tensor, name)}
    # Names torch.Tensor inherits from the C base must be deleted afterwards, not
    # set back: a Python-level copy would shadow the C slot and slow every later op.
    own = {name for name in originals if name in torch.Tensor.__dict__}
    depth = [0]

    def wrap(orig):
        def counted(self, *a, **k):
            if depth[0] == 0:  # a read that calls another (float() -> item()) counts once
                counter[0] += 1
            depth[0] += 1
            try:
                return orig(self, *a, **k)
            finally:
                depth[0] -= 1

        return counted

    try:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, wrap(orig))
        yield
    finally:
        for name, orig in originals.items():
            if name in own:
                setattr(torch.Tensor, name, orig)
            else:
                delattr(torch.Tensor, name)


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Host syncs in one call of ``fn`` (already warmed up), and how they were counted."""
    if device.type == "cuda":
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        n = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
        sync(device)
        return n, "cuda sync_debug_mode=warn"
    counter = [0]
    with _device_form(), _count_host_reads_cpu(counter):
        fn()
    return counter[0], "cpu proxy: Tensor host-read calls, the torch backend in its device form"


@contextlib.contextmanager
def _device_form():
    """The torch backend's CPU-only host paths off: the decision read and the finalize on host numbers run only
    for state in host memory (where there is no device to wait for) and never on an accelerator, so the proxy
    counts what the step would read on one."""
    from dgg_kernels.backends import torch_ref as TR

    saved = TR.host_state, TR.host_value
    TR.host_state, TR.host_value = (lambda state: False), (lambda t: None)
    try:
        yield
    finally:
        TR.host_state, TR.host_value = saved


# ----------------------------------------------------------------------------- formatting
def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -(digits)):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """A Markdown table (also readable on stdout) of ``rows`` with (key, header) columns."""
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def goal(name: str, target: str, met: bool | None, detail: str) -> dict:
    """One goal line: met True/False, or None with the reason it was not measured."""
    status = "met" if met is True else "missed" if met is False else "not measured"
    return {"goal": name, "target": target, "status": status, "detail": detail}


def goals_markdown(goals: list[dict]) -> str:
    lines = ["| goal | target | status | detail |", "|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | {g['target']} | **{g['status']}** | {g['detail']} |")
    return "\n".join(lines)


def stamp_markdown(s: dict) -> str:
    keys = ["device", "mode", "date", "time_utc", "torch", "triton", "cuda", "python", "dgg_kernels", "git",
            "zclip", "transformers", "triton_interpret", "sm_count", "gpu_mem_GiB", "l2_MB"]
    return "\n".join(f"- {k}: {fmt(s.get(k))}" for k in keys if k in s)


# ----------------------------------------------------------------------------- results
def results_paths(out_dir: Path, name: str, s: dict) -> dict[str, Path]:
    base = f"{name}_{device_slug_from_stamp(s)}_{s['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return {ext: out_dir / f"{base}.{ext}" for ext in ("json", "md", "png")}


def device_slug_from_stamp(s: dict) -> str:
    if s["device_type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", s["device"].lower()).strip("-")


def _jsonable(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)  # strict JSON has no NaN/inf
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return v


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except Exception:
        return False


def plot_time_vs_size(path: Path, rows: list[dict], floor_GBps: float, title: str, impls: Iterable[str]) -> bool:
    """Time vs gradient size per implementation, one panel per dtype, with the read-bandwidth floor as a line.

    Returns False (and writes nothing) when matplotlib is missing: it is an optional extra.
    """
    if not have_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        sub = [r for r in rows if r["dtype"] == dt]
        sizes = sorted({r["MB"] for r in sub})
        for impl in impls:
            pts = sorted((r["MB"], r["ms"]) for r in sub if r["impl"] == impl and isinstance(r.get("ms"), float))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl)
        if sizes and floor_GBps:
            ax.plot(sizes, [mb * 1e6 / (floor_GBps * 1e9) * 1e3 for mb in sizes], "k--", lw=1.5,
                    label=f"read floor ({floor_GBps:.0f} GB/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient size (MB)")
        ax.set_ylabel("median time per gate step (ms)")
        ax.set_title(f"{dt}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class Budget:
    """A wall-clock budget: the GPU suite has 10 minutes for everything, so scripts stop starting new work in time."""

    def __init__(self, seconds: float | None):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)

    def exhausted(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)
