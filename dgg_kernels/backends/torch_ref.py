"""The semantics of one gate step, in plain torch (CPU and GPU).

Every other backend must match this one step for step: decisions exactly,
statistics within float32 rounding.  It is written with device-side ops only
(torch.where instead of Python branches) so it never synchronizes the host.  The
one value it reads on the host is the decision of a step on CPU tensors, where
the decision already sits in host memory and there is no device to wait for:
an open CPU step then writes no gradient byte (TorchBackend.mask).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .. import state as S
from ..config import GateConfig
from ..state import GateState
from . import compiled_sumsq
from .base import Backend, dense, zero_where

# An energy above the float32 range is +inf: the fused kernels accumulate in
# float32 and see inf there, and a gradient with a norm above 1.8e19 is broken
# in any case.  NaN stays NaN.
FLT_MAX = float(torch.finfo(torch.float32).max)


def slot_order_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of a window's slots (float64[window], unfilled slots already 0) in the one order every form
    of the finalize adds them: slot 0 first, then each next slot, starting from 0.0.

    torch.sum (pairwise, in an order that depends on the machine's SIMD width) and Triton's tl.sum (a tree)
    round differently on crafted windows, which can flip a decision; a left-to-right order is the same on
    every machine and in every language (finalize_host, the Triton kernel and csrc's window_test add the same
    way).  Adding an unfilled slot's 0.0 leaves the sum unchanged.
    """
    total = torch.zeros_like(values[0])
    for v in values.unbind(0):
        total = total + v
    return total


def _window_test(ring: torch.Tensor, count: torch.Tensor, stat: torch.Tensor, eps: torch.Tensor, window: int):
    """One Z-score test of ``stat`` against a window (``ring``, ``count`` filled slots), all float64.

    Returns (mean, std, z, full): the mean and population std of the filled
    slots (0 for an empty window), and z = (stat - mean) / (std + eps) once
    the window is full, else 0.
    """
    slots = torch.arange(window, device=ring.device)
    valid = slots < count
    n = count.clamp(min=1).to(torch.float64)
    mean = slot_order_sum(torch.where(valid, ring, 0.0)) / n
    std = (slot_order_sum(torch.where(valid, (ring - mean) ** 2, 0.0)) / n).sqrt()
    full = count == window
    z = torch.where(full, (stat - mean) / (std + eps), torch.zeros_like(stat))
    return mean, std, z, full


def _push(ring: torch.Tensor, pos: torch.Tensor, push: torch.Tensor, stat: torch.Tensor, window: int) -> None:
    slots = torch.arange(window, device=ring.device)
    ring.copy_(torch.where(push & (slots == pos), stat, ring))


