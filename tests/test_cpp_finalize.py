"""The C++ finalize (csrc/common/gate_finalize.h), built for the CPU: the source the CUDA kernels compile,
run on every CI machine.  Against the host form of the torch backend bit for bit on every step of the shared
random sequences (NaN, Inf, spikes, both window modes, passes, the KL stop), against the plain-Python model's
decisions, and on the crafted summation-order window.  Skips, saying why, where no C++ compiler can build it."""
from __future__ import annotations

import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from dgg_kernels.backends import torch_ref
from dgg_kernels.config import GateConfig
from semantics_model import GateModel, energy_of
from sequences import GATE_CONFIGS, config_id, make_sequence

try:
    from dgg_kernels.backends import cpp_finalize

    cpp_finalize.load()
    WHY_NOT = None
except Exception as e:  # no compiler, no ninja, no csrc: say why
    WHY_NOT = f"the C++ finalize could not be built here: {type(e).__name__}: {str(e)[:300]}"

pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _clone(st):
    return S.GateState(**{k: getattr(st, k).clone() for k in ("ring", "prev", "ints", "stats", "decision",
                                                               "hyper", "acc")})


def _bits(st):
    return [getattr(st, k).view(torch.uint8).clone() if getattr(st, k).dtype != torch.bool
            else getattr(st, k).clone() for k in ("ring", "prev", "ints", "stats", "decision", "acc")]


CPP_CONFIGS = GATE_CONFIGS + [dict(window=4, threshold=0.3, statistic="energy+increment", max_reuse=4,
                                   target_kl=0.02, kl_factor=1.5)]


@pytest.mark.parametrize("cfg", CPP_CONFIGS, ids=lambda c: config_id(c) + ("-kl" if "target_kl" in c else ""))
@pytest.mark.parametrize("passes", [1, 3])
def test_cpp_finalize_equals_the_host_form_bit_for_bit_and_decides_like_the_model(cfg, passes):
    seq = make_sequence(7 + passes, 70, [(9, 4)], p_new_batch=0.15)
    w = torch.nn.Parameter(torch.zeros(9, 4))
    gate = dgg.DynamicGradientGate(w, backend="torch", **cfg)  # its new_batch()/new_pass() drive the state
    config = gate.config
    model = GateModel(**cfg)
    kl_gen = torch.Generator().manual_seed(3)
    k = 0
    for ev in seq.events:
        if ev[0] == "new_batch":
            gate.new_batch()
            model.new_batch()
            k = 0
            continue
        if passes > 1 and k % passes == 0:
            gate.new_pass()
            model.new_pass()
        k += 1
        energy = energy_of(ev[1])
        kl = float(torch.rand((), generator=kl_gen)) * 0.04 if config.target_kl is not None else 0.0
        gate.state.acc[S.ACC_ENERGY] = energy
        gate.state.acc[S.ACC_KL] = kl
        host = _clone(gate.state)
        torch_ref.finalize_host(host, config)
        cpp_finalize.finalize(gate.state, config)
        assert all(torch.equal(a, b) for a, b in zip(_bits(gate.state), _bits(host))), (cfg, k)
        want = model.step(energy, kl)
        assert bool(gate.state.decision) == want["closed"], (cfg, k, energy)
        assert int(gate.state.ints[S.REUSE]) == want["reuse_index"]


def test_cpp_finalize_adds_the_window_left_to_right():
    """The crafted window where the summation order decides (tests/test_summation_order.py): closes."""
    from test_summation_order import ENERGY, _crafted_state

    for statistic in ("energy", "energy+increment"):
        cfg = GateConfig(window=8, threshold=0.0, statistic=statistic)
        st, host = _crafted_state(cfg), _crafted_state(cfg)
        cpp_finalize.finalize(st, cfg)
        torch_ref.finalize_host(host, cfg)
        assert bool(st.decision) and float(st.stats[S.MEAN]) == 2.0**50
        assert all(torch.equal(a, b) for a, b in zip(_bits(st), _bits(host)))
        assert ENERGY > 2.0**50


