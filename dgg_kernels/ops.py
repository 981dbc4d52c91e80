"""The gate's device work, declared once as ``dgg::`` ops.

Two kinds of op live here, each schema written once:

* The gate's ops, implemented in Python: ``dgg::gate_step`` (reduce, the
  combine of a sharded gate, finalize), ``dgg::gate_finalize_partials`` (the
  finalize of overlap's per-tensor reductions), ``dgg::gate_mask`` and
  ``dgg::snapshot``.  They mutate the tensors their schema marks ``(a!)`` and
  return nothing (snapshot returns a copy), so their fake kernels are
  trivial.  What a gate runs them with (its backend object: launch settings,
  scratch, caches; and a sharded gate's combine) reaches them as an argument,
  a ``GateKernels`` handle: an opaque reference object that torch.compile
  passes into the graph as an input and never looks inside.  No registry:
  an op's meaning is its arguments.
* The csrc ops, ``dgg::csrc_reduce``, ``dgg::csrc_step``, ``dgg::csrc_finalize``
  and ``dgg::csrc_mask``: schemas here, implementations registered from C++
  per dispatch key (``TORCH_LIBRARY_IMPL(dgg, CUDA, ...)`` in csrc/binding.cpp;
  ``dgg::csrc_finalize`` also for CPU by csrc/cpu/finalize_cpu.cpp), fake
  kernels here.  The cuda backend calls them inside the gate's ops.

One dispatch path: ``step``, ``finalize_partials`` and ``mask`` below are what
the gate calls, eager or compiled.  Under torch.compile they call the op;
eagerly they call the op's implementation (the same function) directly,
because the dispatcher's boxing of a list of gradients costs host time that
grows with the list (benchmarks/host_time.py measures both).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .config import STATISTICS, GateConfig
from .state import GateState

# Opaque reference objects as op arguments: torch's private modules, as torch 2.13 has them (the tested
# version).  A torch without them (the GPU machines' image had 2.11) still runs every eager step, which
# calls the ops' implementations directly; only torch.compile of a step needs the ops, and it raises
# COMPILE_UNAVAILABLE, which says why, instead of the package failing to import.
COMPILE_UNAVAILABLE: Optional[str] = None
try:
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError as e:
    register_opaque_type, OpaqueBase = None, object
    COMPILE_UNAVAILABLE = (f"torch {torch.__version__} has no opaque op arguments ({e}); torch.compile of a "
                           "gate step needs them (tested with torch 2.13). Eager steps are unaffected")


class GateKernels(OpaqueBase):
    """What a gate's ops run with: ``backend`` (a backends.base.Backend: its launch settings, scratch buffers
    and caches) and ``sharding`` (a sharded gate's distributed.Sharding, whose ``combine`` sums the ranks'
    partial energies between the reduce and the finalize; None when nothing is combined).

    Built with ``GateKernels.of``; ``__init__`` sets no attribute on purpose: torch derives the object's
    TorchScript class from ``__init__``, and attributes set there would have to be tensors for
    ``torch.library.opcheck``'s schema check to convert the object.
    """

    backend: object
    sharding: object

    def __init__(self) -> None:
        pass

    @classmethod
    def of(cls, backend, sharding=None) -> "GateKernels":
        kernels = cls()
        kernels.backend = backend
        kernels.sharding = sharding if sharding is not None and sharding.combines else None
        return kernels


if register_opaque_type is not None:
    try:
        register_opaque_type(GateKernels, typ="reference")
    except (TypeError, ValueError) as e:  # another version of the private API
        COMPILE_UNAVAILABLE = (f"torch {torch.__version__} did not take GateKernels as an opaque reference type "
                               f"({type(e).__name__}: {e}); torch.compile of a gate step needs it (tested with "
                               "torch 2.13). Eager steps are unaffected")


# -- the gate's ops --------------------------------------------------------------
def _step_impl(
    grads: List[torch.Tensor], ring: torch.Tensor, prev: torch.Tensor, ints: torch.Tensor, stats: torch.Tensor,
    decision: torch.Tensor, acc: torch.Tensor, hyper: torch.Tensor, window: int, statistic: int, max_reuse: int,
    kernels: GateKernels,
) -> None:
    """One reduce + finalize on the state tensors (see dgg_kernels.state for their layout).

    Threshold, eps and the window mode are read from ``hyper`` by every backend; the config built here only
    carries window, statistic and max_reuse.  A sharded gate's partial energy is combined across ranks
    between the reduce and the finalize.
    """
    state = GateState(ring=ring, prev=prev, ints=ints, stats=stats, decision=decision, hyper=hyper, acc=acc)
    _run_step(kernels, grads, state, GateConfig(window=window, statistic=STATISTICS[statistic], max_reuse=max_reuse))


def _run_step(kernels: GateKernels, grads, state: GateState, config: GateConfig) -> None:
    """The body of ``dgg::gate_step`` on a GateState and GateConfig (the eager path calls it with the gate's
    own, which saves building them from the op's arguments)."""
    backend = kernels.backend
    if kernels.sharding is not None:
        backend.reduce(grads, state, config)
        kernels.sharding.combine(state.acc)
        backend.finalize(state, config)
    else:
        backend.step(grads, state, config)


def _finalize_partials_impl(
    ring: torch.Tensor, prev: torch.Tensor, ints: torch.Tensor, stats: torch.Tensor, decision: torch.Tensor,
    acc: torch.Tensor, hyper: torch.Tensor, window: int, statistic: int, max_reuse: int, n_tensors: int,
    kernels: GateKernels,
) -> None:
    """overlap=True: the per-tensor reductions of the backward hooks (the backend's scratch), summed in
    tensor order, then the finalize, as ``gate_step`` would have done."""
    state = GateState(ring=ring, prev=prev, ints=ints, stats=stats, decision=decision, hyper=hyper, acc=acc)
    config = GateConfig(window=window, statistic=STATISTICS[statistic], max_reuse=max_reuse)
    kernels.backend.finalize_partials(n_tensors, state, config)


def _mask_impl(decision: torch.Tensor, grads: List[torch.Tensor], kernels: GateKernels, key=None) -> None:
    """Zero every tensor of ``grads`` in place when ``decision`` (bool[]) is True.  ``key``: the grads'
    MaskPlan key when the caller has it (eager only; the op computes it)."""
    kernels.backend.mask(decision, grads, key)


gate_step = gate_finalize_partials = gate_mask = None  # the ops, where this torch takes a GateKernels argument
if COMPILE_UNAVAILABLE is None:
    _STATE_MUTATED = ("ring", "prev", "ints", "stats", "decision", "acc")
    gate_step = torch.library.custom_op("dgg::gate_step", mutates_args=_STATE_MUTATED)(_step_impl)
    gate_finalize_partials = torch.library.custom_op("dgg::gate_finalize_partials", mutates_args=_STATE_MUTATED)(
        _finalize_partials_impl)

    @torch.library.custom_op("dgg::gate_mask", mutates_args=("grads",))
    def gate_mask(decision: torch.Tensor, grads: List[torch.Tensor], kernels: GateKernels) -> None:
        """Zero every tensor of ``grads`` in place when ``decision`` (bool[]) is True."""
        _mask_impl(decision, grads, kernels)

    @gate_step.register_fake
    def _(grads, ring, prev, ints, stats, decision, acc, hyper, window, statistic, max_reuse, kernels):
        return None

    @gate_finalize_partials.register_fake
    def _(ring, prev, ints, stats, decision, acc, hyper, window, statistic, max_reuse, n_tensors, kernels):
        return None

    @gate_mask.register_fake
    def _(decision, grads, kernels):
        return None


@torch.library.custom_op("dgg::snapshot", mutates_args=())
def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` as it is now (what step() returns and stats() reports under torch.compile).

    An opaque op rather than ``t.clone()``: inductor (torch 2.13, CPU) can drop the clone of a graph input
    that a later mutating custom op writes, and return the input itself, so a step's returned decision
    showed the next step's.  The op's output is its own allocation.
    """
    return t.clone()


@snapshot.register_fake
def _(t):
    return torch.empty_like(t)


# -- what the gate calls: the op under torch.compile, its implementation eagerly ---------------
def _state_args(state: GateState) -> tuple:
    return state.ring, state.prev, state.ints, state.stats, state.decision, state.acc, state.hyper


def _compiled_op(op):
    """``op`` for a step being compiled, or the reason this torch cannot compile it."""
    if op is None:
        raise RuntimeError(COMPILE_UNAVAILABLE)
    return op


def step(kernels: GateKernels, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
    """Reduce ``grads``, combine (a sharded gate), finalize: ``dgg::gate_step``."""
    if torch.compiler.is_compiling():
        _compiled_op(gate_step)(list(grads), *_state_args(state), config.window, config.statistic_id, config.max_reuse, kernels)
    else:
        _run_step(kernels, grads, state, config)


def finalize_partials(kernels: GateKernels, n_tensors: int, state: GateState, config: GateConfig) -> None:
    """Finalize on overlap's per-tensor reductions: ``dgg::gate_finalize_partials``."""
    if torch.compiler.is_compiling():
        _compiled_op(gate_finalize_partials)(*_state_args(state), config.window, config.statistic_id, config.max_reuse,
                               n_tensors, kernels)
    else:
        kernels.backend.finalize_partials(n_tensors, state, config)


def mask(kernels: GateKernels, decision: torch.Tensor, grads: Sequence[torch.Tensor], key=None) -> None:
    """Zero ``grads`` when ``decision`` is True: ``dgg::gate_mask``."""
    if torch.compiler.is_compiling():
        _compiled_op(gate_mask)(decision, list(grads), kernels)
    else:
        _mask_impl(decision, grads, kernels, key)


# -- the csrc ops: schemas here, implementations registered from C++ per dispatch key --------
_lib = torch.library.Library("dgg", "FRAGMENT")
CSRC_SCHEMAS = {
    # sum of squares of ``grads`` (float32, bfloat16, float16; float64 through a float32 copy) into acc[0]
    # (float64); partials (float32) and ticket (int32[1]) are the launch's scratch
    "csrc_reduce": "csrc_reduce(Tensor[] grads, Tensor(a!) partials, Tensor(b!) ticket, Tensor(c!) acc, "
                   "int max_blocks) -> ()",
    # the reduce with the finalize folded into its last block: one launch
    "csrc_step": "csrc_step(Tensor[] grads, Tensor(a!) partials, Tensor(b!) ticket, int max_blocks, "
                 "Tensor(c!) ring, Tensor(d!) prev, Tensor(e!) ints, Tensor(f!) stats, Tensor(g!) decision, "
                 "Tensor hyper, Tensor(h!) acc, int window, int max_reuse, int statistic, int[] slots) -> ()",
    # the finalize (csrc/common/gate_finalize.h) on acc[ACC_ENERGY], or on the sum of ``sums`` in index order
    "csrc_finalize": "csrc_finalize(Tensor(a!) ring, Tensor(b!) prev, Tensor(c!) ints, Tensor(d!) stats, "
                     "Tensor(e!) decision, Tensor hyper, Tensor(f!) acc, int window, int max_reuse, int statistic, "
                     "int[] slots, Tensor? sums=None) -> ()",
    # zero the (address, nbytes) spans of ``table`` (int64[n, 2]) when decision is True.  It writes memory its
    # arguments only name by address: it runs inside dgg::gate_mask, whose schema marks the gradients mutated.
    "csrc_mask": "csrc_mask(Tensor decision, Tensor table, int blocks) -> ()",
}
for _schema in CSRC_SCHEMAS.values():
    _lib.define(_schema)


@torch.library.register_fake("dgg::csrc_reduce", lib=_lib)
def _(grads, partials, ticket, acc, max_blocks):
    return None


@torch.library.register_fake("dgg::csrc_step", lib=_lib)
def _(grads, partials, ticket, max_blocks, ring, prev, ints, stats, decision, hyper, acc, window, max_reuse,
      statistic, slots):
    return None


@torch.library.register_fake("dgg::csrc_finalize", lib=_lib)
def _(ring, prev, ints, stats, decision, hyper, acc, window, max_reuse, statistic, slots, sums=None):
    return None


@torch.library.register_fake("dgg::csrc_mask", lib=_lib)
def _(decision, table, blocks):
    return None


def csrc_finalize(state: GateState, config: GateConfig, slots: Sequence[int], sums: Optional[torch.Tensor] = None):
    """``dgg::csrc_finalize`` on a GateState (the CUDA build's kernel, or the CPU build's host function)."""
    torch.ops.dgg.csrc_finalize(state.ring, state.prev, state.ints, state.stats, state.decision, state.hyper,
                                state.acc, config.window, config.max_reuse, config.statistic_id, list(slots), sums)
