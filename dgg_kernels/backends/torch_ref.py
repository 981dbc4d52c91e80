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
from .base import Backend, zero_where

# An energy above the float32 range is +inf: the fused kernels accumulate in
# float32 and see inf there, and a gradient with a norm above 1.8e19 is broken
# in any case.  NaN stays NaN.
FLT_MAX = float(torch.finfo(torch.float32).max)


def _window_test(ring: torch.Tensor, count: torch.Tensor, stat: torch.Tensor, eps: torch.Tensor, window: int):
    """One Z-score test of ``stat`` against a window (``ring``, ``count`` filled slots), all float64.

    Returns (mean, std, z, full): the mean and population std of the filled
    slots (0 for an empty window), and z = (stat - mean) / (std + eps) once
    the window is full, else 0.
    """
    slots = torch.arange(window, device=ring.device)
    valid = slots < count
    n = count.clamp(min=1).to(torch.float64)
    mean = torch.where(valid, ring, 0.0).sum() / n
    std = (torch.where(valid, (ring - mean) ** 2, 0.0).sum() / n).sqrt()
    full = count == window
    z = torch.where(full, (stat - mean) / (std + eps), torch.zeros_like(stat))
    return mean, std, z, full


def _push(ring: torch.Tensor, pos: torch.Tensor, push: torch.Tensor, stat: torch.Tensor, window: int) -> None:
    slots = torch.arange(window, device=ring.device)
    ring.copy_(torch.where(push & (slots == pos), stat, ring))


