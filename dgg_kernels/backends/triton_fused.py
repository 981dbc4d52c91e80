"""backend="triton": the gate step as one Triton launch per monitor tensor (one launch for an lm_head).

``TritonBackend`` is the top of three layers (as in Liger-Kernel):
``triton_kernels.py`` holds the @triton.jit kernels, ``triton_launch.py`` the
launch configuration, the direct launcher and the launch functions over
tensors, and this file the backend class: what a gate keeps across steps (the
launch layout per device, the scratch, the launch-site cache, the mask plan
and its pointer tables), every launch made by a ``triton_launch`` function.

A step is one step-kernel launch per monitor tensor, the finalize folded into
the last (``step``), or the reduce alone and the finalize kernel after it
(``reduce`` / ``finalize``, with a collective in between), then one mask
launch (per zeroing unit in use).  All run under TRITON_INTERPRET=1 on CPU
tensors, which is how CI tests them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..config import GateConfig
from ..state import GateState
from .base import Backend, DeviceTable, MaskPlan, zero_where
from .triton_launch import (
    CPU_CONFIG,
    CUDA_CONFIGS,
    LaunchConfig,
    _DeviceLayout,
    _LAST_FINALIZE,
    _LAST_NOTHING,
    _LAST_WRITE_ACC,
    _MaskCall,
    launch_finalize,
    launch_mask,
    launch_reduce,
    mask_calls,
    new_scratch,
)

# LaunchConfig and its tables live in triton_launch; importable from here too (the backend's settings).
__all__ = ["TritonBackend", "LaunchConfig", "CUDA_CONFIGS", "CPU_CONFIG"]


class TritonBackend(Backend):
    """Fused Triton gate.

    The reduce launch per gradient dtype comes from ``CUDA_CONFIGS`` (on CUDA)
    or ``CPU_CONFIG`` (under the interpreter); ``configs`` replaces entries,
    and ``block``, ``programs_per_sm``, ``num_warps`` given here override
    every dtype (``block`` and ``cpu_programs`` also the interpreter's).
    """

    name = "triton"

    def __init__(
        self,
        block: int | None = None,
        programs_per_sm: int | None = None,
        num_warps: int | None = None,
        cpu_programs: int = 4,
        configs: dict[torch.dtype, LaunchConfig] | None = None,
    ) -> None:
        override = {k: v for k, v in (("block", block), ("programs_per_sm", programs_per_sm),
                                      ("num_warps", num_warps)) if v is not None}
        merged = {**CUDA_CONFIGS, **(configs or {})}
        self.configs = {dt: dataclasses.replace(c, **override) for dt, c in merged.items()}
        self.cpu_config = dataclasses.replace(CPU_CONFIG, programs_per_sm=cpu_programs,
                                              **({"block": block} if block is not None else {}))
        self._layouts: dict[torch.device, _DeviceLayout] = {}
        self._scratch: dict = {}  # (device, n_tensors) -> (partials, ticket)
        self._tables: dict[int, DeviceTable] = {}  # mask zeroing unit (bytes) -> its pointer table
        self._launches: dict = {}  # launch site -> triton_launch._Launch (the direct-launch cache)
        self._plan: MaskPlan | None = None
        self._mask_calls: list[_MaskCall] = []

    # -- launch configuration -------------------------------------------------
    def _layout(self, device: torch.device) -> _DeviceLayout:
        lay = self._layouts.get(device)
        if lay is None:
            lay = self._layouts[device] = _DeviceLayout(device, self.configs, self.cpu_config)
        return lay

    def _config(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
        """(BLOCK, max programs per tensor) for ``dtype`` on ``device``."""
        block, programs, _ = self._layout(device).configs.get(dtype) or self._layout(device).fallback
        return block, programs

    def _scratch_for(self, device: torch.device, n_tensors: int, slots: int):
        key = (device, n_tensors)
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = new_scratch(device, n_tensors, slots)
        return scratch

    def _launch_one(self, index, g, n_tensors, state: GateState, config: GateConfig, last: int) -> None:
        lay = self._layout(g.device)
        partials, ticket = self._scratch_for(g.device, n_tensors, lay.slots)
        launch_reduce(g, index, partials, ticket, state, config, lay, last, self._launches)

    def _launch_reduce(self, grads, state: GateState, config: GateConfig, last: int) -> None:
        n = len(grads)
        for i, g in enumerate(grads):
            self._launch_one(i, g, n, state, config, last if i == n - 1 else _LAST_NOTHING)

    # -- Backend interface ----------------------------------------------------
    def step(self, grads, state: GateState, config: GateConfig) -> None:
        self._launch_reduce(grads, state, config, _LAST_FINALIZE)

    def reduce(self, grads, state: GateState, config: GateConfig) -> None:
        self._launch_reduce(grads, state, config, _LAST_WRITE_ACC)

    def _finalize_launch(self, state: GateState, config: GateConfig, n_tensors: int, from_partials: bool) -> None:
        device = state.acc.device
        lay = self._layout(device)
        partials, _ = self._scratch_for(device, n_tensors, lay.slots)
        launch_finalize(state, config, partials, lay, from_partials, self._launches)

    def finalize(self, state: GateState, config: GateConfig) -> None:
        self._finalize_launch(state, config, 1, from_partials=False)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        self._launch_one(index, grad, n_tensors, state, config, _LAST_NOTHING)

    def finalize_partials(self, n_tensors, state, config) -> None:
        self._finalize_launch(state, config, n_tensors, from_partials=True)

    # -- mask -------------------------------------------------------------------
    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key: tuple | None = None) -> None:
        """One launch (per zeroing unit; normally one) over a cached pointer table; no per-grad Python work
        while the grads keep their addresses, sizes and layouts (see base.MaskPlan)."""
        if key is None:
            key = MaskPlan.key_of(grads)
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._new_plan(key, grads, decision.device)
        launch_mask(self._mask_calls, decision)
        for i in plan.strided:  # gapped views
            zero_where(grads[i], decision)

    def _new_plan(self, key: tuple, grads: Sequence[torch.Tensor], device: torch.device) -> MaskPlan:
        plan = MaskPlan(key, grads)
        calls = mask_calls(plan, device, self._layout(device), self._tables, self._launches)
        self._plan, self._mask_calls = plan, calls
        return plan
