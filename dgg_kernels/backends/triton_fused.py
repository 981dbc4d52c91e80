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
  table of (address, length in units), in 4-byte units for every dtype (zero
  bits are 0.0 in each), so one launch covers fp32, bf16 and fp16 grads alike
  (2- or 1-byte units only for an odd address or size).

Both run under TRITON_INTERPRET=1 on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .. import state as S
from ..config import GateConfig
from ..state import GateState
from .base import Backend, DeviceTable, MaskPlan, zero_where

_FLT_MAX = 3.4028234663852886e38

# What the last program of a launch does after the partials are written.
_LAST_NOTHING, _LAST_WRITE_ACC, _LAST_FINALIZE = 0, 1, 2

# The state's slots (dgg_kernels/state.py, the single source of truth) as compile-time constants.
_POS, _COUNT, _POS2, _COUNT2 = (tl.constexpr(v) for v in (S.POS, S.COUNT, S.POS2, S.COUNT2))
_ACCEPTED, _CLOSED_TOTAL = tl.constexpr(S.ACCEPTED), tl.constexpr(S.CLOSED_TOTAL)
_REUSE, _STOP, _HAS_PREV = (tl.constexpr(v) for v in (S.REUSE, S.STOP, S.HAS_PREV))
_ENERGY, _NORM, _STATISTIC, _MEAN = (tl.constexpr(v) for v in (S.ENERGY, S.NORM, S.STATISTIC, S.MEAN))
_STD, _Z, _CLOSED = (tl.constexpr(v) for v in (S.STD, S.Z, S.CLOSED))
_Z_ENERGY, _Z_INCREMENT = tl.constexpr(S.Z_ENERGY), tl.constexpr(S.Z_INCREMENT)
_THRESHOLD, _EPS, _WINDOW_MODE = (tl.constexpr(v) for v in (S.THRESHOLD, S.EPS, S.WINDOW_MODE))
_PASS_MODE, _PASS_NEW, _BATCH_CLOSED = (tl.constexpr(v) for v in (S.PASS_MODE, S.PASS_NEW, S.BATCH_CLOSED))
_KL, _KL_LIMIT = tl.constexpr(S.KL), tl.constexpr(S.KL_LIMIT)
_ACC_ENERGY, _ACC_KL = tl.constexpr(S.ACC_ENERGY), tl.constexpr(S.ACC_KL)


@triton.jit
def _window_z(ring_ptr, count, stat, eps, WINDOW: tl.constexpr):
    # One Z-score test (finalize._window_test): mean and population std of the
    # count filled slots of the ring at ring_ptr, z once the window is full.
    # Both sums run left to right in slot order (finalize._sum_slots), not
    # as tl.sum's tree: every form of the finalize adds in this one order.  The
    # launches pass enable_fp_fusion=False, so d * d + total is not contracted
    # into a fused multiply-add (which rounds once, where the others round twice).
    n = tl.maximum(count, 1).to(tl.float64)
    total = tl.zeros_like(stat)
    for k in range(0, WINDOW):
        total = total + tl.where(k < count, tl.load(ring_ptr + k), 0.0)
    mean = total / n
    sq = tl.zeros_like(stat)
    for k in range(0, WINDOW):
        d = tl.where(k < count, tl.load(ring_ptr + k) - mean, 0.0)
        sq = sq + d * d
    std = tl.sqrt(sq / n)
    full = count == WINDOW
    z = tl.where(full, (stat - mean) / (std + eps), 0.0)
    return mean, std, z, full