def finalize_reference(state: GateState, config: GateConfig) -> None:
    """Apply one step's finalize to ``state`` given the energy and the KL in ``state.acc``.

    All arithmetic is float64.  The gate closes when the energy or the KL is not
    finite, or the reuse index is above 1 and a Z-score test fires (full window,
    z > threshold) or the KL exceeds the KL limit (hyper[KL_LIMIT], inf without
    a KL stop), or (passes of several steps) an earlier step of the batch closed.  Units: energy in squared gradient units; the
    statistic is in the units of its kind (norm, energy, or energy increment).
    With statistic "energy+increment" two tests run, each on its own ring
    (state.ring[:window] the energies, state.ring[window:] the increments).
    """
    ints, ring = state.ints, state.ring
    window = config.window
    eps, threshold, kl_limit = state.hyper[S.EPS], state.hyper[S.THRESHOLD], state.hyper[S.KL_LIMIT]
    energy = state.acc[S.ACC_ENERGY]
    energy = torch.where(energy > FLT_MAX, torch.full_like(energy, float("inf")), energy)
    finite = energy <= FLT_MAX  # false for NaN and inf; a sum of squares is never negative
    # the KL stop: the KL observe_kl gave (0 when none); one that is not finite in float32 (stats() reports
    # it in float32) closes at any reuse index
    kl = state.acc[S.ACC_KL]
    kl_finite = kl.abs() <= FLT_MAX
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
    # window_mode "batch": only the first step after new_batch() (reuse index 0 before it) enters a window:
    # one statistic per rollout batch, also with passes of several mini-batches (the first pass's first)
    enters = (state.hyper[S.WINDOW_MODE] == 0) | (ints[S.REUSE] == 0)
    count, pos = ints[S.COUNT], ints[S.POS]
    count2, pos2 = ints[S.COUNT2], ints[S.POS2]

    if config.statistic == "energy+increment":
        mean_e, std_e, z_e, full_e = _window_test(ring[:window], count, energy, eps, window)
        mean_i, std_i, z_i, full_i = _window_test(ring[window:], count2, increment, eps, window)
        fires = (full_e & (z_e > threshold)) | (full_i & (z_i > threshold)) | (kl > kl_limit)
        closed = ~finite | ~kl_finite | ((reuse > 1) & fires) | latched
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
        closed = ~finite | ~kl_finite | ((reuse > 1) & ((full & (z > threshold)) | (kl > kl_limit))) | latched
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
    new_ints[S.BATCHES] = ints[S.BATCHES]
    ints.copy_(torch.stack(new_ints))
    new_stats = [None] * S.N_STATS
    new_stats[S.ENERGY], new_stats[S.NORM], new_stats[S.STATISTIC] = energy, norm, stat
    new_stats[S.MEAN], new_stats[S.STD], new_stats[S.Z] = mean, std, z
    new_stats[S.CLOSED] = closed.to(torch.float64)
    new_stats[S.Z_ENERGY], new_stats[S.Z_INCREMENT] = z_energy, z_increment
    new_stats[S.KL] = kl
    state.stats.copy_(torch.stack(new_stats))
    state.decision.copy_(closed)
    state.acc[S.ACC_KL] = 0.0  # consumed: a step without observe_kl judges no KL


# -- the same finalize on host numbers, for plain CPU tensors ----------------------------------------------
# On CPU the state already sits in host memory and every torch op of finalize_reference is a dispatch of a
# few microseconds on a handful of numbers (about 0.4 ms a step for one test, 0.9 ms for two).  The host form
# below computes the same float64 arithmetic on Python floats, reading and writing the state through numpy
# views of the same memory (no copy, no torch dispatch): tens of microseconds.  It mirrors finalize_reference
# line for line, as the kernels do, and is tested against it step for step (tests/test_torch_backend.py);
# the window's sums run left to right in slot order, as slot_order_sum adds them, so both forms decide alike.


def _window_test_host(ring, count: int, stat: float, eps: float, window: int):
    """_window_test on host numbers: ``ring`` a float64 numpy view of one window."""
    vals = [float(v) for v in ring[:count]]
    n = float(max(count, 1))
    total = 0.0
    for v in vals:  # slot_order_sum's order; not sum(), which compensates its rounding from Python 3.12 on
        total += v
    mean = total / n
    sq = 0.0
    for v in vals:
        d = v - mean
        sq += d * d  # not d ** 2: a float power raises OverflowError where a product gives inf
    std = math.sqrt(sq / n)
    full = count == window
    z = (stat - mean) / (std + eps) if full else 0.0
    return mean, std, z, full


