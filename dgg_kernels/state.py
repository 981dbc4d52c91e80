"""The device state of one gate: one layout, shared by every backend.

All tensors live on the gradients' device at fixed addresses for the gate's
lifetime (so a CUDA graph can capture a step), and every backend reads and
writes them in place.  The slot constants below are the single source of
truth for which entry means what; the Triton and CUDA kernels take them as
arguments from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WINDOW_MODES

# ints: int64[N_INTS]
POS = 0           # next ring slot to write
COUNT = 1         # filled ring slots (<= window)
ACCEPTED = 2      # accepted (open) steps, ever
CLOSED_TOTAL = 3  # closed steps, ever
REUSE = 4         # reuse index of the last step (0 right after new_batch())
STOP = 5          # 1 once the gate closed, or max_reuse steps ran, since new_batch()
HAS_PREV = 6      # 1 once an accepted step left an energy behind (for "increment")
POS2 = 7          # the second ring's POS (statistic "energy+increment": the increment test); else unused, 0
COUNT2 = 8        # the second ring's COUNT; else unused, 0
N_INTS = 9

# stats: float32[N_STATS], the last step's report
ENERGY = 0     # sum of squared gradient entries
NORM = 1       # sqrt(ENERGY)
STATISTIC = 2  # the watched statistic s (energy+increment: of the reported test, see Z)
MEAN = 3       # mean of the filled window before this step (of the reported test)
STD = 4        # population std of the filled window before this step (of the reported test)
Z = 5          # (s - mean) / (std + eps) once the window is full, else 0
               # (energy+increment: the larger of Z_ENERGY and Z_INCREMENT; ties and NaN: the energy test's)
CLOSED = 6     # 1.0 closed / 0.0 open; float32 so it can serve as an optimizer's found_inf
Z_ENERGY = 7     # z of the magnitude test ("norm": of the norm; "energy", "energy+increment": of the energy);
                 # 0 for "increment", which runs no such test (as for a test whose window is filling)
Z_INCREMENT = 8  # z of the increment test ("increment", "energy+increment"); 0 for "norm" and "energy"
N_STATS = 9

# hyper: float64[N_HYPER], settings the kernels read in float64
THRESHOLD = 0    # float("inf"): the observer mode
EPS = 1
WINDOW_MODE = 2  # GateConfig.window_mode_id: 0.0 "step", 1.0 "batch" (read at run time, like the threshold)
N_HYPER = 3

_SAVED = ("ring", "prev", "ints", "stats", "decision")


@dataclass
class GateState:
    """Device tensors of one gate.

    ring:     float64[n_rings * window]  the windows: ring buffers of statistics, one per Z-score
                               test.  [0, window): the first test's (slots < COUNT valid, next
                               write at POS); [window, 2 * window): statistic "energy+increment"
                               only, the increment test's (COUNT2, POS2)
    prev:     float64[1]       energy of the last accepted step (for "increment")
    ints:     int64[N_INTS]    counters, see the slot constants
    stats:    float32[N_STATS] the last step's report
    decision: bool[]           True when the last step closed the gate (step() returns a copy);
                               stats[CLOSED] holds the same bit as float32 for fused optimizers
    hyper:    float64[N_HYPER] threshold, eps and window mode (from the config, not saved)
    acc:      float64[1]       scratch: the squared sum the reduce writes and the finalize reads (not saved)
    """

    ring: torch.Tensor
    prev: torch.Tensor
    ints: torch.Tensor
    stats: torch.Tensor
    decision: torch.Tensor
    hyper: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def new(
        cls, window: int, threshold: float, eps: float, device: torch.device, n_rings: int = 1,
        window_mode: str = "step",
    ) -> "GateState":
        """A fresh state; ``n_rings`` is GateConfig.n_rings (2 for statistic "energy+increment")."""
        f64 = dict(dtype=torch.float64, device=device)
        hyper = [0.0] * N_HYPER
        hyper[THRESHOLD], hyper[EPS], hyper[WINDOW_MODE] = float(threshold), float(eps), float(WINDOW_MODES.index(window_mode))
        return cls(
            ring=torch.zeros(n_rings * window, **f64),
            prev=torch.zeros(1, **f64),
            ints=torch.zeros(N_INTS, dtype=torch.int64, device=device),
            stats=torch.zeros(N_STATS, dtype=torch.float32, device=device),
            decision=torch.zeros((), dtype=torch.bool, device=device),
            hyper=torch.tensor(hyper, **f64),
            acc=torch.zeros(1, **f64),
        )

    def state_dict(self) -> dict:
        return {name: getattr(self, name).detach().clone() for name in _SAVED}

    def load_state_dict(self, sd: dict) -> None:
        """Copy a saved state in; validates everything first so a bad dict changes nothing."""
        sd = _upgrade(sd)
        missing = [k for k in _SAVED if k not in sd]
        if missing:
            raise KeyError(f"gate state_dict is missing {missing}")
        for name in _SAVED:
            mine, theirs = getattr(self, name), sd[name]
            if not isinstance(theirs, torch.Tensor):
                raise TypeError(f"gate state_dict[{name!r}] must be a Tensor, got {type(theirs).__name__}")
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(
                    f"gate state_dict[{name!r}] has shape {tuple(theirs.shape)} and dtype {theirs.dtype}, "
                    f"this gate needs {tuple(mine.shape)} and {mine.dtype} (was it saved with another window or statistic?)"
                )
        for name in _SAVED:
            getattr(self, name).copy_(sd[name])


def _upgrade(sd: dict) -> dict:
    """A state saved before the second ring (7 ints, 7 stats) in today's layout; anything else as it is.

    The new int slots (POS2, COUNT2) start at 0 and the new reports (Z_ENERGY,
    Z_INCREMENT) read 0 until the next step.  Such a state only fits a gate
    with one ring (the old statistics); the shape checks catch the rest.
    """
    ints, stats = sd.get("ints"), sd.get("stats")
    if not (isinstance(ints, torch.Tensor) and isinstance(stats, torch.Tensor)):
        return sd
    if ints.dim() != 1 or ints.numel() != 7 or stats.dim() != 1 or stats.numel() != 7:
        return sd
    sd = dict(sd)
    sd["ints"] = torch.cat([ints, ints.new_zeros(N_INTS - 7)])
    sd["stats"] = torch.cat([stats, stats.new_zeros(N_STATS - 7)])
    return sd
