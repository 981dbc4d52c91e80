"""Host time and device time of one open gate step on a 7B-class params list, against the peers users accept.

    python benchmarks/host_time.py                 # GPU mode on a CUDA machine, CPU mode otherwise
    python benchmarks/host_time.py --quick         # CPU smoke test (what tests/test_benchmarks.py runs)
    python benchmarks/host_time.py --out benchmarks/results

The params list is a Qwen2.5-7B-class model's 339 tensors (lm_head, 28 layers of
attention/MLP/norm weights and biases, embedding, final norm; bf16), every
dimension divided by --scale so it fits next to everything else (the tensor count,
which is what host time depends on, is kept).  The gate monitors lm_head.weight
and masks all 339 gradients, and stays open: its threshold is float("inf") (the
observer mode) where GateConfig accepts it, else 1e9, which no z reaches here.

Rows, each on the same gradients:
- ``dgg <backend> step() open``: ``gate.step()``, backends torch, triton, cuda;
- ``clip_grad_norm_ foreach``: ``torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)``;
- ``AdamW fused step``: ``torch.optim.AdamW(params, fused=True).step()``;
- ``get_total_norm foreach``: the norm alone.

Host time: wall clock (time.perf_counter) of each of --calls back-to-back calls
with no synchronization in between (the GPU runs behind; a sync before each
batch of calls keeps the launch queue from filling), median per call.  That is
what the Python/launch path adds to a CPU-bound training loop.
Device time (CUDA): the sum of the GPU kernel durations of one call, from
torch.profiler over --profile-calls calls, and the gate's mask kernel alone
(the open mask reads the decision and returns).  On a CPU the kernels run on the
host, so there is no separate device time and the host time includes the
arithmetic: CPU mode is a smoke test of the code path (labelled CPU; not
comparable to a GPU's).
Writes host_time_<device>_<date>.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402  (sets TRITON_INTERPRET=1 on CPU before triton loads)
from dgg_kernels.config import BACKENDS  # noqa: E402

GOAL_HOST_US = 50.0
GOAL_VS_CLIP = 0.5
GOAL_MASK_US = 10.0


def qwen7b_param_shapes(scale: int) -> list[tuple[int, ...]]:
    """The 339 parameter shapes of a Qwen2.5-7B-class model, every dimension divided by ``scale``; lm_head first."""
    h, inter, kv, vocab, layers = 3584 // scale, 18944 // scale, 512 // scale, 152064 // scale, 28
    per_layer = [(h, h), (h,), (kv, h), (kv,), (kv, h), (kv,), (h, h),  # q, q bias, k, k bias, v, v bias, o
                 (inter, h), (inter, h), (h, inter), (h,), (h,)]        # gate, up, down, 2 RMSNorms
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


def host_us(fn, device, calls: int, batches: int) -> list[float]:
    """Per-call wall-clock microseconds of ``calls`` back-to-back calls (no sync between), over ``batches``."""
    out = []
    for _ in range(batches):
        C.sync(device)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out.extend(t * 1e6 for t in ts)
    C.sync(device)
    return out


def device_us(fn, device, calls: int, mask_names=("mask",)) -> dict:
    """GPU kernel time of one call (sum over its kernels), and of the kernels whose name contains a mask name."""
    from torch.profiler import ProfilerActivity, profile

    C.sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        C.sync(device)
    total = mask = 0.0
    n_kernels = 0
    names = set()
    for e in prof.events():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        # a kernel's FunctionEvent: its own interval on the device (device_time_total is the same for them)
        tr = getattr(e, "time_range", None)
        us = float(tr.elapsed_us()) if tr is not None else float(getattr(e, "device_time_total", 0.0) or 0.0)
        if us <= 0:
            continue
        total += us
        n_kernels += 1
        names.add(e.name)
        if any(m in e.name.lower() for m in mask_names):
            mask += us
    return {"device_us": total / calls, "mask_device_us": mask / calls if mask else None,
            "kernels_per_call": n_kernels / calls, "kernels": sorted(names)[:12]}


def build_rows(device, args) -> list[dict]:
    """Every row: name, kind, and a zero-argument callable (built lazily so one failing row does not hide others)."""
    import dgg_kernels as dgg

    shapes = qwen7b_param_shapes(args.scale)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * 1e-3).to(device=device, dtype=dtype)
    lm_head = params[0]
    threshold = C.gate_open_threshold()
    rows = []

    def gate_row(backend):
        def make():
            gate = dgg.DynamicGradientGate(lm_head, params, backend=backend, threshold=threshold)
            return gate.step, gate

        return make

    def ops_row(how):
        """The gate's two ops on an open step, their implementations called directly (what eager step() does)
        or through torch's dispatcher (what a compiled graph does): the dispatcher's boxing of the lists."""
        def make():
            from dgg_kernels import inputs, ops

            gate = dgg.DynamicGradientGate(lm_head, params, backend="triton", threshold=threshold)
            st, c, k = gate.state, gate.config, gate._kernels
            grads = inputs.monitor_grads(gate.monitor, None, gate.device)
            zero = [p.grad for p in params]
            args = (grads, st.ring, st.prev, st.ints, st.stats, st.decision, st.acc, st.hyper, c.window,
                    c.statistic_id, c.max_reuse, k)
            run, mask = ((ops._step_impl, ops._mask_impl) if how == "called directly"
                         else (torch.ops.dgg.gate_step.default, torch.ops.dgg.gate_mask.default))
            return (lambda: (run(*args), mask(st.decision, zero, k))), gate

        return make

    for backend in args.backends:
        rows.append({"row": f"dgg {backend} step() open", "kind": "dgg", "backend": backend, "make": gate_row(backend)})
    if args.stub_launches:
        rows.append({"row": "dgg triton step() open, launches stubbed", "kind": "dgg-python", "backend": "triton",
                     "make": stubbed(gate_row("triton"))})
    if args.ops:
        rows += [{"row": f"dgg ops {how}, launches stubbed", "kind": "dgg-python", "backend": "triton",
                  "make": stubbed(ops_row(how))} for how in ("called directly", "through the dispatcher")]
    rows.append({"row": "clip_grad_norm_ foreach", "kind": "peer",
                 "make": lambda: (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), None)})
    if hasattr(torch.nn.utils, "get_total_norm"):
        rows.append({"row": "get_total_norm foreach", "kind": "peer",
                     "make": lambda: (lambda: torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True),
                                      None)})

    def adamw():
        opt = torch.optim.AdamW(params, lr=1e-12, fused=True)  # lr ~0: the params barely move between calls
        return opt.step, opt

    rows.append({"row": "AdamW fused step", "kind": "peer", "make": adamw})
    meta = {"tensors": len(params), "params_M": sum(p.numel() for p in params) / 1e6, "dtype": "bfloat16",
            "grad_MB": sum(p.numel() * p.element_size() for p in params) / 1e6, "scale": args.scale,
            "monitor": list(lm_head.shape), "threshold": threshold}
    return rows, meta, params


def stubbed(make):
    """``make`` with the Triton kernels replaced by no-op launchers that look compiled, so the direct-launch path
    runs: what remains is this package's Python per step (CPU only; --stub-launches)."""
    from dgg_kernels.backends import triton_launch as TL  # the launch layer: where the kernels are launched from

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: None

    class Kernel:
        def __init__(self, real):
            self.arg_names = real.arg_names  # launches pass every argument by name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled()

    def wrapped():
        for name in ("_gate_step_kernel", "_gate_mask_kernel", "_gate_finalize_kernel"):
            setattr(TL, name, Kernel(getattr(TL, name)))
        TL._CompiledKernel = Compiled
        torch.cuda.current_device = lambda: 0
        return make()

    return wrapped


