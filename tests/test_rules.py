"""The paper's rule (energy+increment), the window modes and the observer mode, on every backend.

Hand-made sequences with integer energies: a gradient of k ones has energy k
(exactly, or within float32 rounding where a backend squares a float32
norm), so the expected z values below are computed by hand.  The random-sequence parity of every backend with the
plain-Python model (tests/semantics_model.py) covers the same settings
through sequences.GATE_CONFIGS.
"""
import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from contract import BACKEND_PARAMS
from semantics_model import play
from sequences import make_sequence, run_gate, same_records

BACKENDS = BACKEND_PARAMS
N = 64  # gradient length: energies 0..64 are exact


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _gate(backend, **kw):
    w = torch.nn.Parameter(torch.empty(N, device=_device(backend)))
    return dgg.DynamicGradientGate(w, backend=backend, **kw), w


def _grad(energy, w):
    """A gradient whose energy is ``energy`` (an integer <= N, exactly), or NaN/inf."""
    g = torch.zeros(N, device=w.device)
    if isinstance(energy, float) and not math.isfinite(energy):
        g[0] = energy
    else:
        g[:energy] = 1.0
    return g


def _steps(gate, w, energies):
    """Step through ``energies`` ("|" = new_batch()); returns the stats of each step as Python numbers."""
    out = []
    for e in energies:
        if e == "|":
            gate.new_batch()
            continue
        w.grad = _grad(e, w)
        closed = gate.step()
        s = {k: v.item() for k, v in gate.stats().items()}
        assert bool(closed.item()) == s["closed"]
        out.append(s)
    return out


