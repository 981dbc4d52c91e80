"""reuse_passes: the loop helper, and the reuse experiment that is its main user (--quick smoke run)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import dgg_kernels as dgg
from contract import load_benchmark


class CountingGate:
    """Stands in for a gate: records new_batch/should_stop calls and stops at a scripted pass."""

    class config:
        max_reuse = 4

    def __init__(self, stop_at=None):
        self.stop_at = stop_at
        self.new_batches = 0
        self.asks = 0
        self.pass_no = 0

    def new_batch(self):
        self.new_batches += 1
        self.pass_no = 0

    def new_pass(self):
        self.new_passes = getattr(self, "new_passes", 0) + 1

    def step(self):
        self.pass_no += 1

    def should_stop(self):
        self.asks += 1
        return self.stop_at is not None and self.pass_no >= self.stop_at


def _real_gate(threshold=0.3, max_reuse=8, shape=(64, 16), seed=0):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=threshold, max_reuse=max_reuse, backend="torch")
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return w, gate, direction


def _run_batch(gate, w, grads, max_reuse=None):
    """One rollout batch: pass k gets grads[k-1]; returns the passes run and the gate's decisions."""
    passes, closed = [], []
    for k in dgg.reuse_passes(gate, max_reuse):
        w.grad = grads[k - 1].clone()
        closed.append(bool(gate.step()))
        passes.append(k)
    return passes, closed


def test_stops_right_after_the_gate_closes_on_a_spike():
    w, gate, d = _real_gate(threshold=0.3, max_reuse=8)
    # norms are exact multiples of |d|: fill the window with 1.0, 1.1 (one batch), then 1.2 at pass 1
    _run_batch(gate, w, [1.0 * d, 1.1 * d], max_reuse=2)
    scales = [1.2, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # pass 2: z = -3 (open); pass 3: a spike
    passes, closed = _run_batch(gate, w, [s * d for s in scales])
    assert passes == [1, 2, 3]
    assert closed == [False, False, True]
    assert float(gate.stats()["z"]) > 0.3
    assert torch.count_nonzero(w.grad) == 0  # the closing pass's gradient was discarded


def test_stops_right_after_a_non_finite_gradient():
    w, gate, d = _real_gate(threshold=0.3, max_reuse=8)
    bad = d.clone()
    bad[3, 5] = float("nan")
    passes, closed = _run_batch(gate, w, [d, 1.05 * d, bad] + [d] * 5)
    assert passes == [1, 2, 3]
    assert closed == [False, False, True]


def test_runs_to_max_reuse_when_the_gate_stays_open():
    w, gate, d = _real_gate(threshold=1e9, max_reuse=4)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(d.shape, generator=g) * (1 + 0.5 * i) for i in range(8)]
    assert _run_batch(gate, w, grads)[0] == [1, 2, 3, 4]          # the gate's max_reuse
    assert _run_batch(gate, w, grads, max_reuse=2)[0] == [1, 2]   # a tighter loop limit
    assert _run_batch(gate, w, grads, max_reuse=6)[0] == [1, 2, 3, 4]  # cannot outlast the gate's stop flag
    assert int(gate.stats()["closed_total"]) == 0


def test_each_loop_starts_a_new_batch_and_clears_the_stop():
    w, gate, d = _real_gate(threshold=0.3, max_reuse=8)
    _run_batch(gate, w, [1.0 * d, 1.1 * d], max_reuse=2)
    passes, _ = _run_batch(gate, w, [1.2 * d, 1.0 * d, 5.0 * d] + [d] * 5)
    assert passes == [1, 2, 3] and gate.should_stop()
    # the next batch starts at reuse index 1 (a spike there cannot close the gate) and runs on
    passes, closed = _run_batch(gate, w, [50.0 * d, 1.1 * d, 1.15 * d, 1.12 * d], max_reuse=4)
    assert passes == [1, 2, 3, 4] and closed == [False] * 4
    assert int(gate.stats()["reuse_index"]) == 4