def test_cpp_finalize_on_random_crafted_states_equals_the_host_form():
    """States no sequence reaches: garbage in unfilled ring slots, NaN/Inf/-0.0/denormal windows and energies,
    counters anywhere in range, pass mode, a latched batch."""
    g = torch.Generator().manual_seed(11)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e308, 3.5e38, 2.0**53, 1.0]

    def val():
        r = float(torch.rand((), generator=g))
        if r < 0.3:
            return specials[int(torch.randint(len(specials), (), generator=g))]
        return float(torch.randn((), generator=g, dtype=torch.float64)) * 10 ** float(torch.randint(-3, 4, (), generator=g))

    for i in range(400):
        statistic = ("norm", "energy", "increment", "energy+increment")[i % 4]
        window = 2 + i % 7
        cfg = GateConfig(window=window, threshold=(0.0, 0.3, math.inf)[i % 3], statistic=statistic,
                         max_reuse=1 + i % 5, window_mode=("step", "batch")[i % 2])
        st = S.GateState.new(window, cfg.threshold, cfg.eps, torch.device("cpu"), n_rings=cfg.n_rings,
                             window_mode=cfg.window_mode, kl_limit=(math.inf, 0.01)[i % 2])
        st.ring.copy_(torch.tensor([val() for _ in range(st.ring.numel())], dtype=torch.float64))
        st.prev[0] = val()
        ints = torch.randint(0, 3, (S.N_INTS,), generator=g)
        ints[S.COUNT] = int(torch.randint(0, window + 1, (), generator=g))
        ints[S.COUNT2] = int(torch.randint(0, window + 1, (), generator=g))
        ints[S.POS] = int(torch.randint(0, window, (), generator=g))
        ints[S.POS2] = int(torch.randint(0, window, (), generator=g))
        st.ints.copy_(ints)
        st.acc[S.ACC_ENERGY] = abs(val())
        st.acc[S.ACC_KL] = val() if i % 5 == 0 else 0.0
        host = _clone(st)
        torch_ref.finalize_host(host, cfg)
        cpp_finalize.finalize(st, cfg)
        # NaN payloads and signs aside (a NaN is a NaN), every byte agrees
        for name in ("ring", "prev", "ints", "decision", "acc"):
            a, b = getattr(st, name), getattr(host, name)
            assert torch.equal(a, b) or torch.equal(torch.nan_to_num(a.double(), nan=7.0),
                                                    torch.nan_to_num(b.double(), nan=7.0)), (i, name, a, b)
        a, b = st.stats.double(), host.stats.double()
        assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)), (i, a, b)


def test_cpp_finalize_refuses_a_state_of_another_layout():
    cfg = GateConfig(window=3)
    st = S.GateState.new(3, 0.3, 1e-8, torch.device("cpu"))
    bad = S.GateState(**{**{k: getattr(st, k) for k in ("ring", "prev", "stats", "decision", "hyper", "acc")},
                         "ints": torch.zeros(S.N_INTS - 1, dtype=torch.int64)})
    with pytest.raises(RuntimeError, match=f"state.ints must have {S.N_INTS} elements"):
        cpp_finalize.finalize(bad, cfg)


def test_the_csrc_finalize_op_passes_opcheck_and_sums_overlaps_per_tensor_sums_in_order():
    """dgg::csrc_finalize (the op the CUDA finalize also implements) through torch's dispatcher on its CPU
    build: opcheck (its schema's mutations, its fake kernel), and with ``sums`` it judges their sum, added in
    index order, exactly as a finalize on acc = that sum."""
    from contract import OPCHECK_UTILS
    from dgg_kernels import ops

    cfg = GateConfig(window=3, statistic="energy+increment")
    st = S.GateState.new(3, 0.3, 1e-8, torch.device("cpu"), n_rings=2)
    for e in (1.0, 1.5, 0.75, 2.0):
        st.acc[S.ACC_ENERGY] = e
        cpp_finalize.finalize(st, cfg)
    sums = torch.tensor([1e16, 1.0, -1e16, 3.0], dtype=torch.float64)  # left to right: 3.0 (the 1.0 is lost)
    args = (st.ring, st.prev, st.ints, st.stats, st.decision, st.hyper, st.acc, 3, 4, cfg.statistic_id,
            S.slot_order(), sums)
    torch.library.opcheck(torch.ops.dgg.csrc_finalize.default, tuple(t.clone() if isinstance(t, torch.Tensor)
                                                                    else t for t in args), test_utils=OPCHECK_UTILS)
    with_sums, on_acc = _clone(st), _clone(st)
    cpp_finalize.finalize(with_sums, cfg, sums)
    on_acc.acc[S.ACC_ENERGY] = 3.0
    cpp_finalize.finalize(on_acc, cfg)
    assert float(with_sums.acc[S.ACC_ENERGY]) == 3.0
    assert all(torch.equal(a, b) for a, b in zip(_bits(with_sums), _bits(on_acc)))
    assert ops.CSRC_SCHEMAS["csrc_finalize"].startswith("csrc_finalize(")
