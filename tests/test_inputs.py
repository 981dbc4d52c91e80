"""The input contract (docs/semantics.md, "Accepted inputs"), one case at a time, on every backend here.

Each refused input is refused by every backend with the same exception type and message, names the
tensor, and leaves the gate's state and every gradient as they were; the gate then goes on as if the
refused step had not been tried.  float64 gradients are accepted by every backend and read as the spec
says (each entry rounded to float32).  test_fuzz.py checks the same contract on random sequences.
"""
from __future__ import annotations

import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import inputs
from contract import DEVICES, KEY_FORMS, REFUSED, assert_unchanged, backends_for, break_input, snapshot
from semantics_model import energy_of, play
from sequences import GATE_CONFIGS, assert_stats_match, config_id, make_sequence, run_gate


def _gate(backend, device, n_extra=1, **kw):
    g = torch.Generator().manual_seed(0)
    monitor = [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(device)),
               torch.nn.Parameter(torch.randn(4, generator=g).to(device))]
    extra = [torch.nn.Parameter(torch.randn(3, 2, generator=g).to(device)) for _ in range(n_extra)]
    gate = dgg.DynamicGradientGate(monitor, [*monitor, *extra], backend=backend, window=2, threshold=0.5, **kw)
    return gate, monitor, extra


def _fill(tensors, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.grad = (torch.randn(t.shape, generator=g) * scale).to(t.device, t.dtype)


# ----------------------------------------------------------------------------- refusals at step()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_inputs_raise_the_same_error_on_every_backend_and_modify_nothing(kind, device):
    want_type, want_text = REFUSED[kind]
    errors = {}
    after = {}
    for backend in backends_for(device):
        gate, monitor, extra = _gate(backend, device)
        for s in range(4):  # a state worth protecting: full windows, a reuse index above 1
            _fill(monitor + extra, s)
            gate.step()
        _fill(monitor + extra, 10, scale=math.nan)  # would close the gate and zero every grad if anything ran
        name = break_input(kind, monitor, extra, index=0)
        snap = snapshot(gate, monitor + extra)
        with pytest.raises(want_type) as info:
            gate.step()
        msg = str(info.value)
        assert want_text in msg and name in msg, msg
        assert_unchanged(gate, snap)
        errors[backend] = (type(info.value), msg)
        # repaired, the gate goes on from where it was
        for p in monitor + extra:
            p.grad = None
            p.data = torch.ones(p.shape, device=device)
        _fill(monitor + extra, 11)
        gate.step()
        after[backend] = {k: v.item() for k, v in gate.stats().items()}
    assert len(set(errors.values())) == 1, errors
    ref = after["torch"]
    for backend, got in after.items():
        assert got["closed"] == ref["closed"] and got["reuse_index"] == ref["reuse_index"] == 5, backend
        assert got["accepted"] == ref["accepted"] and got["closed_total"] == ref["closed_total"], backend
        assert math.isclose(got["energy"], ref["energy"], rel_tol=1e-5), backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_monitor_of_a_dtype_the_gate_does_not_read_is_refused_at_construction(dtype, device):
    for backend in backends_for(device):
        w = torch.zeros(3, device=device).to(dtype)
        with pytest.raises(TypeError, match=rf"monitor\[0\] has dtype {dtype}; the gate reads"):
            dgg.DynamicGradientGate(w, backend=backend)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_monitor_is_refused_at_construction(device):
    for backend in backends_for(device):
        w = torch.randn(4, 3, device=device).to_sparse()
        with pytest.raises(TypeError, match=r"monitor\[0\] is a torch.sparse_coo tensor"):
            dgg.DynamicGradientGate(w, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_embedding_gradient_names_the_embedding_and_modifies_nothing(backend):
    """The case a user meets: nn.Embedding(sparse=True) in params."""
    if backend not in backends_for("cpu"):
        pytest.skip("triton unavailable")
    lm = torch.nn.Linear(4, 10, bias=False)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    gate = dgg.DynamicGradientGate(lm.weight, [lm.weight, emb.weight], backend=backend)
    lm(emb(torch.tensor([1, 2, 3]))).sum().backward()
    snap = snapshot(gate, [lm.weight, emb.weight])
    with pytest.raises(TypeError, match=r"params\[1\].grad is a torch.sparse_coo tensor.*nn.Embedding\(sparse=True\)"):
        gate.step()
    assert_unchanged(gate, snap)


def test_a_grad_on_another_device_is_named():
    """Not reachable through .grad assignment (torch refuses the device), so the check itself is tested."""
    g = torch.empty(3, device="meta")
    cpu = torch.device("cpu")
    err = inputs.monitor_problem("monitor[0].grad", g, cpu)
    assert isinstance(err, RuntimeError) and "monitor[0].grad is on meta, but the gate was built on cpu" in str(err)
    err = inputs.param_problem("params[2].grad", g, cpu)
    assert isinstance(err, RuntimeError) and "params[2].grad is on meta" in str(err)
    assert inputs.param_problem("p", torch.empty(3), cpu) is None


def test_a_dtensor_grad_of_a_plain_tensor_is_refused(monkeypatch):
    """A DTensor .grad on a plain monitor or params tensor (a gate built before the model was sharded)."""
    w = torch.nn.Parameter(torch.empty(3))
    p = torch.nn.Parameter(torch.empty(2))
    gate = dgg.DynamicGradientGate(w, [w, p], backend="torch")
    w.grad, p.grad = torch.randn(3), torch.randn(2)
    for fake, want in ((w.grad, r"monitor\[0\] is a plain tensor but its .grad is a DTensor"),
                       (p.grad, r"params\[1\] is a plain tensor but its .grad is a DTensor")):
        monkeypatch.setattr(inputs, "is_dtensor", lambda t, fake=fake: t is fake)
        snap = snapshot(gate, [w, p])
        with pytest.raises(ValueError, match=want):
            gate.step()
        assert_unchanged(gate, snap)


# ----------------------------------------------------------------------------- overlap hooks
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overlap_hook_skips_a_refused_grad_and_step_names_it(backend):
    if backend not in backends_for("cpu"):
        pytest.skip("triton unavailable")
    emb = torch.nn.Embedding(10, 4, sparse=True)
    gate = dgg.DynamicGradientGate(emb.weight, backend=backend, overlap=True)
    emb(torch.tensor([1, 2])).sum().backward()  # the hook sees a sparse grad: it must not reduce it
    snap = snapshot(gate, [emb.weight])
    with pytest.raises(TypeError, match=r"monitor\[0\].grad is a torch.sparse_coo tensor"):
        gate.step()
    assert_unchanged(gate, snap)


# ----------------------------------------------------------------------------- the params check cache
@pytest.mark.parametrize("key_form", KEY_FORMS, indirect=True)
def test_params_grads_are_checked_once_per_layout(key_form, monkeypatch):
    """The full check runs when anything it reads changes (which grads are present, their dtype, device, layout,
    shape and strides), and only then: a new grad tensor of the same layout each step is not rechecked."""
    calls = []
    real = inputs.param_problem

    def counting(name, g, device):
        calls.append(name)
        return real(name, g, device)

    monkeypatch.setattr(inputs, "param_problem", counting)
    w = torch.nn.Parameter(torch.empty(4, 3))
    t = torch.nn.Parameter(torch.empty(3, 4))
    gate = dgg.DynamicGradientGate(w, [w, t], backend="torch")
    buf = torch.randn(4, 3)
    w.grad = torch.randn(4, 3)
    t.grad = buf.t()  # non-contiguous
    gate.step()
    assert calls == ["params[0].grad", "params[1].grad"]
    calls.clear()
    w.grad = torch.randn(4, 3)  # a new tensor, same layout
    t.grad = buf.t()
    gate.step()
    assert calls == []
    # an expanded view at the same address and byte size as the transposed grad: other strides, checked again
    t.grad = buf[:1].expand(4, 3).t()
    snap = snapshot(gate, [w, t])
    with pytest.raises(ValueError, match=r"params\[1\].grad has overlapping memory"):
        gate.step()
    assert_unchanged(gate, snap)
    t.grad = torch.randn(3, 4)  # a new layout: the full check again
    calls.clear()
    gate.step()
    assert calls == ["params[0].grad", "params[1].grad"]


# ----------------------------------------------------------------------------- float64
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", GATE_CONFIGS[:4] + GATE_CONFIGS[5:6], ids=config_id)
def test_float64_gradients_match_the_model_on_every_backend(cfg, device):
    """float64 is read as every dtype is: each entry rounded to float32, squared, summed (float32 or wider)."""
    shapes = [(13, 5), (3,)]
    seq = make_sequence(5 + cfg["window"], 60, shapes, torch.float64)
    want = play(cfg, seq)
    records = {}
    for backend in backends_for(device):
        mon = [torch.nn.Parameter(torch.empty(s, dtype=torch.float64, device=device)) for s in shapes]
        records[backend] = run_gate(dgg.DynamicGradientGate(mon, backend=backend, **cfg), seq)
    for backend, got in records.items():
        for i, (r, (w, stop)) in enumerate(zip(got, want)):
            assert r["closed"] == w["closed"] and r["should_stop"] == stop, (backend, i)
            assert_stats_match(r["stats"], w, i, w["err_scale"])
            assert r["zeroed"] if r["closed"] else r["untouched"], (backend, i)


def test_float64_entries_are_rounded_to_float32_first():
    """An entry beyond the float32 range is inf once rounded: the gate closes, as for a float32 overflow."""
    big = torch.nn.Parameter(torch.empty(3, dtype=torch.float64))
    gate = dgg.DynamicGradientGate(big, backend="torch")
    big.grad = torch.tensor([1e39, 1.0, 2.0], dtype=torch.float64)
    assert gate.step().item() and math.isinf(gate.stats()["energy"].item())
    x = torch.tensor([1 + 2**-40, 3.0], dtype=torch.float64)  # 1 + 2^-40 rounds to 1.0 in float32
    big2 = torch.nn.Parameter(torch.empty(2, dtype=torch.float64))
    gate2 = dgg.DynamicGradientGate(big2, backend="torch")
    big2.grad = x
    gate2.step()
    assert gate2.stats()["energy"].item() == 10.0 == energy_of([x])
