"""dgg_kernels.integrations.adapter: the pieces every trainer adapter shares (CPU, no trainer installed)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dgg_kernels as dgg
from dgg_kernels.integrations.adapter import (
    GateBinding,
    output_embedding_weight,
    refuse_fsdp1,
    refuse_grad_scaling,
    resolve_config,
    trainable_params,
)


class TinyLM(nn.Module):
    """What the adapters find in a transformers model: get_output_embeddings()."""

    def __init__(self, vocab=11, hidden=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


class Wrapper(nn.Module):  # DDP / accelerate style: the model is .module
    def __init__(self, inner):
        super().__init__()
        self.module = inner


def _backward(model, scale=1.0):
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 5))
    (model(ids).pow(2).mean() * scale).backward()


def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        out += [v.detach().clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_output_embedding_and_params():
    m = TinyLM()
    assert output_embedding_weight(m) is m.lm_head.weight
    assert output_embedding_weight(Wrapper(Wrapper(m))) is m.lm_head.weight
    m.embed.weight.requires_grad_(False)
    assert trainable_params(m) == [m.lm_head.weight]
    with pytest.raises(ValueError, match="no output embedding"):
        output_embedding_weight(nn.Linear(2, 2))


def test_refusals_say_what_to_do():
    class FlatParameter(nn.Parameter):  # FSDP1's flattened parameters, by type name
        pass

    m = TinyLM()
    refuse_fsdp1(m)
    m.extra = FlatParameter(torch.zeros(3))
    with pytest.raises(ValueError, match="FSDP1.*Use FSDP2 here"):
        refuse_fsdp1(m, trainer="X", fix="Use FSDP2 here.")
    for fine in (False, None, torch.amp.GradScaler("cpu", enabled=False)):
        refuse_grad_scaling(fine)
    for scaled in (True, torch.amp.GradScaler("cpu")):
        with pytest.raises(ValueError, match="fp16 with a gradient scaler.*Use bf16"):
            refuse_grad_scaling(scaled, fix="Use bf16.")


def test_resolve_config():
    assert resolve_config() == dgg.GateConfig()
    c = resolve_config({"window": 5, "enable": True}, ignore=("enable",), defaults={"max_reuse": 3})
    assert (c.window, c.max_reuse, c.statistic) == (5, 3, dgg.GateConfig.statistic)
    assert resolve_config({"max_reuse": 2}, defaults={"max_reuse": 3}).max_reuse == 2  # what the user set wins
    assert resolve_config({"max_reuse": 2}, override={"max_reuse": 3}).max_reuse == 3  # the trainer decides
    g = dgg.GateConfig(window=4, max_reuse=7)
    assert resolve_config(g, defaults={"max_reuse": 3}) is g
    assert resolve_config(g, override={"max_reuse": 3}).max_reuse == 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['windw'\] in my.section"):
        resolve_config({"windw": 5}, where="my.section")
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        resolve_config({"window": 1})
    with pytest.raises(TypeError, match="unknown GateConfig field"):
        resolve_config(defaults={"max_reuses": 2})
    with pytest.raises(TypeError, match="must be a GateConfig"):
        resolve_config([("window", 3)])


def test_binding_discards_a_closed_step_on_device_and_reports():
    m = TinyLM()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    b = GateBinding(m, dgg.GateConfig(window=2, threshold=0.5, backend="torch", max_reuse=3))
    assert b.gate.monitor[0] is m.lm_head.weight and len(b.gate.params) == 2
    assert b.attach(opt) is opt and b.attach(opt) is opt and b.optimizer is opt and len(b._handles) == 1
    b.new_batch()
    for k in range(3):
        b.new_pass()
        opt.zero_grad()
        _backward(m)
        if k == 2:
            m.lm_head.weight.grad[0, 0] = math.nan
        before = _state(m, opt)
        b.step()
        opt.step()
        assert _same(before, _state(m, opt)) == (k == 2), k
    assert b.last_step_closed() and b.should_stop()
    metrics = b.metrics()
    assert metrics["dgg/closed"] == 1.0 and metrics["dgg/passes"] == 3.0 and metrics["dgg/reuse_index"] == 3.0
    assert metrics["dgg/accepted"] == 2.0 and metrics["dgg/closed_total"] == 1.0
    assert set(b.metrics("x/")) == {"x/" + k[4:] for k in metrics}
    assert all(isinstance(v, float) for v in metrics.values())
    b.new_batch()
    assert b.passes == 0 and not b.should_stop()


def test_binding_rebind_keeps_state_and_hook_order():
    m = TinyLM()
    calls = []

    def pre_step(opt, args, kwargs):  # the gate steps inside the optimizer's pre-hook, before found_inf is handed on
        calls.append("pre")
        b.step()

    b = GateBinding(m, dgg.GateConfig(window=2, backend="torch"))
    for _ in range(2):
        _backward(m)
        b.step()
    saved = b.gate.state_dict()
    # the trainer swaps the parameters (accelerate's FSDP2 prepare does): same names, new tensors
    m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())
    m.embed.weight = nn.Parameter(m.embed.weight.detach().clone())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    old = b.gate
    b.attach(opt, pre_step=pre_step)
    assert b.rebind() and b.gate is not old and b.gate.monitor[0] is m.lm_head.weight
    assert all(torch.equal(x, y) for x, y in zip(b.gate.state_dict()["state"].values(), saved["state"].values()))
    assert not b.rebind()  # nothing swapped: nothing rebuilt
    # the hooks moved to the new gate, pre_step first: a NaN it judges in the pre-hook skips the fused step
    _backward(m)
    opt.step()  # an open step (it also creates AdamW's state)
    assert calls == ["pre"] and not b.last_step_closed()
    opt.zero_grad()
    _backward(m)
    m.embed.weight.grad[0, 0] = math.nan
    m.lm_head.weight.grad[0, 0] = math.nan
    before = _state(m, opt)
    opt.step()
    assert calls == ["pre", "pre"] and b.last_step_closed() and _same(before, _state(m, opt))
    b.detach()
    assert b.optimizer is None


def test_binding_refuses_bad_input():
    with pytest.raises(TypeError, match="GateConfig"):
        GateBinding(TinyLM(), {"window": 3})
    with pytest.raises(TypeError, match="monitor must be a Tensor"):
        GateBinding(TinyLM(), dgg.GateConfig(), monitor=[])
