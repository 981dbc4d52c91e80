"""The gate's finalize in Python, written once: energy and KL in, state updated (docs/semantics.md).

``judge`` holds every rule (finiteness, the reuse index, the window tests, the decision, what enters a
window, the counters) over an arithmetic ``m`` that runs it in one of two forms:

- ``TENSOR``: 0-dim torch tensors, device ops only (torch.where for every choice), so it never synchronizes
  the host and traces under torch.compile: ``finalize_reference``, the form for accelerator and traced state;
- ``HOST``: Python floats and ints, for a state in host memory read through numpy views (no torch dispatch:
  tens of microseconds where the tensor form takes about half a millisecond on a CPU): ``finalize_host``.

Both run the same statements, so they cannot drift apart; each form's reading and writing of the state is
the only code of its own.  All arithmetic is float64; the windows' sums run left to right in slot order
(``_sum_slots``), the order the Triton kernel and csrc's gate_finalize.h use too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import state as S
from ..config import GateConfig
from ..state import GateState

# An energy above the float32 range is +inf: the fused kernels accumulate in float32 and see inf there, and a
# gradient with a norm above 1.8e19 is broken in any case.  NaN stays NaN.
FLT_MAX = float(torch.finfo(torch.float32).max)


class _Tensor:
    """The arithmetic of the tensor form: 0-dim tensors; choices with torch.where."""

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def and_(a, b):
        return a & b

    @staticmethod
    def or_(a, b):
        return a | b

    @staticmethod
    def not_(a):
        return ~a

    @staticmethod
    def sqrt(x):
        return x.sqrt()

    @staticmethod
    def abs(x):
        return x.abs()

    @staticmethod
    def min_int(a, b: int):
        return a.clamp(max=b)

    @staticmethod
    def as_float(b):
        return b.to(torch.float64)

    @staticmethod
    def as_int(b):
        return b.to(torch.int64)

    @staticmethod
    def zero(like):
        return torch.zeros_like(like)

    @staticmethod
    def filled(ring, count):
        """The window's values with its unfilled slots as 0.0, slot 0 first (one where over the ring)."""
        return torch.where(torch.arange(ring.numel(), device=ring.device) < count, ring, 0.0).unbind(0)

    @staticmethod
    def squared_deviations(ring, count, mean):
        """(v - mean)**2 of the filled slots (rounded: a square, no fused multiply-add), 0.0 elsewhere."""
        d = ring - mean
        return torch.where(torch.arange(ring.numel(), device=ring.device) < count, d * d, 0.0).unbind(0)


class _Host:
    """The arithmetic of the host form: Python floats, ints and bools."""

    @staticmethod
    def where(c, a, b):
        return a if c else b

    @staticmethod
    def and_(a, b):
        return a and b

    @staticmethod
    def or_(a, b):
        return a or b

    @staticmethod
    def not_(a):
        return not a

    @staticmethod
    def sqrt(x):
        return math.sqrt(x) if x >= 0.0 else math.nan  # NaN and negatives: NaN, as torch, Triton and C++ give

    @staticmethod
    def abs(x):
        return abs(x)

    @staticmethod
    def min_int(a, b: int):
        return min(a, b)

    @staticmethod
    def as_float(b):
        return float(b)

    @staticmethod
    def as_int(b):
        return int(b)

    @staticmethod
    def zero(like):
        return 0 if isinstance(like, int) else 0.0

    @staticmethod
    def filled(ring, count):
        return [v if k < count else 0.0 for k, v in enumerate(ring)]

    @staticmethod
    def squared_deviations(ring, count, mean):
        # (v - mean) * (v - mean), not ** 2: a float power raises OverflowError where a product gives inf
        return [(v - mean) * (v - mean) if k < count else 0.0 for k, v in enumerate(ring)]


TENSOR, HOST = _Tensor(), _Host()


def _sum_slots(terms):
    """The sum of a window's terms (slot 0 first; an unfilled slot's term is 0.0, which leaves the sum
    unchanged), left to right from 0.0: the one order every form of the finalize adds in."""
    total = 0.0
    for t in terms:
        total = total + t
    return total


def _window_test(m, ring, count, stat, eps, window: int):
    """One Z-score test of ``stat`` against a window (``ring``: its values; ``count``: filled slots):
    (mean, std, z, full).  mean and the population std of the filled slots (0 for an empty window);
    z = (stat - mean) / (std + eps) once the window is full, else 0."""
    n = m.as_float(m.where(count > 1, count, 1))
    mean = _sum_slots(m.filled(ring, count)) / n
    std = m.sqrt(_sum_slots(m.squared_deviations(ring, count, mean)) / n)
    full = count == window
    z = m.where(full, (stat - mean) / (std + eps), 0.0)
    return mean, std, z, full


