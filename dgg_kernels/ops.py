"""The gate's device work as torch.library custom ops, so torch.compile traces step() without graph breaks.

``dgg::gate_step`` (reduce + finalize) and ``dgg::gate_mask`` mutate their
tensor arguments and return nothing, so their fake (meta) kernels are
trivial.  Eager step() calls the backend directly; under torch.compile the
gate goes through these ops.  The backend object (with its launch
configuration and scratch buffers) is found by an integer key, a constant in
the compiled graph.
"""
from __future__ import annotations

import itertools
import weakref
from typing import List

import torch

from .config import STATISTICS, GateConfig
from .state import GateState

_backends: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def register_backend(backend) -> int:
    """A key under which the ops find ``backend`` (kept only while the backend lives)."""
    key = next(_keys)
    _backends[key] = backend
    return key


def _lookup(key: int):
    backend = _backends.get(key)
    if backend is None:
        raise RuntimeError(f"dgg ops: no live gate backend under key {key} (was its gate deleted?)")
    return backend


@torch.library.custom_op("dgg::gate_step", mutates_args=("ring", "prev", "ints", "stats", "decision", "acc"))
def gate_step(
    grads: List[torch.Tensor], ring: torch.Tensor, prev: torch.Tensor, ints: torch.Tensor, stats: torch.Tensor,
    decision: torch.Tensor, acc: torch.Tensor, hyper: torch.Tensor, window: int, statistic: int, max_reuse: int,
    backend_key: int, combine_key: int = 0,
) -> None:
    """One reduce + finalize on the state tensors (see dgg_kernels.state for their layout).

    Threshold, eps and the window mode are read from ``hyper`` by every
    backend; the config built here only carries window, statistic and
    max_reuse.  A nonzero
    ``combine_key`` names a sharded gate's distributed.Sharding: the partial
    energy is then combined across ranks between the reduce and the finalize.
    """
    state = GateState(ring=ring, prev=prev, ints=ints, stats=stats, decision=decision, hyper=hyper, acc=acc)
    config = GateConfig(window=window, statistic=STATISTICS[statistic], max_reuse=max_reuse)
    backend = _lookup(backend_key)
    if combine_key:
        backend.reduce(grads, state, config)
        _lookup(combine_key).combine(acc)
        backend.finalize(state, config)
    else:
        backend.step(grads, state, config)


@gate_step.register_fake
def _(grads, ring, prev, ints, stats, decision, acc, hyper, window, statistic, max_reuse, backend_key, combine_key=0):
    return None


@torch.library.custom_op("dgg::gate_mask", mutates_args=("grads",))
def gate_mask(decision: torch.Tensor, grads: List[torch.Tensor], backend_key: int) -> None:
    """Zero every tensor of ``grads`` in place when ``decision`` (bool[]) is True."""
    _lookup(backend_key).mask(decision, grads)


@gate_mask.register_fake
def _(decision, grads, backend_key):
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
