"""overlap=True: the monitor reduction runs from a post-accumulate-grad hook during backward."""
import pytest
import torch
import torch.nn as nn

import dgg_kernels as dgg
from contract import CPU_BACKEND_PARAMS
from sequences import bit_equal

BACKENDS = CPU_BACKEND_PARAMS  # triton skips without the package


def _pair(backend, shapes=((31, 6), (31,)), **kw):
    """An overlapped and a plain gate on two identical parameter sets."""
    torch.manual_seed(0)
    base = [torch.randn(s) for s in shapes]
    a = [nn.Parameter(t.clone()) for t in base]
    b = [nn.Parameter(t.clone()) for t in base]
    ga = dgg.DynamicGradientGate(a, overlap=True, backend=backend, window=3, threshold=0.2, **kw)
    gb = dgg.DynamicGradientGate(b, backend=backend, window=3, threshold=0.2, **kw)
    return a, b, ga, gb


def _backward(params, x, scale):
    w, bias = params
    ((x @ w.t() + bias).tanh().sum() * scale).backward()


def _same_state(ga, gb):
    for k, v in ga.state.state_dict().items():
        assert bit_equal(v, gb.state.state_dict()[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_equals_plain_step(backend):
    a, b, ga, gb = _pair(backend)
    g = torch.Generator().manual_seed(1)
    closed = []
    for i in range(12):
        x = torch.randn(4, 6, generator=g)
        scale = 20.0 if i in (6, 9) else 1.0 + 0.1 * i
        for params in (a, b):
            for p in params:
                p.grad = None
            _backward(params, x, scale)
        closed.append(ga.step().item())
        assert closed[-1] == gb.step().item()
        _same_state(ga, gb)
        for p, q in zip(a, b):
            assert bit_equal(p.grad, q.grad)
    assert any(closed) and not all(closed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_uses_the_fully_accumulated_gradient(backend):
    a, b, ga, gb = _pair(backend)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        xs = [torch.randn(4, 6, generator=g) for _ in range(3)]
        for params in (a, b):
            for p in params:
                p.grad = None
            for x in xs:  # three micro-batches: the hook fires three times on `a`
                _backward(params, x, 1.0 + step)
        ga.step()
        gb.step()
        _same_state(ga, gb)
    # the check has teeth: one micro-batch's energy differs from the accumulated one
    for p in a:
        p.grad = None
    _backward(a, xs[0], 6.0)
    ga.step()
    assert ga.stats()["energy"].item() != gb.stats()["energy"].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_changed_after_backward_is_reduced_again(backend):
    a, b, ga, gb = _pair(backend)
    x = torch.randn(4, 6)
    for params in (a, b):
        _backward(params, x, 1.0)
        for p in params:
            p.grad.mul_(0.25)  # e.g. GradScaler.unscale_ or clipping after backward
    ga.step()
    gb.step()
    _same_state(ga, gb)
    want = sum(float(p.grad.double().square().sum()) for p in b)
    assert abs(ga.stats()["energy"].item() - want) <= 1e-5 * want


def test_grads_set_by_hand_without_backward_are_reduced_in_step():
    a, b, ga, gb = _pair("torch")
    for params in (a, b):
        for p in params:
            p.grad = torch.ones_like(p) * 3
    ga.step()
    gb.step()
    _same_state(ga, gb)


def test_overlap_needs_leaf_tensors_and_can_be_removed():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="leaf"):
        dgg.DynamicGradientGate(w * 2, overlap=True)
    gate = dgg.DynamicGradientGate(w, overlap=True)
    gate.remove_hooks()
    (w * 2).sum().backward()
    assert not gate.step().item()
    assert gate.stats()["energy"].item() == pytest.approx(12.0)


@pytest.mark.gpu
def test_overlap_on_cuda_matches_plain_and_is_sync_free():
    torch.manual_seed(3)
    w1 = nn.Parameter(torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16))
    w2 = nn.Parameter(w1.detach().clone())
    ga = dgg.DynamicGradientGate(w1, overlap=True, window=3)
    gb = dgg.DynamicGradientGate(w2, window=3)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    for i in range(8):
        for w, gate in ((w1, ga), (w2, gb)):
            w.grad = None
            (x @ w.t()).float().square().mean().mul(1.0 + (5.0 if i == 6 else 0.1 * i)).backward()
            if i == 7:
                torch.cuda.set_sync_debug_mode("error")
            try:
                gate.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(ga.state.stats, gb.state.stats), i


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_judges_the_unscaled_gradient_under_grad_scaler(backend):
    """scaler.scale(loss).backward(); scaler.unscale_(opt); gate.step(): the hooks reduced the scaled gradient
    during backward, and unscale_ divides it in place; the gate must judge the unscaled one, as the plain
    gate does (not scale**2 times its energy), on every step, including after the scale grows."""
    a, b, ga, gb = _pair(backend)
    opts = [torch.optim.AdamW(p, lr=1e-3, fused=True) for p in (a, b)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2) for _ in (a, b)]
    for ga_, opt in ((ga, opts[0]), (gb, opts[1])):
        ga_.attach(opt)
    g = torch.Generator().manual_seed(3)
    for i in range(8):
        x = torch.randn(4, 6, generator=g)
        for params, opt, scaler in zip((a, b), opts, scalers):
            opt.zero_grad(set_to_none=True)
            w, bias = params
            scaler.scale((x @ w.t() + bias).tanh().sum()).backward()
            scaler.unscale_(opt)
        ea, eb = ga.step(), gb.step()
        assert ea.item() == eb.item(), i
        assert torch.equal(ga.stats()["energy"], gb.stats()["energy"]), (i, ga.stats()["energy"], gb.stats()["energy"])
        for (params, opt, scaler) in zip((a, b), opts, scalers):
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() > 2.0**16  # the scale grew during the run: each growth must not look like a surge


def test_unscale_wrapper_covers_sharded_scaler_and_skips_a_disabled_one():
    """The wrapper is on every GradScaler class with its own unscale_ (FSDP's ShardedGradScaler too), and a
    disabled scaler (enabled=False, the usual `GradScaler(enabled=use_fp16)` in a bf16 run) bumps nothing,
    so overlap keeps its reduction."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    a, b, ga, gb = _pair("torch")
    assert getattr(ShardedGradScaler.unscale_, "_dgg_bumps_versions", False)
    assert getattr(torch.amp.GradScaler.unscale_, "_dgg_bumps_versions", False)
    opt = torch.optim.AdamW(a, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _backward(a, torch.randn(4, 6), 1.0)
    versions = [p.grad._version for p in a]
    scaler.unscale_(opt)
    assert [p.grad._version for p in a] == versions
