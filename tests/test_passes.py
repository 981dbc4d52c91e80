"""Passes made of several optimizer steps (``gate.new_pass()``), on every backend, against the plain-Python model.

A pass over a rollout batch is as many optimizer steps as the batch has
mini-batches (verl's ``ppo_mini_batch_size``, TRL's ``steps_per_generation``).
The reuse index counts passes: every step of pass r is tested at index r; a
closed step ends the batch (every later step until new_batch() closes too);
max_reuse counts passes.
"""
from __future__ import annotations

import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from contract import DEVICES, backends_for
from semantics_model import play
from sequences import bit_equal, make_sequence, run_gate

CONFIGS = [
    dict(window=3, threshold=0.3, statistic="norm", max_reuse=3),
    dict(window=4, threshold=0.5, statistic="energy+increment", max_reuse=4, window_mode="batch"),
    dict(window=2, threshold=0.0, statistic="increment", max_reuse=2),
]


def _with_passes(seq, steps_per_pass: int):
    """``seq`` with a new_pass() before every ``steps_per_pass``-th step of each batch (and at each batch start)."""
    events, k = [], 0
    for ev in seq.events:
        if ev[0] == "new_batch":
            events.append(ev)
            k = 0
            continue
        if k % steps_per_pass == 0:
            events.append(("new_pass",))
        events.append(ev)
        k += 1
    seq.events = events
    return seq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["statistic"])
@pytest.mark.parametrize("steps_per_pass", [1, 3])
def test_multi_step_passes_match_the_model_on_every_backend(device, cfg, steps_per_pass):
    shapes = [(33, 5), (7,)]
    seq = _with_passes(make_sequence(11 + steps_per_pass, 40, shapes, p_new_batch=0.12), steps_per_pass)
    want = [(rec["closed"], stop, rec["reuse_index"]) for rec, stop in play(cfg, seq)]
    assert any(c for c, _, _ in want) and not all(c for c, _, _ in want)
    for backend in backends_for(device):
        mon = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        gate = dgg.DynamicGradientGate(mon, backend=backend, **cfg)
        got = run_gate(gate, seq)
        for k, (rec, (closed, stop, reuse)) in enumerate(zip(got, want)):
            assert rec["closed"] == closed, (backend, k)
            assert rec["should_stop"] == stop, (backend, k)
            assert rec["stats"]["reuse_index"] == reuse, (backend, k)
            assert rec["zeroed"] if closed else rec["untouched"], (backend, k)


@pytest.mark.parametrize("device", DEVICES)
def test_a_close_ends_the_batch_until_new_batch(device):
    """In pass mode a NaN closes, and so does every later step of the batch, however small; new_batch() ends it."""
    for backend in backends_for(device):
        w = torch.nn.Parameter(torch.zeros(17, device=device))
        gate = dgg.DynamicGradientGate(w, backend=backend, window=2, threshold=1e9, max_reuse=8)
        closed = []
        for batch in range(2):
            gate.new_batch()
            for p in range(3):
                gate.new_pass()
                for mb in range(2):
                    g = torch.randn(17, device=device)
                    if batch == 0 and (p, mb) == (1, 0):
                        g[3] = math.nan
                    w.grad = g
                    closed.append(bool(gate.step()))
                    assert gate.stats()["reuse_index"].item() == p + 1
        assert closed == [False, False, True, True, True, True] + [False] * 6, backend
        assert gate.stats()["closed_total"].item() == 4


@pytest.mark.parametrize("device", DEVICES)
def test_without_new_pass_every_step_is_a_pass(device):
    """The old behaviour: no new_pass() calls, the index advances every step and a close does not latch."""
    for backend in backends_for(device):
        w = torch.nn.Parameter(torch.zeros(9, device=device))
        gate = dgg.DynamicGradientGate(w, backend=backend, window=2, threshold=1e9, max_reuse=8)
        gate.new_batch()
        closed = []
        for k in range(4):
            w.grad = torch.full((9,), math.nan, device=device) if k == 1 else torch.randn(9, device=device)
            closed.append(bool(gate.step()))
            assert gate.stats()["reuse_index"].item() == k + 1
        assert closed == [False, True, False, False]