def host_state(state: GateState) -> bool:
    """True when every tensor of ``state`` is a plain tensor in host memory, outside tracing: the finalize
    may then run on host numbers (finalize_host)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and t.device.type == "cpu"
               for t in (state.ring, state.prev, state.ints, state.stats, state.decision, state.hyper, state.acc))


def finalize_host(state: GateState, config: GateConfig) -> None:
    """finalize_reference on host numbers, for a state in host memory (host_state(state) is True)."""
    ints_v, ring_v = state.ints.numpy(), state.ring.numpy()
    ints = [int(v) for v in ints_v]
    hyper = [float(v) for v in state.hyper.numpy()]
    acc_v = state.acc.numpy()
    window = config.window
    eps, threshold, kl_limit = hyper[S.EPS], hyper[S.THRESHOLD], hyper[S.KL_LIMIT]
    energy = float(acc_v[S.ACC_ENERGY])
    if energy > FLT_MAX:
        energy = math.inf
    finite = energy <= FLT_MAX
    kl = float(acc_v[S.ACC_KL])
    kl_finite = abs(kl) <= FLT_MAX
    norm = math.sqrt(energy) if energy == energy else math.nan
    has_prev = ints[S.HAS_PREV] > 0
    prev = float(state.prev.numpy()[0])
    increment = energy - prev if has_prev else 0.0
    pass_mode = ints[S.PASS_MODE] > 0
    reuse = ints[S.REUSE] + (ints[S.PASS_NEW] if pass_mode else 1)
    latched = pass_mode and ints[S.BATCH_CLOSED] > 0
    enters = hyper[S.WINDOW_MODE] == 0 or ints[S.REUSE] == 0
    count, pos = ints[S.COUNT], ints[S.POS]
    count2, pos2 = ints[S.COUNT2], ints[S.POS2]
    push2 = False
    if config.statistic == "energy+increment":
        mean_e, std_e, z_e, full_e = _window_test_host(ring_v[:window], count, energy, eps, window)
        mean_i, std_i, z_i, full_i = _window_test_host(ring_v[window:], count2, increment, eps, window)
        fires = (full_e and z_e > threshold) or (full_i and z_i > threshold) or kl > kl_limit
        closed = not finite or not kl_finite or (reuse > 1 and fires) or latched
        accept = not closed
        push, push2 = accept and enters, accept and enters and has_prev
        if push:
            ring_v[pos] = energy
        if push2:
            ring_v[window + pos2] = increment
        pick_i = z_i > z_e
        stat = increment if pick_i else energy
        mean, std, z = (mean_i, std_i, z_i) if pick_i else (mean_e, std_e, z_e)
        z_energy, z_increment = z_e, z_i
    else:
        if config.statistic == "norm":
            stat, pushable = norm, True
        elif config.statistic == "energy":
            stat, pushable = energy, True
        else:  # increment
            stat, pushable = increment, has_prev
        mean, std, z, full = _window_test_host(ring_v, count, stat, eps, window)
        closed = not finite or not kl_finite or (reuse > 1 and ((full and z > threshold) or kl > kl_limit)) or latched
        accept = not closed
        push = accept and enters and pushable
        if push:
            ring_v[pos] = stat
        z_energy, z_increment = (0.0, z) if config.statistic == "increment" else (z, 0.0)

    if accept:
        state.prev.numpy()[0] = energy
    new_ints = list(ints)
    if push:
        new_ints[S.POS], new_ints[S.COUNT] = (pos + 1) % window, min(count + 1, window)
    new_ints[S.ACCEPTED] += int(accept)
    new_ints[S.CLOSED_TOTAL] += int(closed)
    new_ints[S.REUSE] = reuse
    if closed or reuse >= config.max_reuse:
        new_ints[S.STOP] = 1
    if accept:
        new_ints[S.HAS_PREV] = 1
    if push2:
        new_ints[S.POS2], new_ints[S.COUNT2] = (pos2 + 1) % window, min(count2 + 1, window)
    new_ints[S.PASS_NEW] = 0
    if closed:
        new_ints[S.BATCH_CLOSED] = 1
    ints_v[:] = new_ints
    new_stats = [0.0] * S.N_STATS
    new_stats[S.ENERGY], new_stats[S.NORM], new_stats[S.STATISTIC] = energy, norm, stat
    new_stats[S.MEAN], new_stats[S.STD], new_stats[S.Z] = mean, std, z
    new_stats[S.CLOSED] = 1.0 if closed else 0.0
    new_stats[S.Z_ENERGY], new_stats[S.Z_INCREMENT] = z_energy, z_increment
    new_stats[S.KL] = kl
    with np.errstate(over="ignore"):  # float64 -> float32 rounds to nearest, beyond the range to inf, as .to()
        state.stats.numpy()[:] = np.array(new_stats, dtype=np.float64).astype(np.float32)
    state.decision.numpy()[()] = closed
    acc_v[S.ACC_KL] = 0.0  # consumed: a step without observe_kl judges no KL


# -- the reduction: sum of float32 squares, widened by chunks ------------------------
# Eager mode never materializes a full-size float32 copy of a gradient (what vector_norm(g, dtype=float32)
# does on a half-precision g, and g.float() on float64): entries are widened CHUNK at a time into one
# float32 scratch buffer per backend object and device.
# CPU: 2**19 entries, a 2 MiB scratch that stays in cache between the widening copy and the sum that
#      reads it back; the fastest of 2**17..2**21 measured on a 2-core AMD EPYC (smaller chunks pay the
#      two Python-level ops per chunk more often, larger ones fall out of cache).
# Accelerators: 2**24 entries, a 64 MiB scratch, so a gradient of many GB takes tens of launches.
CPU_CHUNK = 1 << 19
ACCEL_CHUNK = 1 << 24
# float32 gradients are read in place (no scratch) in pieces of FP32_PIECE entries (64 MiB), each as rows
# of ROW entries: see _sumsq_rows.
FP32_PIECE = 1 << 24
ROW = 4096


def _flat_span(g: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of every element of ``g`` in memory order when g is dense (contiguous, transposed,
    permuted), else None (gapped or overlapping views).  A sum of squares does not depend on the order."""
    if g.is_contiguous():
        return g.view(-1)
    if dense(g):
        # every stride is positive and the elements fill [offset, offset + numel) exactly
        return g.as_strided((g.numel(),), (1,))
    return None


