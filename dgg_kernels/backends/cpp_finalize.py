"""The C++ finalize (csrc/common/gate_finalize.h) built for the CPU: the same source nvcc compiles into the
CUDA backend's kernels, so that it runs, and is tested against the plain-Python model, on machines with no GPU.
Loading the build registers it as the CPU implementation of the ``dgg::csrc_finalize`` op (dgg_kernels/ops.py),
the op whose CUDA implementation the cuda backend calls.

Built just in time from a source checkout (csrc/ beside the package) with torch.utils.cpp_extension and a
host C++ compiler, with -ffp-contract=off so that no product is fused into an addition (the CUDA kernels use
the _rn intrinsics for the same reason).  Not a backend: ``finalize(state, config)`` runs one finalize of a
CPU GateState on the energy in state.acc (or on the sum of overlap's per-tensor ``sums``), as the CUDA
backend's finalize launch does.
"""
from __future__ import annotations

from pathlib import Path

from .. import ops, state as S
from ..config import GateConfig
from ..state import GateState

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "cpu" / "finalize_cpu.cpp"
CFLAGS = ["-O2", "-std=c++17", "-ffp-contract=off"]
_module = None


def load(verbose: bool = False):
    """The built module (built on the first call of a process; torch caches the build between processes).
    Raises RuntimeError saying why when it cannot be built here."""
    global _module
    if _module is not None:
        return _module
    if not SOURCE.is_file():
        raise RuntimeError(f"the C++ finalize builds from a source checkout: {SOURCE} is missing")
    from torch.utils.cpp_extension import load as build

    mod = build(name="dgg_finalize_cpu", sources=[str(SOURCE)], extra_include_paths=[str(CSRC)],
                extra_cflags=CFLAGS, verbose=verbose)
    want = (S.N_INTS, S.N_STATS, S.N_HYPER, S.N_ACC)
    if tuple(mod.STATE_LAYOUT) != want:
        raise RuntimeError(f"the built C++ finalize is stale (STATE_LAYOUT {tuple(mod.STATE_LAYOUT)} != {want}); "
                           "delete its build folder (torch's extensions dir, dgg_finalize_cpu) and rebuild")
    _module = mod
    return mod


def finalize(state: GateState, config: GateConfig, sums=None) -> None:
    """One finalize of a CPU ``state`` on its energy (state.acc[ACC_ENERGY], or the float64 ``sums`` added in
    index order) and KL (state.acc[ACC_KL]): the ``dgg::csrc_finalize`` op, on the CPU build."""
    load()
    ops.csrc_finalize(state, config, S.slot_order(), sums)