@pytest.mark.parametrize("device", DEVICES)
def test_reuse_passes_counts_passes_of_several_steps(device):
    for backend in backends_for(device):
        w = torch.nn.Parameter(torch.zeros(9, device=device))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True)
        gate = dgg.DynamicGradientGate(w, backend=backend, window=2, threshold=1e9, max_reuse=3)
        gate.attach(opt)
        seen = []
        for k in dgg.reuse_passes(gate):
            for mb in range(4):
                w.grad = torch.randn(9, device=device)
                gate.step()
                seen.append((k, gate.stats()["reuse_index"].item()))
                opt.step()
        assert seen == [(k, k) for k in (1, 2, 3) for _ in range(4)]
        assert gate.should_stop()
        # a NaN in pass 2, mini-batch 1: the rest of the pass closes on device (the optimizer skips), the loop ends
        passes, before = [], None
        for k in dgg.reuse_passes(gate):
            passes.append(k)
            for mb in range(3):
                w.grad = torch.randn(9, device=device)
                if (k, mb) == (2, 1):
                    w.grad[0] = math.nan
                    before = w.detach().clone()
                closed = bool(gate.step())
                opt.step()
                assert closed == (k == 2 and mb >= 1)
        assert passes == [1, 2] and bit_equal(w.detach(), before)


def test_new_pass_is_sync_free_and_changes_only_the_pass_slots():
    w = torch.nn.Parameter(torch.zeros(5))
    gate = dgg.DynamicGradientGate(w, backend="torch")
    before = gate.state.ints.clone()
    gate.new_pass()
    changed = (gate.state.ints != before).nonzero().flatten().tolist()
    from dgg_kernels import state as S

    assert changed == [S.PASS_MODE, S.PASS_NEW]
    gate.new_batch()
    after = before.clone()
    after[S.BATCHES] += 1  # new_batch() counts itself; every other slot is back
    assert bit_equal(gate.state.ints, after)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps_per_pass", [3, 4])
@pytest.mark.parametrize("statistic", ["energy", "energy+increment"])
def test_batch_window_needs_window_batches_with_several_steps_per_pass(device, steps_per_pass, statistic):
    """window_mode="batch": one statistic per rollout batch, however many mini-batches a pass has.

    The property itself, not only agreement with the model: with a window of W, a surge x1000 at every
    step of every later pass closes nothing in batches 1..W-1 (the window holds fewer than W statistics),
    and in batch W it closes pass 2 (the window is full, one statistic per batch).
    """
    W = 3
    for backend in backends_for(device):
        mon = torch.nn.Parameter(torch.zeros(64, device=device))
        gate = dgg.DynamicGradientGate(mon, window=W, threshold=0.3, statistic=statistic, max_reuse=3,
                                       window_mode="batch", backend=backend)
        gen = torch.Generator().manual_seed(0)
        for batch in range(1, W + 1):
            gate.new_batch()
            closed = []
            for p in range(1, 4):
                gate.new_pass()
                for _ in range(steps_per_pass):
                    scale = 1.0 if p == 1 else 1000.0
                    mon.grad = (scale * (1 + 0.1 * torch.rand(64, generator=gen))).to(device)
                    closed.append(bool(gate.step()))
            # one statistic per batch entered the window (the first step after new_batch())
            assert int(gate.state.ints[S.COUNT]) == batch, (backend, batch)
            if batch < W:
                assert not any(closed), (backend, batch, closed)
            else:
                assert closed[:steps_per_pass] == [False] * steps_per_pass, backend
                assert closed[steps_per_pass], (backend, "pass 2 of batch W must close")
