"""The Triton gate's launch layer: launch configuration, a direct launcher, and launch functions over tensors.

One layer of three (as in Liger-Kernel): ``triton_kernels.py`` holds the
@triton.jit kernels, this file launches them, and ``triton_fused.py`` holds
``TritonBackend`` (``backend="triton"``): the caches a gate keeps across
steps, built on the functions here.

- Launch configuration: ``LaunchConfig`` and its tables (``CUDA_CONFIGS`` per
  gradient dtype on CUDA, ``CPU_CONFIG`` under the interpreter, ``MASK_CUDA``
  and ``MASK_CPU`` for the mask); ``_DeviceLayout`` is what they give on one
  device.
- The launcher: ``_Launch``, one launch site of a kernel, which goes through
  Triton's JIT the first time and then straight to the compiled kernel while
  the arguments stay the same (docs/semantics.md's cache table: "Triton
  direct launch").  ``_on(device)`` makes the tensors' device current around
  every launch (Triton launches on the current CUDA device).
- Launch functions that take tensors and the caches they fill
  (``launches``: launch site -> ``_Launch``; the scratch; the mask tables)
  from their caller, which is how ``TritonBackend`` runs every launch:
  ``launch_reduce`` (the step kernel over one monitor tensor),
  ``launch_finalize``, ``mask_calls`` + ``launch_mask``.
- On top of those, functions that need no gate and no backend (fresh caches
  by default; tests call them alone): ``sumsq`` (the reduce: the energy),
  ``finalize`` (the finalize on a GateState) and ``mask`` (zero grads when
  closed).

Every launch here is asynchronous: nothing reads the device (no host sync).
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import warnings
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .. import state as S
from ..config import GateConfig
from ..state import GateState
from .base import DeviceTable, MaskPlan, zero_where
from .triton_kernels import _gate_finalize_kernel, _gate_mask_kernel, _gate_step_kernel

# What the last program of a step-kernel launch does after the partials are written (the kernel's LAST).
_LAST_NOTHING, _LAST_WRITE_ACC, _LAST_FINALIZE = 0, 1, 2


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
    """What the launches on one device use, computed once per device (a TritonBackend keeps one per device).

    ``configs`` (dtype -> LaunchConfig, default ``CUDA_CONFIGS``) gives the
    reduce launch on CUDA; under the interpreter every dtype gets
    ``cpu_config`` (default ``CPU_CONFIG``).  Fields: ``configs`` dtype ->
    (BLOCK, max programs per tensor, warps); ``fallback`` the largest of those
    (a dtype not in the table); ``slots`` partials per monitor tensor (one
    stride for every dtype: the largest grid); ``pblock`` the block the
    partials are added in; ``mask_programs``, ``mask_block``, ``mask_warps``
    the mask launch.
    """

    __slots__ = ("configs", "fallback", "slots", "pblock", "mask_programs", "mask_block", "mask_warps")

    def __init__(
        self, device: torch.device, configs: dict[torch.dtype, LaunchConfig] | None = None,
        cpu_config: LaunchConfig | None = None,
    ) -> None:
        configs = CUDA_CONFIGS if configs is None else configs
        if device.type == "cuda":
            sms = _sm_count(device)
            table = {dt: (c.block, c.programs_per_sm * sms, c.num_warps) for dt, c in configs.items()}
            mask = MASK_CUDA
        else:
            sms = 1
            c = CPU_CONFIG if cpu_config is None else cpu_config
            table = {dt: (c.block, c.programs_per_sm, c.num_warps) for dt in configs}
            mask = MASK_CPU
        self.configs = table
        self.fallback = max(table.values())
        # One partials stride for every dtype, so monitor tensors of different dtypes share one layout.
        self.slots = max(p for _, p, _ in table.values())
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


_DATA_PTR = torch.Tensor.data_ptr
_DTYPE = operator.attrgetter("dtype")


def _getter(positions: list[int]):
    """A C-level ``args -> tuple of args[i] for i in positions`` (itemgetter returns a bare item for one)."""
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


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
    key derived from the whole argument list: every argument's type, every
    tensor's dtype and exact address (alignment is part of the
    specialization), every other argument's value (True is not 1: the types
    differ), plus the grid, the warps and the current device: everything the
    JIT's choice depends on, and
    more.  A later call with an equal key passes arguments the JIT would
    specialize identically, so it goes straight to that kernel's launcher
    (``CompiledKernel[grid](*args)``, the same call the JIT ends with in Triton
    3.6 and 3.9).  Anything else goes through the JIT again.  Under the
    interpreter the JIT returns no compiled kernel and every call takes the JIT
    path.  ``DGG_TRITON_FAST_LAUNCH=0`` turns the direct path off.
    """

    __slots__ = ("fn", "names", "pick", "key", "runner", "hits", "split")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names = tuple(fn.arg_names)
        self.pick = operator.itemgetter(*self.names) if len(self.names) > 1 else (lambda kw: (kw[self.names[0]],))
        self.key = None
        self.runner = None
        self.hits = 0  # direct launches so far (tests and benchmarks read it)
        # (argument types, tensors getter, others getter) of the last JIT call: how a key is read (C-level maps)
        self.split = None

    def _key(self, grid: tuple, num_warps: int, args: tuple):
        """The direct-launch key of ``args`` (see the class docstring), or None when the arguments' types are
        not those the last JIT call split them by (then the JIT runs, and splits again)."""
        types = tuple(map(type, args))
        split = self.split
        if split is None or split[0] != types:
            return None
        tensors = split[1](args)
        return (grid, num_warps, torch.cuda.current_device(), types, tuple(map(_DATA_PTR, tensors)),
                tuple(map(_DTYPE, tensors)), split[2](args))

    def __call__(self, grid: tuple, num_warps: int, **kwargs) -> None:
        global _FAST_LAUNCH
        if len(kwargs) != len(self.names):
            extra = sorted(set(kwargs) - set(self.names))
            missing = [n for n in self.names if n not in kwargs]
            raise TypeError(f"{getattr(self.fn, '__name__', self.fn)}: missing arguments {missing}, unknown {extra}")
        args = self.pick(kwargs)  # KeyError names a misspelt argument
        runner = self.runner
        if runner is not None:
            key = self._key(grid, num_warps, args)
            if key is not None and key == self.key:
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
            is_tensor = [isinstance(a, torch.Tensor) for a in args]
            self.split = (tuple(map(type, args)), _getter([i for i, t in enumerate(is_tensor) if t]),
                          _getter([i for i, t in enumerate(is_tensor) if not t]))
            self.key = self._key(grid, num_warps, args)


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


