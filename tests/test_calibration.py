"""dgg_kernels.calibration.Recorder: close rates from an observed run, against hand computations."""
import math
import types

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels.calibration import Recorder
from semantics_model import play
from sequences import make_sequence

# One-element gradients: the norm is |g| exactly.  Batches (norms of each pass), an observer gate with
# statistic "norm", window 2, window_mode "batch" (the window holds first passes only):
#   A [1, 1]         r2: window [1] not full -> z 0                    batch score 0
#   B [3, 5]         r1 enters -> window [1, 3] (mean 2, std 1); r2: z = (5 - 2) / 1 = 3     score 3
#   C [2, 2.5, 3.5]  r1: z 0, enters -> [3, 2] (mean 2.5, std 0.5); r2: z 0; r3: z = 1 / 0.5 = 2   score 2
#   D [nan, 1]       r1: NaN closes (under every threshold), enters nothing; r2: z = -3      score inf
#   E [10]           r1 only: z = 15, but the first pass is never eligible                    score -inf
BATCHES = [[1.0, 1.0], [3.0, 5.0], [2.0, 2.5, 3.5], [math.nan, 1.0], [10.0]]
HAND_SCORES = [0.0, 3.0, 2.0, math.inf, -math.inf]


def _observed(batches=BATCHES, recorder=None, **kw):
    w = torch.nn.Parameter(torch.empty(1))
    cfg = dict(window=2, threshold=math.inf, statistic="norm", window_mode="batch", max_reuse=100, backend="torch")
    cfg.update(kw)
    gate = dgg.DynamicGradientGate(w, **cfg)
    rec = recorder or Recorder()
    closes = []
    for batch in batches:
        gate.new_batch()
        closed_here = False
        for norm in batch:
            w.grad = torch.tensor([norm])
            closed_here |= bool(gate.step().item())
            rec.record(gate)
        closes.append(closed_here)
    return rec, gate, closes


def test_recorder_matches_the_hand_computation():
    rec, _, closes = _observed()
    assert closes == [False, False, False, True, False]  # the observer closed only on the NaN
    assert len(rec) == 10 and rec.n_batches == 5
    assert rec.batch_scores() == HAND_SCORES
    rates = rec.close_rates([0, 1, 2, 2.5, 3, math.inf])
    assert rates == {0.0: 0.6, 1.0: 0.6, 2.0: 0.4, 2.5: 0.4, 3.0: 0.2, math.inf: 0.2}
    assert rec.step_close_rates([1.0]) == {1.0: 0.3}  # B pass 2, C pass 3, D pass 1 of 10 steps
    assert rec.first_close_passes(2.5) == [None, 2, None, 1, None]
    assert rec.first_close_passes(0.0) == [None, 2, 3, 1, None]
    # a norm gate runs no increment test: only the NaN batch closes, whatever the threshold
    assert rec.close_rates([0.0], test="increment") == {0.0: 0.2}
    assert rec.close_rates([0.0, 2.5], test="energy") == rates_subset(rates, 0.0, 2.5)


def rates_subset(rates, *keys):
    return {k: rates[k] for k in keys}


def test_threshold_for_close_rate():
    rec, _, _ = _observed()
    def up(x):
        return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(math.inf)))

    def down(x):
        return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-math.inf)))

    # 5 batches: at most floor(rate * 5) may close; the answer sits one float32 step above the next score
    assert rec.threshold_for_close_rate(0.4) == up(2.0)
    assert rec.threshold_for_close_rate(0.5) == up(2.0)
    assert rec.threshold_for_close_rate(0.2) == up(3.0)
    assert rec.threshold_for_close_rate(0.6) == up(0.0)  # A's z of 0 must stay open
    assert rec.threshold_for_close_rate(0.8) == 0.0  # only E is left, with no eligible pass
    assert rec.threshold_for_close_rate(1.0) == 0.0
    for rate in (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0):
        if rate < 0.2:
            with pytest.raises(ValueError, match="non-finite"):  # D closes under every threshold
                rec.threshold_for_close_rate(rate)
            continue
        t = rec.threshold_for_close_rate(rate)
        assert rec.close_rates([t])[t] <= rate
        # t is one float32 step above a batch score m (or 0): at m itself the recorded run still keeps the
        # rate (the step guards the gate's float64 z), one step below m it does not
        if t > 0:
            m = down(t)
            assert rec.close_rates([m])[m] <= rate
            if m > 0:
                assert rec.close_rates([down(m)])[down(m)] > rate
    # the threshold it picks, run for real on the same gradients, closes what it predicted (here exactly:
    # a batch window holds first passes only, which a finite gradient never closes)
    t = rec.threshold_for_close_rate(0.4)
    _, gate, closes = _observed(threshold=t)
    assert closes == [False, True, False, True, False]
    assert sum(closes) / len(closes) == 0.4