# ----------------------------------------------------------------------------- energy+increment
ENERGY_ONLY = ["|", 10, "|", 20, "|", 30, "|", 40, 45]
INCREMENT_ONLY = ["|", 40, "|", 30, "|", 20, "|", 10, 12]


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_rule_closes_when_only_the_energy_test_fires(backend):
    # energies 10, 20, 30, 40, each the first pass of its batch (which never closes): energy window
    # [20, 30, 40] (mean 30, std 8.165), increment window [10, 10, 10] (std 0).  Then a second pass of 45:
    # z_energy = 15 / 8.165 = 1.84 > 1; the increment 5 is below its window: z < 0.
    gate, w = _gate(backend, window=3, threshold=1.0, statistic="energy+increment", max_reuse=100)
    s = _steps(gate, w, ENERGY_ONLY)
    assert not any(x["closed"] for x in s[:4])
    last = s[-1]
    assert last["closed"]
    assert last["z_energy"] == pytest.approx(15 / math.sqrt(200 / 3), rel=1e-6)
    assert last["z_increment"] < -1e6  # (5 - 10) / (0 + eps)
    assert last["z"] == last["z_energy"]  # the larger z is reported, with its test's statistic, mean and std
    assert (last["statistic"], last["mean"]) == pytest.approx((45.0, 30.0), rel=1e-6)
    assert last["std"] == pytest.approx(math.sqrt(200 / 3), rel=1e-6)
    # each single statistic alone: energy closes there too, increment does not
    for statistic, closes in (("energy", True), ("increment", False)):
        g1, w1 = _gate(backend, window=3, threshold=1.0, statistic=statistic, max_reuse=100)
        assert _steps(g1, w1, ENERGY_ONLY)[-1]["closed"] == closes, statistic


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_rule_closes_when_only_the_increment_test_fires(backend):
    # first passes 40, 30, 20, 10: energy window [30, 20, 10] (mean 20, std 8.165), increments [-10, -10, -10].
    # Then a second pass of 12: z_energy = -8 / 8.165 = -0.98; the increment +2 is 12 above its window's mean
    # with std 0.
    gate, w = _gate(backend, window=3, threshold=1.0, statistic="energy+increment", max_reuse=100)
    s = _steps(gate, w, INCREMENT_ONLY)
    assert not any(x["closed"] for x in s[:4])
    last = s[-1]
    assert last["closed"]
    assert last["z_energy"] == pytest.approx(-8 / math.sqrt(200 / 3), rel=1e-6)
    assert last["z_increment"] > 1e6  # 12 / (0 + eps)
    assert last["z"] == last["z_increment"]
    assert (last["statistic"], last["mean"], last["std"]) == pytest.approx((2.0, -10.0, 0.0), abs=1e-4)
    for statistic, closes in (("energy", False), ("increment", True)):
        g1, w1 = _gate(backend, window=3, threshold=1.0, statistic=statistic, max_reuse=100)
        assert _steps(g1, w1, INCREMENT_ONLY)[-1]["closed"] == closes, statistic


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_rule_each_test_waits_for_its_own_window(backend):
    # window 2: the energy window is full after 2 accepted steps, the increment window after 3
    # (the first accepted step has no increment).
    gate, w = _gate(backend, window=2, threshold=0.5, statistic="energy+increment", max_reuse=100)
    s = _steps(gate, w, [10, 12, 11])
    # step 3: energy window [10, 12] full: z_e = (11 - 11) / 1 = 0; increment window [2] not full: z_i = 0
    assert s[2]["z_energy"] == pytest.approx(0.0, abs=1e-6) and s[2]["z_increment"] == 0.0
    ints = gate.state.ints.cpu()
    assert (ints[S.COUNT].item(), ints[S.COUNT2].item()) == (2, 2)
    # ring: energies in [0, window), increments in [window, 2 window)
    assert sorted(gate.state.ring.cpu().tolist()[:2]) == pytest.approx([11.0, 12.0], rel=1e-6)
    assert sorted(gate.state.ring.cpu().tolist()[2:]) == pytest.approx([-1.0, 2.0], rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_rule_first_pass_never_closes_and_nan_always_does(backend):
    gate, w = _gate(backend, window=2, threshold=0.0, statistic="energy+increment", max_reuse=100)
    s = _steps(gate, w, [10, 11, 12, 13, "|", 64])  # a spike at reuse index 1: reported, not acted on
    assert s[-1]["reuse_index"] == 1 and s[-1]["z"] > 1 and not s[-1]["closed"]
    closed_before = gate.stats()["closed_total"].item()
    s = _steps(gate, w, ["|", math.nan, "|", 10, math.inf])  # NaN at pass 1, inf at pass 2
    assert s[0]["closed"] and not s[1]["closed"] and s[2]["closed"]
    assert s[0]["reuse_index"] == 1 and s[2]["reuse_index"] == 2
    assert gate.stats()["closed_total"].item() == closed_before + 2


# ----------------------------------------------------------------------------- window modes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("statistic", ["energy", "increment", "energy+increment"])
def test_batch_window_holds_only_first_passes(backend, statistic):
    gate, w = _gate(backend, window=3, threshold=100.0, statistic=statistic, window_mode="batch", max_reuse=100)
    batches = [[10, 11, 12], [20, 30], [40, 1, 2, 3], [50]]
    seq = [e for b in batches for e in ["|"] + b]
    _steps(gate, w, seq)
    ring = gate.state.ring.cpu().tolist()
    ints = gate.state.ints.cpu()
    # first passes: 10, 20, 40, 50; their increments (from the previous accepted step, the last pass
    # of the batch before): none, 20 - 12, 40 - 30, 50 - 3
    want_e, want_i = [20.0, 40.0, 50.0], [8.0, 10.0, 47.0]
    if statistic == "energy":
        assert sorted(ring) == pytest.approx(want_e, rel=1e-6) and ints[S.COUNT].item() == 3
    elif statistic == "increment":
        assert sorted(ring) == pytest.approx(want_i, rel=1e-5) and ints[S.COUNT].item() == 3
    else:
        assert sorted(ring[:3]) == pytest.approx(want_e, rel=1e-6)
        assert sorted(ring[3:]) == pytest.approx(want_i, rel=1e-5)
        assert (ints[S.COUNT].item(), ints[S.COUNT2].item()) == (3, 3)
    assert ints[S.ACCEPTED].item() == 10  # every step was accepted (and every one moved the increment's reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_window_later_passes_are_tested_against_first_passes(backend):
    # first passes 10, 12, 14 -> window [10, 12, 14], mean 12, std 1.633; a second pass of 16 has z = 2.45
    gate, w = _gate(backend, window=3, threshold=2.0, statistic="energy", window_mode="batch", max_reuse=100)
    s = _steps(gate, w, ["|", 10, 10, 10, "|", 12, 12, "|", 14, 14, 16])
    assert [x["closed"] for x in s] == [False] * 7 + [True]
    assert s[-1]["z"] == pytest.approx(4 / math.sqrt(8 / 3), rel=1e-6)
    assert s[-2]["z"] == pytest.approx(2 / math.sqrt(8 / 3), rel=1e-6)
    assert sorted(gate.state.ring.cpu().tolist()) == pytest.approx([10.0, 12.0, 14.0], rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_window_without_new_batch_only_the_first_step_enters(backend):
    gate, w = _gate(backend, window=2, threshold=0.0, statistic="norm", window_mode="batch", max_reuse=100)
    s = _steps(gate, w, [1, 4, 9, 64, 1, 64])
    assert gate.state.ints[S.COUNT].item() == 1  # only the very first step entered: the window never fills
    assert not any(x["closed"] for x in s) and all(x["z"] == 0 for x in s)
    assert _steps(gate, w, [math.nan])[0]["closed"]  # still a NaN guard


# ----------------------------------------------------------------------------- observer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("statistic", ["norm", "energy", "increment", "energy+increment"])
def test_observer_never_closes_on_finite_grads_but_closes_on_nan_and_inf(backend, statistic):
    gate, w = _gate(backend, window=3, threshold=math.inf, statistic=statistic, max_reuse=100)
    s = _steps(gate, w, [1, 2, 1, 2, 1, 64, 1, 64, 2])
    assert not any(x["closed"] for x in s)
    assert max(x["z"] for x in s) > 3  # z is computed and reported
    assert gate.state.hyper[S.THRESHOLD].item() == math.inf
    for bad in (math.nan, math.inf, -math.inf):
        r = _steps(gate, w, [bad])[0]
        assert r["closed"]
        assert torch.equal(w.grad, torch.zeros_like(w.grad))  # NaN never passes the gate
    assert gate.stats()["closed_total"].item() == 3


def test_observer_gate_attached_to_a_fused_optimizer_always_steps_on_finite_grads():
    w = torch.nn.Parameter(torch.ones(N))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    gate = dgg.DynamicGradientGate(w, window=2, threshold=math.inf, backend="torch")
    gate.attach(opt)
    before = w.detach().clone()
    for e in (1, 2, 64, 64, 1):
        w.grad = _grad(e, w)
        assert not gate.step().item()
        opt.step()
    assert not torch.equal(before, w.detach())


# ----------------------------------------------------------------------------- z_energy / z_increment
@pytest.mark.parametrize("statistic", ["norm", "energy", "increment", "energy+increment"])
def test_z_per_test_for_every_statistic(statistic):
    seq = make_sequence(3, 80, [(9, 4)])
    w = torch.nn.Parameter(torch.empty(9, 4))
    cfg = dict(window=4, threshold=0.4, statistic=statistic)
    recs = run_gate(dgg.DynamicGradientGate(w, backend="torch", **cfg), seq)
    model = play(cfg, seq)
    def same(a, b):
        return a == b or (math.isnan(a) and math.isnan(b))

    for i, (r, (m, _)) in enumerate(zip(recs, model)):
        s = r["stats"]
        if statistic == "increment":
            assert s["z_energy"] == 0.0 and same(s["z_increment"], s["z"]), i  # the test not run reports 0
        elif statistic in ("norm", "energy"):
            assert s["z_increment"] == 0.0 and same(s["z_energy"], s["z"]), i
        else:  # the larger of the two (the energy test's on a tie or NaN)
            ze, zi = s["z_energy"], s["z_increment"]
            assert same(s["z"], zi if zi > ze else ze), i
        # for every statistic: closed iff not finite, or reuse > 1 and z > threshold
        finite = math.isfinite(s["energy"])
        assert s["closed"] == (not finite or (s["reuse_index"] > 1 and s["z"] > 0.4)), i
        assert s["closed"] == m["closed"], i


# ----------------------------------------------------------------------------- state dicts and settings
@pytest.mark.parametrize("statistic, window_mode", [("energy+increment", "step"), ("increment", "batch"),
                                                    ("energy+increment", "batch")])
def test_state_dict_round_trip_new_settings(statistic, window_mode):
    seq = make_sequence(8, 140, [(13, 3)])
    first, rest = seq.events[:70], seq.events[70:]
    kw = dict(window=4, threshold=0.3, statistic=statistic, window_mode=window_mode, backend="torch")
    a = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(13, 3)), **kw)
    seq.events = first
    run_gate(a, seq)
    sd = a.state_dict()
    assert sd["config"]["window_mode"] == window_mode and sd["state"]["ring"].numel() == a.config.n_rings * 4
    b = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(13, 3)), **kw)
    b.load_state_dict(sd)
    seq.events = rest
    ra, rb = run_gate(a, seq), run_gate(b, seq)
    assert same_records(ra, rb)
    assert any(r["closed"] for r in ra) and not all(r["closed"] for r in ra)


