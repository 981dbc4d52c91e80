"""Validated gate settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

STATISTICS = ("norm", "energy", "increment")
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class GateConfig:
    """Settings of one DynamicGradientGate.

    window:    number of accepted statistics the Z-score is taken over (>= 2).
    threshold: the gate closes when z > threshold (finite, >= 0; the paper uses 0.1-0.5).
    statistic: "norm" (sqrt of the energy), "energy" (sum of squared gradient
               entries) or "increment" (energy minus the previous accepted energy).
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

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2, got {self.window!r}")
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
            or self.threshold < 0
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")
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

    @property
    def statistic_id(self) -> int:
        """The statistic as the integer the kernels take (0 norm, 1 energy, 2 increment)."""
        return STATISTICS.index(self.statistic)
