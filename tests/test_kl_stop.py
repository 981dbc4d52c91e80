"""The KL stop: target_kl / kl_factor, observe_kl(), and the KL test every backend runs in its finalize.

Every backend is checked step for step against the torch backend and the plain-Python semantics model
(decisions and counters exactly, the KL bit for bit), with random gradients of odd sizes in fp32, bf16 and
fp16, the KL given as a tensor of several dtypes or as a number.
"""
from __future__ import annotations

import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from dgg_kernels.calibration import Recorder
from contract import BACKEND_PARAMS, CPU_BACKEND_PARAMS, assert_unchanged, snapshot
from semantics_model import GateModel, energy_of
from sequences import assert_stats_match


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _stats(gate) -> dict:
    return {k: v.item() for k, v in gate.stats().items()}


def _kl_sequence(seed: int, steps: int) -> list[float]:
    """Per step a KL that grows over the passes of a batch, with jumps: float32 values, as the gate stores
    them (some negative, as a k1 estimate can be)."""
    gen = torch.Generator().manual_seed(seed)
    kl = (torch.rand(steps, generator=gen) * 0.03 - 0.003).to(torch.float32)
    return [float(x) for x in kl]


CASES = [
    # (statistic, threshold, target_kl, kl_factor, passes of several steps)
    ("norm", math.inf, 0.01, 1.5, False),              # the KL stop alone (observer gradient test)
    ("energy+increment", 0.3, 0.01, 1.5, False),       # the paper's rule or the KL: either closes
    ("energy", 0.5, 0.005, 1.0, True),                 # passes of two steps: a KL close ends the batch
    ("increment", math.inf, None, 1.0, False),         # no KL stop: a given KL is reported, never closes
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-t{c[1]}-kl{c[2]}x{c[3]}-passes{c[4]}")
def test_kl_stop_matches_the_model_step_for_step(backend, dtype, case):
    statistic, threshold, target_kl, kl_factor, passes = case
    device = _device_for(backend)
    torch.manual_seed(7)
    cfg = dict(window=3, threshold=threshold, statistic=statistic, max_reuse=4, target_kl=target_kl,
               kl_factor=kl_factor)
    w = torch.nn.Parameter(torch.empty(37, 13, dtype=dtype, device=device))
    gate = dgg.DynamicGradientGate(w, backend=backend, **cfg)
    ref_w = torch.nn.Parameter(torch.empty(37, 13, dtype=dtype, device="cpu"))
    ref = dgg.DynamicGradientGate(ref_w, backend="torch", **cfg)
    model = GateModel(**cfg)
    kls = _kl_sequence(11, 48)
    kl_dtypes = [torch.float32, torch.bfloat16, torch.float64]
    closes = {"kl": 0, "first pass": 0}
    step = 0
    for batch in range(8):
        for g in (gate, ref):
            g.new_batch()
        model.new_batch()
        for p in range(3):
            if passes:
                for g in (gate, ref):
                    g.new_pass()
                model.new_pass()
            for _ in range(2 if passes else 1):
                grad = (torch.randn(37, 13) * (1.0 + 2.0 * (step % 5 == 4))).to(dtype)
                energy = energy_of([grad])
                w.grad, ref_w.grad = grad.clone().to(device), grad.clone()  # a closed gate zeroes them
                kl_dtype = kl_dtypes[step % 3]
                kl = torch.tensor(kls[step], dtype=kl_dtype)
                if step % 4 == 3:
                    gate.observe_kl(float(kl))  # a Python number
                else:
                    gate.observe_kl(kl.to(device).requires_grad_(kl_dtype == torch.float32))
                ref.observe_kl(kl)
                closed = bool(gate.step().item())
                ref_closed = bool(ref.step().item())
                want = model.step(energy, float(kl.to(torch.float64)))
                got, r = _stats(gate), _stats(ref)
                assert closed == ref_closed == want["closed"], (step, got, r, want)
                assert gate.should_stop() == ref.should_stop() == model.stop, step
                assert got["reuse_index"] == r["reuse_index"] == model.reuse
                assert (got["accepted"], got["closed_total"]) == (model.accepted, model.closed_total)
                assert got["kl"] == r["kl"] == float(torch.tensor(want["kl"], dtype=torch.float32)), step
                assert_stats_match(got, r, step, want["err_scale"], model=want)
                if target_kl is not None and want["kl"] > target_kl * kl_factor:
                    closes["first pass" if model.reuse <= 1 else "kl"] += 1
                    assert closed == (model.reuse > 1 or (passes and model.batch_closed)), step
                step += 1
            if model.stop:
                break
    if target_kl is None:
        assert gate.stats()["closed_total"].item() == 0 or threshold != math.inf
    else:
        assert closes["kl"] > 0 and closes["first pass"] > 0, closes  # the sequence reaches both cases


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_non_finite_kl_on_the_device_closes_the_gate(backend):
    """A NaN or Inf KL in an accelerator tensor cannot be refused without a host read: the finalize closes
    on it, at any pass, with or without a KL stop.  Written into the state directly here (on CPU the gate
    refuses such a value before it gets there)."""
    device = _device_for(backend)
    for target_kl, bad in ((None, math.nan), (0.01, math.inf), (0.01, -math.inf), (None, 1e39)):
        w = torch.nn.Parameter(torch.zeros(9, 5, device=device))
        gate = dgg.DynamicGradientGate(w, backend=backend, threshold=math.inf, target_kl=target_kl)
        gate.new_batch()
        w.grad = torch.randn(9, 5, device=device)
        gate.observe_kl(0.0)
        gate.state.acc[S.ACC_KL] = bad
        assert bool(gate.step().item())
        assert gate.should_stop() and gate.stats()["reuse_index"].item() == 1
        # consumed: the next step judges no KL unless given one
        w.grad = torch.randn(9, 5, device=device)
        gate.observe_kl(0.0)
        gate.new_batch()
        assert not bool(gate.step().item())
        assert gate.state.acc[S.ACC_KL].item() == 0.0


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
def test_a_given_kl_is_judged_by_one_step_only(backend):
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, backend=backend, threshold=math.inf, max_reuse=8)
    gate.new_batch()
    w.grad = torch.randn(7, 3)
    gate.observe_kl(torch.tensor(0.25))
    gate.step()
    assert gate.stats()["kl"].item() == 0.25
    w.grad = torch.randn(7, 3)
    gate.step()  # no KL stop: observe_kl is optional, and the last one is forgotten
    assert gate.stats()["kl"].item() == 0.0 and not gate.should_stop()


