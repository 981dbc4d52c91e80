"""backend="triton": the gate step as one Triton launch per monitor tensor (one launch for an lm_head).

Kernels:
- ``_gate_step_kernel``: every program strides over the gradient (int64
  offsets), accumulates x*x in float32 and writes one float32 partial.  In the
  launch for the last monitor tensor each program then takes an atomic ticket;
  the program holding the last ticket adds all partials in a fixed order in
  float64 (deterministic: same gradient, same bits), runs the finalize of
  ``torch_ref.finalize_reference`` on the device state, and resets the ticket
  to 0 so the next launch (or a CUDA-graph replay) needs no memset.
- ``_gate_mask_kernel``: reads the decision first and does nothing more when
  the gate is open; when closed it zeroes every gradient listed in a device
  table of (address, numel), one launch per dtype.

Both run under TRITON_INTERPRET=1 on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..config import GateConfig
from ..state import GateState
from .base import Backend, DeviceTable

_FLT_MAX = 3.4028234663852886e38

# What the last program of a launch does after the partials are written.
_LAST_NOTHING, _LAST_WRITE_ACC, _LAST_FINALIZE = 0, 1, 2

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


@triton.jit
def _finalize(
    energy, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
    WINDOW: tl.constexpr, WBLOCK: tl.constexpr, STAT: tl.constexpr,
):
    # Mirrors torch_ref.finalize_reference line for line; all float64.
    energy = tl.where(energy > 3.4028234663852886e38, float("inf"), energy)
    finite = energy <= 3.4028234663852886e38
    norm = tl.sqrt(energy)
    has_prev_i = tl.load(ints_ptr + 6)  # HAS_PREV
    prev = tl.load(prev_ptr)
    if STAT == 0:
        stat = norm
    elif STAT == 1:
        stat = energy
    else:
        stat = tl.where(has_prev_i > 0, energy - prev, 0.0)

    count = tl.load(ints_ptr + 1)  # COUNT
    widx = tl.arange(0, WBLOCK)
    ring = tl.load(ring_ptr + widx, mask=widx < WINDOW, other=0.0)
    valid = widx < count
    n = tl.maximum(count, 1).to(tl.float64)
    mean = tl.sum(tl.where(valid, ring, 0.0), 0) / n
    dev = tl.where(valid, ring - mean, 0.0)
    std = tl.sqrt(tl.sum(dev * dev, 0) / n)
    full = count == WINDOW
    reuse = tl.load(ints_ptr + 4) + 1  # REUSE
    threshold = tl.load(hyper_ptr + 0)
    eps = tl.load(hyper_ptr + 1)
    z = tl.where(full, (stat - mean) / (std + eps), 0.0)
    closed = (finite == 0) | (full & (reuse > 1) & (z > threshold))
    accept = closed == 0
    if STAT == 2:
        push = accept & (has_prev_i > 0)  # the first accepted increment has nothing to push
    else:
        push = accept

    pos = tl.load(ints_ptr + 0)  # POS
    tl.store(ring_ptr + pos, stat, mask=push)
    tl.store(prev_ptr, tl.where(accept, energy, prev))
    tl.store(ints_ptr + 0, tl.where(push, (pos + 1) % WINDOW, pos))
    tl.store(ints_ptr + 1, tl.where(push, tl.minimum(count + 1, WINDOW), count))
    tl.store(ints_ptr + 2, tl.load(ints_ptr + 2) + accept.to(tl.int64))
    tl.store(ints_ptr + 3, tl.load(ints_ptr + 3) + closed.to(tl.int64))
    tl.store(ints_ptr + 4, reuse)
    stop = tl.load(ints_ptr + 5)
    tl.store(ints_ptr + 5, tl.where(closed | (reuse >= max_reuse), 1, stop))
    tl.store(ints_ptr + 6, tl.where(accept, 1, has_prev_i))

    tl.store(stats_ptr + 0, energy.to(tl.float32))
    tl.store(stats_ptr + 1, norm.to(tl.float32))
    tl.store(stats_ptr + 2, stat.to(tl.float32))
    tl.store(stats_ptr + 3, mean.to(tl.float32))
    tl.store(stats_ptr + 4, std.to(tl.float32))
    tl.store(stats_ptr + 5, z.to(tl.float32))
    tl.store(stats_ptr + 6, closed.to(tl.float32))
    tl.store(decision_ptr, closed)  # a torch.bool tensor: Triton stores int1 as one byte


@triton.jit
def _sum_partials(partials_ptr, n_partials, PBLOCK: tl.constexpr):
    # Fixed order: the same partials always give the same bits.
    total = tl.zeros([PBLOCK], tl.float64)
    for start in range(0, n_partials, PBLOCK):
        offs = start + tl.arange(0, PBLOCK)
        total += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0, cache_modifier=".cg").to(tl.float64)
    return tl.sum(total, 0)


@triton.jit
def _gate_step_kernel(
    x_ptr, n_elements, partials_ptr, slot0, slots_per_tensor, n_partials, ticket_ptr, acc_ptr,
    ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
    BLOCK: tl.constexpr, PBLOCK: tl.constexpr, LAST: tl.constexpr,
    WINDOW: tl.constexpr, WBLOCK: tl.constexpr, STAT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.float32)
    # int64 from the start: a 262144 x 8192 lm_head has more than 2^31 entries.
    start0 = pid.to(tl.int64) * BLOCK
    stride = nprog.to(tl.int64) * BLOCK
    for start in range(start0, n_elements, stride):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0, cache_modifier=".cg").to(tl.float32)
        acc += x * x
    tl.store(partials_ptr + slot0 + pid, tl.sum(acc, 0))
    if pid == 0:
        # Slots this launch does not fill must read as 0 to the finalize.
        rest = nprog + tl.arange(0, PBLOCK)
        for s in range(0, slots_per_tensor, PBLOCK):
            tl.store(partials_ptr + slot0 + s + rest, tl.zeros([PBLOCK], tl.float32), mask=s + rest < slots_per_tensor)
    if LAST != 0:
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == nprog - 1:
            energy = _sum_partials(partials_ptr, n_partials, PBLOCK)
            if LAST == 1:
                tl.store(acc_ptr, energy)
            else:
                _finalize(energy, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
                          WINDOW, WBLOCK, STAT)
            tl.store(ticket_ptr, 0)


@triton.jit
def _gate_finalize_kernel(
    acc_ptr, partials_ptr, n_partials, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
    FROM_PARTIALS: tl.constexpr, PBLOCK: tl.constexpr,
    WINDOW: tl.constexpr, WBLOCK: tl.constexpr, STAT: tl.constexpr,
):
    # FROM_PARTIALS: the overlapped path, where each monitor tensor was reduced
    # separately during backward; otherwise the energy is in acc (after a collective).
    if FROM_PARTIALS:
        energy = _sum_partials(partials_ptr, n_partials, PBLOCK)
    else:
        energy = tl.load(acc_ptr)
    _finalize(energy, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
              WINDOW, WBLOCK, STAT)


@triton.jit
def _gate_mask_kernel(decision_ptr, table_ptr, n_tensors, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    closed = tl.load(decision_ptr)
    if closed != 0:
        pid = tl.program_id(0).to(tl.int64)
        stride = tl.num_programs(0).to(tl.int64) * BLOCK
        for t in range(0, n_tensors):
            addr = tl.load(table_ptr + 2 * t)
            numel = tl.load(table_ptr + 2 * t + 1)
            ptr = addr.to(tl.pointer_type(DTYPE), bitcast=True)
            for start in range(pid * BLOCK, numel, stride):
                offs = start + tl.arange(0, BLOCK)
                tl.store(ptr + offs, tl.zeros([BLOCK], DTYPE), mask=offs < numel)


def _check_grads(grads: Sequence[torch.Tensor], what: str) -> None:
    for i, g in enumerate(grads):
        if g.dtype not in _TL_DTYPE:
            raise TypeError(f"{what}[{i}] has dtype {g.dtype}; the triton backend takes float32, bfloat16, float16, float64")


class TritonBackend(Backend):
    """Fused Triton gate.

    Block sizes: BLOCK elements per program iteration, ``programs_per_sm``
    programs per SM on CUDA (``cpu_programs`` under the interpreter).
    """

    name = "triton"

    def __init__(self, block: int | None = None, programs_per_sm: int = 4, num_warps: int = 8, cpu_programs: int = 4):
        self.block = block
        self.programs_per_sm = programs_per_sm
        self.num_warps = num_warps
        self.cpu_programs = cpu_programs
        self._scratch: dict = {}  # (device, n_tensors) -> (partials, ticket)
        self._tables: dict[torch.dtype, DeviceTable] = {}

    # -- launch configuration -------------------------------------------------
    def _config(self, device: torch.device) -> tuple[int, int]:
        """(BLOCK, max programs per tensor) for ``device``."""
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            return self.block or 4096, self.programs_per_sm * sms
        return self.block or 256, self.cpu_programs

    def _scratch_for(self, device: torch.device, n_tensors: int, slots: int):
        key = (str(device), n_tensors)
        if key not in self._scratch:
            partials = torch.zeros(n_tensors * slots, dtype=torch.float32, device=device)
            ticket = torch.zeros(1, dtype=torch.int32, device=device)
            self._scratch[key] = (partials, ticket)
        return self._scratch[key]

    def _launch_one(self, index, g, n_tensors, state: GateState, config: GateConfig, last: int) -> None:
        device = g.device
        block, slots = self._config(device)
        partials, ticket = self._scratch_for(device, n_tensors, slots)
        x = g if g.is_contiguous() else g.contiguous()
        n = x.numel()
        nprog = max(1, min(slots, triton.cdiv(n, block)))
        _gate_step_kernel[(nprog,)](
            x, n, partials, index * slots, slots, partials.numel(), ticket, state.acc,
            state.ring, state.prev, state.ints, state.stats, state.decision, state.hyper, config.max_reuse,
            BLOCK=block, PBLOCK=self._pblock(slots), LAST=last,
            WINDOW=config.window, WBLOCK=triton.next_power_of_2(config.window), STAT=config.statistic_id,
            num_warps=self.num_warps if device.type == "cuda" else 1,
        )

    @staticmethod
    def _pblock(slots: int) -> int:
        return triton.next_power_of_2(min(max(slots, 16), 1024))

    def _launch_reduce(self, grads, state: GateState, config: GateConfig, last: int) -> None:
        _check_grads(grads, "monitor grad")
        for i, g in enumerate(grads):
            self._launch_one(i, g, len(grads), state, config, last if i == len(grads) - 1 else _LAST_NOTHING)

    # -- Backend interface ----------------------------------------------------
    def step(self, grads, state: GateState, config: GateConfig) -> None:
        self._launch_reduce(grads, state, config, _LAST_FINALIZE)

    def reduce(self, grads, state: GateState, config: GateConfig) -> None:
        self._launch_reduce(grads, state, config, _LAST_WRITE_ACC)

    def _finalize_launch(self, state: GateState, config: GateConfig, n_tensors: int, from_partials: bool) -> None:
        _, slots = self._config(state.acc.device)
        partials, _ = self._scratch_for(state.acc.device, n_tensors, slots)
        _gate_finalize_kernel[(1,)](
            state.acc, partials, partials.numel(), state.ring, state.prev, state.ints, state.stats, state.decision,
            state.hyper, config.max_reuse, FROM_PARTIALS=from_partials, PBLOCK=self._pblock(slots),
            WINDOW=config.window, WBLOCK=triton.next_power_of_2(config.window), STAT=config.statistic_id,
        )

    def finalize(self, state: GateState, config: GateConfig) -> None:
        self._finalize_launch(state, config, 1, from_partials=False)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        _check_grads([grad], "monitor grad")
        self._launch_one(index, grad, n_tensors, state, config, _LAST_NOTHING)

    def finalize_partials(self, n_tensors, state, config) -> None:
        self._finalize_launch(state, config, n_tensors, from_partials=True)

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        _check_grads(grads, "params grad")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            if g.is_contiguous():
                by_dtype.setdefault(g.dtype, []).append(g)
            else:  # a strided view cannot be zeroed through a flat table
                g.masked_fill_(decision, 0)
        for dtype, group in by_dtype.items():
            table = self._table(dtype, group)
            device = group[0].device
            block = 4096 if device.type == "cuda" else 256
            nprog = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
            _gate_mask_kernel[(nprog,)](decision, table, len(group), DTYPE=_TL_DTYPE[dtype], BLOCK=block,
                                        num_warps=4 if device.type == "cuda" else 1)

    def _table(self, dtype: torch.dtype, group: list[torch.Tensor]) -> torch.Tensor:
        """Device (address, numel) pairs of ``group``, rebuilt only when a grad moved (no host sync)."""
        table = self._tables.setdefault(dtype, DeviceTable())
        table.update(tuple((g.data_ptr(), g.numel()) for g in group), group[0].device)
        return table.table