def test_reports_validate_their_arguments():
    rec, _, _ = _observed()
    for bad in (-0.1, math.nan, "1", True):
        with pytest.raises(ValueError, match="thresholds must be numbers >= 0"):
            rec.close_rates([bad])
    for bad in (-0.1, 1.5, math.nan, None):
        with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\]"):
            rec.threshold_for_close_rate(bad)
    with pytest.raises(ValueError, match="test must be one of"):
        rec.close_rates([1.0], test="norm")
    with pytest.raises(ValueError, match="nothing recorded"):
        Recorder().close_rates([1.0])
    with pytest.raises(ValueError, match="capacity"):
        Recorder(capacity=0)


def test_one_recorder_per_gate():
    """A second gate is refused, also one with the same config (its rows and new_batch() counts would merge
    with the first gate's batches); nothing is recorded."""
    rec, gate, _ = _observed()
    w = torch.nn.Parameter(torch.empty(1))
    other = dgg.DynamicGradientGate(w, window=3, threshold=math.inf, backend="torch")
    w.grad = torch.ones(1)
    other.step()
    with pytest.raises(ValueError, match="one Recorder per gate"):
        rec.record(other)
    assert len(rec) == 10 and rec.n_batches == 5


@pytest.mark.parametrize("how", ["interleaved", "after"])
def test_a_second_gate_with_the_same_config_is_refused_at_the_report(how):
    """Two gates with the same config pass record()'s check (it reads nothing back), but their rows would merge
    into each other's batches: the report refuses them, naming the row; one gate recorded twice after a step too."""
    kw = dict(window=2, threshold=math.inf, statistic="norm", backend="torch")
    w1, w2 = torch.nn.Parameter(torch.empty(1)), torch.nn.Parameter(torch.empty(1))
    g1, g2 = dgg.DynamicGradientGate(w1, **kw), dgg.DynamicGradientGate(w2, **kw)
    assert g1.config == g2.config
    rec = Recorder()
    order = [g1, g2] * 3 if how == "interleaved" else [g1] * 3 + [g2] * 3
    for g in order:
        g.new_batch()
        (w1 if g is g1 else w2).grad = torch.ones(1)
        g.step()
        rec.record(g)
    assert len(rec) == 6
    with pytest.raises(ValueError, match="more than one gate.*one Recorder per gate"):
        rec.close_rates([1.0])
    once = Recorder()
    g1.step()
    once.record(g1)
    assert once.n_batches == 1
    once.record(g1)  # recorded twice after one step
    with pytest.raises(ValueError, match="two records after one step"):
        once.n_batches


def test_record_grows_its_buffer_and_keeps_every_row():
    small, _, _ = _observed(recorder=Recorder(capacity=1))
    big, _, _ = _observed()
    assert len(small) == len(big) == 10
    assert small.batch_scores() == big.batch_scores()


def test_record_reads_nothing_back(monkeypatch):
    """record() queues device copies only: every way of reading a tensor's value raises while it runs."""
    w = torch.nn.Parameter(torch.empty(4))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=math.inf, statistic="energy+increment", backend="torch")
    rec = Recorder(capacity=2)  # so that recording also grows the buffer

    def boom(*a, **k):
        raise AssertionError("record() read a device value")

    for i in range(6):
        w.grad = torch.randn(4) * (1 + i)
        gate.step()
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, boom)
            rec.record(gate)
    assert len(rec) == 6 and rec.n_batches == 1  # no new_batch(): one batch


@pytest.mark.gpu
def test_record_never_syncs_gpu():
    w = torch.nn.Parameter(torch.empty(1000, device="cuda"))
    gate = dgg.DynamicGradientGate(w, window=3, threshold=math.inf, statistic="energy+increment")
    rec = Recorder(capacity=2)
    torch.cuda.synchronize()
    for i in range(8):
        w.grad = torch.randn(1000, device="cuda") * (1 + i % 3)
        torch.cuda.set_sync_debug_mode("error")
        try:
            gate.step()
            rec.record(gate)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(rec) == 8 and 0 <= rec.close_rates([0.5])[0.5] <= 1


def _model_scores(cfg, seq, key):
    """Batch scores from the plain-Python model's per-step z (the hand rule, on float64 values)."""
    scores, current, reuse = [], None, 0
    recs = iter(play(cfg, seq))
    for ev in seq.events:
        if ev[0] == "new_batch":
            reuse = 0
            continue
        reuse += 1
        m, _ = next(recs)
        if reuse == 1 or current is None:
            current = []
            scores.append(current)
        if not math.isfinite(m["energy"]):
            current.append(math.inf)
        elif reuse > 1:
            current.append(m[key])
    return [max(b, default=-math.inf) for b in scores]


