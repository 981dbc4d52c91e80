"""Validated gate settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

# "energy+increment" is the paper's rule: two Z-score tests, one on the energy
# and one on its increment, each with its own window; the gate closes when either fires.
STATISTICS = ("norm", "energy", "increment", "energy+increment")
WINDOW_MODES = ("step", "batch")
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class GateConfig:
    """Settings of one DynamicGradientGate.

    window:    number of statistics the Z-score is taken over (>= 2); with
               statistic="energy+increment" each of the two tests has a window this long.
    threshold: the gate closes when z > threshold (>= 0; the paper uses 0.1-0.5).
               float("inf") is the observer mode: z is computed and reported but
               the z-test never closes (a NaN/Inf gradient still does).
    statistic: "norm" (sqrt of the energy), "energy" (sum of squared gradient
               entries), "increment" (energy minus the previous accepted energy),
               or "energy+increment" (the paper's rule: an energy test and an
               increment test, each with its own window; closes when either fires).
    window_mode: what the window holds: "step" (every accepted step's statistic)
               or "batch" (one per rollout batch: the first pass's, i.e. the step
               right after new_batch(), if accepted; later passes are tested
               against the window but never enter it).
    eps:       added to the window std before dividing (> 0).
    max_reuse: passes over one rollout batch before should_stop() says stop (>= 1).
    backend:   "auto", "torch", "triton" or "cuda".
    """

    window: int = 8
    threshold: float = 0.3
    statistic: str = "norm"
    eps: float = 1e-8
    max_reuse: int = 4
    backend: str = "auto"
    window_mode: str = "step"

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2, got {self.window!r}")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or math.isnan(self.threshold)
            or self.threshold < 0
        ):
            raise ValueError(
                f"threshold must be a number >= 0 (float('inf') for the observer mode), got {self.threshold!r}"
            )
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if (
            isinstance(self.eps, bool)
            or not isinstance(self.eps, (int, float))
            or not math.isfinite(self.eps)
            or self.eps <= 0
        ):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if isinstance(self.max_reuse, bool) or not isinstance(self.max_reuse, int) or self.max_reuse < 1:
            raise ValueError(f"max_reuse must be an int >= 1, got {self.max_reuse!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {self.window_mode!r}")

    @property
    def statistic_id(self) -> int:
        """The statistic as the integer the kernels take (0 norm, 1 energy, 2 increment, 3 energy+increment)."""
        return STATISTICS.index(self.statistic)

    @property
    def window_mode_id(self) -> int:
        """The window mode as the kernels read it from state.hyper[WINDOW_MODE] (0 step, 1 batch)."""
        return WINDOW_MODES.index(self.window_mode)

    @property
    def n_rings(self) -> int:
        """Z-score tests, hence window rings in the state: 2 for "energy+increment", else 1."""
        return 2 if self.statistic == "energy+increment" else 1