@triton.jit
def _finalize(
    energy, acc_ptr, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
    WINDOW: tl.constexpr, STAT: tl.constexpr,
):
    # Mirrors torch_ref.finalize_reference line for line; all float64.
    # STAT: 0 norm, 1 energy, 2 increment, 3 energy+increment (two tests, two rings).
    energy = tl.where(energy > 3.4028234663852886e38, float("inf"), energy)
    finite = energy <= 3.4028234663852886e38
    # the KL stop: the KL observe_kl gave (0 when none); one not finite in float32 closes at any reuse index
    kl = tl.load(acc_ptr + _ACC_KL)
    kl_finite = tl.abs(kl) <= 3.4028234663852886e38
    kl_over = kl > tl.load(hyper_ptr + _KL_LIMIT)
    norm = tl.sqrt(energy)
    has_prev_i = tl.load(ints_ptr + _HAS_PREV)
    prev = tl.load(prev_ptr)
    # the first accepted step has nothing to subtract: increment 0, enters no increment window
    increment = tl.where(has_prev_i > 0, energy - prev, 0.0)
    # passes of several steps: only a pass's first step advances the reuse index; after a close in this
    # batch every later step closes
    pass_mode = tl.load(ints_ptr + _PASS_MODE) > 0
    reuse = tl.load(ints_ptr + _REUSE) + tl.where(pass_mode, tl.load(ints_ptr + _PASS_NEW), 1)
    batch_closed = tl.load(ints_ptr + _BATCH_CLOSED)
    latched = pass_mode & (batch_closed > 0)
    threshold = tl.load(hyper_ptr + _THRESHOLD)
    eps = tl.load(hyper_ptr + _EPS)
    # window mode "batch" (1.0): only the first step after new_batch() (reuse index 0 before it) enters a
    # window: one statistic per rollout batch, also with passes of several mini-batches
    enters = (tl.load(hyper_ptr + _WINDOW_MODE) == 0.0) | (tl.load(ints_ptr + _REUSE) == 0)
    count = tl.load(ints_ptr + _COUNT)
    pos = tl.load(ints_ptr + _POS)
    zero = tl.zeros_like(energy)

    if STAT == 3:
        count2 = tl.load(ints_ptr + _COUNT2)
        pos2 = tl.load(ints_ptr + _POS2)
        mean_e, std_e, z_e, full_e = _window_z(ring_ptr, count, energy, eps, WINDOW)
        mean_i, std_i, z_i, full_i = _window_z(ring_ptr + WINDOW, count2, increment, eps, WINDOW)
        fires = (full_e & (z_e > threshold)) | (full_i & (z_i > threshold)) | kl_over
        closed = (finite == 0) | (kl_finite == 0) | ((reuse > 1) & fires) | latched
        accept = closed == 0
        push = accept & enters
        push2 = push & (has_prev_i > 0)
        tl.store(ring_ptr + pos, energy, mask=push)
        tl.store(ring_ptr + WINDOW + pos2, increment, mask=push2)
        tl.store(ints_ptr + _POS2, tl.where(push2, (pos2 + 1) % WINDOW, pos2))
        tl.store(ints_ptr + _COUNT2, tl.where(push2, tl.minimum(count2 + 1, WINDOW), count2))
        # report the test with the larger z (the increment test only when strictly larger: NaN -> energy)
        pick_i = z_i > z_e
        stat = tl.where(pick_i, increment, energy)
        mean = tl.where(pick_i, mean_i, mean_e)
        std = tl.where(pick_i, std_i, std_e)
        z = tl.where(pick_i, z_i, z_e)
        z_energy = z_e
        z_increment = z_i
    else:
        if STAT == 0:
            stat = norm
        elif STAT == 1:
            stat = energy
        else:
            stat = increment
        mean, std, z, full = _window_z(ring_ptr, count, stat, eps, WINDOW)
        closed = (finite == 0) | (kl_finite == 0) | ((reuse > 1) & ((full & (z > threshold)) | kl_over)) | latched
        accept = closed == 0
        if STAT == 2:
            push = accept & enters & (has_prev_i > 0)
            z_energy = zero  # a test this statistic does not run reports 0
            z_increment = z
        else:
            push = accept & enters
            z_energy = z
            z_increment = zero
        tl.store(ring_ptr + pos, stat, mask=push)

    tl.store(prev_ptr, tl.where(accept, energy, prev))
    tl.store(ints_ptr + _POS, tl.where(push, (pos + 1) % WINDOW, pos))
    tl.store(ints_ptr + _COUNT, tl.where(push, tl.minimum(count + 1, WINDOW), count))
    tl.store(ints_ptr + _ACCEPTED, tl.load(ints_ptr + _ACCEPTED) + accept.to(tl.int64))
    tl.store(ints_ptr + _CLOSED_TOTAL, tl.load(ints_ptr + _CLOSED_TOTAL) + closed.to(tl.int64))
    tl.store(ints_ptr + _REUSE, reuse)
    stop = tl.load(ints_ptr + _STOP)
    tl.store(ints_ptr + _STOP, tl.where(closed | (reuse >= max_reuse), 1, stop))
    tl.store(ints_ptr + _HAS_PREV, tl.where(accept, 1, has_prev_i))
    tl.store(ints_ptr + _PASS_NEW, tl.zeros_like(reuse))
    tl.store(ints_ptr + _BATCH_CLOSED, tl.where(closed, 1, batch_closed))

    tl.store(stats_ptr + _ENERGY, energy.to(tl.float32))
    tl.store(stats_ptr + _NORM, norm.to(tl.float32))
    tl.store(stats_ptr + _STATISTIC, stat.to(tl.float32))
    tl.store(stats_ptr + _MEAN, mean.to(tl.float32))
    tl.store(stats_ptr + _STD, std.to(tl.float32))
    tl.store(stats_ptr + _Z, z.to(tl.float32))
    tl.store(stats_ptr + _CLOSED, closed.to(tl.float32))
    tl.store(stats_ptr + _Z_ENERGY, z_energy.to(tl.float32))
    tl.store(stats_ptr + _Z_INCREMENT, z_increment.to(tl.float32))
    tl.store(stats_ptr + _KL, kl.to(tl.float32))
    tl.store(acc_ptr + _ACC_KL, 0.0)  # consumed: a step without observe_kl judges no KL
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
    WINDOW: tl.constexpr, STAT: tl.constexpr,
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
                tl.store(acc_ptr + _ACC_ENERGY, energy)
            else:
                _finalize(energy, acc_ptr, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
                          WINDOW, STAT)
            tl.store(ticket_ptr, 0)


