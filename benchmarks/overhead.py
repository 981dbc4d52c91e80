"""The gate step alone, against its peers, on real lm_head gradient shapes and a size sweep.

    python benchmarks/overhead.py                 # GPU mode on a CUDA machine, CPU mode otherwise
    python benchmarks/overhead.py --quick         # CPU smoke test (seconds; what tests/test_benchmarks.py runs)
    python benchmarks/overhead.py --budget-s 240  # stop starting new cases after 240 s (the GPU suite does)
    python benchmarks/overhead.py --out benchmarks/results   # replace the committed results

Per (shape, dtype, implementation): median time of one step on random
gradients (rotating buffers plus do_bench's L2 flush, so the 50 MB L2 of an
H100 does not flatter small sizes), effective GB/s (gradient bytes / time), %
of the read bandwidth measured in this same run (bytes / time of a big
tensor.sum()), and host syncs per step.  Then the mask cost, open and closed,
on a 7B-class parameter list (339 gradients).  Writes
overhead_<device>_<date>.{json,md,png} into --out (default: $DGG_BENCH_OUT, else
a folder under the system temp dir; never the checkout unless asked).

Gates run with a threshold of 1e9 here so they stay open and the buffers keep
their random data (a closed gate zeroes them): the decision is computed either
way, and the closed cost is the mask section's.  Peers run with their own
defaults.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402  (sets TRITON_INTERPRET=1 on CPU before triton loads)
from benchmarks import peers as P  # noqa: E402

# lm_head shapes (vocab x hidden) of the models the issue names.
LM_HEADS = {
    "qwen2.5-1.5b": (151936, 1536),
    "qwen2.5-7b": (152064, 3584),
    "llama3-8b": (128256, 4096),
    "gemma-style": (262144, 2560),
}
SWEEP_MB_GPU = [1, 4, 16, 64, 256, 1024, 4096]
SWEEP_MB_CPU = [1, 4, 16, 64]
SWEEP_MB_QUICK = [1]
ROTATE_BYTES_GPU = 256e6  # > 4x the 50 MB L2 of an H100: each call reads cold memory
ROTATE_BYTES_CPU = 64e6
BIG_FLOOR_BYTES_GPU = 4 * 2**30  # the 4 GiB fp32 tensor.sum() of the anchors
GATE_OPEN_THRESHOLD = 1e9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FUSED = ("dgg triton", "dgg cuda")  # the fused backends (the open-mask goal)
BW_ROWS = ("dgg auto", "dgg triton", "dgg cuda")  # what the bandwidth goal is about


def qwen7b_param_shapes(scale: int = 1) -> list[tuple[int, ...]]:
    """The 339 parameter shapes of a Qwen2.5-7B-class model (28 layers, GQA with biases, untied lm_head).

    ``scale`` divides every dimension (CPU mode keeps the count, not the bytes).
    """
    h, inter, kv, vocab, layers = 3584 // scale, 18944 // scale, 512 // scale, 152064 // scale, 28
    per_layer = [(h, h), (h,), (kv, h), (kv,), (kv, h), (kv,), (h, h),  # q, q bias, k, k bias, v, v bias, o
                 (inter, h), (inter, h), (h, inter), (h,), (h,)]        # gate, up, down, 2 RMSNorms
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


def cases_for(mode: str) -> list[dict]:
    """(label, group, shape) of every gradient case; CPU modes scale the lm_head shapes down."""
    if mode == "gpu":
        rdiv, cdiv, sweep = 1, 1, SWEEP_MB_GPU
    elif mode == "cpu":
        rdiv, cdiv, sweep = 16, 4, SWEEP_MB_CPU
    else:
        rdiv, cdiv, sweep = 256, 32, SWEEP_MB_QUICK
    out = []
    for name, (v, h) in LM_HEADS.items():
        label = name if rdiv == 1 else f"{name} /{rdiv}x/{cdiv}"
        out.append({"case": label, "group": "lm_head", "shape": (v // rdiv, h // cdiv), "first": not out})
    for mb in sweep:
        out.append({"case": f"{mb} MB", "group": "sweep", "mb_target": mb, "shape": None})
    return out


def sweep_shape(mb: float, dtype: torch.dtype) -> tuple[int, int]:
    cols = 4096
    rows = max(1, int(mb * 1e6 // (cols * torch.finfo(dtype).bits // 8)))
    return rows, cols


def random_grads(shape, dtype, device, n: int) -> list[torch.Tensor]:
    """``n`` buffers of random gradients with a total norm near 0.5 (below ZClip's max_grad_norm=1.0 and
    clip_grad_norm_'s 1.0, as in a healthy run, so no peer rescales them every step).  Never zeros."""
    numel = math.prod(shape)
    scale = 0.5 / math.sqrt(numel)
    out = []
    for i in range(n):
        g = torch.randn(shape, device=device, dtype=dtype)
        out.append(g.mul_(scale * (1 + 0.01 * i)))
    return out


def measure_case(case: dict, dtype_name: str, impls, device, mode, args, budget, floor_GBps) -> list[dict]:
    dtype = DTYPES[dtype_name]
    shape = case["shape"] or sweep_shape(case["mb_target"], dtype)
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits // 8)
    rotate = ROTATE_BYTES_GPU if device.type == "cuda" else ROTATE_BYTES_CPU
    nbuf = int(min(16, max(1, math.ceil(rotate / nbytes)))) if device.type == "cuda" else int(min(4, max(1, math.ceil(rotate / nbytes))))
    base = {"case": case["case"], "group": case["group"], "shape": list(shape), "dtype": dtype_name,
            "MB": nbytes / 1e6, "buffers": nbuf}
    rows = []
    if budget.exhausted(reserve=args.reserve_s):
        return [dict(base, impl=i.name, kind=i.kind, ms=None, status="skipped: time budget") for i in impls]
    try:
        bufs = random_grads(shape, dtype, device, nbuf)
        param = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    except torch.OutOfMemoryError as e:
        return [dict(base, impl=i.name, kind=i.kind, ms=None, status=f"n/a: out of memory ({e})"[:200]) for i in impls]
    counter = [0]

    def rotate_grad():
        param.grad = bufs[counter[0] % nbuf]
        counter[0] += 1

    for impl in impls:
        row = dict(base, impl=impl.name, kind=impl.kind)
        rows.append(row)
        if budget.exhausted(reserve=args.reserve_s):
            row.update(ms=None, status="skipped: time budget")
            continue
        if mode == "quick" and "inductor" in impl.name and dtype_name != "float32":
            row.update(ms=None, status="skipped in --quick (each dtype is one more compile)")
            continue
        if device.type != "cuda" and impl.name == "dgg triton" and not case.get("first"):
            # The Triton interpreter takes seconds per step on CPU: run it on the
            # smallest case only, to exercise the code path, not to time it.
            row.update(ms=None, status="skipped on CPU: Triton interpreter (run on the first case only)")
            continue
        rotate_grad()
        try:
            runner = P.build(impl, P.Case(monitor=[param], params=[param], threshold=GATE_OPEN_THRESHOLD))
        except P.Unavailable as e:
            row.update(ms=None, status=f"n/a: {e}")
            continue
        if hasattr(runner, "gate"):  # what "auto" chose (and, for the others, that they run what they say)
            row["backend"] = runner.gate.backend

        def fn():
            rotate_grad()
            return runner.step()

        try:
            for _ in range(max(3, getattr(runner, "warmup_steps", 0))):  # compiles, ZClip's 25-step warm-up
                fn()
            C.sync(device)
            syncs, how = C.count_host_syncs(fn, device)
            interp = impl.name == "dgg triton" and device.type != "cuda"
            ms = C.bench_ms(fn, device, warmup_ms=25, rep_ms=args.rep_ms, cpu_reps=1 if interp else args.cpu_reps,
                            cpu_warmup=0 if interp else 1)
        except Exception as e:  # a backend failing on one shape must not hide the other rows
            row.update(ms=None, status=f"error: {type(e).__name__}: {e}"[:300])
            C.log(f"  {impl.name} {case['case']} {dtype_name}: {row['status']}")
            continue
        GBps = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=ms, GBps=GBps, pct_floor=100 * GBps / floor_GBps, host_syncs=syncs, syncs_counted_by=how,
                   status="ok")
        C.log(f"  {case['case']:>22} {dtype_name:>8} {impl.name:<24} {ms:9.4f} ms {GBps:8.1f} GB/s "
              f"{row['pct_floor']:6.1f}% syncs={syncs}")
    # Rebind rather than del: the closures above share these cells, and a None
    # frees the buffers (before empty_cache) as well as del would.
    bufs = param = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_masks(device, mode, args, budget) -> list[dict]:
    """Mask cost on a 7B-class parameter list: open (nothing to do) and closed (write zeros everywhere)."""
    from dgg_kernels.backends import resolve_backend

    scale = 1 if mode == "gpu" else (16 if mode == "cpu" else 128)
    shapes = qwen7b_param_shapes(scale)
    dtype = torch.bfloat16
    rows: list[dict] = []
    if budget.exhausted(reserve=args.reserve_s):
        return [{"impl": "all", "status": "skipped: time budget"}]
    try:
        grads = [torch.randn(s, device=device, dtype=dtype).mul_(1e-3) for s in shapes]
    except torch.OutOfMemoryError as e:
        return [{"impl": "all", "status": f"n/a: out of memory ({e})"[:200]}]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    base = {"tensors": len(grads), "MB": nbytes / 1e6, "dtype": "bfloat16", "params_B": sum(g.numel() for g in grads) / 1e9}
    decision = torch.zeros((), dtype=torch.bool, device=device)

    def backend_mask(name):
        b = resolve_backend(name, device)
        return lambda: b.mask(decision, grads)

    def hand_written():  # what a user writes: read the decision, zero when closed
        if bool(decision):
            for g in grads:
                g.zero_()

    keep = torch.ones((), dtype=torch.float32, device=device)

    def foreach_mul():  # a 0/1 step factor multiplied in (keeps NaN: 0 * NaN = NaN)
        torch._foreach_mul_(grads, keep)

    impls = {"dgg torch": lambda: backend_mask("torch"), "dgg triton": lambda: backend_mask("triton"),
             "dgg cuda": lambda: backend_mask("cuda"), "hand-written if bool(): zero_()": lambda: hand_written,
             "foreach_mul_ by 0/1 factor": lambda: foreach_mul}
    for state in ("open", "closed"):
        decision.fill_(1 if state == "closed" else 0)
        keep.fill_(0.0 if state == "closed" else 1.0)
        for name, make in impls.items():
            row = dict(base, impl=name, gate=state)
            rows.append(row)
            if budget.exhausted(reserve=args.reserve_s):
                row.update(us=None, status="skipped: time budget")
                continue
            if device.type != "cuda" and name == "dgg triton" and state == "closed":
                row.update(us=None, status="skipped on CPU: the Triton interpreter takes tens of seconds here")
                continue
            try:
                fn = make()
                fn()
                C.sync(device)
                syncs, how = C.count_host_syncs(fn, device)
                ms = C.bench_ms(fn, device, warmup_ms=10, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps, cpu_warmup=1)
            except Exception as e:
                row.update(us=None, status=f"n/a: {type(e).__name__}: {e}"[:300])
                continue
            row.update(us=ms * 1e3, host_syncs=syncs, syncs_counted_by=how, status="ok",
                       GBps_written=(nbytes / (ms * 1e-3) / 1e9) if state == "closed" else None)
            C.log(f"  mask {state:>6} {name:<34} {ms * 1e3:10.1f} us syncs={syncs}")
    # Rebound, not del'd (the closures above share it): frees the 15 GB (GPU) before empty_cache.
    grads = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