def judge(m, x: dict, config: GateConfig) -> dict:
    """One step's rules.  ``x``: the state's inputs (energy, kl, prev, the int slots by name, the settings
    threshold, eps, kl_limit, window_mode, and ring, ring2: each window's values, slot 0 first).  Returns what
    the finalize writes: the new int slots, prev, the stats, closed, and which ring slot each test pushes."""
    window = config.window
    energy = m.where(x["energy"] > FLT_MAX, math.inf, x["energy"])
    # false for NaN and inf, and for a negative energy, which no sum of squares gives (only a damaged or
    # hand-made acc): such a step closes rather than entering a window
    finite = m.and_(energy >= 0.0, energy <= FLT_MAX)
    # the KL stop: the KL observe_kl gave (0 when none); one not finite in float32 closes at any reuse index
    kl = x["kl"]
    kl_finite = m.abs(kl) <= FLT_MAX
    norm = m.sqrt(energy)
    has_prev = x["HAS_PREV"] > 0
    # the increment: energy minus the previous accepted energy; the first accepted step has nothing to
    # subtract, so it reports 0 and enters no increment window
    increment = m.where(has_prev, energy - x["prev"], 0.0)
    # passes of several steps (new_pass() since new_batch()): only a pass's first step advances the reuse
    # index, and once a step of the batch closed, every later one closes too (the batch is over)
    pass_mode = x["PASS_MODE"] > 0
    reuse = x["REUSE"] + m.where(pass_mode, x["PASS_NEW"], 1)
    latched = m.and_(pass_mode, x["BATCH_CLOSED"] > 0)
    # window_mode "batch": only the first step after new_batch() (reuse index 0 before it) enters a window:
    # one statistic per rollout batch, also with passes of several mini-batches
    enters = m.or_(x["window_mode"] == 0, x["REUSE"] == 0)
    eps, threshold = x["eps"], x["threshold"]
    count, count2 = x["COUNT"], x["COUNT2"]
    broken = m.or_(m.not_(finite), m.not_(kl_finite))
    kl_over = kl > x["kl_limit"]
    if config.statistic == "energy+increment":
        mean_e, std_e, z_e, full_e = _window_test(m, x["ring"], count, energy, eps, window)
        mean_i, std_i, z_i, full_i = _window_test(m, x["ring2"], count2, increment, eps, window)
        fires = m.or_(m.or_(m.and_(full_e, z_e > threshold), m.and_(full_i, z_i > threshold)), kl_over)
        closed = m.or_(m.or_(broken, m.and_(reuse > 1, fires)), latched)
        accept = m.not_(closed)
        push = m.and_(accept, enters)
        push2 = m.and_(push, has_prev)
        pushed, pushed2 = energy, increment
        # report the test with the larger z (the increment test only when strictly larger, so NaN -> energy)
        pick_i = z_i > z_e
        stat = m.where(pick_i, increment, energy)
        mean, std, z = m.where(pick_i, mean_i, mean_e), m.where(pick_i, std_i, std_e), m.where(pick_i, z_i, z_e)
        z_energy, z_increment = z_e, z_i
    else:
        stat, pushable = {"norm": (norm, True), "energy": (energy, True),
                          "increment": (increment, has_prev)}[config.statistic]
        mean, std, z, full = _window_test(m, x["ring"], count, stat, eps, window)
        closed = m.or_(m.or_(broken, m.and_(reuse > 1, m.or_(m.and_(full, z > threshold), kl_over))), latched)
        accept = m.not_(closed)
        push = m.and_(m.and_(accept, enters), pushable)
        push2, pushed, pushed2 = m.and_(push, False), stat, m.zero(stat)
        # the test a single statistic does not run reports z = 0 (never above a threshold)
        zero = m.zero(z)
        z_energy, z_increment = (zero, z) if config.statistic == "increment" else (z, zero)
    pos, pos2 = x["POS"], x["POS2"]
    ints = {
        "POS": m.where(push, (pos + 1) % window, pos),
        "COUNT": m.where(push, m.min_int(count + 1, window), count),
        "ACCEPTED": x["ACCEPTED"] + m.as_int(accept),
        "CLOSED_TOTAL": x["CLOSED_TOTAL"] + m.as_int(closed),
        "REUSE": reuse,
        "STOP": m.where(m.or_(closed, reuse >= config.max_reuse), 1, x["STOP"]),
        "HAS_PREV": m.where(accept, 1, x["HAS_PREV"]),
        "POS2": m.where(push2, (pos2 + 1) % window, pos2),
        "COUNT2": m.where(push2, m.min_int(count2 + 1, window), count2),
        "PASS_NEW": m.zero(x["PASS_NEW"]),
        "BATCH_CLOSED": m.where(closed, 1, x["BATCH_CLOSED"]),
    }
    stats = {"ENERGY": energy, "NORM": norm, "STATISTIC": stat, "MEAN": mean, "STD": std, "Z": z,
             "CLOSED": m.as_float(closed), "Z_ENERGY": z_energy, "Z_INCREMENT": z_increment, "KL": kl}
    return dict(ints=ints, stats=stats, closed=closed, prev=m.where(accept, energy, x["prev"]),
                push=push, push2=push2, pushed=pushed, pushed2=pushed2)