BAD_KL = [
    (torch.tensor([0.1]), ValueError, "0-dim"),
    (torch.zeros(2, 2), ValueError, "0-dim"),
    (torch.tensor(1), TypeError, "floating-point"),
    (torch.tensor(True), TypeError, "floating-point"),
    (torch.tensor(math.nan), ValueError, "finite"),
    (torch.tensor(math.inf, dtype=torch.bfloat16), ValueError, "finite"),
    (math.nan, ValueError, "finite"),
    (-math.inf, ValueError, "finite"),
    (1e39, ValueError, "finite in float32"),
    (10**400, ValueError, "finite"),
    (torch.tensor(-1e39, dtype=torch.float64), ValueError, "finite in float32"),
    (True, TypeError, "number"),
    ("0.1", TypeError, "number"),
    (None, TypeError, "number"),
]


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
@pytest.mark.parametrize("bad,exc,words", BAD_KL, ids=[f"{type(b).__name__}-{i}" for i, (b, _, _) in enumerate(BAD_KL)])
def test_a_bad_kl_is_refused_and_nothing_changes(backend, bad, exc, words):
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, backend=backend, target_kl=0.01)
    w.grad = torch.randn(7, 3)
    gate.observe_kl(0.002)
    gate.step()
    w.grad = torch.randn(7, 3)
    snap = snapshot(gate, [w])
    acc = gate.state.acc.clone()
    with pytest.raises(exc, match=words):
        gate.observe_kl(bad)
    assert_unchanged(gate, snap)
    assert torch.equal(gate.state.acc, acc)
    with pytest.raises(RuntimeError, match="observe_kl"):  # the refused KL does not count as given
        gate.step()
    assert_unchanged(gate, snap)