BW_TARGET = ">= 95% of read bandwidth at >= 1 GB and >= 90% at 256 MB (every shape, fp32 and bf16)"
VS_BOUND = 1.25
VS_TARGET = (f"<= {VS_BOUND:g}x the faster of vector_norm and the better backend, at every size 1 MB - 4 GB "
             "(fp32 and bf16)")


def _bw_floor_pct(mb: float) -> float | None:
    """The bandwidth goal for a gradient of ``mb`` MB: 95% from 1 GB, 90% from 256 MB, none below."""
    return 95.0 if mb >= 1000 else (90.0 if mb >= 200 else None)


def _bandwidth_goal(impl: str, rows: list[dict]) -> dict:
    mine = [r for r in rows if r["impl"] == impl and _bw_floor_pct(r["MB"]) is not None]
    good = [r for r in mine if r.get("status") == "ok"]
    if not good:
        return C.goal(f"{impl} bandwidth", BW_TARGET, None, (mine[0].get("status") if mine else "not run"))
    low = [r for r in good if r["pct_floor"] < _bw_floor_pct(r["MB"])]
    worst = min(good, key=lambda r: r["pct_floor"] - _bw_floor_pct(r["MB"]))
    detail = f"worst {worst['case']} {worst['dtype']}: {worst['pct_floor']:.1f}% (goal {_bw_floor_pct(worst['MB']):g}%)"
    if low:
        detail += "; below: " + ", ".join(f"{r['case']} {r['dtype']} {r['pct_floor']:.1f}%" for r in low)
    if len(good) != len(mine):
        detail += f"; {len(mine) - len(good)} rows did not run"
    return C.goal(f"{impl} bandwidth", BW_TARGET, not low and len(good) == len(mine), detail)