@pytest.mark.parametrize("statistic, window_mode", [("energy+increment", "step"), ("norm", "step"),
                                                    ("increment", "batch")])
def test_close_rates_match_the_model_on_random_sequences(statistic, window_mode):
    cfg = dict(window=4, threshold=math.inf, statistic=statistic, window_mode=window_mode, max_reuse=100)
    seq = make_sequence(21, 200, [(17, 3)], p_new_batch=0.3)
    if seq.events[0][0] != "new_batch":
        seq.events.insert(0, ("new_batch",))
    w = torch.nn.Parameter(torch.empty(17, 3))
    gate = dgg.DynamicGradientGate(w, backend="torch", **cfg)
    rec = Recorder()
    for ev in seq.events:
        if ev[0] == "new_batch":
            gate.new_batch()
        else:
            w.grad = ev[1][0].clone()
            gate.step()
            rec.record(gate)
    grid = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    for test, key in ((None, "z"), ("energy", "z_energy"), ("increment", "z_increment")):
        want = _model_scores(cfg, seq, key)
        got = rec.batch_scores(test)
        assert len(got) == len(want)
        for t in grid:  # the recorded z is float32: compare where no score sits at the threshold
            if any(math.isfinite(s) and abs(s - t) < 1e-4 * (1 + abs(t)) for s in want):
                continue
            assert rec.close_rates([t], test)[t] == sum(s > t for s in want) / len(want), (test, t)
    rates = rec.close_rates(grid)
    assert all(rates[a] >= rates[b] for a, b in zip(grid, grid[1:]))  # fewer closes as the threshold grows
    assert rates[0.0] > rates[4.0]


@pytest.mark.parametrize("max_reuse", [1, 3])
def test_recorder_counts_rollout_batches_in_passes_of_several_steps(max_reuse):
    """reuse_passes with 2 mini-batches per pass: every step of a batch belongs to it, whatever its reuse index
    (with max_reuse=1 consecutive batches even share reuse index 1 throughout)."""
    w = torch.nn.Parameter(torch.empty(4))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=math.inf, max_reuse=max_reuse, backend="torch",
                                   target_kl=0.01, kl_factor=1.0)
    rec = Recorder()
    kls = [[0.0, 0.0, 0.0, 0.0, 0.5, 0.5], [0.0] * 6, [0.0] * 6]  # per batch, per step: only batch 0 exceeds
    for batch in range(3):
        k = 0
        for _ in dgg.reuse_passes(gate):
            for _mini in range(2):
                w.grad = torch.ones(4)
                gate.observe_kl(kls[batch][k] if k < len(kls[batch]) else 0.0)
                gate.step()
                rec.record(gate)
                k += 1
    assert len(rec) == 3 * 2 * max_reuse
    assert rec.n_batches == 3
    closes = rec.close_rates([0.01], test="kl")[0.01]
    assert closes == (1 / 3 if max_reuse == 3 else 0.0)  # batch 0's pass 3 exceeds the limit; K=1 has no pass 2
    assert rec.first_close_passes(0.01, test="kl") == ([3, None, None] if max_reuse == 3 else [None] * 3)


def test_recorder_batches_survive_a_resume_into_a_fresh_gate_and_wrappers():
    """The batch count lives in the gate's state: a gate resumed mid-batch from a state_dict (a new object)
    continues the same batch, and a wrapper exposing .state and .config (DeepSpeedGate, the adapter's)
    records like the gate itself."""
    w = torch.nn.Parameter(torch.empty(3))
    kw = dict(window=2, threshold=math.inf, max_reuse=4, backend="torch")
    gate = dgg.DynamicGradientGate(w, **kw)
    rec = Recorder()
    norms = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 50.0, 1.0]]
    for b, batch in enumerate(norms):
        gate.new_batch()
        for k, n in enumerate(batch):
            if (b, k) == (1, 2):  # resume mid-batch into a fresh gate, recorded through a wrapper
                sd = gate.state_dict()
                gate = dgg.DynamicGradientGate(w, **kw)
                gate.load_state_dict(sd)
                gate = types.SimpleNamespace(gate=gate, state=gate.state, config=gate.config, step=gate.step)
            w.grad = torch.full((3,), n)
            gate.step()
            rec.record(gate)
    assert rec.n_batches == 2
    assert rec.first_close_passes(1.0) == [None, 3]
    assert rec.close_rates([1.0]) == {1.0: 0.5}
