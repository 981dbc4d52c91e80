"""Random gradient sequences shared by every backend's tests.

Never zeros: Gaussian gradients whose scale drifts, with spikes, NaN, +/-Inf,
float32-overflowing values, and new_batch() at random points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


# Gate settings every backend's parity tests run: each statistic, windows 2-16,
# thresholds 0-2 and inf (the observer mode), max_reuse 1-8, both window modes.
# GATE_CONFIGS[:4] (every single statistic) runs with every dtype under the
# Triton interpreter; NEW_SETTINGS (the paper's rule, the batch window with
# each statistic family, the observer) once each, in float32: they change only
# the finalize, not the reduction.
GATE_CONFIGS = [
    dict(window=2, threshold=0.0, statistic="norm", eps=1e-3, max_reuse=1),
    dict(window=3, threshold=0.3, statistic="norm", max_reuse=4),
    dict(window=8, threshold=0.1, statistic="energy", max_reuse=4),
    dict(window=5, threshold=0.5, statistic="increment", max_reuse=8),
    dict(window=16, threshold=2.0, statistic="norm", eps=1e-3, max_reuse=3),
    # the paper's rule, per-step windows
    dict(window=4, threshold=0.3, statistic="energy+increment", max_reuse=4),
    # one statistic per batch (the first pass's), for each statistic family
    dict(window=3, threshold=0.2, statistic="norm", window_mode="batch", max_reuse=4),
    dict(window=4, threshold=0.0, statistic="increment", window_mode="batch", max_reuse=6),
    dict(window=3, threshold=0.1, statistic="energy+increment", window_mode="batch", eps=1e-3, max_reuse=4),
    # the observer: z reported, closes only on NaN/Inf
    dict(window=5, threshold=float("inf"), statistic="energy+increment", max_reuse=4),
]
NEW_SETTINGS = GATE_CONFIGS[5:]


def config_id(cfg: dict) -> str:
    mode = "-batch" if cfg.get("window_mode", "step") == "batch" else ""
    return f"{cfg['statistic']}-w{cfg['window']}-t{cfg['threshold']}{mode}"


@dataclass
class Sequence:
    shapes: list
    dtype: torch.dtype
    events: list = field(default_factory=list)  # ("new_batch",), ("new_pass",) or ("step", [grad tensors])


def make_sequence(seed, steps, shapes, dtype=torch.float32, p_new_batch=0.2, p_spike=0.1, p_bad=0.06):
    g = torch.Generator().manual_seed(seed)

    def u():
        return float(torch.rand((), generator=g))

    seq = Sequence(shapes=list(shapes), dtype=dtype)
    log_scale = 0.0
    max_scale = 50.0 if dtype == torch.float16 else 1e3
    for _ in range(steps):
        if u() < p_new_batch:
            seq.events.append(("new_batch",))
        log_scale = max(-4.0, min(math.log(max_scale), log_scale + 0.3 * (u() - 0.5)))
        scale = math.exp(log_scale) * (1.0 + 0.1 * u())
        if u() < p_spike:
            scale *= 1.5 + 8 * u()
        grads = [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]
        if u() < p_bad:
            t = grads[int(u() * len(grads))].view(-1)
            i = int(u() * t.numel())
            kind = int(u() * 4)
            t[i] = [math.nan, math.inf, -math.inf, 1e20 if dtype == torch.float32 else math.inf][kind]
        seq.events.append(("step", grads))
    return seq


def run_gate(gate, seq, params_extra=(), opcheck=True):
    """Play ``seq`` through ``gate`` (monitor tensors = gate.monitor, in order).

    The gate ops are opcheck-ed on the first step (contract.opcheck_gate_ops) unless ``opcheck`` is False.  Returns one record per step: closed (bool), stats (dict of Python numbers),
    should_stop, and whether every param grad was left untouched / zeroed.
    """
    from contract import opcheck_gate_ops

    records = []
    for ev in seq.events:
        if ev[0] == "new_batch":
            gate.new_batch()
            continue
        if ev[0] == "new_pass":
            gate.new_pass()
            continue
        for t, grad in zip(gate.monitor, ev[1]):
            t.grad = grad.to(t.device).clone()
        for p in params_extra:
            p.grad = torch.randn_like(p)
        if opcheck and not records:  # the ops, on this run's first step: opcheck inside every parity run
            opcheck_gate_ops(gate)
        before = [p.grad.clone() if p.grad is not None else None for p in gate.params]
        closed = gate.step()
        stats = {k: v.item() for k, v in gate.stats().items()}
        after = [p.grad for p in gate.params]
        untouched = all(b is None or bit_equal(a, b) for a, b in zip(after, before))
        zeroed = all(a is None or (a == 0).all().item() for a in after)
        records.append(dict(closed=bool(closed.item()), stats=stats, should_stop=gate.should_stop(), untouched=untouched, zeroed=zeroed))
    return records


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_equal(a, b):
    """Same dtype, shape and bits (NaN payloads included; any dtype of 1-8 bytes, float8 and complex64 too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INT_OF_SIZE.get(a.element_size())
    if as_int is None or a.dtype == as_int:
        return torch.equal(a, b)
    return torch.equal(a.view(as_int), b.view(as_int))


def _nan_tagged(x):
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, dict):
        return {k: _nan_tagged(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_tagged(v) for v in x]
    return x


def same_records(a, b) -> bool:
    """run_gate records equal exactly, with NaN equal to NaN."""
    return _nan_tagged(a) == _nan_tagged(b)


def close(a, b, rel=1e-5, abs_=0.0):
    """Equal within float32 rounding; NaN equals NaN and inf equals inf of the same sign."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= abs_ + rel * max(abs(a), abs(b))


def assert_stats_match(got: dict, want: dict, step: int, err_scale: float, model: dict | None = None):
    """Compare a step's float stats within float32 rounding.

    ``err_scale`` is the size of the numbers the stats were computed from (for
    "increment", the energies that were differenced): rounding is relative to
    it, not to the stat itself.  ``model`` is the semantics model's record of
    the step (default: ``want``, when that is it): z_energy and z_increment are
    compared with the tolerance of their own test's std.
    """
    for key in ("energy", "norm"):
        assert close(got[key], want[key], 2e-5), (step, key, got[key], want[key])
    if "kl" in want and "kl" in got:  # the given KL, stored and reported unchanged (a float32 value)
        assert got["kl"] == want["kl"] or math.isnan(got["kl"]) and math.isnan(want["kl"]), (step, "kl", got, want)
    d = 2e-5 * err_scale  # how far statistic, mean and std may move by float32 rounding
    for key in ("statistic", "mean", "std"):
        assert close(got[key], want[key], 2e-5, abs_=d), (step, key, got[key], want[key])
    # z = (s - mean) / std: an error d in the numerator moves z by d / std, and
    # an error d in std moves it by |z| * d / std.  A small window of close
    # values (a small std) makes z large and badly conditioned, so the
    # tolerance grows with |z| / std; decisions are still compared exactly.
    ztol = d * (1.0 + abs(want["z"])) / (abs(want["std"]) + 1e-8) + 1e-5
    assert close(got["z"], want["z"], 2e-5, abs_=ztol), (step, "z", got["z"], want["z"])
    model = want if model is None else model
    for key in ("z_energy", "z_increment"):
        if key not in want:
            continue
        # the test's own std; without a model record, the reported one (the same test for one statistic)
        std = model.get("std_" + key[2:], want["std"])
        if std is None:  # a test this statistic does not run: exactly 0
            assert got[key] == 0.0 and want[key] == 0.0, (step, key, got[key], want[key])
            continue
        if math.isnan(want[key]) or math.isnan(std):
            assert math.isnan(got[key]) == math.isnan(want[key]), (step, key, got[key], want[key])
            continue
        tol = d * (1.0 + abs(want[key])) / (abs(std) + 1e-8) + 1e-5
        assert close(got[key], want[key], 2e-5, abs_=tol), (step, key, got[key], want[key])