def _vs_bound_goal(rows: list[dict]) -> dict:
    """The gate users get (backend="auto") against min(vector_norm, dgg triton, dgg cuda) on the same case."""
    ratios, missing = [], []
    for (case, dtype) in dict.fromkeys((r["case"], r["dtype"]) for r in rows):
        sub = {r["impl"]: r for r in rows if r["case"] == case and r["dtype"] == dtype and r.get("status") == "ok"}
        bound = [sub[i]["ms"] for i in ("vector_norm (bound)", "dgg triton", "dgg cuda") if i in sub]
        if "dgg auto" not in sub or not bound:
            missing.append(f"{case} {dtype}")
            continue
        ratios.append((sub["dgg auto"]["ms"] / min(bound), case, dtype, sub["dgg auto"].get("backend")))
    if not ratios:
        return C.goal("dgg auto vs the bound", VS_TARGET, None, "no case ran: " + ", ".join(missing[:6]))
    worst = max(ratios)
    over = [f"{c} {d} {x:.2f}x" for x, c, d, _ in ratios if x > VS_BOUND]
    detail = f"worst {worst[1]} {worst[2]}: {worst[0]:.2f}x (auto picked {worst[3]})"
    if over:
        detail += "; over: " + ", ".join(over)
    if missing:
        detail += f"; {len(missing)} cases did not run"
    return C.goal("dgg auto vs the bound", VS_TARGET, not over and not missing, detail)