_INT_INPUTS = ("POS", "COUNT", "ACCEPTED", "CLOSED_TOTAL", "REUSE", "STOP", "HAS_PREV", "POS2", "COUNT2",
               "PASS_MODE", "PASS_NEW", "BATCH_CLOSED")


def finalize_reference(state: GateState, config: GateConfig) -> None:
    """The tensor form: apply one step's finalize to ``state`` given the energy and the KL in ``state.acc``
    (device ops only, no host sync).  The ring is written with torch.where over its slots."""
    ints, ring, hyper, window = state.ints, state.ring, state.hyper, config.window
    x = {name: ints[getattr(S, name)] for name in _INT_INPUTS}
    x.update(energy=state.acc[S.ACC_ENERGY], kl=state.acc[S.ACC_KL], prev=state.prev[0],
             threshold=hyper[S.THRESHOLD], eps=hyper[S.EPS], kl_limit=hyper[S.KL_LIMIT],
             window_mode=hyper[S.WINDOW_MODE], ring=ring[:window], ring2=ring[window:])
    out = judge(TENSOR, x, config)
    slots = torch.arange(window, device=ring.device)
    ring[:window].copy_(torch.where(out["push"] & (slots == x["POS"]), out["pushed"], ring[:window]))
    if config.n_rings == 2:
        ring[window:].copy_(torch.where(out["push2"] & (slots == x["POS2"]), out["pushed2"], ring[window:]))
    state.prev.copy_(out["prev"].reshape(1))
    new_ints = [ints[k] for k in range(S.N_INTS)]  # slots the finalize does not write keep their value
    for name, v in out["ints"].items():
        new_ints[getattr(S, name)] = v
    ints.copy_(torch.stack(new_ints))
    new_stats = [None] * S.N_STATS
    for name, v in out["stats"].items():
        new_stats[getattr(S, name)] = v
    state.stats.copy_(torch.stack(new_stats))
    state.decision.copy_(out["closed"])
    state.acc[S.ACC_KL] = 0.0  # consumed: a step without observe_kl judges no KL


def host_state(state: GateState) -> bool:
    """True when every tensor of ``state`` is a plain tensor in host memory, outside tracing: the finalize
    may then run on host numbers (finalize_host)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and t.device.type == "cpu"
               for t in (state.ring, state.prev, state.ints, state.stats, state.decision, state.hyper, state.acc))


def finalize_host(state: GateState, config: GateConfig) -> None:
    """The host form, for a state in host memory (host_state(state) is True): the same rules on Python
    numbers, reading and writing the state through numpy views of its memory."""
    ints_v, ring_v, acc_v = state.ints.numpy(), state.ring.numpy(), state.acc.numpy()
    hyper, window = state.hyper.numpy(), config.window
    ints = [int(v) for v in ints_v]
    x = {name: ints[getattr(S, name)] for name in _INT_INPUTS}
    x.update(energy=float(acc_v[S.ACC_ENERGY]), kl=float(acc_v[S.ACC_KL]), prev=float(state.prev.numpy()[0]),
             threshold=float(hyper[S.THRESHOLD]), eps=float(hyper[S.EPS]), kl_limit=float(hyper[S.KL_LIMIT]),
             window_mode=float(hyper[S.WINDOW_MODE]), ring=[float(v) for v in ring_v[:window]],
             ring2=[float(v) for v in ring_v[window:]])
    out = judge(HOST, x, config)
    if out["push"]:
        ring_v[x["POS"]] = out["pushed"]
    if out["push2"]:
        ring_v[window + x["POS2"]] = out["pushed2"]
    state.prev.numpy()[0] = out["prev"]
    for name, v in out["ints"].items():
        ints[getattr(S, name)] = int(v)
    ints_v[:] = ints
    new_stats = [0.0] * S.N_STATS
    for name, v in out["stats"].items():
        new_stats[getattr(S, name)] = v
    with np.errstate(over="ignore"):  # float64 -> float32 rounds to nearest, beyond the range to inf, as .to()
        state.stats.numpy()[:] = np.array(new_stats, dtype=np.float64).astype(np.float32)
    state.decision.numpy()[()] = bool(out["closed"])
    acc_v[S.ACC_KL] = 0.0  # consumed: a step without observe_kl judges no KL
