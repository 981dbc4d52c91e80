"""GatedLinear / gated_linear: the gate inside the lm_head's backward."""
import copy

import pytest
import torch
import torch.nn as nn

import dgg_kernels as dgg

# triton runs under the interpreter on CPU; its cases skip without the package
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


class Tiny(nn.Module):
    def __init__(self, vocab=97, width=12, tied=False, bias=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=bias and not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _loss(model, ids, scale=1.0):
    logits = model(ids)
    return scale * nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def _gated_copy(model, backend, **kw):
    g = copy.deepcopy(model)
    gate = dgg.DynamicGradientGate(g.head.weight, window=2, threshold=0.0, backend=backend, **kw)
    g.head = dgg.GatedLinear(g.head, gate)
    return g, gate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied", [False, True])
def test_open_gate_gradients_equal_plain_linear(backend, tied):
    torch.manual_seed(0)
    ref = Tiny(tied=tied)
    gated, gate = _gated_copy(ref, backend)
    ids = torch.randint(0, 97, (3, 5))
    _loss(ref, ids).backward()
    _loss(gated, ids).backward()
    assert gate.stats()["accepted"].item() == 1  # one backward = one gate step
    for (n, a), (_, b) in zip(ref.named_parameters(), gated.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tied", [False, True])
def test_closed_gate_zeroes_every_parameter_gradient(backend, tied):
    torch.manual_seed(1)
    model, gate = _gated_copy(Tiny(tied=tied), backend)
    ids = torch.randint(0, 97, (4, 6))
    for _ in range(3):  # fill the window (2) with accepted steps of the same size
        model.zero_grad()
        _loss(model, ids).backward()
    assert gate.stats()["closed_total"].item() == 0
    model.zero_grad()
    _loss(model, ids, scale=5.0).backward()  # a surge: z > 0 = threshold
    assert gate.stats()["closed"].item()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n


def test_closed_micro_batch_keeps_earlier_accumulated_grads():
    torch.manual_seed(2)
    model, gate = _gated_copy(Tiny(), "torch")
    ids = torch.randint(0, 97, (2, 5))
    for _ in range(3):
        model.zero_grad()
        _loss(model, ids).backward()
    model.zero_grad()
    _loss(model, ids).backward()  # open micro-batch
    kept = {n: p.grad.clone() for n, p in model.named_parameters()}
    _loss(model, ids, scale=50.0).backward()  # closed micro-batch adds nothing
    assert gate.stats()["closed"].item()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, kept[n]), n


def test_functional_form_and_bias_watch():
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(7, 4))
    b = nn.Parameter(torch.randn(7))
    gate = dgg.DynamicGradientGate([w, b], backend="torch")
    h = torch.randn(2, 3, 4, requires_grad=True)
    out = dgg.gated_linear(h, w, b, gate)
    torch.testing.assert_close(out, nn.functional.linear(h, w, b))
    out.square().sum().backward()
    want = float(w.grad.double().square().sum() + b.grad.double().square().sum())
    assert abs(gate.stats()["energy"].item() - want) <= 1e-5 * want


def test_gate_must_watch_the_layer_it_wraps():
    lin = nn.Linear(3, 5)
    gate = dgg.DynamicGradientGate(nn.Parameter(torch.empty(5, 3)))
    with pytest.raises(ValueError, match="neither this layer's weight"):
        dgg.GatedLinear(lin, gate)
    with pytest.raises(TypeError, match="nn.Linear"):
        dgg.GatedLinear(nn.Conv1d(1, 1, 1), gate)


def test_torch_compile_matches_eager():
    torch.manual_seed(4)
    ref = Tiny()
    eager, g1 = _gated_copy(ref, "torch")
    compiled, g2 = _gated_copy(ref, "torch")
    compiled_fwd = torch.compile(compiled, backend="aot_eager")
    ids = torch.randint(0, 97, (3, 5))
    for scale in (1.0, 1.0, 1.0, 5.0):
        eager.zero_grad()
        compiled.zero_grad()
        _loss(eager, ids, scale).backward()
        _loss(compiled_fwd, ids, scale).backward()
        assert torch.equal(g1.state.ints, g2.state.ints)
        for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=n)
    assert g2.stats()["closed_total"].item() == 1