def evaluate_goals(rows, masks, device) -> list[dict]:
    if device.type != "cuda":
        dgg_syncs = sorted({(r["impl"], r.get("host_syncs")) for r in rows if r["kind"] == "dgg" and r.get("status") == "ok"})
        proxy = ", ".join(f"{i}: {s}" for i, s in dgg_syncs) or "none ran"
        return [
            C.goal("dgg auto vs the bound", VS_TARGET, None, C.NOT_MEASURED_CPU),
            C.goal("fused gate bandwidth", BW_TARGET, None, C.NOT_MEASURED_CPU),
            C.goal("host syncs", "0 per gate step (all dgg backends)", None,
                   f"{C.NOT_MEASURED_CPU}; CPU proxy (host-read calls per step): {proxy}"),
            C.goal("open-gate mask", "< 10 us on a 7B-class parameter list", None, C.NOT_MEASURED_CPU),
        ]
    goals = [_vs_bound_goal(rows)] + [_bandwidth_goal(impl, rows) for impl in BW_ROWS]
    dgg = [r for r in rows if r["kind"] == "dgg" and r.get("status") == "ok"]
    if dgg:
        bad = sorted({f"{r['impl']} ({r['host_syncs']})" for r in dgg if r["host_syncs"]})
        goals.append(C.goal("host syncs", "0 per gate step (all dgg backends that ran)", not bad,
                            "syncs seen: " + ", ".join(bad) if bad else
                            f"0 on every row ({len(dgg)} rows, sync_debug_mode=warn)"))
    else:
        goals.append(C.goal("host syncs", "0 per gate step", None, "no dgg row ran"))
    open_rows = [m for m in masks if m.get("gate") == "open" and m["impl"] in FUSED and m.get("status") == "ok"]
    if open_rows:
        detail = ", ".join(f"{m['impl']}: {m['us']:.1f} us" for m in open_rows)
        goals.append(C.goal("open-gate mask", "< 10 us on a 7B-class parameter list (339 tensors)",
                            all(m["us"] < 10 for m in open_rows), detail))
    else:
        goals.append(C.goal("open-gate mask", "< 10 us", None,
                            "; ".join(f"{m['impl']}: {m.get('status')}" for m in masks if m.get("gate") == "open" and m["impl"] in FUSED)))
    return goals