def finalize_reference(state: GateState, config: GateConfig) -> None:
    """Apply one step's finalize to ``state`` given the energy in ``state.acc``.

    All arithmetic is float64.  Units: energy in squared gradient units; the
    statistic is in the units of its kind (norm, energy, or energy increment).
    With statistic "energy+increment" two tests run, each on its own ring
    (state.ring[:window] the energies, state.ring[window:] the increments).
    """
    ints, ring = state.ints, state.ring
    window = config.window
    eps, threshold = state.hyper[S.EPS], state.hyper[S.THRESHOLD]
    energy = state.acc[0]
    energy = torch.where(energy > FLT_MAX, torch.full_like(energy, float("inf")), energy)
    finite = energy <= FLT_MAX  # false for NaN and inf; a sum of squares is never negative
    norm = energy.sqrt()
    has_prev = ints[S.HAS_PREV] > 0
    # the increment: energy minus the previous accepted energy; the first accepted
    # step has nothing to subtract, so it reports 0 and enters no increment window
    increment = torch.where(has_prev, energy - state.prev[0], torch.zeros_like(energy))
    # passes of several steps (new_pass() called since new_batch()): only the first step of a pass advances the
    # reuse index, and once a step of the batch closed, every later one closes too (the batch is over)
    pass_mode = ints[S.PASS_MODE] > 0
    reuse = ints[S.REUSE] + torch.where(pass_mode, ints[S.PASS_NEW], torch.ones_like(ints[S.REUSE]))
    latched = pass_mode & (ints[S.BATCH_CLOSED] > 0)
    # window_mode "batch": only the first pass of a batch (reuse index 1) enters a window
    enters = (state.hyper[S.WINDOW_MODE] == 0) | (reuse == 1)
    count, pos = ints[S.COUNT], ints[S.POS]
    count2, pos2 = ints[S.COUNT2], ints[S.POS2]

    if config.statistic == "energy+increment":
        mean_e, std_e, z_e, full_e = _window_test(ring[:window], count, energy, eps, window)
        mean_i, std_i, z_i, full_i = _window_test(ring[window:], count2, increment, eps, window)
        fires = (full_e & (z_e > threshold)) | (full_i & (z_i > threshold))
        closed = ~finite | ((reuse > 1) & fires) | latched
        accept = ~closed
        push, push2 = accept & enters, accept & enters & has_prev
        _push(ring[:window], pos, push, energy, window)
        _push(ring[window:], pos2, push2, increment, window)
        # report the test with the larger z (the increment test only when strictly larger, so NaN -> energy)
        pick_i = z_i > z_e
        stat = torch.where(pick_i, increment, energy)
        mean = torch.where(pick_i, mean_i, mean_e)
        std = torch.where(pick_i, std_i, std_e)
        z = torch.where(pick_i, z_i, z_e)
        z_energy, z_increment = z_e, z_i
    else:
        if config.statistic == "norm":
            stat, pushable = norm, torch.ones_like(has_prev)
        elif config.statistic == "energy":
            stat, pushable = energy, torch.ones_like(has_prev)
        else:  # increment
            stat, pushable = increment, has_prev
        mean, std, z, full = _window_test(ring, count, stat, eps, window)
        closed = ~finite | (full & (reuse > 1) & (z > threshold)) | latched
        accept = ~closed
        push, push2 = accept & enters & pushable, torch.zeros_like(accept)
        _push(ring, pos, push, stat, window)
        # the test a single statistic does not run reports z = 0 (never above a threshold)
        zero = torch.zeros_like(z)
        z_energy, z_increment = (zero, z) if config.statistic == "increment" else (z, zero)

    state.prev.copy_(torch.where(accept, energy, state.prev[0]).reshape(1))
    one = torch.ones_like(pos)
    new_ints = [None] * S.N_INTS
    new_ints[S.POS] = torch.where(push, (pos + 1) % window, pos)
    new_ints[S.COUNT] = torch.where(push, (count + 1).clamp(max=window), count)
    new_ints[S.ACCEPTED] = ints[S.ACCEPTED] + accept.long()
    new_ints[S.CLOSED_TOTAL] = ints[S.CLOSED_TOTAL] + closed.long()
    new_ints[S.REUSE] = reuse
    new_ints[S.STOP] = torch.where(closed | (reuse >= config.max_reuse), one, ints[S.STOP])
    new_ints[S.HAS_PREV] = torch.where(accept, one, ints[S.HAS_PREV])
    new_ints[S.POS2] = torch.where(push2, (pos2 + 1) % window, pos2)
    new_ints[S.COUNT2] = torch.where(push2, (count2 + 1).clamp(max=window), count2)
    new_ints[S.PASS_MODE] = ints[S.PASS_MODE]
    new_ints[S.PASS_NEW] = torch.zeros_like(pos)
    new_ints[S.BATCH_CLOSED] = torch.where(closed, one, ints[S.BATCH_CLOSED])
    ints.copy_(torch.stack(new_ints))
    new_stats = [None] * S.N_STATS
    new_stats[S.ENERGY], new_stats[S.NORM], new_stats[S.STATISTIC] = energy, norm, stat
    new_stats[S.MEAN], new_stats[S.STD], new_stats[S.Z] = mean, std, z
    new_stats[S.CLOSED] = closed.to(torch.float64)
    new_stats[S.Z_ENERGY], new_stats[S.Z_INCREMENT] = z_energy, z_increment
    state.stats.copy_(torch.stack(new_stats))
    state.decision.copy_(closed)


def _norm32(g: torch.Tensor) -> torch.Tensor:
    """The float32 L2 norm of ``g`` with every entry rounded to float32 first (the spec for every dtype).

    vector_norm widens bf16/fp16 entries to float32 without materializing g.float()**2; it refuses to
    narrow float64, so a float64 grad is rounded to a float32 copy first (entries beyond the float32
    range become inf, as in the kernels).
    """
    return torch.linalg.vector_norm(g.float() if g.dtype == torch.float64 else g, dtype=torch.float32)


class TorchBackend(Backend):
    name = "torch"

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        # squaring the float32 norm in float64 keeps the energy within float32 rounding
        norms = [_norm32(g) for g in grads]
        state.acc.copy_((torch.stack(norms).to(torch.float64) ** 2).sum().reshape(1))

    def finalize(self, state: GateState, config: GateConfig) -> None:
        finalize_reference(state, config)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        if getattr(self, "_parts", None) is None or self._parts.numel() != n_tensors or self._parts.device != grad.device:
            self._parts = torch.zeros(n_tensors, dtype=torch.float64, device=grad.device)
        norm = _norm32(grad)
        self._parts[index].copy_(norm.to(torch.float64) ** 2)

    def finalize_partials(self, n_tensors, state, config) -> None:
        state.acc.copy_(self._parts.sum().reshape(1))
        finalize_reference(state, config)

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key=None) -> None:
        for g in grads:
            zero_where(g, decision)
