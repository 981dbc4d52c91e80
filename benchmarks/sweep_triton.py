"""Sweep the Triton reduce launch (BLOCK, programs per SM, warps) per gradient dtype, to fill triton_launch.CUDA_CONFIGS.

    python benchmarks/sweep_triton.py                  # GPU: the full grid on lm_head shapes, bf16/fp16/fp32
    python benchmarks/sweep_triton.py --budget-s 150   # what run_gpu_suite.sh's "sweep" phase runs
    python benchmarks/sweep_triton.py --quick          # CPU smoke test under the interpreter (no tuning possible)

Per dtype and launch configuration, the time of one fused gate step (reduce +
finalize, one launch; the mask is separate and does not depend on these) on
real lm_head gradient shapes and a 256 MB gradient, with the same method as
overhead.py: triton.testing.do_bench median with its L2 flush, gradients
rotating through buffers totalling > 256 MB, random data; % of the read
bandwidth measured in the same run (tensor.sum over 4 GiB fp32).  The best
configuration per dtype is the one with the highest worst-case % over the
shapes (ties: the higher mean).  The Markdown ends with the CUDA_CONFIGS entry
to paste into dgg_kernels/backends/triton_launch.py for each dtype whose best
beats today's default (BLOCK 4096, 4 programs/SM, 8 warps) by more than
--min-gain points on its worst shape.  On a CPU nothing can be tuned: the
interpreter runs the kernels one program at a time; --quick only checks that
every configuration launches and gives the same energy.
Writes sweep_triton_<device>_<date>.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402  (sets TRITON_INTERPRET=1 on CPU before triton loads)

SHAPES_GPU = {
    "qwen2.5-1.5b": (151936, 1536),
    "llama3-8b": (128256, 4096),
    "gemma-style": (262144, 2560),
    "256 MB": None,  # rows x 4096 columns of 256 MB in the dtype
}
SHAPES_QUICK = {"tiny": (129, 31)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROTATE_BYTES = 256e6


def _shape(name, shape, dtype) -> tuple[int, int]:
    if shape is not None:
        return shape
    mb = float(name.split()[0])
    return int(mb * 1e6 // (4096 * torch.finfo(dtype).bits // 8)), 4096


def measure(device, args, budget, floor_GBps) -> list[dict]:
    from dgg_kernels.backends.triton_fused import TritonBackend
    from dgg_kernels.backends.triton_launch import CUDA_CONFIGS, LaunchConfig
    from dgg_kernels.config import GateConfig
    from dgg_kernels import state as S
    from dgg_kernels.state import GateState

    gpu = device.type == "cuda"
    shapes = SHAPES_GPU if gpu else SHAPES_QUICK
    grid = list(itertools.product(args.blocks, args.programs_per_sm, args.warps))
    rows = []
    config = GateConfig(threshold=1e9)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        default = CUDA_CONFIGS.get(dtype, LaunchConfig())
        for shape_name, shape in shapes.items():
            shape = _shape(shape_name, shape, dtype)
            nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
            nbuf = int(min(16, max(1, math.ceil(ROTATE_BYTES / nbytes)))) if gpu else 1
            if budget.exhausted(reserve=args.reserve_s):
                rows.append({"dtype": dtype_name, "case": shape_name, "status": "skipped: time budget"})
                continue
            try:
                bufs = [torch.randn(shape, device=device, dtype=dtype).mul_(0.5 / math.sqrt(math.prod(shape)))
                        for _ in range(nbuf)]
            except torch.OutOfMemoryError as e:
                rows.append({"dtype": dtype_name, "case": shape_name, "status": f"n/a: out of memory ({e})"[:200]})
                continue
            ref = None
            for block, pps, warps in grid:
                row = {"dtype": dtype_name, "case": shape_name, "shape": list(shape), "MB": nbytes / 1e6,
                       "block": block, "programs_per_sm": pps, "num_warps": warps,
                       "default": (block, pps, warps) == (default.block, default.programs_per_sm, default.num_warps)}
                rows.append(row)
                if budget.exhausted(reserve=args.reserve_s):
                    row["status"] = "skipped: time budget"
                    continue
                lc = LaunchConfig(block=block, programs_per_sm=pps, num_warps=warps)
                backend = TritonBackend(configs={dtype: lc}, block=block if not gpu else None)
                state = GateState.new(config.window, config.threshold, config.eps, device)
                counter = [0]

                def fn(backend=backend, state=state, counter=counter):
                    g = bufs[counter[0] % nbuf]
                    counter[0] += 1
                    backend.step([g], state, config)

                try:
                    fn()
                    C.sync(device)
                    energy = float(state.acc[S.ACC_ENERGY].item())
                    ms = C.bench_ms(fn, device, warmup_ms=10, rep_ms=args.rep_ms, cpu_reps=1, cpu_warmup=0)
                except Exception as e:
                    row["status"] = f"error: {type(e).__name__}: {e}"[:300]
                    continue
                ref = energy if ref is None else ref
                GBps = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=ms, GBps=GBps, pct_floor=100 * GBps / floor_GBps, status="ok",
                           energy_rel_diff=abs(energy - ref) / max(abs(ref), 1e-30))
            C.log(f"  {dtype_name} {shape_name}: best "
                  + str(max((r for r in rows if r.get("status") == "ok" and r["dtype"] == dtype_name
                             and r["case"] == shape_name), key=lambda r: r["pct_floor"], default={}).get("pct_floor")))
            bufs = None
            if gpu:
                torch.cuda.empty_cache()
    return rows


def best_per_dtype(rows: list[dict], min_gain: float) -> list[dict]:
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        ok = [r for r in rows if r["dtype"] == dtype and r.get("status") == "ok"]
        cases = sorted({r["case"] for r in ok})
        by_cfg: dict[tuple, list[dict]] = {}
        for r in ok:
            by_cfg.setdefault((r["block"], r["programs_per_sm"], r["num_warps"]), []).append(r)
        full = {k: v for k, v in by_cfg.items() if len(v) == len(cases)}  # measured on every shape
        if not full:
            out.append({"dtype": dtype, "status": "not enough rows"})
            continue
        score = {k: (min(r["pct_floor"] for r in v), statistics.mean(r["pct_floor"] for r in v)) for k, v in full.items()}
        best = max(score, key=score.get)
        default = next((k for k, v in full.items() if v[0]["default"]), None)
        entry = {"dtype": dtype, "best": dict(zip(("block", "programs_per_sm", "num_warps"), best)),
                 "best_worst_pct": score[best][0], "best_mean_pct": score[best][1], "cases": cases,
                 "default_worst_pct": score[default][0] if default else None,
                 "default_mean_pct": score[default][1] if default else None, "status": "ok"}
        entry["adopt"] = bool(default and score[best][0] - score[default][0] > min_gain)
        out.append(entry)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag says what it does (tests/test_benchmarks.py checks)."""
    ap = C.base_parser(__doc__, "CPU smoke test: a tiny shape, two configurations", "configurations", 5.0)
    ap.add_argument("--dtypes", type=C.names(DTYPES, "dtype", allow_empty=False), default=None,
                    help=f"comma-separated, of {', '.join(DTYPES)} (default bfloat16,float16,float32; a CPU: "
                         "bfloat16,float32)")
    ap.add_argument("--blocks", type=C.int_list(1, power_of_two=True), default=None,
                    help="BLOCK values, powers of two (default 2048,4096,8192,16384; --quick: 64,128)")
    ap.add_argument("--programs-per-sm", type=C.int_list(1), default=None,
                    help="programs per SM, >= 1 (default 2,4,8; --quick: 2)")
    ap.add_argument("--warps", type=C.int_list(1, power_of_two=True), default=None,
                    help="num_warps values, powers of two (default 4,8,16; --quick: 1)")
    ap.add_argument("--rep-ms", type=C.number(0, lo_open=True), default=60.0,
                    help="do_bench time per row on a GPU (> 0; default 60 ms)")
    ap.add_argument("--min-gain", type=C.number(0), default=0.5,
                    help="points (>= 0) of %% of read bandwidth on the worst shape a config must gain over the "
                         "default to be suggested (default 0.5)")
    return ap