def test_new_batch_once_per_loop_and_one_stop_question_per_pass():
    gate = CountingGate(stop_at=3)
    it = dgg.reuse_passes(gate)
    assert gate.new_batches == 0  # lazy: creating the iterator does not reset the gate
    seen = []
    for k in it:
        gate.step()
        seen.append(k)
    assert seen == [1, 2, 3]
    assert gate.new_batches == 1 and gate.asks == 3 and gate.new_passes == 3  # a new_pass() before each pass
    gate2 = CountingGate(stop_at=None)
    assert [k for k in dgg.reuse_passes(gate2) if gate2.step() is None] == [1, 2, 3, 4]
    assert gate2.asks == 4


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                     ("2", TypeError)])
def test_bad_max_reuse_raises_at_the_call(bad, exc):
    gate = CountingGate()
    with pytest.raises(exc, match="max_reuse"):
        dgg.reuse_passes(gate, bad)
    assert gate.new_batches == 0


def test_integer_scalars_are_accepted():
    gate = CountingGate()
    assert list(dgg.reuse_passes(gate, np.int64(2))) == [1, 2]




def test_rlvr_reuse_quick_smoke(tmp_path):
    bench = load_benchmark()
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--quick", "--no-plots", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread on CPU; leave the session as it was
    md = (tmp_path / "rlvr_reuse_quick_results.md").read_text()
    data = json.loads((tmp_path / "rlvr_reuse_quick_results.json").read_text())
    assert "What was seen" in md and "## Verdict" in md and "## GPU configuration" in md
    assert data["env"]["date"] == res["env"]["date"] and len(data["env"]["date"]) == 10
    batches = res["args"]["batches"]
    by_arm = {r["arm"]: r for r in res["runs"]}
    stat, mode = bench.default_rule()
    gated_name = f"dgg K=4 t=0.3 {bench.rule_name(stat, mode)}"
    assert set(by_arm) == {"fixed K=2", gated_name}
    fixed, gated = by_arm["fixed K=2"], by_arm[gated_name]
    assert len(fixed["updates"]) == 2 * batches and not any(u["closed"] for u in fixed["updates"])
    assert batches <= len(gated["updates"]) <= 4 * batches
    # the JSON holds the per-update records column-wise, one entry per update
    for r, rj in zip(res["runs"], data["runs"]):
        assert all(len(col) == len(r["updates"]) for col in rj["updates"].values())
    for r in res["runs"]:
        assert len(r["curve"]) == batches + 1
        for b in range(batches):
            us = [u for u in r["updates"] if u["batch"] == b]
            assert [u["pass"] for u in us] == list(range(1, len(us) + 1))
            # a closed gate ends the batch, and only a closed gate or max_reuse does
            assert all(not u["closed"] for u in us[:-1])
            assert us[-1]["closed"] or len(us) == (2 if r is fixed else 4)
            for u in us:
                assert math.isfinite(u["grad_norm"]) and math.isfinite(u["z"]) and u["kl_step"] >= -1e-6
                assert set(u["rel_change"]) == {"embed", "block0", "block1", "lm_head"}
                if u["closed"]:  # a discarded update leaves every weight, so the policy, as it was
                    assert u["kl_step"] == 0.0 and all(v == 0.0 for v in u["rel_change"].values())
                if r is fixed:  # fixed arms log every observer rule's z; the first rule drives the loop
                    assert set(u["obs_z"]) == set(res["observer_rules"]) and u["obs_z"][r["main_rule"]] == u["z"]
        assert any(u["rel_change"]["lm_head"] > 0 and u["kl_step"] > 0 for u in r["updates"])
    an = res["analysis"]
    assert an["arms"][gated_name]["close_rate"] == sum(u["closed"] for u in gated["updates"]) / batches
    assert {v["vs"] for v in an["versus"]} == {"fixed K=2"}

