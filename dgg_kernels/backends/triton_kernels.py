"""The Triton gate's kernels: every @triton.jit function, and the state's slots as compile-time constants.

Nothing here launches; ``triton_launch.py`` holds the launch configuration,
the launcher and the plain launch functions over tensors, and
``triton_fused.py`` the backend class (``backend="triton"``) on top of them.

- ``_gate_step_kernel``: every program strides over the gradient (int64
  offsets), accumulates x*x in float32 and writes one float32 partial.  In the
  launch for the last monitor tensor (``LAST`` 1 or 2) each program then takes
  an atomic ticket; the program holding the last ticket adds all partials in a
  fixed order in float64 (deterministic: same gradient, same bits), and either
  writes that energy to ``acc[ACC_ENERGY]`` (``LAST`` 1: the reduce alone) or
  runs the finalize of ``finalize.judge`` (dgg_kernels/backends/finalize.py) on the device state
  (``LAST`` 2), then resets the ticket to 0 so the next launch (or a
  CUDA-graph replay) needs no memset.  ``LAST`` 0: the partials only.
- ``_gate_finalize_kernel``: the finalize alone, on the energy in
  ``acc[ACC_ENERGY]`` (after a collective) or on the partials of separate
  reduce launches (``FROM_PARTIALS``, the overlapped path).
- ``_gate_mask_kernel``: reads the decision first and does nothing more when
  the gate is open; when closed it zeroes every gradient listed in a device
  table of (address, length in units), in ``DTYPE`` units (4-byte for every
  float dtype: zero bits are 0.0 in each), so one launch covers fp32, bf16 and
  fp16 grads alike (2- or 1-byte units only for an odd address or size).

All run under TRITON_INTERPRET=1 on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import state as S

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
    # Mirrors finalize.judge (dgg_kernels/backends/finalize.py) line for line; all float64.
    # STAT: 0 norm, 1 energy, 2 increment, 3 energy+increment (two tests, two rings).
    energy = tl.where(energy > 3.4028234663852886e38, float("inf"), energy)
    finite = (energy >= 0.0) & (energy <= 3.4028234663852886e38)  # a negative energy (a damaged acc) closes
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