def _strided_pieces(g: torch.Tensor, chunk: int):
    """Views of a non-dense ``g`` (any shape, gapped or overlapping), at most ``chunk`` entries each,
    that together visit every logical entry once: slices along dim 0, recursing into a slice that is
    itself longer than a chunk."""
    if g.numel() <= chunk:
        yield g
    elif g.dim() == 1:
        yield from g.split(chunk)
    elif g[0].numel() <= chunk:
        yield from g.split(max(1, chunk // g[0].numel()))
    else:
        for row in g.unbind(0):
            yield from _strided_pieces(row, chunk)


def _pieces(g: torch.Tensor, chunk: int):
    """Views covering every entry of ``g`` once, at most ``chunk`` entries each (1-D and contiguous when
    g is dense)."""
    span = _flat_span(g)
    return span.split(chunk) if span is not None else _strided_pieces(g, chunk)


def _sumsq_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a 1-D contiguous float32 CPU ``x`` (float32 0-dim), reading x once, in place.

    The norms of rows of ROW entries (vector_norm's vectorized last-dim kernel: as fast as one
    vector_norm of x), then their squares summed: no float32 accumulation runs over more than ROW
    terms, so the result stays within a few float32 roundings of the exact sum at any length (a single
    vector_norm of 16M entries is off by about 1e-3 relative).
    """
    n = x.numel()
    rows = n // ROW
    if rows == 0:
        return torch.dot(x, x)
    if rows * ROW == n:  # no tail: no slice (each op costs tens of microseconds with cold caches)
        norms = torch.linalg.vector_norm(x.view(rows, ROW), dim=1)
    else:
        norms = torch.cat([torch.linalg.vector_norm(x[: rows * ROW].view(rows, ROW), dim=1),
                           torch.linalg.vector_norm(x[rows * ROW:]).reshape(1)])
    return torch.dot(norms, norms)


def _widened(p: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``p`` (any dtype and layout, at most scratch.numel() entries) rounded to float32 entry by entry, as a
    1-D contiguous view of ``scratch`` (float64 beyond the float32 range becomes inf, as in the kernels)."""
    n = p.numel()
    x = scratch if n == scratch.numel() else scratch[:n]  # a full chunk (the common case) needs no slice
    (x if p.dim() == 1 else x.view(p.shape)).copy_(p)
    return x


def _sum64(parts: list, device: torch.device) -> torch.Tensor:
    """The float32 0-dim ``parts`` added in float64 (0 for none)."""
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(parts) == 1:
        return parts[0].to(torch.float64)
    return torch.sum(torch.stack(parts), dtype=torch.float64)


def _cpu_energy(g: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """sum(float32(g)**2) of a CPU ``g`` as a float64 0-dim tensor.

    Dense float32: read in place (_sumsq_rows).  Dense bfloat16/float16 of compiled_sumsq.MIN_ENTRIES or
    more: one compiled pass (compiled_sumsq), when torch.compile works here.  Anything else (smaller half
    types, float64, gapped views): _chunked_sumsq.
    """
    span = _flat_span(g)
    if g.dtype == torch.float32 and span is not None:
        pieces = (span,) if span.numel() <= FP32_PIECE else span.split(FP32_PIECE)
        return _sum64([_sumsq_rows(p) for p in pieces], g.device)
    if span is not None and compiled_sumsq.applies(g):
        rows, tail = compiled_sumsq.split_rows(span)
        head = compiled_sumsq.rows_sumsq(rows)
        if head is not None:  # the tail (under ROW entries) the chunked way
            return head + _chunked_sumsq(tail, scratch) if tail.numel() else head
    return _chunked_sumsq(g, scratch)


def _chunked_sumsq(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum(float32(g)**2) of a CPU ``g`` of any dtype and layout as a float64 0-dim tensor.

    CPU_CHUNK entries at a time widened into ``scratch`` and summed with BLAS dot there, the fastest
    eager float32 sum of squares torch has on a CPU (the chunk is in cache; its float32 accumulation over
    a chunk measured within about 2e-5 relative of the exact sum).  Chunk sums are added in float64.
    """
    parts = []
    for p in _pieces(g, CPU_CHUNK):
        x = _widened(p, scratch)
        parts.append(torch.dot(x, x))
    return _sum64(parts, g.device)


def _device_energy(g: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """sum(float32(g)**2) of ``g`` on an accelerator as a float64 0-dim tensor, without a host sync.

    float32: one vector_norm kernel reads g in place, whatever its layout.  Other dtypes: ACCEL_CHUNK
    entries at a time widened into ``scratch`` and reduced there (a fixed number of launches per
    gradient size, no data-dependent control flow).
    """
    if g.dtype == torch.float32:
        return torch.linalg.vector_norm(g).to(torch.float64).square()
    parts = [torch.linalg.vector_norm(_widened(p, scratch)).square() for p in _pieces(g, ACCEL_CHUNK)]
    return _sum64(parts, g.device)


def _norm32(g: torch.Tensor) -> torch.Tensor:
    """The float32 L2 norm of ``g`` with every entry rounded to float32 first, in one traced expression.

    What the compiled path (torch.compile tracing the backend) uses: inductor fuses the widening into its
    reduction, so no temporary is materialized there.  vector_norm refuses to narrow float64, hence the
    explicit cast (fused as well).  In eager mode this form would widen into a full-size float32 copy
    (vector_norm(dtype=...) on a half type, or .float()), which TorchBackend avoids by chunking.
    """
    return torch.linalg.vector_norm(g.float() if g.dtype == torch.float64 else g, dtype=torch.float32)


# -- the mask ----------------------------------------------------------------------------------------------
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_value(t: torch.Tensor) -> bool | int | float | None:
    """The 0-dim ``t`` as a Python number when reading it costs no synchronization, else None.

    A value only for a plain tensor in host memory (device "cpu") outside tracing: CPU ops run synchronously,
    so the value is final when the op that wrote it returns, and reading it is a load of a few bytes.  On CUDA
    and other accelerators, under torch.compile tracing, and for tensor subclasses (fake, functional, DTensor)
    it returns None and the caller must stay on the device.
    """
    if t.device.type != "cpu" or type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    return t.item()  # host-read-ok: a plain CPU tensor, already computed: no device to wait for


def _write_zeros(g: torch.Tensor) -> None:
    """Write zeros into every element of ``g`` (any layout; any dtype whose zero is all-zero bits).

    Through an integer view of the same element size, so float8/float4/uint16-64 (no fill kernels) go
    the same way as the rest; a write only, g is not read (half the traffic of masked_fill_).
    """
    view = _INT_OF_SIZE.get(g.element_size())
    (g.view(view) if view is not None else g).zero_()


class TorchBackend(Backend):
    """The plain-torch backend: the executable spec, and the fallback wherever the kernels do not run.

    Costs (docs/semantics.md, "The torch backend's cost"): the reduction reads each monitor gradient once
    (half types and float64 widened through a chunk-sized float32 scratch); the mask writes nothing on an
    open CPU step and only zeros on a closed one; on accelerators it reads and writes every params byte
    (masked_fill_ with the 0-dim device decision), which needs no host synchronization.
    """

    name = "torch"

    def __init__(self) -> None:
        self._scratch: dict = {}  # device -> float32[<= one chunk], the widening buffer, kept across steps
        self._parts = None

    # -- reduction ------------------------------------------------------------------------------------
    def _scratch_for(self, device: torch.device, n: int) -> torch.Tensor:
        """A float32 buffer of at least ``n`` (<= one chunk) entries on ``device``, reused across steps.

        Reused because a fresh allocation of a chunk costs page faults each step on CPU.  A CUDA step on
        a side stream (overlap=True) uses it only after the main stream's last use (gate.py waits).
        """
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=device)
            self._scratch[device] = buf
        return buf

    def _energy(self, g: torch.Tensor) -> torch.Tensor:
        """sum(float32(g)**2) as a float64 0-dim tensor on g's device; no host sync, no full-size temporary."""
        if torch.compiler.is_compiling():
            # traced: the compiler fuses the widening into its reduction, no temporary is materialized
            return _norm32(g).to(torch.float64) ** 2
        cpu = g.device.type == "cpu"
        # float32 is read in place (on CPU when dense); everything else is widened through the scratch
        widens = g.dtype != torch.float32 or (cpu and _flat_span(g) is None)
        scratch = self._scratch_for(g.device, min(CPU_CHUNK if cpu else ACCEL_CHUNK, g.numel())) if widens else None
        return _cpu_energy(g, scratch) if cpu else _device_energy(g, scratch)

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        energies = [self._energy(g) for g in grads]
        total = energies[0] if len(energies) == 1 else torch.stack(energies).sum()
        state.acc[S.ACC_ENERGY] = total

    def finalize(self, state: GateState, config: GateConfig) -> None:
        (finalize_host if host_state(state) else finalize_reference)(state, config)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        if self._parts is None or self._parts.numel() != n_tensors or self._parts.device != grad.device:
            self._parts = torch.zeros(n_tensors, dtype=torch.float64, device=grad.device)
        self._parts[index].copy_(self._energy(grad))

    def finalize_partials(self, n_tensors, state, config) -> None:
        state.acc[S.ACC_ENERGY] = self._parts.sum()
        self.finalize(state, config)

    # -- mask -----------------------------------------------------------------------------------------
    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key=None) -> None:
        closed = host_value(decision)
        if closed is None:
            # On a device the decision stays there: masked_fill_ with the 0-dim bool decision reads and
            # writes every byte, open or closed (docs/semantics.md, "The torch backend's cost").
            for g in grads:
                zero_where(g, decision)
        elif closed:
            for g in grads:
                _write_zeros(g)