@pytest.mark.parametrize(
    "mine, theirs, name",
    [
        (dict(window_mode="step"), dict(window_mode="batch"), "window_mode"),
        (dict(statistic="energy"), dict(statistic="energy+increment"), "statistic"),
        (dict(statistic="energy+increment"), dict(statistic="increment"), "statistic"),
        (dict(threshold=0.3), dict(threshold=math.inf), "threshold"),
    ],
)
def test_load_state_dict_refuses_other_settings_and_changes_nothing(mine, theirs, name):
    w = torch.nn.Parameter(torch.empty(5))
    a = dgg.DynamicGradientGate(w, window=3, backend="torch", **theirs)
    b = dgg.DynamicGradientGate(w, window=3, backend="torch", **mine)
    for g in (a, b):
        for k in range(4):
            w.grad = torch.randn(5) * (k + 1)
            g.step()
    before = b.state_dict()
    with pytest.raises(ValueError, match=name):
        b.load_state_dict(a.state_dict())
    after = b.state_dict()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def test_state_dict_from_before_the_second_ring_still_loads():
    """A state saved before window_mode and the second ring existed (7 ints, 7 stats) resumes identically."""
    seq = make_sequence(9, 100, [(11,)])
    first, rest = seq.events[:50], seq.events[50:]
    a = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(11)), window=4, statistic="increment", backend="torch")
    seq.events = first
    run_gate(a, seq)
    sd = a.state_dict()
    old = {"config": {k: v for k, v in sd["config"].items() if k not in ("window_mode", "target_kl", "kl_factor")},
           "state": dict(sd["state"], ints=sd["state"]["ints"][:7].clone(), stats=sd["state"]["stats"][:7].clone())}
    b = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(11)), window=4, statistic="increment", backend="torch")
    b.load_state_dict(old)
    # every slot a version 1 state had, and what a gate with that history holds in the later ones; BATCHES
    # (the new_batch() count, version 6) starts from the upgrade
    assert torch.equal(b.state.ints[: S.BATCHES], a.state.ints[: S.BATCHES]) and b.state.ints[S.BATCHES] == 0
    assert torch.equal(b.state.ring, a.state.ring)
    seq.events = rest
    assert same_records(run_gate(a, seq), run_gate(b, seq))
    c = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(11)), window=4, window_mode="batch", backend="torch")
    with pytest.raises(ValueError, match="window_mode"):  # an old state was a step window
        c.load_state_dict(old)


