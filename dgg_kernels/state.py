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

# ints: int64[N_INTS]
POS = 0           # next ring slot to write
COUNT = 1         # filled ring slots (<= window)
ACCEPTED = 2      # accepted (open) steps, ever
CLOSED_TOTAL = 3  # closed steps, ever
REUSE = 4         # reuse index of the last step (0 right after new_batch())
STOP = 5          # 1 once the gate closed, or max_reuse steps ran, since new_batch()
HAS_PREV = 6      # 1 once an accepted step left an energy behind (for "increment")
N_INTS = 7

# stats: float32[N_STATS], the last step's report
ENERGY = 0     # sum of squared gradient entries
NORM = 1       # sqrt(ENERGY)
STATISTIC = 2  # the watched statistic s
MEAN = 3       # mean of the filled window before this step
STD = 4        # population std of the filled window before this step
Z = 5          # (s - mean) / (std + eps) once the window is full, else 0
CLOSED = 6     # 1.0 closed / 0.0 open; float32 so it can serve as an optimizer's found_inf
N_STATS = 7

# hyper: float64[N_HYPER], settings the kernels read in float64
THRESHOLD = 0
EPS = 1
N_HYPER = 2

_SAVED = ("ring", "prev", "ints", "stats", "decision")


@dataclass
class GateState:
    """Device tensors of one gate.

    ring:     float64[window]  accepted statistics (a ring buffer; slots < COUNT are valid)
    prev:     float64[1]       energy of the last accepted step (for "increment")
    ints:     int64[N_INTS]    counters, see the slot constants
    stats:    float32[N_STATS] the last step's report
    decision: bool[]           True when the last step closed the gate (step() returns a copy);
                               stats[CLOSED] holds the same bit as float32 for fused optimizers
    hyper:    float64[N_HYPER] threshold and eps (from the config, not saved)
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
    def new(cls, window: int, threshold: float, eps: float, device: torch.device) -> "GateState":
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            ring=torch.zeros(window, **f64),
            prev=torch.zeros(1, **f64),
            ints=torch.zeros(N_INTS, dtype=torch.int64, device=device),
            stats=torch.zeros(N_STATS, dtype=torch.float32, device=device),
            decision=torch.zeros((), dtype=torch.bool, device=device),
            hyper=torch.tensor([float(threshold), float(eps)], **f64),
            acc=torch.zeros(1, **f64),
        )

    def state_dict(self) -> dict:
        return {name: getattr(self, name).detach().clone() for name in _SAVED}

    def load_state_dict(self, sd: dict) -> None:
        """Copy a saved state in; validates everything first so a bad dict changes nothing."""
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
                    f"this gate needs {tuple(mine.shape)} and {mine.dtype} (was it saved with another window?)"
                )
        for name in _SAVED:
            getattr(self, name).copy_(sd[name])
