"""The torch backend on a CPU: gate.step() against a plain vector_norm of the same gradient, open and closed.

    python benchmarks/torch_backend_cpu.py                       # fp32/bf16/fp16, 8-512 MiB, one thread
    python benchmarks/torch_backend_cpu.py --quick               # 8 and 16 MiB, 3 reps (seconds)
    python benchmarks/torch_backend_cpu.py --out benchmarks/results   # replace the committed table

One monitor gradient of SIZE MiB (shape rows x 4096) per row; monitor == params, as for an lm_head gated
alone, and the gate's default settings with backend="torch".  Three calls are timed, interleaved, in
every repetition (one call per timing, after warm-up; medians reported), each after an untimed read of a
buffer of twice the last-level cache (at least 64 MiB), so that no call finds its gradient or its code in
cache, as in training, where a forward and backward pass run between two steps (without it a 16 MiB
gradient partly stays in a 32 MiB L3 from one call to the next, and the row measures the cache):

- vector_norm: torch.linalg.vector_norm(g) of the open gate's gradient (no dtype argument: the fast
  path torch has for fp32 and bf16; fp16 has none on CPU);
- open: gate.step() with threshold=inf on that same gradient (randn data; every timed step is checked to
  have stayed open);
- closed: gate.step() of a second gate on its own gradient of the same size, whose first entry is set to
  NaN (untimed) before each timed step, so every timed step closes and writes zeros (checked).  After the
  first close that gradient holds zeros and the NaN; the reduction and the zero write cost the same on
  any values.

The reduction the backend takes is in the table: float32 is read in place; bfloat16 and float16 from 2**22
entries go through one torch.compile'd pass (compiled once per dtype, in the first step of the first row:
"first step s"); TORCHDYNAMO_DISABLE=1 measures the chunked eager path instead.

Ratios are median(step) / median(vector_norm).  The goals: open <= 1.5x at fp32 and <= 2x at bf16/fp16,
closed <= 2.5x, from 16 MiB up.  Writes torch_backend_cpu_<date>.{json,md} into --out.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES_MIB = [8, 16, 32, 64, 128, 256, 512]
QUICK_SIZES_MIB = [8, 16]
COLS = 4096  # the gradient's row length (an lm_head's hidden size)
GOAL_FROM_MIB = 16
OPEN_GOAL = {"float32": 1.5, "bfloat16": 2.0, "float16": 2.0}
CLOSED_GOAL = 2.5
CLOCKS = ("auto", "cpu", "wall")


def build_parser():
    """The command line; every flag says what it does."""
    ap = C.base_parser(__doc__, "8 and 16 MiB, 3 timed repetitions (a smoke run of seconds)", "sizes", 5.0)
    ap.add_argument("--dtypes", type=C.names(DTYPES, "dtype", allow_empty=False), default="float32,bfloat16,float16",
                    help=f"comma-separated gradient dtypes, of {', '.join(DTYPES)} (default: all three)")
    ap.add_argument("--sizes-mib", type=C.int_list(1), default=None,
                    help="comma-separated gradient sizes in MiB (>= 1; default "
                         f"{','.join(map(str, SIZES_MIB))}, with --quick {','.join(map(str, QUICK_SIZES_MIB))})")
    ap.add_argument("--reps", type=C.integer(1), default=None,
                    help="timed repetitions per row, each timing every call once, interleaved (>= 1; default 9, 3 "
                         "with --quick)")
    ap.add_argument("--warmup", type=C.integer(0), default=2,
                    help="untimed repetitions before timing (>= 0; default 2)")
    ap.add_argument("--threads", type=C.integer(1), default=1,
                    help="torch.set_num_threads for the run (>= 1; default 1, the steadiest on a shared machine)")
    ap.add_argument("--clock", choices=CLOCKS, default="auto",
                    help="what a call's time is: 'cpu' (time.thread_time of the calling thread: time the thread "
                         "ran, so other tenants' processes on a shared machine do not inflate it; one thread "
                         "only), 'wall' (time.perf_counter) or 'auto' (default: cpu with --threads 1, else wall); "
                         "both are recorded, this one is the table's")
    return ap


def cpu_model() -> str:
    """The CPU model named in /proc/cpuinfo (else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _load_avg() -> float | None:
    """The 1-minute load average (how busy a shared machine was), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _gate(param: torch.nn.Parameter, threshold: float):
    import dgg_kernels as dgg

    return dgg.DynamicGradientGate(param, backend="torch", threshold=threshold)


def _llc_bytes() -> int | None:
    """The last-level cache's size in bytes as Linux reports it for CPU 0, None elsewhere."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes) if sizes else None


def flush_buffer() -> torch.Tensor:
    """A float32 buffer of 2x the last-level cache (at least 64 MiB): reading it evicts what the cache held."""
    nbytes = max(64 * 2**20, 2 * (_llc_bytes() or 0))
    return torch.ones(nbytes // 4)


def _timed(fn) -> tuple[dict, object]:
    """One call of ``fn``: ({"cpu": ms the calling thread ran, "wall": ms of wall clock}, its result)."""
    c0, w0 = time.thread_time(), time.perf_counter()
    out = fn()
    w1, c1 = time.perf_counter(), time.thread_time()
    return {"cpu": (c1 - c0) * 1e3, "wall": (w1 - w0) * 1e3}, out


def _reduction_path(g: torch.Tensor) -> str:
    """Which CPU reduction TorchBackend used for ``g`` (docs/semantics.md, "The torch backend's cost")."""
    from dgg_kernels.backends import compiled_sumsq

    if g.dtype == torch.float32:
        return "in place"
    if compiled_sumsq.applies(g) and compiled_sumsq.rows_sumsq(compiled_sumsq.split_rows(g.view(-1))[0]) is not None:
        return "compiled"  # asked again after the timing: it ran (not declined, not failed)
    return "chunked"


def measure_row(dtype_name: str, mib: int, reps: int, warmup: int, clock: str, flush: torch.Tensor) -> dict:
    """One (dtype, size) row: median ms of vector_norm, an open step and a closed step, timed interleaved.

    Two diagnostic calls are timed in the same repetitions: the backend's reduction alone on the open
    gradient, and a whole open step on a 16-entry gradient (what a step costs besides reading the gradient:
    the input checks, the finalize, the decision copy).
    """
    dtype = DTYPES[dtype_name]
    esize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, mib * 2**20 // (COLS * esize))
    shape = (rows, COLS)
    p_open = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
    p_open.grad = torch.randn(shape, dtype=dtype)
    p_closed = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
    p_closed.grad = torch.randn(shape, dtype=dtype)
    p_tiny = torch.nn.Parameter(torch.empty(16, dtype=dtype))
    p_tiny.grad = torch.randn(16, dtype=dtype)
    g_open, g_closed, g_tiny = _gate(p_open, math.inf), _gate(p_closed, math.inf), _gate(p_tiny, math.inf)
    grad = p_open.grad
    flat_closed = p_closed.grad.view(-1)
    backend, state, config = g_open._backend, g_open.state, g_open.config

    calls = {
        "vector_norm": lambda: torch.linalg.vector_norm(grad),
        "open": g_open.step,
        "closed": g_closed.step,
        "reduce": lambda: backend.reduce([grad], state, config),
        "tiny_step": g_tiny.step,
    }
    times = {k: {"cpu": [], "wall": []} for k in calls}
    decisions = {"open": [], "closed": []}
    first_step_s = _timed(g_open.step)[0]["wall"] / 1e3  # untimed in the medians: a compile happens here
    for i in range(warmup + reps):
        for name, fn in calls.items():
            if name == "closed":
                flat_closed[0] = math.nan  # untimed: this step's energy is NaN, so it must close
            flush.sum()  # untimed: the cache holds the flush buffer, not this call's data
            t, out = _timed(fn)
            if i < warmup:
                continue
            for k in ("cpu", "wall"):
                times[name][k].append(t[k])
            if name in decisions:
                decisions[name].append(out)
    # read after the timing: every timed open step stayed open, every closed one closed and zeroed its grad
    all_open = not any(bool(d) for d in decisions["open"])
    all_closed = all(bool(d) for d in decisions["closed"])
    zeroed = bool((p_closed.grad == 0).all())
    med = {k: {c: statistics.median(v[c]) for c in ("cpu", "wall")} for k, v in times.items()}
    m = {k: v[clock] for k, v in med.items()}
    return {
        "dtype": dtype_name, "MiB": mib, "shape": list(shape), "reps": reps, "clock": clock,
        "vector_norm_ms": m["vector_norm"], "open_ms": m["open"], "closed_ms": m["closed"],
        "open_ratio": m["open"] / m["vector_norm"], "closed_ratio": m["closed"] / m["vector_norm"],
        "reduce_ms": m["reduce"], "reduce_ratio": m["reduce"] / m["vector_norm"], "tiny_step_ms": m["tiny_step"],
        "reduction": _reduction_path(grad), "first_step_s": first_step_s,
        "medians_ms": med,
        "min_ms": {k: {c: min(v[c]) for c in ("cpu", "wall")} for k, v in times.items()},
        "vector_norm_GBps": rows * COLS * esize / (m["vector_norm"] * 1e-3) / 1e9,
        "checked": "ok" if (all_open and all_closed and zeroed) else
        f"FAILED (open steps all open: {all_open}, closed all closed: {all_closed}, zeroed: {zeroed})",
    }


def evaluate_goals(rows: list[dict]) -> list[dict]:
    """The bars, over the rows from GOAL_FROM_MIB up: worst open ratio per dtype, worst closed ratio overall."""
    goals = []
    big = [r for r in rows if r["MiB"] >= GOAL_FROM_MIB and r["checked"] == "ok"]
    for dt, bar in OPEN_GOAL.items():
        mine = [r for r in big if r["dtype"] == dt]
        if not mine:
            goals.append(C.goal(f"open step, {dt}", f"<= {bar}x vector_norm", None, "no row measured"))
            continue
        worst = max(mine, key=lambda r: r["open_ratio"])
        goals.append(C.goal(f"open step, {dt}", f"<= {bar}x vector_norm", worst["open_ratio"] <= bar,
                            f"worst {worst['open_ratio']:.2f}x at {worst['MiB']} MiB"))
    if big:
        worst = max(big, key=lambda r: r["closed_ratio"])
        goals.append(C.goal("closed step", f"<= {CLOSED_GOAL}x vector_norm", worst["closed_ratio"] <= CLOSED_GOAL,
                            f"worst {worst['closed_ratio']:.2f}x ({worst['dtype']}, {worst['MiB']} MiB)"))
    else:
        goals.append(C.goal("closed step", f"<= {CLOSED_GOAL}x vector_norm", None, "no row measured"))
    bad = [f"{r['dtype']} {r['MiB']} MiB" for r in rows if r["checked"] != "ok"]
    goals.append(C.goal("every timed step as intended", "open stayed open, closed closed and zeroed",
                        not bad, "all rows" if not bad else "failed: " + ", ".join(bad)))
    return goals


def main(argv=None) -> int:
    ap = build_parser()
    args = C.parse(ap, argv)  # every flag, --device and --out checked before any work
    device = C.pick_device(args.device)
    if device.type != "cpu":
        ap.error(f"--device {args.device}: this benchmark measures the CPU (give --device cpu or leave it auto on "
                 "a machine without CUDA); benchmarks/overhead.py measures GPUs")
    sizes = args.sizes_mib or (QUICK_SIZES_MIB if args.quick else SIZES_MIB)
    reps = args.reps or (3 if args.quick else 9)
    torch.set_num_threads(args.threads)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if args.threads == 1 else "wall"
    elif clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu times the calling thread only: use it with --threads 1 (or --clock wall)")
    budget = C.Budget(args.budget_s)

    stamp = C.stamp(device, "quick" if args.quick else "cpu")
    stamp.update(cpu_model=cpu_model(), torch_threads=torch.get_num_threads(), clock=clock,
                 load_avg_1min_start=_load_avg())
    C.log(f"torch_backend_cpu: {stamp['cpu_model']}, torch {stamp['torch']}, triton {stamp['triton']}, "
          f"{stamp['torch_threads']} thread(s)")
    flush = flush_buffer()
    stamp.update(llc_bytes=_llc_bytes(), flush_MiB=flush.numel() * 4 / 2**20)
    rows: list[dict] = []
    for dtype_name in args.dtypes:
        for mib in sizes:
            if budget.exhausted(args.reserve_s):
                C.log(f"budget spent: {dtype_name} {mib} MiB and later rows not measured")
                break
            row = measure_row(dtype_name, mib, reps, args.warmup, clock, flush)
            row.update(machine=stamp["cpu_model"], date=stamp["date"], torch=stamp["torch"],
                       triton=stamp["triton"], threads=stamp["torch_threads"])
            rows.append(row)
            C.log(f"{dtype_name:>8} {mib:4d} MiB  vector_norm {row['vector_norm_ms']:8.2f} ms  open "
                  f"{row['open_ms']:8.2f} ms ({row['open_ratio']:.2f}x)  closed {row['closed_ms']:8.2f} ms "
                  f"({row['closed_ratio']:.2f}x)  reduce {row['reduce_ratio']:.2f}x  16-entry step "
                  f"{row['tiny_step_ms']:.2f} ms  {row['checked']}")

    stamp["load_avg_1min_end"] = _load_avg()
    name = f"torch_backend_cpu_{stamp['date']}"
    paths = {ext: args.out / f"{name}.{ext}" for ext in ("json", "md")}
    payload = {
        "benchmark": "torch_backend_cpu",
        "label": "CPU",
        "stamp": stamp,
        "method": {
            "gradient": f"one monitor gradient (rows x {COLS}), monitor == params, randn data",
            "gate": "DynamicGradientGate(param, backend='torch', threshold=inf), other settings the defaults",
            "vector_norm": "torch.linalg.vector_norm(g) of the open gate's gradient, no dtype argument",
            "closed": "a second gate and gradient; its first entry set to NaN (untimed) before each timed step",
            "timing": f"{args.warmup} warm-up then {reps} timed repetitions, the calls interleaved in each; "
                      "medians; ratio = median(step) / median(vector_norm)",
            "cache": f"cold: before every call (untimed) a read of {stamp['flush_MiB']:.0f} MiB (2x the "
                     f"last-level cache of {(stamp['llc_bytes'] or 0) / 2**20:.0f} MiB, at least 64 MiB)",
            "clock": f"{clock}: " + ("time.thread_time around one call (CPU time of the one calling thread: "
                                      "descheduled time, when other tenants' processes run, is left out; cache "
                                      "and memory-bandwidth contention are not)" if clock == "cpu" else
                                      "time.perf_counter around one call") + "; rows' medians_ms hold both clocks",
            "reduce": "TorchBackend.reduce alone on the open gradient (diagnostic)",
            "reduction": "the CPU reduction the torch backend took: 'in place' (float32), 'compiled' (bfloat16 and "
                         "float16 from 2**22 entries: one torch.compile'd pass, traced once per dtype) or 'chunked' "
                         "(widened through a 2 MiB float32 scratch; also what TORCHDYNAMO_DISABLE=1 measures)",
            "first step": "wall seconds of the open gate's first step, before the warm-up: where the one-time "
                          "compile of the compiled reduction shows (first row of a dtype; later rows reuse it)",
            "tiny step": "an open gate.step() on a 16-entry gradient: the per-step cost that does not grow with "
                         "the gradient (input checks, finalize, decision copy; diagnostic)",
            "threads": f"torch.set_num_threads({stamp['torch_threads']})",
        },
        "rows": rows,
    }
    C.write_json(paths["json"], payload)  # the raw results first
    goals = C.analysed(paths["json"], payload, "goals", lambda: evaluate_goals(rows))
    cols = [("dtype", "dtype"), ("MiB", "MiB"), ("vector_norm_ms", "vector_norm ms"), ("open_ms", "open step ms"),
            ("open_ratio", "open / vn"), ("closed_ms", "closed step ms"), ("closed_ratio", "closed / vn"),
            ("reduce_ratio", "reduce / vn"), ("reduction", "reduction"), ("tiny_step_ms", "16-entry step ms"),
            ("first_step_s", "first step s"),
            ("vector_norm_GBps", "vector_norm GB/s"), ("checked", "checked")]
    md = "\n\n".join([
        f"# The torch backend on a CPU: gate.step() against vector_norm ({stamp['date']})",
        f"CPU. Machine: {stamp['cpu_model']}; {stamp['torch_threads']} torch thread(s); torch {stamp['torch']}, "
        f"triton {stamp['triton']}; medians of {reps} timed repetitions after {args.warmup} warm-up; clock: "
        f"{clock} ({'thread CPU time' if clock == 'cpu' else 'wall'}); 1-minute load average "
        f"{stamp['load_avg_1min_start']} at the start, {stamp['load_avg_1min_end']} at the end "
        f"({os.cpu_count()} logical cores).",
        C.stamp_markdown(stamp),
        "## Goals (from 16 MiB up)\n\n" + C.goals_markdown(goals),
        "## Median ms per call\n\n" + C.table(rows, cols),
        "## Method\n\n" + "\n".join(f"- {k}: {v}" for k, v in payload["method"].items()),
    ])
    paths["md"].write_text(md + "\n")
    print(md)
    C.log(f"results written to {args.out.resolve()}: {paths['json'].name}, {paths['md'].name}")
    return 0 if all(r["checked"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