def measure(device, mode, args, budget) -> tuple[list[dict], dict]:
    rows, meta, params = build_rows(device, args)
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "make"}
        out.append(row)
        if budget.exhausted(reserve=args.reserve_s):
            row["status"] = "skipped: time budget"
            continue
        if device.type != "cuda" and r.get("backend") == "cuda":
            row["status"] = "n/a: the cuda backend needs a CUDA device"
            continue
        try:
            fn, owner = r["make"]()
            if r.get("backend"):
                row["backend_used"] = owner.backend
            for _ in range(args.warmup):
                fn()
            C.sync(device)
            syncs, how = C.count_host_syncs(fn, device)
            ts = host_us(fn, device, args.calls, args.batches)
            row.update(host_us=statistics.median(ts), host_us_p10=_pct(ts, 10), host_us_p90=_pct(ts, 90),
                       calls=len(ts), host_syncs=syncs, syncs_counted_by=how, status="ok")
            if device.type == "cuda":
                try:
                    row.update(device_us(fn, device, args.profile_calls))
                except Exception as e:  # the profiler is optional: host time still stands
                    row["device_us_error"] = f"{type(e).__name__}: {e}"[:200]
            owner = fn = None
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {e}"[:300]
        C.log(f"  {row['row']:<28} host {C.fmt(row.get('host_us'))} us/call, device {C.fmt(row.get('device_us'))} "
              f"us/call, mask {C.fmt(row.get('mask_device_us'))} us  {row['status']}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out, meta


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def evaluate_goals(rows: list[dict], device) -> list[dict]:
    target = (f"open step() host time <= {GOAL_HOST_US:g} us with 300+ params and <= {GOAL_VS_CLIP:g}x "
              "clip_grad_norm_(foreach)'s on the same params; open mask device time < 10 us")
    if device.type != "cuda":
        return [C.goal("open step() host time", target, None, f"{C.NOT_MEASURED_CPU}; CPU mode is a smoke test")]
    clip = next((r for r in rows if r["row"] == "clip_grad_norm_ foreach" and r.get("status") == "ok"), None)
    goals = []
    for r in rows:
        if r["kind"] != "dgg" or r.get("backend") == "torch":
            continue
        name = f"{r['row']} host time"
        if r.get("status") != "ok":
            goals.append(C.goal(name, target, None, str(r.get("status"))))
            continue
        parts, met = [f"{r['host_us']:.1f} us/call"], r["host_us"] <= GOAL_HOST_US
        if clip is not None:
            ratio = r["host_us"] / clip["host_us"]
            parts.append(f"{ratio:.2f}x clip_grad_norm_ ({clip['host_us']:.1f} us)")
            met = met and ratio <= GOAL_VS_CLIP
        else:
            parts.append("clip_grad_norm_ did not run")
            met = None if met else False
        mask = r.get("mask_device_us")
        if mask is None:
            parts.append("mask device time not measured" + (f" ({r['device_us_error']})" if r.get("device_us_error")
                                                             else ""))
            met = None if met else False
        else:
            parts.append(f"open mask {mask:.2f} us on the device")
            met = met and mask < GOAL_MASK_US if met is not None else met
        goals.append(C.goal(name, target, met, "; ".join(parts)))
    return goals


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag says what it does (tests/test_benchmarks.py checks)."""
    ap = C.base_parser(__doc__, "CPU smoke sizes and few calls (seconds; what the tests run)", "rows", 3.0)
    ap.add_argument("--backends", type=C.names(BACKENDS, "backend", allow_empty=False), default=None,
                    help=f"comma-separated gate backends, of {', '.join(BACKENDS)} (default torch,triton,cuda on a "
                         "GPU; torch,triton on a CPU)")
    ap.add_argument("--scale", type=C.integer(1), default=None,
                    help="divide every model dimension by this (default 4 on a GPU: ~0.95 GB of bf16 grads; "
                         "64 on a CPU, 128 with --quick)")
    ap.add_argument("--calls", type=C.integer(1), default=None,
                    help="back-to-back calls per timed batch (default 30 on a GPU: few enough that the peers' "
                         "kernels never fill the launch queue; 20 on a CPU, 5 with --quick)")
    ap.add_argument("--batches", type=C.integer(1), default=None,
                    help="timed batches, a sync before each (default 15 on a GPU, 5 on a CPU, 2 with --quick)")
    ap.add_argument("--warmup", type=C.integer(0), default=None, help="untimed calls first (default 20 on a GPU, else 3)")
    ap.add_argument("--profile-calls", type=C.integer(1), default=20,
                    help="calls under torch.profiler for the device time (GPU only; default 20)")
    ap.add_argument("--ops", action="store_true",
                    help="add two rows (launches stubbed): the gate's ops called directly and through the dispatcher")
    ap.add_argument("--stub-launches", action="store_true",
                    help="CPU only: one more row, the triton gate with its kernels replaced by no-op launchers, "
                         "i.e. the package's own Python per step (run last: the real kernels stay replaced)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = C.parse(ap, argv)  # every flag and --out checked before any work
    device = C.pick_device(args.device)
    if device.type == "cuda" and (args.stub_launches or args.ops):
        ap.error("--stub-launches and --ops are for CPU runs only (they stub the Triton launches)")
    mode = "gpu" if device.type == "cuda" else ("quick" if args.quick else "cpu")
    if device.type != "cuda":
        torch.set_num_threads(1)
    gpu = mode == "gpu"
    # an explicit flag always wins over these defaults (a bad one was refused above)
    args.backends = args.backends or (["torch", "triton", "cuda"] if gpu else ["torch", "triton"])
    args.scale = args.scale or (4 if gpu else (64 if mode == "cpu" else 128))
    args.calls = args.calls or (30 if gpu else (20 if mode == "cpu" else 5))
    args.batches = args.batches or (15 if gpu else (5 if mode == "cpu" else 2))
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 3)
    budget = C.Budget(args.budget_s)
    stamp = C.stamp(device, mode)
    stamp["torch_threads"] = torch.get_num_threads()
    C.log(f"host_time: {stamp['device']} mode={mode} torch {stamp['torch']} triton {stamp['triton']}")
    rows, meta = measure(device, mode, args, budget)
    method = {
        "host_time": f"time.perf_counter around each of {args.calls} back-to-back calls (no sync between; a sync "
                     f"before each of {args.batches} batches), median per call, after {args.warmup} warm-up calls",
        "device_time": (f"torch.profiler (CUDA activity): sum of kernel durations over {args.profile_calls} calls / "
                        "calls; mask: the kernels whose name contains 'mask'") if gpu else
                       "n/a on a CPU: the ops run on the host, so host time includes the arithmetic",
        "gate": f"monitor lm_head.weight, masks all {meta['tensors']} grads, threshold {meta['threshold']} (open)",
        "host_syncs": "torch.cuda.set_sync_debug_mode('warn') warnings in one call" if gpu else
                      "CPU proxy: Tensor host-read calls in one call",
    }
    paths = C.results_paths(args.out, "host_time", stamp)
    label = ("CPU mode: a smoke test of the code path (torch backend and the Triton interpreter); host times include "
             "the arithmetic and are not comparable to a GPU's") if not gpu else "GPU mode"
    payload = {"benchmark": "host_time", "stamp": stamp, "label": label, "setup": meta, "method": method,
               "rows": rows}
    C.write_json(paths["json"], payload)  # the raw results first: nothing below can lose the run
    goals = C.analysed(paths["json"], payload, "goals", lambda: evaluate_goals(rows, device))
    cols = [("row", "row"), ("backend_used", "backend"), ("host_us", "host us/call (median)"),
            ("host_us_p10", "p10"), ("host_us_p90", "p90"), ("device_us", "device us/call"),
            ("mask_device_us", "mask kernel us"), ("kernels_per_call", "kernels/call"), ("host_syncs", "host syncs"),
            ("status", "status")]
    head = ("CPU MODE: a smoke test; host times here include the arithmetic and say nothing about a GPU's host path."
            if not gpu else "")
    md = "\n\n".join(x for x in [
        f"# Host and device time of an open gate step, {meta['tensors']} params: {stamp['device']} ({mode}), "
        f"{stamp['date']}",
        head,
        C.stamp_markdown(stamp),
        "## Setup\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()),
        "## Goals\n\n" + C.goals_markdown(goals),
        "## Per call\n\n" + C.table(rows, cols),
        "## Method\n\n" + "\n".join(f"- {k}: {v}" for k, v in method.items()),
    ] if x)
    paths["md"].write_text(md + "\n")
    print(md)
    C.log(f"results written to {args.out.resolve()}: {paths['json'].name}, {paths['md'].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
