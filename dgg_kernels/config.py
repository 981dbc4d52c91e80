"""Validated gate settings."""
from __future__ import annotations

import math
from dataclasses import dataclass

# "energy+increment" is the paper's rule: two Z-score tests, one on the energy
# and one on its increment, each with its own window; the gate closes when either fires.
STATISTICS = ("norm", "energy", "increment", "energy+increment")
WINDOW_MODES = ("step", "batch")
BACKENDS = ("auto", "torch", "triton", "cuda")


def _positive_finite(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


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
               or "batch" (one per rollout batch: the first step's after
               new_batch(), if accepted; with passes of several mini-batches,
               the first mini-batch's; every other step is tested against the
               window but never enters it).
    eps:       added to the window std before dividing (> 0).
    max_reuse: passes over one rollout batch before should_stop() says stop (>= 1).
    backend:   "auto", "torch", "triton" or "cuda".
    target_kl: the KL stop, off when None: a second test, on the approximate KL of
               the current policy to the rollout policy that the trainer gives
               the gate each step (DynamicGradientGate.observe_kl).  The gate
               closes when the reuse index is above 1 and kl > kl_factor * target_kl
               (alone: threshold=float("inf"); with a finite threshold, either
               test closes).  A finite number > 0.
    kl_factor: the multiple of target_kl the KL must exceed (> 0, finite; 1.5 is
               stable-baselines3's and Spinning Up's rule, 1.0 CleanRL's).
    """

    window: int = 8
    threshold: float = 0.3
    statistic: str = "norm"
    eps: float = 1e-8
    max_reuse: int = 4
    backend: str = "auto"
    window_mode: str = "step"
    target_kl: float | None = None
    kl_factor: float = 1.0

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
        if not _positive_finite(self.eps):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if isinstance(self.max_reuse, bool) or not isinstance(self.max_reuse, int) or self.max_reuse < 1:
            raise ValueError(f"max_reuse must be an int >= 1, got {self.max_reuse!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {self.window_mode!r}")
        if self.target_kl is not None and not _positive_finite(self.target_kl):
            raise ValueError(f"target_kl must be None (no KL stop) or a finite number > 0, got {self.target_kl!r}")
        if not _positive_finite(self.kl_factor):
            raise ValueError(f"kl_factor must be a finite number > 0, got {self.kl_factor!r}")
        if self.target_kl is not None and not 0 < self.target_kl * self.kl_factor < math.inf:
            raise ValueError(f"target_kl * kl_factor (the KL limit) must be a finite number > 0, got "
                             f"{self.target_kl!r} * {self.kl_factor!r}")

    @property
    def kl_limit(self) -> float:
        """The KL above which the KL test closes: kl_factor * target_kl, or inf when there is no KL stop."""
        return math.inf if self.target_kl is None else float(self.target_kl) * float(self.kl_factor)

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