def main(argv=None) -> int:
    args = C.parse(build_parser(), argv)  # every flag and --out checked before any work
    device = C.pick_device(args.device)
    gpu = device.type == "cuda"
    mode = "gpu" if gpu else "quick"
    if not gpu:
        torch.set_num_threads(1)
    # an explicit flag always wins over these defaults (a bad one was refused above)
    args.dtypes = args.dtypes or (["bfloat16", "float16", "float32"] if gpu else ["bfloat16", "float32"])
    args.blocks = args.blocks or ([2048, 4096, 8192, 16384] if gpu else [64, 128])
    args.programs_per_sm = args.programs_per_sm or ([2, 4, 8] if gpu else [2])
    args.warps = args.warps or ([4, 8, 16] if gpu else [1])
    budget = C.Budget(args.budget_s)
    stamp = C.stamp(device, mode)
    C.log(f"sweep_triton: {stamp['device']} mode={mode} triton {stamp['triton']}")
    floor_GBps, floor_used = C.read_bandwidth_GBps(device, 4 * 2**30 if gpu else 2**24)
    rows = measure(device, args, budget, floor_GBps)
    energies_agree = all(r.get("energy_rel_diff", 0) < 1e-5 for r in rows if r.get("status") == "ok")
    paths = C.results_paths(args.out, "sweep_triton", stamp)
    payload = {"benchmark": "sweep_triton", "stamp": stamp,
               "label": "GPU mode" if gpu else "CPU mode (interpreter): no tuning possible; code path only",
               "read_GBps": floor_GBps, "read_floor_bytes": floor_used, "grid": {
                   "blocks": args.blocks, "programs_per_sm": args.programs_per_sm, "warps": args.warps},
               "energies_agree": energies_agree, "rows": rows}
    C.write_json(paths["json"], payload)  # the raw results first: nothing below can lose the run
    best = C.analysed(paths["json"], payload, "best", lambda: best_per_dtype(rows, args.min_gain))
    suggest = [f"    torch.{b['dtype']}: LaunchConfig(block={b['best']['block']}, "
               f"programs_per_sm={b['best']['programs_per_sm']}, num_warps={b['best']['num_warps']}),"
               for b in best if b.get("status") == "ok" and b["adopt"]]
    best_cols = [("dtype", "dtype"), ("best", "best"), ("best_worst_pct", "best: worst shape %"),
                 ("best_mean_pct", "best: mean %"), ("default_worst_pct", "default: worst shape %"),
                 ("default_mean_pct", "default: mean %"), ("adopt", "suggest"), ("status", "status")]
    cols = [("dtype", "dtype"), ("case", "case"), ("MB", "MB"), ("block", "BLOCK"), ("programs_per_sm", "prog/SM"),
            ("num_warps", "warps"), ("ms", "ms"), ("pct_floor", "% of read BW"), ("status", "status")]
    md = "\n\n".join(x for x in [
        f"# Triton reduce launch sweep: {stamp['device']} ({mode}), {stamp['date']}",
        "" if gpu else "CPU MODE: the interpreter runs one program at a time; nothing here can be tuned.",
        C.stamp_markdown(stamp),
        f"Read bandwidth: {floor_GBps:.1f} GB/s (tensor.sum over {floor_used / 2**20:.0f} MiB fp32). "
        f"Energies agree across configurations: {energies_agree}.",
        "## Best per dtype (highest worst-case % of read bandwidth over the shapes)\n\n"
        + C.table([dict(b, best=str(b.get("best"))) for b in best], best_cols),
        "## Suggested CUDA_CONFIGS entries\n\n" + ("```python\n" + "\n".join(suggest) + "\n```" if suggest else
                                                   "None: the default is within --min-gain of the best everywhere "
                                                   "(or nothing was measured)."),
        "## Every row\n\n" + C.table(rows, cols),
    ] if x)
    paths["md"].write_text(md + "\n")
    print(md)
    C.log(f"results written to {args.out.resolve()}: {paths['json'].name}, {paths['md'].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
