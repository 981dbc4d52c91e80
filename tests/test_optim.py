"""gate.attach(optimizer): a closed gate skips fused optimizer steps on device."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import dgg_kernels as dgg

OPTS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(9, 4, generator=g)), nn.Parameter(torch.randn(5, generator=g))]


def _set_grads(params, scale, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        for name in a[1][k]:
            assert torch.equal(torch.as_tensor(a[1][k][name]), torch.as_tensor(b[1][k][name])), (k, name)


@pytest.mark.parametrize("name", list(OPTS))
def test_closed_step_leaves_params_and_state_bit_identical(name):
    params, ref_params = _params(), _params()
    opt, ref_opt = OPTS[name](params), OPTS[name](ref_params)
    gate = dgg.DynamicGradientGate(params[0], params, window=2, threshold=0.5, backend="torch")
    gate.attach(opt)
    for i in range(3):  # open steps: identical to an ungated optimizer
        _set_grads(params, 1.0, i)
        _set_grads(ref_params, 1.0, i)
        assert not gate.step().item()
        opt.step()
        ref_opt.step()
    _assert_same(_snapshot(opt, params), _snapshot(ref_opt, ref_params))
    before = _snapshot(opt, params)
    _set_grads(params, 30.0, 99)  # a surge closes the gate
    assert gate.step().item()
    opt.step()
    _assert_same(_snapshot(opt, params), before)
    assert not hasattr(opt, "found_inf")
    _set_grads(params, 1.0, 3)  # the next open step equals the ungated optimizer's next step
    _set_grads(ref_params, 1.0, 3)
    assert not gate.step().item()
    opt.step()
    ref_opt.step()
    _assert_same(_snapshot(opt, params), _snapshot(ref_opt, ref_params))


def test_fused_sgd_momentum_closed_first_step_leaves_no_garbage():
    params, ref_params = _params(1), _params(1)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, fused=True)
    gate = dgg.DynamicGradientGate(params[0], params, backend="torch")
    gate.attach(opt)
    _set_grads(params, 1.0, 0)
    params[0].grad[0, 0] = math.nan  # closes on the very first step
    assert gate.step().item()
    opt.step()
    for p in params:
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(buf, torch.zeros_like(p))
    _set_grads(params, 1.0, 1)
    _set_grads(ref_params, 1.0, 1)
    assert not gate.step().item()
    opt.step()
    ref.step()  # a fresh optimizer's first step: dampening 0 makes the two equal
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def _scaled_backward(params, scaler, scale, seed, inf_in=None):
    """scaler.scale(loss).backward() for a loss whose gradient is ``scale`` * Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = None
    targets = [torch.randn(p.shape, generator=g) * scale for p in params]
    if inf_in is not None:
        targets[inf_in].view(-1)[2] = math.inf
    loss = sum((p * t).sum() for p, t in zip(params, targets))
    scaler.scale(loss).backward()


def _scaler_setup():
    params = _params(2)
    opt = torch.optim.Adam(params, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    # a threshold that ordinary noise does not cross, only a real surge
    gate = dgg.DynamicGradientGate(params[0], params, window=2, threshold=50.0, backend="torch")
    gate.attach(opt)
    for i in range(3):
        _scaled_backward(params, scaler, 1.0, i)
        scaler.unscale_(opt)  # the gate must judge unscaled gradients
        gate.step()
        scaler.step(opt)
        scaler.update()
    return params, opt, scaler, gate


def test_grad_scaler_closed_gate_with_finite_grads_skips_without_backoff():
    params, opt, scaler, gate = _scaler_setup()
    before = _snapshot(opt, params)
    _scaled_backward(params, scaler, 30.0, 50)
    scaler.unscale_(opt)
    assert gate.step().item()
    scaler.step(opt)
    scaler.update()
    _assert_same(_snapshot(opt, params), before)
    assert scaler.get_scale() == 1024.0
    assert not hasattr(opt, "found_inf")


def test_grad_scaler_inf_elsewhere_with_open_gate_skips_and_backs_off():
    params, opt, scaler, gate = _scaler_setup()
    before = _snapshot(opt, params)
    _scaled_backward(params, scaler, 1.0, 51, inf_in=1)  # inf in a tensor the gate does not watch
    scaler.unscale_(opt)
    assert not gate.step().item()
    scaler.step(opt)
    scaler.update()
    _assert_same(_snapshot(opt, params), before)
    assert scaler.get_scale() == 512.0


def test_non_fused_optimizer_warns_and_gets_only_zeroed_grads():
    params = _params(3)
    opt = torch.optim.Adam(params, lr=1e-2)  # not fused
    gate = dgg.DynamicGradientGate(params[0], params, backend="torch")
    with pytest.warns(UserWarning, match="fused=True"):
        handle = gate.attach(opt)
    _set_grads(params, 1.0, 0)
    params[0].grad[0, 0] = math.nan
    assert gate.step().item()
    opt.step()  # must not raise: found_inf is never set on a non-fused optimizer
    assert not hasattr(opt, "found_inf")
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    handle.remove()


def test_remove_detaches():
    params = _params(4)
    opt = torch.optim.Adam(params, lr=1e-1, fused=True)
    gate = dgg.DynamicGradientGate(params[0], params, backend="torch")
    handle = gate.attach(opt)
    _set_grads(params, 1.0, 0)
    gate.step()
    opt.step()  # moments are now non-zero
    handle.remove()
    before = [p.detach().clone() for p in params]
    _set_grads(params, 1.0, 1)
    params[0].grad[0, 0] = math.nan
    assert gate.step().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    # without the hook Adam steps on the zeroed grads and still moves the weights
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
