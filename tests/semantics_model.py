"""An independent, plain-Python model of one gate's semantics (docs/semantics.md).

Python floats (float64) and lists only, written from the spec rather than from
the torch backend, so that the two can catch each other's mistakes.
"""
from __future__ import annotations

import math

FLT_MAX = 3.4028234663852886e38


def energy_of(grads) -> float:
    """sum(g**2) over all tensors in float64; above the float32 range it is +inf."""
    e = 0.0
    for g in grads:
        e += float(g.double().pow(2).sum())
    return math.inf if e > FLT_MAX else e


class GateModel:
    def __init__(self, window=8, threshold=0.3, statistic="norm", eps=1e-8, max_reuse=4):
        self.W, self.threshold, self.statistic, self.eps, self.max_reuse = window, threshold, statistic, eps, max_reuse
        self.window: list[float] = []  # accepted statistics, oldest first
        self.magnitudes: list[float] = []  # the energies (or norms) each window entry was computed from
        self.prev_energy: float | None = None
        self.accepted = self.closed_total = self.reuse = 0
        self.stop = False

    def new_batch(self):
        self.reuse = 0
        self.stop = False

    def step(self, energy: float) -> dict:
        finite = math.isfinite(energy)
        norm = math.sqrt(energy) if not math.isnan(energy) else math.nan
        if self.statistic == "norm":
            s, pushable, mag = norm, True, norm
        elif self.statistic == "energy":
            s, pushable, mag = energy, True, energy
        else:
            pushable = self.prev_energy is not None
            s = energy - self.prev_energy if pushable else 0.0
            mag = energy + (self.prev_energy or 0.0)
        # how large the float32 rounding of this step's stats can be, in their units
        err_scale = max([mag if math.isfinite(mag) else 0.0] + self.magnitudes)
        n = len(self.window)
        mean = sum(self.window) / n if n else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / n) if n else 0.0
        full = n == self.W
        self.reuse += 1
        z = (s - mean) / (std + self.eps) if full else 0.0
        closed = (not finite) or (full and self.reuse > 1 and z > self.threshold)
        if closed:
            self.closed_total += 1
        else:
            self.accepted += 1
            self.prev_energy = energy
            if pushable:
                self.window = (self.window + [s])[-self.W :]
                self.magnitudes = (self.magnitudes + [mag])[-self.W :]
        if closed or self.reuse >= self.max_reuse:
            self.stop = True
        return dict(closed=closed, energy=energy, norm=norm, statistic=s, mean=mean, std=std, z=z, err_scale=err_scale)


def play(cfg: dict, seq) -> list:
    """The model's record for each step of a sequences.Sequence: (step dict, stop flag)."""
    m = GateModel(**{k: v for k, v in cfg.items() if k != "backend"})
    out = []
    for ev in seq.events:
        if ev[0] == "new_batch":
            m.new_batch()
        else:
            out.append((m.step(energy_of(ev[1])), m.stop))
    return out