@pytest.mark.gpu
def test_a_kl_on_another_device_is_refused():
    w = torch.nn.Parameter(torch.zeros(7, 3, device="cuda"))
    gate = dgg.DynamicGradientGate(w, target_kl=0.01)
    with pytest.raises(RuntimeError, match="is on cpu"):
        gate.observe_kl(torch.tensor(0.1))


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
def test_with_a_kl_stop_every_step_needs_a_kl(backend):
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, backend=backend, target_kl=0.01)
    w.grad = torch.randn(7, 3)
    snap = snapshot(gate, [w])
    with pytest.raises(RuntimeError, match="observe_kl"):
        gate.step()
    assert_unchanged(gate, snap)
    gate.observe_kl(0.0)
    gate.step()
    with pytest.raises(RuntimeError, match="observe_kl"):  # one observation serves one step
        gate.step()


@pytest.mark.parametrize("kw,words", [
    (dict(target_kl=0), "target_kl"), (dict(target_kl=-0.01), "target_kl"), (dict(target_kl=math.nan), "target_kl"),
    (dict(target_kl=math.inf), "target_kl"), (dict(target_kl="0.01"), "target_kl"), (dict(target_kl=True), "target_kl"),
    (dict(kl_factor=0), "kl_factor"), (dict(kl_factor=math.inf), "kl_factor"), (dict(kl_factor=None), "kl_factor"),
    (dict(target_kl=1e300, kl_factor=1e10), "KL limit"), (dict(target_kl=1e-300, kl_factor=1e-300), "KL limit"),
])
def test_bad_kl_settings_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(3)), **kw)


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
def test_reuse_passes_end_at_the_kl_stop_and_the_update_is_skipped(backend):
    """Through reuse_passes and a fused AdamW attached to the gate: the pass whose KL is over the limit
    leaves the weights and Adam's state untouched, and no further pass runs."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(11, 23)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, fused=True)
    gate = dgg.DynamicGradientGate(lin.weight, list(lin.parameters()), backend=backend, threshold=math.inf,
                                   target_kl=0.01, kl_factor=1.5, max_reuse=8)
    gate.attach(opt)
    x = torch.randn(5, 11)
    passes = []
    for k in dgg.reuse_passes(gate):
        loss = lin(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        gate.observe_kl(torch.tensor(0.004 * k))  # over 1.5 x 0.01 from pass 4 on
        before = [p.detach().clone() for p in lin.parameters()]
        gate.step()
        opt.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, lin.parameters()))
        passes.append((k, moved))
    assert passes == [(1, True), (2, True), (3, True), (4, False)]


def test_state_dict_keeps_the_kl_settings():
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, target_kl=0.02, kl_factor=1.5)
    w.grad = torch.randn(7, 3)
    gate.observe_kl(torch.tensor(0.003))
    gate.step()
    sd = gate.state_dict()
    assert sd["config"]["target_kl"] == 0.02 and sd["config"]["kl_factor"] == 1.5
    fresh = dgg.DynamicGradientGate(w, target_kl=0.02, kl_factor=1.5)
    fresh.load_state_dict(sd)
    assert fresh.stats()["kl"].item() == gate.stats()["kl"].item()
    other = dgg.DynamicGradientGate(w, target_kl=0.05, kl_factor=1.5)
    with pytest.raises(ValueError, match="target_kl"):
        other.load_state_dict(sd)


def test_recorder_reports_kl_close_rates():
    """Recorder(test="kl") treats a threshold as a KL limit: a batch closes at its first pass >= 2 whose KL
    is above it (an observer gate, no KL stop)."""
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, threshold=math.inf, max_reuse=3)
    rec = Recorder()
    # per batch the KL of passes 1..3; the first pass never counts
    batches = [(0.5, 0.001, 0.002), (0.0, 0.03, 0.001), (0.0, 0.004, 0.02), (0.0, 0.0, 0.0)]
    for kls in batches:
        for kl in dgg.reuse_passes(gate):
            w.grad = torch.randn(7, 3)
            gate.observe_kl(kls[kl - 1])
            gate.step()
            rec.record(gate)
    scores = rec.batch_scores(test="kl")
    want = [max(k[1:]) for k in batches]
    assert scores == [float(torch.tensor(s, dtype=torch.float32)) for s in want]
    assert rec.close_rates([0.01, 0.025], test="kl") == {0.01: 0.5, 0.025: 0.25}
    limit = rec.threshold_for_close_rate(0.25, test="kl")
    assert 0.02 <= limit < 0.0201


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
def test_observe_kl_and_step_compile_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) over observe_kl + step: the same decisions and KL as eager."""
    torch._dynamo.reset()
    gates = []
    for _ in range(2):
        w = torch.nn.Parameter(torch.zeros(9, 5))
        gates.append((w, dgg.DynamicGradientGate(w, backend=backend, threshold=math.inf, target_kl=0.01, max_reuse=8)))
    (w, gate), (ref_w, ref) = gates

    @torch.compile(backend="aot_eager", fullgraph=True)
    def compiled(kl):
        gate.observe_kl(kl)
        return gate.step()

    gate.new_batch()
    ref.new_batch()
    got, want = [], []
    for k in range(5):
        x = torch.randn(9, 5)
        w.grad, ref_w.grad = x.clone(), x.clone()
        kl = torch.tensor(0.006 * k)
        got.append((bool(compiled(kl)), gate.stats()["kl"].item()))
        ref.observe_kl(kl)
        want.append((bool(ref.step()), ref.stats()["kl"].item()))
    assert got == want and any(c for c, _ in got) and not all(c for c, _ in got)


