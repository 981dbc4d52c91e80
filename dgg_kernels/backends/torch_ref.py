"""The semantics of one gate step, in plain torch (CPU and GPU).

Every other backend must match this one step for step: decisions exactly,
statistics within float32 rounding.  It is written with device-side ops only
(torch.where instead of Python branches) so it never synchronizes the host.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import state as S
from ..config import GateConfig
from ..state import GateState
from .base import Backend

# An energy above the float32 range is +inf: the fused kernels accumulate in
# float32 and see inf there, and a gradient with a norm above 1.8e19 is broken
# in any case.  NaN stays NaN.
FLT_MAX = float(torch.finfo(torch.float32).max)


def finalize_reference(state: GateState, config: GateConfig) -> None:
    """Apply one step's finalize to ``state`` given the energy in ``state.acc``.

    All arithmetic is float64.  Units: energy in squared gradient units; the
    statistic is in the units of its kind (norm, energy, or energy increment).
    """
    ints, ring = state.ints, state.ring
    window = config.window
    energy = state.acc[0]
    energy = torch.where(energy > FLT_MAX, torch.full_like(energy, float("inf")), energy)
    finite = energy <= FLT_MAX  # false for NaN and inf; a sum of squares is never negative
    norm = energy.sqrt()
    has_prev = ints[S.HAS_PREV] > 0
    if config.statistic == "norm":
        stat, pushable = norm, torch.ones_like(has_prev)
    elif config.statistic == "energy":
        stat, pushable = energy, torch.ones_like(has_prev)
    else:  # increment: the first accepted step has nothing to subtract, so it reports 0 and pushes nothing
        stat = torch.where(has_prev, energy - state.prev[0], torch.zeros_like(energy))
        pushable = has_prev

    count = ints[S.COUNT]
    slots = torch.arange(window, device=ring.device)
    valid = slots < count
    n = count.clamp(min=1).to(torch.float64)
    mean = torch.where(valid, ring, 0.0).sum() / n
    std = (torch.where(valid, (ring - mean) ** 2, 0.0).sum() / n).sqrt()
    full = count == window
    reuse = ints[S.REUSE] + 1
    z = torch.where(full, (stat - mean) / (std + state.hyper[S.EPS]), torch.zeros_like(stat))
    closed = ~finite | (full & (reuse > 1) & (z > state.hyper[S.THRESHOLD]))
    accept = ~closed
    push = accept & pushable

    pos = ints[S.POS]
    ring.copy_(torch.where(push & (slots == pos), stat, ring))
    state.prev.copy_(torch.where(accept, energy, state.prev[0]).reshape(1))
    one = torch.ones_like(pos)
    new_ints = torch.stack(
        [
            torch.where(push, (pos + 1) % window, pos),
            torch.where(push, (count + 1).clamp(max=window), count),
            ints[S.ACCEPTED] + accept.long(),
            ints[S.CLOSED_TOTAL] + closed.long(),
            reuse,
            torch.where(closed | (reuse >= config.max_reuse), one, ints[S.STOP]),
            torch.where(accept, one, ints[S.HAS_PREV]),
        ]
    )
    ints.copy_(new_ints)
    state.stats.copy_(torch.stack([energy, norm, stat, mean, std, z, closed.to(torch.float64)]))
    state.decision.copy_(closed)


class TorchBackend(Backend):
    name = "torch"

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        # vector_norm accumulates without materializing g.float()**2; squaring the
        # float32 norm in float64 keeps the energy within float32 rounding.
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        state.acc.copy_((torch.stack(norms).to(torch.float64) ** 2).sum().reshape(1))

    def finalize(self, state: GateState, config: GateConfig) -> None:
        finalize_reference(state, config)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        if getattr(self, "_parts", None) is None or self._parts.numel() != n_tensors or self._parts.device != grad.device:
            self._parts = torch.zeros(n_tensors, dtype=torch.float64, device=grad.device)
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._parts[index].copy_(norm.to(torch.float64) ** 2)

    def finalize_partials(self, n_tensors, state, config) -> None:
        state.acc.copy_(self._parts.sum().reshape(1))
        finalize_reference(state, config)

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        for g in grads:
            g.masked_fill_(decision, 0)  # writes zeros: multiplying by a 0/1 mask would keep NaN