def pivot(rows, value_key, impls, group) -> tuple[list[dict], list[tuple[str, str]]]:
    out = []
    for (case, dtype) in dict.fromkeys((r["case"], r["dtype"]) for r in rows if r["group"] == group):
        sub = {r["impl"]: r for r in rows if r["case"] == case and r["dtype"] == dtype}
        mb = next(iter(sub.values()))["MB"]
        line = {"case": case, "dtype": dtype, "MB": mb}
        for i in impls:
            r = sub.get(i)
            line[i] = r.get(value_key) if r and r.get("status") == "ok" else None
        out.append(line)
    cols = [("case", "case"), ("dtype", "dtype"), ("MB", "MB")] + [(i, i) for i in impls]
    return out, cols


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag says what it does (tests/test_benchmarks.py checks)."""
    ap = C.base_parser(__doc__, "CPU smoke sizes (seconds; what the tests run)", "cases", 5.0)
    ap.add_argument("--dtypes", type=C.names(DTYPES, "dtype", allow_empty=False), default="float32,bfloat16",
                    help=f"comma-separated gradient dtypes, of {', '.join(DTYPES)} (default float32,bfloat16)")
    ap.add_argument("--impls", type=C.names([i.name for i in P.IMPLS], "implementation"), default="",
                    help="comma-separated subset of implementation names, e.g. 'vector_norm (bound),dgg triton' "
                         f"(default: all): {', '.join(i.name for i in P.IMPLS)}")
    ap.add_argument("--rep-ms", type=C.number(0, lo_open=True), default=100.0,
                    help="milliseconds do_bench spends timing each row on a GPU (> 0; default 100)")
    ap.add_argument("--cpu-reps", type=C.integer(1), default=None,
                    help="timed calls per row on a CPU (>= 1; default 3 with --quick, else 10)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG (drawn when matplotlib is installed)")
    return ap


def main(argv=None) -> int:
    args = C.parse(build_parser(), argv)  # every flag and --out checked before any work

    device = C.pick_device(args.device)
    if device.type == "cuda":
        mode = "gpu"
    else:
        mode = "quick" if args.quick else "cpu"
    if device.type != "cuda":
        torch.set_num_threads(1)  # steadier CPU timings on a shared machine; CPU numbers are smoke only
    if args.cpu_reps is None:
        args.cpu_reps = 3 if mode == "quick" else 10
    budget = C.Budget(args.budget_s)
    stamp = C.stamp(device, mode)
    stamp["torch_threads"] = torch.get_num_threads()
    impls = [i for i in P.IMPLS if not args.impls or i.name in args.impls]
    dtypes = args.dtypes
    C.log(f"overhead: {stamp['device']} mode={mode} torch {stamp['torch']} triton {stamp['triton']}")

    floor_bytes = BIG_FLOOR_BYTES_GPU if mode == "gpu" else (256 * 2**20 if mode == "cpu" else 32 * 2**20)
    floor_GBps, floor_used = C.read_bandwidth_GBps(device, floor_bytes)
    C.log(f"read bandwidth (tensor.sum of {floor_used / 2**20:.0f} MiB fp32): {floor_GBps:.1f} GB/s")

    rows: list[dict] = []
    for dtype_name in dtypes:
        for case in cases_for(mode):
            rows += measure_case(case, dtype_name, impls, device, mode, args, budget, floor_GBps)
    masks = measure_masks(device, mode, args, budget)

    paths = C.results_paths(args.out, "overhead", stamp)
    names = [i.name for i in impls]
    payload = {
        "benchmark": "overhead",
        "stamp": stamp,
        "label": "CPU mode: code paths and file format only; no GPU goal is measured" if device.type != "cuda"
        else "GPU mode",
        "method": {
            "timing": "triton.testing.do_bench median (CUDA events, L2 flush between calls)" if device.type == "cuda"
            else "perf_counter median per call (CPU)",
            "rotating_buffers": "gradient buffers cycled per call so their total exceeds "
                                f"{(ROTATE_BYTES_GPU if device.type == 'cuda' else ROTATE_BYTES_CPU) / 1e6:.0f} MB (max 16)",
            "data": "randn scaled to total norm ~0.5 (never zeros)",
            "read_floor": f"bytes / median time of tensor.sum() over {floor_used / 2**20:.0f} MiB fp32",
            "gate_threshold": f"{GATE_OPEN_THRESHOLD:g} (gates stay open; closed cost is in the mask section)",
            "host_syncs": "torch.cuda.set_sync_debug_mode('warn') warnings in one warmed-up step" if device.type == "cuda"
            else ("CPU proxy: calls of Tensor.item/tolist/cpu/numpy/__bool__/__float__/__int__/__index__ in one step, "
                  "the torch backend in its device form (its CPU-only host paths off)"),
            "zclip": "zclip.ZClip() defaults; timed after its 25-step warm-up",
            "compiled": "dgg torch compiled: torch.compile(gate.step) (the gate's custom ops stay opaque); "
                        "dgg torch inductor-fused: torch.compile of the torch backend's reduce+finalize+mask "
                        "traced op by op (gradients passed in), default mode",
        },
        "read_GBps": floor_GBps,
        "read_floor_bytes": floor_used,
        "rows": rows,
        "mask_rows": masks,
    }
    C.write_json(paths["json"], payload)  # the raw results first: nothing below can lose the run
    goals = C.analysed(paths["json"], payload, "goals", lambda: evaluate_goals(rows, masks, device))

    ms_rows, ms_cols = pivot(rows, "ms", names, "lm_head")
    pct_rows, pct_cols = pivot(rows, "pct_floor", names, "lm_head")
    sw_rows, sw_cols = pivot(rows, "ms", names, "sweep")
    swp_rows, swp_cols = pivot(rows, "pct_floor", names, "sweep")
    sync_rows = []
    for i in impls:
        mine = [r for r in rows if r["impl"] == i.name]
        ok = [r for r in mine if r.get("status") == "ok"]
        sync_rows.append({"impl": i.name, "kind": i.kind,
                          "host syncs/step": max((r["host_syncs"] for r in ok), default=None),
                          "rows ok": f"{len(ok)}/{len(mine)}",
                          "status": "ok" if ok else (mine[0].get("status") if mine else "not run")})
    mask_tab = C.table(masks, [("impl", "mask"), ("gate", "gate"), ("tensors", "tensors"), ("MB", "MB"),
                               ("us", "median us"), ("GBps_written", "GB/s written"), ("host_syncs", "host syncs"),
                               ("status", "status")])
    plotted = False
    if not args.no_plot:
        plotted = C.plot_time_vs_size(paths["png"], rows, floor_GBps,  # lm_head shapes and sweep together
                                      f"gate step alone, {stamp['device']} ({mode}), {stamp['date']}, "
                                      f"torch {stamp['torch']}, triton {stamp['triton']}", names)
    head = "CPU MODE: small sizes on a CPU; these numbers say nothing about the GPU goals." if device.type != "cuda" else ""
    md = "\n\n".join(x for x in [
        f"# Gate overhead vs peers: {stamp['device']} ({mode}), {stamp['date']}",
        head,
        C.stamp_markdown(stamp),
        "## Goals\n\n" + C.goals_markdown(goals),
        f"## Read bandwidth (this run)\n\n{floor_GBps:.1f} GB/s: bytes / median time of tensor.sum() over "
        f"{floor_used / 2**20:.0f} MiB fp32.",
        "## lm_head shapes: median ms per gate step\n\n" + C.table(ms_rows, ms_cols),
        "## lm_head shapes: % of read bandwidth\n\n" + C.table(pct_rows, pct_cols),
        "## Size sweep: median ms\n\n" + C.table(sw_rows, sw_cols),
        "## Size sweep: % of read bandwidth\n\n" + C.table(swp_rows, swp_cols),
        "## Host syncs per step, availability\n\n" + C.table(sync_rows, [("impl", "impl"), ("kind", "kind"),
                                                                          ("host syncs/step", "host syncs/step"),
                                                                          ("rows ok", "rows ok"), ("status", "status")]),
        "## Mask cost, 7B-class parameter list (bf16)\n\n" + mask_tab,
        "## Method\n\n" + "\n".join(f"- {k}: {v}" for k, v in payload["method"].items())
        + (f"\n- plot: {paths['png'].name}" if plotted else "\n- plot: not written (matplotlib missing or --no-plot)"),
    ] if x)
    paths["md"].write_text(md + "\n")
    print(md)
    written = [paths["json"].name, paths["md"].name] + ([paths["png"].name] if plotted else [])
    C.log(f"results written to {args.out.resolve()}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
