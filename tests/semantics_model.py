"""An independent, plain-Python model of one gate's semantics (docs/semantics.md).

Python floats (float64) and lists only, written from the spec rather than from
the torch backend, so that the two can catch each other's mistakes.
"""
from __future__ import annotations

import math

FLT_MAX = 3.4028234663852886e38


def energy_of(grads) -> float:
    """sum(g**2) over all tensors in float64, each entry rounded to float32 first; above the float32 range: +inf."""
    e = 0.0
    for g in grads:
        e += float(g.float().double().pow(2).sum())
    return math.inf if e > FLT_MAX else e


def _left_to_right(xs) -> float:
    """The spec's summation order: 0.0, then each term in turn (not sum(), which compensates from 3.12 on)."""
    total = 0.0
    for x in xs:
        total += x
    return total


class _Test:
    """One sliding-window Z-score test: its window of statistics and the magnitudes they came from.

    The window is a ring of ``size`` slots written in turn (slot 0 first, wrapping around); its sums run
    over the slots in slot order, as the spec says (docs/semantics.md)."""

    def __init__(self, size):
        self.size = size
        self.slots: list[float] = []  # slot k holds the k-th, (k + size)-th, ... pushed statistic
        self.next = 0  # the slot the next push writes
        self.magnitudes: list[float] = []  # the energies (or norms) each entry was computed from

    @property
    def values(self) -> list[float]:
        """The window, oldest first."""
        return self.slots[self.next:] + self.slots[: self.next] if len(self.slots) == self.size else list(self.slots)

    def judge(self, s):
        n = len(self.slots)
        mean = _left_to_right(self.slots) / n if n else 0.0
        std = math.sqrt(_left_to_right((x - mean) * (x - mean) for x in self.slots) / n) if n else 0.0
        full = n == self.size
        return mean, std, full

    def push(self, s, mag):
        if len(self.slots) < self.size:
            self.slots.append(s)
        else:
            self.slots[self.next] = s
        self.next = (self.next + 1) % self.size
        self.magnitudes = (self.magnitudes + [mag])[-self.size :]


class GateModel:
    def __init__(self, window=8, threshold=0.3, statistic="norm", eps=1e-8, max_reuse=4, window_mode="step",
                 target_kl=None, kl_factor=1.0):
        self.W, self.threshold, self.statistic, self.eps, self.max_reuse = window, threshold, statistic, eps, max_reuse
        self.window_mode = window_mode
        # the KL stop: closes from reuse index 2 on when the given KL exceeds kl_factor * target_kl
        self.kl_limit = math.inf if target_kl is None else target_kl * kl_factor
        # "energy+increment" runs two tests, each with a window of W; the others one
        kinds = ["energy", "increment"] if statistic == "energy+increment" else [statistic]
        self.tests = {k: _Test(window) for k in kinds}
        self.prev_energy: float | None = None
        self.accepted = self.closed_total = self.reuse = 0
        self.stop = False
        # passes of several steps: from the first new_pass() after new_batch() on, only the first step after
        # each new_pass() advances the reuse index, and once a step closed every later step of the batch closes
        self.pass_mode = self.pass_new = self.batch_closed = False

    @property
    def window(self) -> list[float]:
        """The (first) test's window, oldest first."""
        return next(iter(self.tests.values())).values

    def new_batch(self):
        self.reuse = 0
        self.stop = False
        self.pass_mode = self.pass_new = self.batch_closed = False

    def new_pass(self):
        self.pass_mode = self.pass_new = True

    def step(self, energy: float, kl: float = 0.0) -> dict:
        """One step on this energy, with the KL the trainer gave (0.0: none)."""
        if energy > FLT_MAX:  # beyond the float32 range the energy is +inf (energy_of gives it so too)
            energy = math.inf
        # a KL beyond float32 closes, as NaN/Inf do; so does a negative energy (no sum of squares gives one)
        finite = math.isfinite(energy) and energy >= 0 and abs(kl) <= FLT_MAX
        norm = math.sqrt(energy) if energy >= 0 else math.nan  # NaN (and a negative energy): NaN
        has_prev = self.prev_energy is not None
        # each watched test: its statistic, whether it may enter the window, and its magnitude
        values = {
            "norm": (norm, True, norm),
            "energy": (energy, True, energy),
            "increment": (energy - self.prev_energy if has_prev else 0.0, has_prev, energy + (self.prev_energy or 0.0)),
        }
        # window_mode "batch": one statistic per rollout batch, the first step's after new_batch()
        first_of_batch = self.reuse == 0
        self.reuse += (1 if self.pass_new else 0) if self.pass_mode else 1
        self.pass_new = False
        judged = {}
        for kind, test in self.tests.items():
            s, _, _ = values[kind]
            mean, std, full = test.judge(s)
            z = (s - mean) / (std + self.eps) if full else 0.0
            judged[kind] = dict(statistic=s, mean=mean, std=std, z=z, full=full)
        fires = any(j["full"] and j["z"] > self.threshold for j in judged.values()) or kl > self.kl_limit
        closed = (not finite) or (self.reuse > 1 and fires) or (self.pass_mode and self.batch_closed)
        self.batch_closed = self.batch_closed or closed
        # how large the float32 rounding of this step's stats can be, in their units
        mags = [values[k][2] for k in self.tests]
        err_scale = max([m if math.isfinite(m) else 0.0 for m in mags] + [m for t in self.tests.values() for m in t.magnitudes])
        if closed:
            self.closed_total += 1
        else:
            self.accepted += 1
            self.prev_energy = energy
            if self.window_mode == "step" or first_of_batch:
                for kind, test in self.tests.items():
                    s, pushable, mag = values[kind]
                    if pushable:
                        test.push(s, mag)
        if closed or self.reuse >= self.max_reuse:
            self.stop = True
        # the report: the one test, or for two the increment test when its z is strictly larger
        if "increment" in judged and "energy" in judged and judged["increment"]["z"] > judged["energy"]["z"]:
            shown = judged["increment"]
        else:
            shown = next(iter(judged.values()))
        magnitude = judged.get("energy", judged.get("norm"))
        out = dict(closed=closed, energy=energy, norm=norm, err_scale=err_scale, reuse_index=self.reuse, kl=kl,
                   statistic=shown["statistic"], mean=shown["mean"], std=shown["std"], z=shown["z"])
        # a test the statistic does not run reports z = 0 (std: None)
        out["z_energy"] = magnitude["z"] if magnitude else 0.0
        out["std_energy"] = magnitude["std"] if magnitude else None
        out["z_increment"] = judged["increment"]["z"] if "increment" in judged else 0.0
        out["std_increment"] = judged["increment"]["std"] if "increment" in judged else None
        # whether each test's window is full (so its z can fire); False for a test the statistic does not run
        out["full_energy"] = bool(magnitude and magnitude["full"])
        out["full_increment"] = "increment" in judged and judged["increment"]["full"]
        return out


def play(cfg: dict, seq) -> list:
    """The model's record for each step of a sequences.Sequence: (step dict, stop flag)."""
    m = GateModel(**{k: v for k, v in cfg.items() if k != "backend"})
    out = []
    for ev in seq.events:
        if ev[0] == "new_batch":
            m.new_batch()
        elif ev[0] == "new_pass":
            m.new_pass()
        else:
            out.append((m.step(energy_of(ev[1])), m.stop))
    return out