@triton.jit
def _gate_finalize_kernel(
    acc_ptr, partials_ptr, n_partials, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
    FROM_PARTIALS: tl.constexpr, PBLOCK: tl.constexpr,
    WINDOW: tl.constexpr, STAT: tl.constexpr,
):
    # FROM_PARTIALS: the overlapped path, where each monitor tensor was reduced
    # separately during backward; otherwise the energy is in acc (after a collective).
    if FROM_PARTIALS:
        energy = _sum_partials(partials_ptr, n_partials, PBLOCK)
    else:
        energy = tl.load(acc_ptr + _ACC_ENERGY)
    _finalize(energy, acc_ptr, ring_ptr, prev_ptr, ints_ptr, stats_ptr, decision_ptr, hyper_ptr, max_reuse,
              WINDOW, STAT)


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


# -- launch configuration ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How the reduce kernel is launched for one gradient dtype.

    block: elements per program iteration (a power of 2); programs_per_sm: the
    grid is at most this many programs per SM (under the interpreter: this many
    programs in all); num_warps: warps per program.
    """

    block: int = 4096
    programs_per_sm: int = 4
    num_warps: int = 8


# The reduce launch per gradient dtype on CUDA.  Every entry holds the values the
# design-notes probe measured for fp32 and bf16 on an H100 (BLOCK 4096, 4 programs
# per SM, 8 warps), which are also the values used before this table existed;
# benchmarks/sweep_triton.py measures the alternatives on a device, and a dtype
# whose sweep winner beats these on every lm_head shape gets its own entry here.
CUDA_CONFIGS: dict[torch.dtype, LaunchConfig] = {
    torch.float32: LaunchConfig(),
    torch.bfloat16: LaunchConfig(),
    torch.float16: LaunchConfig(),
    torch.float64: LaunchConfig(),
}
# Under TRITON_INTERPRET=1 on CPU tensors: small blocks, a few programs (the interpreter runs them one by one).
CPU_CONFIG = LaunchConfig(block=256, programs_per_sm=4, num_warps=1)
# The mask kernel: BLOCK units per iteration, programs per SM (CUDA) or in all (CPU), warps.
MASK_CUDA = LaunchConfig(block=4096, programs_per_sm=2, num_warps=4)
MASK_CPU = LaunchConfig(block=256, programs_per_sm=2, num_warps=1)

# Zeroing unit of the mask: the widest integer type that divides a grad's address and byte size
# (zero bits are 0.0 in every float dtype, so one launch zeroes bf16, fp16 and fp32 grads alike).
_MASK_UNITS = ((4, tl.int32), (2, tl.int16), (1, tl.int8))

_SM_COUNT: dict[int, int] = {}  # CUDA device index -> multiprocessor count (read once per process)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(index)
    if n is None:
        n = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


class _DeviceLayout:
    """What a TritonBackend launches with on one device, computed once per device."""

    __slots__ = ("configs", "fallback", "slots", "pblock", "mask_programs", "mask_block", "mask_warps")

    def __init__(self, backend: "TritonBackend", device: torch.device) -> None:
        if device.type == "cuda":
            sms = _sm_count(device)
            configs = {dt: (c.block, c.programs_per_sm * sms, c.num_warps) for dt, c in backend.configs.items()}
            mask = MASK_CUDA
        else:
            sms = 1
            c = backend.cpu_config
            configs = {dt: (c.block, c.programs_per_sm, c.num_warps) for dt in backend.configs}
            mask = MASK_CPU
        self.configs = configs
        self.fallback = max(configs.values())
        # One partials stride for every dtype, so monitor tensors of different dtypes share one layout.
        self.slots = max(p for _, p, _ in configs.values())
        self.pblock = triton.next_power_of_2(min(max(self.slots, 16), 1024))
        self.mask_programs = mask.programs_per_sm * sms
        self.mask_block = mask.block
        self.mask_warps = mask.num_warps


# -- launching without the generic launcher's per-call work ------------------------------
def _fast_launch_default() -> bool:
    return os.environ.get("DGG_TRITON_FAST_LAUNCH", "1") != "0"


_FAST_LAUNCH = _fast_launch_default()
try:
    from triton.compiler import CompiledKernel as _CompiledKernel
except Exception:  # pragma: no cover - a triton without it: every launch goes through the JIT
    _CompiledKernel = None


def _runner_of(kernel, grid: tuple):
    """The compiled kernel's direct launcher for ``grid``, or None where there is none (the interpreter)."""
    if not _FAST_LAUNCH or _CompiledKernel is None or not isinstance(kernel, _CompiledKernel):
        return None
    try:
        return kernel[tuple(grid) + (1,) * (3 - len(grid))]
    except Exception:
        return None