def test_settings_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match=r"window_mode must be one of \('step', 'batch'\), got 'epoch'"):
        dgg.GateConfig(window_mode="epoch")
    with pytest.raises(ValueError, match=r"threshold must be a number >= 0 \(float\('inf'\) for the observer"):
        dgg.GateConfig(threshold=math.nan)
    with pytest.raises(ValueError, match="statistic must be one of .*energy\\+increment"):
        dgg.GateConfig(statistic="paper")
    cfg = dgg.GateConfig(threshold=math.inf, statistic="energy+increment", window_mode="batch")
    assert (cfg.statistic_id, cfg.window_mode_id, cfg.n_rings) == (3, 1, 2)
    assert dgg.GateConfig().statistic == dgg.GateConfig.statistic  # the gate's defaults are the config's
    gate = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(3)))
    assert (gate.config.statistic, gate.config.window_mode) == (dgg.GateConfig.statistic, dgg.GateConfig.window_mode)
    assert "window_mode='step'" in repr(gate)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cfg", [dict(statistic="energy+increment"), dict(statistic="increment", window_mode="batch"),
                                 dict(statistic="energy+increment", window_mode="batch", threshold=math.inf)])
def test_no_host_sync_in_step_new_settings_gpu(backend, cfg):
    w = torch.nn.Parameter(torch.empty(4096, 64, device="cuda", dtype=torch.bfloat16))
    gate = dgg.DynamicGradientGate(w, window=3, backend=backend, **cfg)
    w.grad = torch.randn_like(w)
    gate.step()  # compile / build tables outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(12):
            if i % 3 == 0:
                gate.new_batch()
            w.grad.mul_(1.0 + (i % 4))
            gate.step()
            gate.stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")
