"""Every form of the finalize adds a window's slots in one order (left to right, slot 0 first), so all decide
alike on crafted windows where the order decides: the tensor form, the host form, the Triton kernel and the
plain-Python model.  (csrc's window_test adds the same way; its CPU build is not part of this package yet.)"""
from __future__ import annotations

import pytest
import torch

from dgg_kernels import state as S
from dgg_kernels.backends import torch_ref
from dgg_kernels.config import GateConfig
from dgg_kernels.state import GateState
from semantics_model import GateModel

# window 8, statistic "energy", threshold 0: window 2**53 then seven 1s.  Left to right every +1 rounds back to
# 2**53 (ties to even): mean 2**50, and an energy of 2**50 + 0.5 lies above it (z > 0: closes).  Pairwise,
# the 1s first add up to 2 and 4 and survive: mean 2**50 + 0.75, the same energy lies below it (stays open).
WINDOW = [2.0**53] + [1.0] * 7
ENERGY = 2.0**50 + 0.5


def _crafted_state(cfg: GateConfig) -> GateState:
    st = GateState.new(cfg.window, cfg.threshold, cfg.eps, torch.device("cpu"), n_rings=cfg.n_rings,
                       window_mode=cfg.window_mode, kl_limit=cfg.kl_limit)
    st.ring[: cfg.window] = torch.tensor(WINDOW, dtype=torch.float64)
    st.ints[S.COUNT] = cfg.window
    st.ints[S.POS] = 0
    st.ints[S.REUSE] = 1  # the step judged is pass 2: eligible
    st.ints[S.HAS_PREV] = 1
    st.prev[0] = 1.0
    st.acc[S.ACC_ENERGY] = ENERGY
    return st


def test_left_to_right_is_what_decides_here():
    """The crafted case really separates the orders (else the test below could not fail)."""
    w = torch.tensor(WINDOW, dtype=torch.float64)
    left = torch.zeros((), dtype=torch.float64)
    for v in w:
        left = left + v
    left = left / 8
    assert left == 2.0**50 and ENERGY > left
    pairwise = ((w[0] + w[1]) + (w[2] + w[3])) + ((w[4] + w[5]) + (w[6] + w[7]))
    assert ENERGY < pairwise / 8


@pytest.mark.parametrize("statistic", ["energy", "energy+increment"])
def test_every_form_of_the_finalize_decides_alike_on_a_crafted_window(statistic):
    cfg = GateConfig(window=8, threshold=0.0, statistic=statistic)
    forms = {"tensor": torch_ref.finalize_reference, "host": torch_ref.finalize_host}
    try:
        from dgg_kernels.backends.triton_fused import TritonBackend
    except ImportError:  # pragma: no cover - triton is installed in CI
        TritonBackend = None
    if TritonBackend is not None:
        forms["triton"] = TritonBackend().finalize
    got = {}
    for name, finalize in forms.items():
        st = _crafted_state(cfg)
        finalize(st, cfg)
        got[name] = (bool(st.decision), float(st.stats[S.MEAN]), float(st.stats[S.Z_ENERGY]))
    # the spec (docs/semantics.md): left to right, so the energy test fires (z > 0) and the step closes
    assert all(closed for closed, _, _ in got.values()), got
    assert len(set(got.values())) == 1, got


def test_the_model_adds_left_to_right_too():
    """The plain-Python model, fed the same window one rollout batch at a time, closes the same step."""
    m = GateModel(window=8, threshold=0.0, statistic="energy", window_mode="batch")
    for e in WINDOW:  # one statistic per batch: batch k's first step enters slot k
        m.new_batch()
        assert not m.step(e)["closed"]
    rec = m.step(ENERGY)  # pass 2 of the last batch, judged against the full window
    assert rec["reuse_index"] == 2 and rec["full_energy"]
    assert rec["mean"] == 2.0**50 and rec["closed"]
