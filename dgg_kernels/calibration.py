"""Calibration: pick a threshold from an observed run instead of guessing.

Run the gate as an observer (``threshold=float("inf")``: z is computed and
reported, the z-test never closes; a NaN/Inf gradient still does), call
``Recorder.record(gate)`` after every ``gate.step()``, then ask the recorder
what each threshold would have done::

    import dgg_kernels as dgg
    from dgg_kernels.calibration import Recorder

    gate = dgg.DynamicGradientGate(lm_head.weight, params, threshold=float("inf"), statistic="energy+increment")
    rec = Recorder()
    for batch in batches:
        for _ in dgg.reuse_passes(gate):     # calls gate.new_batch(); an observer stops early only on NaN/Inf
            ...; loss.backward(); gate.step(); rec.record(gate); opt.step()
    rec.close_rates([0.1, 0.3, 1.0])          # {0.1: 0.62, 0.3: 0.41, 1.0: 0.12}: fraction of batches closed
    rec.threshold_for_close_rate(0.2)         # the smallest threshold closing at most 20% of the batches
    rec.threshold_for_close_rate(0.2, test="kl")  # the same for the KL stop: a KL limit (observe_kl each step)

``record()`` only queues two small device copies (no host synchronization),
so it can sit in the training loop; the report methods read the device (once
each) and are meant for after the run.

What the numbers mean.  A rollout batch is the run of steps from one
``new_batch()`` to the next (the gate counts its new_batch() calls in its
state, which record() copies with each step; a gate whose new_batch() is
never called records one batch).  With passes of several
steps (``new_pass()``, ``reuse_passes``) every step of a batch belongs to it,
whatever its reuse index.  Under a threshold
``t`` a batch closes at its first *eligible* pass (reuse index above 1, the
test's window full) whose z exceeds ``t``, or at any step whose energy was
not finite; for statistic ``"energy+increment"`` z is the larger of the two
tests' z, so either test firing counts.  The close rate is the fraction of
recorded batches that close.  A test whose window is still filling reports
z = 0, which exceeds no threshold (thresholds are >= 0), so warm-up steps
never count.

This is a first-order estimate.  A gate that really ran with threshold ``t``
would have discarded the closing pass and ended the batch there: the later
passes of that batch (which the observer saw, and which are not counted
here) would not have happened, the model would have taken other updates, and
the windows would hold other values: with ``window_mode="step"`` a closed step
never enters the window (the observer's window also holds the passes a real
gate rejected), and the increment of the next accepted step is taken from
another predecessor.  With ``window_mode="batch"`` and statistic ``"norm"`` or
``"energy"`` the windows hold only first steps of batches, which a finite gradient never
closes, so on the observed trajectory they are the same as a real gate's.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Iterable, Optional

import torch

from . import state as S

_TESTS = (None, "energy", "increment", "kl")
# columns of a recorded row: the gate's stats (float32 -> float64, exact), then its ints (int64 -> float64)
_N_COLS = S.N_STATS + S.N_INTS
_REUSE_COL = S.N_STATS + S.REUSE
_BATCHES_COL = S.N_STATS + S.BATCHES
_Z_COL = {None: S.Z, "energy": S.Z_ENERGY, "increment": S.Z_INCREMENT, "kl": S.KL}


def _closes(score: float, t: float) -> bool:
    """Whether a step (or batch) with this score closes under threshold t; a non-finite energy (+inf)
    closes under every threshold, float("inf") included."""
    return score == math.inf or score > t


def _check_threshold(t) -> float:
    if isinstance(t, bool) or not isinstance(t, Real) or math.isnan(t) or t < 0:
        raise ValueError(f"thresholds must be numbers >= 0 (float('inf') allowed), got {t!r}")
    return float(t)


class Recorder:
    """Records a gate's per-step z (per test), reuse index and decision, on the device, for close-rate reports.

    One Recorder per gate: call ``record(gate)`` once after each ``gate.step()``.
    Rows live in a float64 device buffer that doubles when full (``capacity``
    rows to start); nothing is read back until a report method is called.
    Meant for an observer gate (``threshold=float("inf")``), but it works on
    any gate: its own closes show in the recorded z like any other pass.
    Not for use inside a captured CUDA graph (each record writes the next row).
    """

    def __init__(self, capacity: int = 1024) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self._capacity = capacity
        self._buf: Optional[torch.Tensor] = None
        self._n = 0
        self.config = None  # the recorded gate's GateConfig, from the first record()

    # -- recording (no host sync) -------------------------------------------------------
    def record(self, gate) -> None:
        """Append the gate's last step (a copy of its device stats and counters); no host read."""
        st = gate.state
        if self._buf is None:
            self._buf = torch.zeros(self._capacity, _N_COLS, dtype=torch.float64, device=st.stats.device)
            self.config = gate.config
        elif st.stats.device != self._buf.device:
            raise ValueError(f"this Recorder holds steps on {self._buf.device}; the gate is on {st.stats.device}")
        elif gate.config != self.config:
            raise ValueError(
                f"this Recorder holds steps of a gate with {self.config}; got one with {gate.config} "
                "(use one Recorder per gate)"
            )
        if self._n == self._buf.shape[0]:  # grow on the device: a stream-ordered copy, no host read
            grown = torch.zeros(2 * self._n, _N_COLS, dtype=torch.float64, device=self._buf.device)
            grown[: self._n].copy_(self._buf)
            self._buf = grown
        row = self._buf[self._n]
        row[: S.N_STATS].copy_(st.stats)
        row[S.N_STATS :].copy_(st.ints)
        self._n += 1

    def __len__(self) -> int:
        """Recorded steps."""
        return self._n

    # -- reports (each reads the device once) -------------------------------------------
    def _rows(self) -> list[list[float]]:
        if self._n == 0:
            raise ValueError("nothing recorded yet: call record(gate) after each gate.step()")
        rows = self._buf[: self._n].cpu().tolist()  # host-read-ok: a report, after the run, never in step()
        # One gate's steps, ever (accepted + closed), rise with every step, across a resume into a fresh gate too.
        # A second gate with the same config passes record()'s check (which reads nothing back), and its rows
        # would merge into the first's batches: this is where that shows.
        steps = [r[S.N_STATS + S.ACCEPTED] + r[S.N_STATS + S.CLOSED_TOTAL] for r in rows]
        back = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
        if back is not None:
            raise ValueError(
                f"recorded row {back} is the gate's step {steps[back]:.0f}, after row {back - 1}'s step "
                f"{steps[back - 1]:.0f}: its rows come from more than one gate, a gate loaded from an older "
                "state, or two records after one step. Use one Recorder per gate, record once after each "
                "gate.step(), and start a new Recorder after loading an older state"
            )
        return rows

    @staticmethod
    def _score(row: list[float], test) -> float:
        """What this step does under threshold t: it closes iff score > t (+inf: under every t, see _closes)."""
        if not (math.isfinite(row[S.ENERGY]) and math.isfinite(row[S.KL])):
            return math.inf  # a NaN/Inf energy or KL closes at any threshold, at any pass
        if row[_REUSE_COL] <= 1:
            return -math.inf  # the first pass of a batch never closes on a finite gradient
        z = row[_Z_COL[test]]
        return -math.inf if math.isnan(z) else z

    def _batches(self, test) -> list[list[tuple[int, float]]]:
        """Per batch: (reuse index, score) of each recorded step.  A batch starts at the first step recorded
        after a new_batch() (the reuse index alone cannot say: in passes of several steps it repeats)."""
        if test not in _TESTS:
            raise ValueError(f"test must be one of {_TESTS}, got {test!r}")
        batches: list = []
        last = None
        for row in self._rows():
            batch = row[_BATCHES_COL]  # the gate's new_batch() count, saved with its state
            if batch != last:
                batches.append([])
            batches[-1].append((int(row[_REUSE_COL]), self._score(row, test)))
            last = batch
        return batches

    def batch_scores(self, test: Optional[str] = None) -> list[float]:
        """Per recorded batch, the largest z among its eligible passes: the batch closes under a threshold
        t iff this exceeds t.  +inf for a batch with a non-finite energy (it closes under every threshold,
        inf included), -inf for one with no eligible pass.

        test: None (the gate's z: for "energy+increment" the larger of both tests'), "energy" or
        "increment" (only that test's z, as if the other were not watched; 0 for a test the gate does
        not run, so such a test never closes a batch), or "kl": the KL the trainer gave the gate
        (observe_kl; 0 where none was given), so a "threshold" is a KL limit, kl_factor * target_kl
        (the KL stop fires from the second pass on, with no window).
        """
        return [max(s for _, s in b) for b in self._batches(test)]

    @property
    def n_batches(self) -> int:
        """Recorded rollout batches (reads the device)."""
        return len(self._batches(None))

    def close_rates(self, thresholds: Iterable[float], test: Optional[str] = None) -> dict[float, float]:
        """{threshold: fraction of recorded batches that would have closed under it} (first order, see the
        module docstring).  ``test`` as in batch_scores()."""
        ts = [_check_threshold(t) for t in thresholds]
        scores = self.batch_scores(test)
        return {t: sum(_closes(s, t) for s in scores) / len(scores) for t in ts}

    def step_close_rates(self, thresholds: Iterable[float], test: Optional[str] = None) -> dict[float, float]:
        """{threshold: fraction of recorded steps at which the gate would have closed}, each step judged on
        its own (a step after a would-be close in the same batch is still counted)."""
        ts = [_check_threshold(t) for t in thresholds]
        scores = [s for b in self._batches(test) for _, s in b]
        return {t: sum(_closes(s, t) for s in scores) / len(scores) for t in ts}

    def first_close_passes(self, threshold: float, test: Optional[str] = None) -> list[Optional[int]]:
        """Per recorded batch, the reuse index of the pass that would have closed it under ``threshold``
        (None where the batch stays open): its passes after that one would not have run."""
        t = _check_threshold(threshold)
        return [next((r for r, s in b if _closes(s, t)), None) for b in self._batches(test)]

    def threshold_for_close_rate(self, rate: float, test: Optional[str] = None) -> float:
        """The smallest threshold under which at most ``rate`` of the recorded batches close.

        With B recorded batches, at most floor(rate * B) may close: the answer is
        just above the (floor(rate * B) + 1)-th largest batch score (one float32
        step above it: the recorded z is float32 and the gate's own z, float64,
        rounds to it, so the gate stays at or below the answer too), or 0.0
        where that score is negative or there are no more batches.  Raises
        ValueError where more than floor(rate * B) batches had a non-finite
        energy, which closes under every threshold.
        """
        if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 <= rate <= 1:
            raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
        scores = sorted(self.batch_scores(test), reverse=True)
        allowed = math.floor(rate * len(scores) + 1e-9)
        if allowed >= len(scores):
            return 0.0
        m = scores[allowed]
        if m == math.inf:
            n_bad = sum(s == math.inf for s in scores)
            raise ValueError(
                f"{n_bad} of {len(scores)} recorded batches had a non-finite gradient energy, which closes the "
                f"gate under every threshold; no threshold keeps the close rate at or below {rate}"
            )
        if m < 0:
            return 0.0
        # host-side float32 arithmetic on a Python number (no device involved)
        above = torch.nextafter(torch.tensor(m, dtype=torch.float32), torch.tensor(math.inf, dtype=torch.float32))
        return float(above)  # host-read-ok: a CPU tensor built just above

    def __repr__(self) -> str:
        return f"Recorder({self._n} steps)"