def _arg_key(a):
    """What the JIT's choice of compiled kernel can depend on in one argument: a tensor's dtype and exact
    address (alignment is part of the specialization), any other value with its type (True is not 1)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr())
    return (type(a), a)


class _Launch:
    """One launch site of a @triton.jit kernel: the JIT path the first time, then the compiled kernel.

    ``launch(grid, num_warps, **kwargs)`` takes every kernel argument by name
    (Triton's own names, ``fn.arg_names``), so a call cannot pass them in the
    wrong order and an argument added to the kernel but not to the call fails
    loudly (TypeError) instead of launching with a stale list.  ``fn[grid](...)``
    (Triton's JIT) binds the arguments, computes their specialization (dtypes,
    16-byte alignment of pointers, integers equal to 1 or divisible by 16),
    looks the kernel up, and calls the compiled kernel's launcher with every
    argument in signature order.  The kernel it returns is remembered with a
    key derived from the whole argument list (``_arg_key`` of each: a tensor's
    dtype and address, any other value with its type), the grid, the warps
    and the current device: everything the JIT's choice depends on, and
    more.  A later call with an equal key passes arguments the JIT would
    specialize identically, so it goes straight to that kernel's launcher
    (``CompiledKernel[grid](*args)``, the same call the JIT ends with in Triton
    3.6 and 3.9).  Anything else goes through the JIT again.  Under the
    interpreter the JIT returns no compiled kernel and every call takes the JIT
    path.  ``DGG_TRITON_FAST_LAUNCH=0`` turns the direct path off.
    """

    __slots__ = ("fn", "names", "key", "runner", "hits")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names = tuple(fn.arg_names)
        self.key = None
        self.runner = None
        self.hits = 0  # direct launches so far (tests and benchmarks read it)

    def __call__(self, grid: tuple, num_warps: int, **kwargs) -> None:
        global _FAST_LAUNCH
        if len(kwargs) != len(self.names):
            extra = sorted(set(kwargs) - set(self.names))
            missing = [n for n in self.names if n not in kwargs]
            raise TypeError(f"{getattr(self.fn, '__name__', self.fn)}: missing arguments {missing}, unknown {extra}")
        args = tuple(kwargs[n] for n in self.names)  # KeyError names a misspelt argument
        runner = self.runner
        if runner is not None:
            key = (grid, num_warps, torch.cuda.current_device(), *map(_arg_key, args))
            if key == self.key:
                try:
                    runner(*args)
                    self.hits += 1
                    return
                except TypeError as e:  # the launcher refused the arguments before launching: JIT from now on
                    _FAST_LAUNCH = False
                    warnings.warn(f"dgg triton backend: direct kernel launch failed ({e}); using Triton's JIT launcher")
                    self.runner = None
        # no fused multiply-adds: the finalize rounds d * d and the sum separately, as every other form does
        kernel = self.fn[grid](*args, num_warps=num_warps, enable_fp_fusion=False)
        self.runner = _runner_of(kernel, grid)
        if self.runner is not None:
            self.key = (grid, num_warps, torch.cuda.current_device(), *map(_arg_key, args))


class _MaskCall(NamedTuple):
    """One mask launch of a plan: the grads zeroed in ``unit``-byte words (``dtype``), listed in ``table``."""

    launch: "_Launch"
    grid: tuple
    warps: int
    table: torch.Tensor
    n: int
    unit: int
    dtype: object
    block: int


def _on(device: torch.device):
    """A guard that makes ``device`` current while Triton launches (Triton launches on the current CUDA
    device, not on its tensors' device); nothing to do off CUDA or when it is current already."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


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
        self._launches: dict = {}  # launch site -> _Launch
        self._plan: MaskPlan | None = None
        self._mask_calls: list = []

    # -- launch configuration -------------------------------------------------
    def _layout(self, device: torch.device) -> _DeviceLayout:
        lay = self._layouts.get(device)
        if lay is None:
            lay = self._layouts[device] = _DeviceLayout(self, device)
        return lay

    def _config(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
        """(BLOCK, max programs per tensor) for ``dtype`` on ``device``."""
        block, programs, _ = self._layout(device).configs.get(dtype) or self._layout(device).fallback
        return block, programs

    def _launch(self, site, fn) -> _Launch:
        launch = self._launches.get(site)
        if launch is None:
            launch = self._launches[site] = _Launch(fn)
        return launch

    def _scratch_for(self, device: torch.device, n_tensors: int, slots: int):
        key = (device, n_tensors)
        scratch = self._scratch.get(key)
        if scratch is None:
            partials = torch.zeros(n_tensors * slots, dtype=torch.float32, device=device)
            ticket = torch.zeros(1, dtype=torch.int32, device=device)
            scratch = self._scratch[key] = (partials, ticket)
        return scratch

    def _launch_one(self, index, g, n_tensors, state: GateState, config: GateConfig, last: int) -> None:
        device = g.device
        lay = self._layout(device)
        block, programs, warps = lay.configs.get(g.dtype) or lay.fallback
        slots = lay.slots
        partials, ticket = self._scratch_for(device, n_tensors, slots)
        x = g if g.is_contiguous() else g.contiguous()
        n = x.numel()
        nprog = max(1, min(programs, -(-n // block)))
        window = config.window
        with _on(device):
            self._launch(("step", index, last), _gate_step_kernel)(
                (nprog,), warps if device.type == "cuda" else 1,
                x_ptr=x, n_elements=n, partials_ptr=partials, slot0=index * slots, slots_per_tensor=slots,
                n_partials=partials.numel(), ticket_ptr=ticket, acc_ptr=state.acc, ring_ptr=state.ring,
                prev_ptr=state.prev, ints_ptr=state.ints, stats_ptr=state.stats, decision_ptr=state.decision,
                hyper_ptr=state.hyper, max_reuse=config.max_reuse, BLOCK=block, PBLOCK=lay.pblock, LAST=last,
                WINDOW=window, STAT=config.statistic_id,
            )

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
        window = config.window
        with _on(device):
            self._launch(("finalize", from_partials), _gate_finalize_kernel)(
                (1,), 4,
                acc_ptr=state.acc, partials_ptr=partials, n_partials=partials.numel(), ring_ptr=state.ring,
                prev_ptr=state.prev, ints_ptr=state.ints, stats_ptr=state.stats, decision_ptr=state.decision,
                hyper_ptr=state.hyper, max_reuse=config.max_reuse, FROM_PARTIALS=from_partials, PBLOCK=lay.pblock,
                WINDOW=window, STAT=config.statistic_id,
            )

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
        with _on(decision.device):
            for c in self._mask_calls:
                c.launch(c.grid, c.warps, decision_ptr=decision, table_ptr=c.table, n_tensors=c.n, DTYPE=c.dtype,
                         BLOCK=c.block)
        for i in plan.strided:  # gapped views
            zero_where(grads[i], decision)

    def _new_plan(self, key: tuple, grads: Sequence[torch.Tensor], device: torch.device) -> MaskPlan:
        plan = MaskPlan(key, grads)
        by_unit: dict[int, list] = {}
        for _, addr, nbytes in plan.spans:
            unit = next(u for u, _ in _MASK_UNITS if addr % u == 0 and nbytes % u == 0)
            by_unit.setdefault(unit, []).append((addr, nbytes // unit))
        lay = self._layout(device)
        calls = []
        for unit, tl_type in _MASK_UNITS:
            rows = by_unit.get(unit)
            if not rows:
                continue
            table = self._tables.setdefault(unit, DeviceTable())
            table.update(tuple(rows), device)
            calls.append(_MaskCall(self._launch(("mask", unit), _gate_mask_kernel), (lay.mask_programs,),
                                   lay.mask_warps, table.table, len(rows), unit, tl_type, lay.mask_block))
        self._plan, self._mask_calls = plan, calls
        return plan
