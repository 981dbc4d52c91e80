"""Run a short gate sequence on backend="cuda" for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool synccheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_cuda.py

Covers the fused step (one and several pointer tables), reduce + finalize,
the overlap path, and the mask (closed and open) on float32/bfloat16/float16
gradients with odd sizes and misaligned views, and checks the decisions
against backend="torch".  Exits non-zero on a mismatch; the sanitizer reports
memory errors itself (its exit code is non-zero on any).  It writes no files:
everything it has to say goes to stdout/stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dgg_kernels as dgg  # noqa: E402
from dgg_kernels.backends.cuda_ext import CudaBackend  # noqa: E402
from dgg_kernels.state import GateState  # noqa: E402
from sequences import make_sequence, run_gate  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """No flags beyond --help, which describes the run instead of starting it."""
    return argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_cuda: needs a CUDA device", file=sys.stderr)
        return 2
    failures = 0
    shape_sets = [[(37, 11), (5,)], [(1,)], [(4097,), (3,)], [(17 * (i + 1),) for i in range(9)]]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shapes in shape_sets:
            cfg = dict(window=3, threshold=0.3, statistic="increment", max_reuse=4)
            seq = make_sequence(1, 25, shapes, dtype)
            gates = [
                dgg.DynamicGradientGate(
                    [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="cuda")) for s in shapes],
                    backend=b, **cfg,
                )
                for b in ("cuda", "torch")
            ]
            got, want = (run_gate(g, seq) for g in gates)
            bad = [i for i, (a, b) in enumerate(zip(got, want)) if a["closed"] != b["closed"]]
            if bad:
                failures += 1
                print(f"decision mismatch {dtype} {shapes}: steps {bad}", file=sys.stderr)

    # Split reduce + finalize, the overlap path, and masks on misaligned views.
    backend = CudaBackend(torch.device("cuda"))
    state = GateState.new(3, 0.3, 1e-8, torch.device("cuda"))
    config = dgg.GateConfig(window=3, backend="cuda")
    buf = torch.randn(10_007, device="cuda").half()
    views = [buf[1:4098], buf[4099:4100], buf[5000:10_007]]
    for _ in range(4):
        backend.reduce(views, state, config)
        backend.finalize(state, config)
        for k, v in enumerate(views):
            backend.reduce_partial(k, v, len(views), state, config)
        backend.finalize_partials(len(views), state, config)
    backend.mask(torch.zeros((), dtype=torch.bool, device="cuda"), views)
    backend.mask(torch.ones((), dtype=torch.bool, device="cuda"), views)
    torch.cuda.synchronize()
    if any(v.any().item() for v in views):
        failures += 1
        print("mask left non-zero entries", file=sys.stderr)
    print("sanitize_cuda: done" + (f", {failures} FAILURES" if failures else ", all decisions match"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