def _site(launches: dict, site: tuple, kernel) -> _Launch:
    """The ``_Launch`` of ``site`` in the launch-site cache ``launches``, made for ``kernel`` the first time."""
    launch = launches.get(site)
    if launch is None:
        launch = launches[site] = _Launch(kernel)
    return launch


# -- launch functions over tensors, with their caches given ---------------------------
def new_scratch(device: torch.device, n_tensors: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step kernel's scratch for ``n_tensors`` monitor tensors: ``(partials, ticket)``.

    partials: float32[n_tensors * slots], zeros; monitor tensor i's programs write
    [i * slots, (i + 1) * slots) (``slots``: ``_DeviceLayout.slots``).  ticket:
    int32[1], zero; the last program of a launch resets it to 0, so one scratch
    serves every later step (and CUDA-graph replays) without a memset.
    """
    partials = torch.zeros(n_tensors * slots, dtype=torch.float32, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    return partials, ticket


def launch_reduce(
    grad: torch.Tensor, index: int, partials: torch.Tensor, ticket: torch.Tensor, state: GateState,
    config: GateConfig, layout: _DeviceLayout, last: int, launches: dict,
) -> None:
    """One step-kernel launch over monitor tensor ``index``: its squared sum into its partials.

    grad: the gradient, any shape, float32, bfloat16, float16 or float64 (another
    dtype launches with ``layout.fallback``); a non-contiguous one is reduced from
    a contiguous copy.  On ``layout``'s device: CUDA, or CPU under TRITON_INTERPRET=1.
    partials, ticket: from ``new_scratch(device, n_tensors, layout.slots)``, the
    same for every monitor tensor of one step; slots this launch leaves unused
    are zeroed by it.  state, config: the gate's GateState and GateConfig.
    last: what the launch does once every program wrote its partial:
    ``_LAST_NOTHING`` nothing more (every monitor tensor but the last, or the
    overlapped path), ``_LAST_WRITE_ACC`` the float64 sum of all partials (the
    energy) into ``state.acc[ACC_ENERGY]``, ``_LAST_FINALIZE`` the finalize on
    that energy (the state, its stats and decision updated).
    launches: the launch-site cache; this launch's site is ("step", index, last).
    """
    block, programs, warps = layout.configs.get(grad.dtype) or layout.fallback
    slots = layout.slots
    x = grad if grad.is_contiguous() else grad.contiguous()
    n = x.numel()
    nprog = max(1, min(programs, -(-n // block)))
    device = x.device
    with _on(device):
        _site(launches, ("step", index, last), _gate_step_kernel)(
            (nprog,), warps if device.type == "cuda" else 1,
            x_ptr=x, n_elements=n, partials_ptr=partials, slot0=index * slots, slots_per_tensor=slots,
            n_partials=partials.numel(), ticket_ptr=ticket, acc_ptr=state.acc, ring_ptr=state.ring,
            prev_ptr=state.prev, ints_ptr=state.ints, stats_ptr=state.stats, decision_ptr=state.decision,
            hyper_ptr=state.hyper, max_reuse=config.max_reuse, BLOCK=block, PBLOCK=layout.pblock, LAST=last,
            WINDOW=config.window, STAT=config.statistic_id,
        )


def launch_finalize(
    state: GateState, config: GateConfig, partials: torch.Tensor, layout: _DeviceLayout, from_partials: bool,
    launches: dict,
) -> None:
    """The finalize kernel alone (one program): the state, its stats and decision updated.

    The energy judged: ``state.acc[ACC_ENERGY]`` (float64; ``from_partials``
    False: a ``_LAST_WRITE_ACC`` reduce wrote it, a collective may have
    combined it since), or the float64 sum of ``partials`` (float32, from
    ``new_scratch``; ``from_partials`` True: ``_LAST_NOTHING`` reduces of every
    monitor tensor wrote them, the overlapped path).  ``partials`` is passed
    either way and read only then.  The KL from ``state.acc[ACC_KL]``,
    consumed (set to 0).  launches: the launch-site cache; the site is
    ("finalize", from_partials).
    """
    with _on(state.acc.device):
        _site(launches, ("finalize", from_partials), _gate_finalize_kernel)(
            (1,), 4,
            acc_ptr=state.acc, partials_ptr=partials, n_partials=partials.numel(), ring_ptr=state.ring,
            prev_ptr=state.prev, ints_ptr=state.ints, stats_ptr=state.stats, decision_ptr=state.decision,
            hyper_ptr=state.hyper, max_reuse=config.max_reuse, FROM_PARTIALS=from_partials, PBLOCK=layout.pblock,
            WINDOW=config.window, STAT=config.statistic_id,
        )


def mask_calls(
    plan: MaskPlan, device: torch.device, layout: _DeviceLayout, tables: dict, launches: dict,
) -> list[_MaskCall]:
    """The mask launches that zero ``plan``'s byte spans (``base.MaskPlan``; its gapped views are not here).

    One launch per zeroing unit in use (normally one: 4 bytes), each over a
    device table of (address, length in units) rows.  tables: unit (bytes) ->
    ``base.DeviceTable``, updated here (rebuilt only when its rows change; no
    host sync).  launches: the launch-site cache; the sites are ("mask", unit).
    """
    by_unit: dict[int, list] = {}
    for _, addr, nbytes in plan.spans:
        unit = next(u for u, _ in _MASK_UNITS if addr % u == 0 and nbytes % u == 0)
        by_unit.setdefault(unit, []).append((addr, nbytes // unit))
    calls = []
    for unit, tl_type in _MASK_UNITS:
        rows = by_unit.get(unit)
        if not rows:
            continue
        table = tables.setdefault(unit, DeviceTable())
        table.update(tuple(rows), device)
        calls.append(_MaskCall(_site(launches, ("mask", unit), _gate_mask_kernel), (layout.mask_programs,),
                               layout.mask_warps, table.table, len(rows), unit, tl_type, layout.mask_block))
    return calls


def launch_mask(calls: Sequence[_MaskCall], decision: torch.Tensor) -> None:
    """Run ``mask_calls``' launches: each zeroes its table's grads when ``decision`` (bool[], on their device)
    is True, and reads nothing but the decision when it is False."""
    with _on(decision.device):
        for c in calls:
            c.launch(c.grid, c.warps, decision_ptr=decision, table_ptr=c.table, n_tensors=c.n, DTYPE=c.dtype,
                     BLOCK=c.block)


# -- launch functions that need no gate: fresh caches by default ----------------------
def sumsq(
    grads: Sequence[torch.Tensor], state: GateState | None = None, *, layout: _DeviceLayout | None = None,
    launches: dict | None = None,
) -> torch.Tensor:
    """The energy of ``grads``, the sum of the squares of all their entries, as the gate's reduce computes it.

    grads: one or more tensors on one device (CUDA, or CPU under
    TRITON_INTERPRET=1), any shapes, float32, bfloat16, float16 or float64
    (mixed dtypes allowed), contiguous or not.  Squares add up in float32 within
    a program; the programs' partials add in float64 in a fixed order, so the
    same grads give the same bits.  A NaN or Inf entry gives a NaN or Inf
    energy; a float32 overflow gives Inf.
    state: whose ``acc[ACC_ENERGY]`` receives the energy (nothing else of it
    is read or written); default a fresh GateState.
    layout: default ``_DeviceLayout(device)`` (``CUDA_CONFIGS`` / ``CPU_CONFIG``);
    launches: the launch-site cache, default a fresh one (Triton's JIT).
    Returns ``state.acc[ACC_ENERGY]``: a float64 0-dim tensor on the grads'
    device, a view into ``state.acc`` (no host sync).
    """
    grads = list(grads)
    if not grads:
        raise ValueError("sumsq needs at least one tensor")
    device = grads[0].device
    config = GateConfig()  # the reduce does not read the config (the finalize's arguments only)
    if state is None:
        state = GateState.new(config.window, config.threshold, config.eps, device)
    layout = _DeviceLayout(device) if layout is None else layout
    launches = {} if launches is None else launches
    partials, ticket = new_scratch(device, len(grads), layout.slots)
    for i, g in enumerate(grads):
        last = _LAST_WRITE_ACC if i == len(grads) - 1 else _LAST_NOTHING
        launch_reduce(g, i, partials, ticket, state, config, layout, last, launches)
    return state.acc[S.ACC_ENERGY]


def finalize(
    state: GateState, config: GateConfig, *, layout: _DeviceLayout | None = None, launches: dict | None = None,
) -> None:
    """The gate's finalize on ``state`` (one launch, no host sync), the energy taken from ``state.acc``.

    state: a GateState for ``config`` (``GateState.new`` with its window,
    n_rings, window mode and KL limit) on CUDA, or on CPU under
    TRITON_INTERPRET=1.  Reads the energy from ``acc[ACC_ENERGY]`` (float64:
    ``sumsq`` writes it, or set it by hand) and the KL from ``acc[ACC_KL]``
    (consumed: set to 0); updates ``ring``, ``prev`` and ``ints``, writes
    ``stats`` (float32[N_STATS]) and ``decision`` (bool[]).  config: its
    GateConfig (window, statistic and max_reuse enter the launch).
    layout, launches: as for ``sumsq``.
    """
    device = state.acc.device
    layout = _DeviceLayout(device) if layout is None else layout
    partials, _ = new_scratch(device, 1, layout.slots)
    launch_finalize(state, config, partials, layout, False, {} if launches is None else launches)


def mask(
    decision: torch.Tensor, grads: Sequence[torch.Tensor], *, layout: _DeviceLayout | None = None,
    launches: dict | None = None,
) -> None:
    """Zero every tensor of ``grads`` when ``decision`` is True; touch nothing when False (no host sync).

    decision: bool[] (0-dim), on the grads' device (CUDA, or CPU under
    TRITON_INTERPRET=1).  grads: tensors of any dtype whose zero is all-zero
    bits (every dtype but float8_e8m0fnu), no two overlapping in memory; any
    layout: a dense one (contiguous or a gap-free permutation) is zeroed as
    bytes by the mask kernel, a gapped view by torch (``base.zero_where``).
    layout, launches: as for ``sumsq``.
    """
    device = decision.device
    grads = list(grads)
    plan = MaskPlan(MaskPlan.key_of(grads), grads)
    layout = _DeviceLayout(device) if layout is None else layout
    calls = mask_calls(plan, device, layout, {}, {} if launches is None else launches)
    launch_mask(calls, decision)
    for i in plan.strided:
        zero_where(grads[i], decision)