def test_numpy_numbers_are_kls_too():
    np = pytest.importorskip("numpy")
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, target_kl=0.01)
    w.grad = torch.randn(7, 3)
    gate.observe_kl(np.float32(0.125))
    gate.step()
    assert gate.stats()["kl"].item() == 0.125


@pytest.mark.parametrize("backend", CPU_BACKEND_PARAMS)
def test_a_step_refused_for_its_gradients_keeps_the_kl_for_the_retry(backend):
    """observe_kl() serves the next step that runs: a step refused for a missing gradient leaves the KL (and
    the KL stop's bookkeeping) as they were, so the repaired retry judges it without a second observe_kl()."""
    w = torch.nn.Parameter(torch.zeros(7, 3))
    gate = dgg.DynamicGradientGate(w, backend=backend, threshold=math.inf, target_kl=0.01, max_reuse=8)
    gate.new_batch()
    w.grad = torch.randn(7, 3)
    gate.observe_kl(0.0)
    gate.step()
    gate.observe_kl(0.5)  # over the limit at pass 2
    w.grad = None
    with pytest.raises(RuntimeError, match="no .grad"):
        gate.step()
    w.grad = torch.randn(7, 3)
    assert bool(gate.step()) and gate.stats()["kl"].item() == 0.5
    with pytest.raises(RuntimeError, match="observe_kl"):
        gate.step()


def test_gated_linear_needs_the_kl_before_its_backward():
    """GatedLinear steps its gate inside backward: a KL stop there needs observe_kl() before backward()."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 9)
    gate = dgg.DynamicGradientGate(lin.weight, list(lin.parameters()), threshold=math.inf, target_kl=0.01,
                                   max_reuse=8)
    gated = dgg.GatedLinear(lin, gate)
    x = torch.randn(4, 5)
    gate.new_batch()
    with pytest.raises(RuntimeError, match="observe_kl"):
        gated(x).sum().backward()
    for k, kl in enumerate((0.0, 0.001, 0.5)):
        lin.zero_grad()
        gate.observe_kl(kl)
        gated(x).sum().backward()
        assert bool(gate.stats()["closed"]) == (k == 2)
    assert lin.weight.grad.abs().sum().item() == 0.0  # the closed step zeroed the gradients
