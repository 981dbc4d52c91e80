"""GatedLinear / gated_linear: the gate inside the lm_head's backward."""
import copy

import pytest
import torch
import torch.nn as nn

import dgg_kernels as dgg
from contract import CPU_BACKEND_PARAMS

# triton runs under the interpreter on CPU; its cases skip without the package
BACKENDS = CPU_BACKEND_PARAMS


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


@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_matches_eager(autocast):
    torch.manual_seed(4)
    ref = Tiny()
    eager, g1 = _gated_copy(ref, "torch")
    compiled, g2 = _gated_copy(ref, "torch")
    compiled_fwd = torch.compile(compiled, backend="aot_eager")
    ids = torch.randint(0, 97, (3, 5))
    for scale in (1.0, 1.0, 1.0, 5.0):
        eager.zero_grad()
        compiled.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = _loss(eager, ids, scale), _loss(compiled_fwd, ids, scale)
        for loss in losses:
            loss.backward()
        assert torch.equal(g1.state.ints, g2.state.ints)
        for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=n)
    assert g2.stats()["closed_total"].item() == 1


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_backward_steps_the_gate_of_its_forward_even_when_that_gate_was_replaced(compiler):
    """A GatedLinear's backward steps the gate its forward ran with, eager or compiled, even when the layer's
    gate was replaced and the old one dropped in between: the compiled backward keeps only the gate's op
    handle and state tensors, so the handle must hold the backend itself (docs/semantics.md)."""
    import gc

    torch.manual_seed(0)
    lin = nn.Linear(12, 97)
    lm = dgg.GatedLinear(lin, dgg.DynamicGradientGate(lin.weight, window=2, threshold=0.0, backend="torch"))
    run = lm if compiler == "eager" else torch.compile(lm, backend=compiler)
    loss = run(torch.randn(3, 12)).square().sum()
    state = lm.gate.state
    lm.gate = dgg.DynamicGradientGate(lin.weight, window=2, threshold=0.0, backend="torch")
    gc.collect()
    loss.backward()
    assert int(state.ints[dgg.state.ACCEPTED]) == 1 and int(lm.gate.stats()["accepted"]) == 0


# -- in a Hugging Face model: autocast, state dict, save/load, tying, resizing ---------------------------------------

def _qwen2(tied, vocab=50, seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _gate_head(model, **kw):
    gate = dgg.DynamicGradientGate(model.lm_head.weight, backend="torch", **kw)
    model.lm_head = dgg.GatedLinear(model.lm_head, gate)
    return gate


def _lm_loss(model, ids, scale=1.0, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    return out.logits, scale * out.loss


@pytest.mark.parametrize("tied", [False, True])
def test_autocast_gradients_equal_plain_linear(tied):
    # an fp32 model under autocast(bf16), as Trainer(bf16=True) runs it: the same logits and gradients as nn.Linear
    ref = _qwen2(tied)
    gated = copy.deepcopy(ref)
    gate = _gate_head(gated, threshold=1e9)
    ids = torch.randint(0, 50, (2, 7))
    for model in (ref, gated):
        logits, loss = _lm_loss(model, ids, autocast=True)
        assert logits.dtype == torch.bfloat16
        loss.backward()
    assert gate.stats()["accepted"].item() == 1 and gate.stats()["norm"].item() > 0
    assert gated.lm_head.weight.dtype == torch.float32
    for (n, a), (m, b) in zip(ref.named_parameters(), gated.named_parameters()):
        assert n == m
        assert b.grad is not None and b.grad.dtype == a.dtype == torch.float32, n
        torch.testing.assert_close(b.grad, a.grad, rtol=1.6e-2, atol=1e-5, msg=n)


@pytest.mark.parametrize("tied", [False, True])
def test_autocast_closed_gate_zeroes_every_parameter_gradient(tied):
    model = _qwen2(tied)
    gate = _gate_head(model, window=2, threshold=0.0)
    ids = torch.randint(0, 50, (2, 7))
    for _ in range(3):  # fill the window with steps of the same size
        model.zero_grad()
        _lm_loss(model, ids, autocast=True)[1].backward()
    assert gate.stats()["closed_total"].item() == 0
    model.zero_grad()
    _lm_loss(model, ids, scale=5.0, autocast=True)[1].backward()  # a surge
    assert gate.stats()["closed"].item()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n


def test_gated_linear_function_under_autocast():
    torch.manual_seed(5)
    w = nn.Parameter(torch.randn(7, 4))
    b = nn.Parameter(torch.randn(7))
    h = torch.randn(2, 3, 4, requires_grad=True)
    gate = dgg.DynamicGradientGate([w, b], backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dgg.gated_linear(h, w, b, gate)
        want = nn.functional.linear(h, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().square().sum().backward()
    assert (w.grad.dtype, b.grad.dtype, h.grad.dtype) == (torch.float32,) * 3
    assert gate.stats()["accepted"].item() == 1


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_is_the_plain_models(tied):
    plain = _qwen2(tied)
    gated = _qwen2(tied, seed=1)
    gate = _gate_head(gated)
    head = gated.lm_head.weight
    assert isinstance(gated.lm_head, nn.Linear)
    assert list(gated.state_dict()) == list(plain.state_dict())  # lm_head.weight stays lm_head.weight
    assert [n for n, _ in gated.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert (gated.lm_head.weight is gated.model.embed_tokens.weight) == tied
    # a plain checkpoint loads into the gated model (strict), and the other way round
    gated.load_state_dict(plain.state_dict())
    assert gated.lm_head.weight is head and gate.monitor[0] is head  # copied in place: the gate still watches it
    for k, v in plain.state_dict().items():
        assert torch.equal(gated.state_dict()[k], v), k
    with torch.no_grad():
        gated.lm_head.weight.mul_(2.0)
    fresh = _qwen2(tied, seed=2)
    fresh.load_state_dict(gated.state_dict())
    assert torch.equal(fresh.lm_head.weight, gated.lm_head.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip(tied, tmp_path):
    transformers = pytest.importorskip("transformers")
    gated = _qwen2(tied)
    _gate_head(gated)
    with torch.no_grad():
        gated.lm_head.weight.mul_(3.0)  # "trained": differs from any fresh init
    gated.save_pretrained(tmp_path / "gated")
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "gated")
    assert type(loaded.lm_head) is nn.Linear
    assert torch.equal(loaded.lm_head.weight, gated.lm_head.weight)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for k, v in gated.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a plain checkpoint, loaded and then gated, saves and loads back the same
    gate = _gate_head(loaded)
    loaded.save_pretrained(tmp_path / "again")
    again = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again.lm_head.weight, gated.lm_head.weight)
    ids = torch.randint(0, 50, (2, 5))
    _lm_loss(loaded, ids)[1].backward()
    assert gate.stats()["accepted"].item() == 1


@pytest.mark.parametrize("tied", [False, True])
def test_tie_weights_and_resize_token_embeddings(tied):
    model = _qwen2(tied)
    gate = _gate_head(model)
    model.tie_weights()
    assert isinstance(model.lm_head, dgg.GatedLinear) and gate.monitor[0] is model.lm_head.weight
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.resize_token_embeddings(60, mean_resizing=False)
    ids = torch.randint(0, 60, (2, 5))
    if tied:
        # the shared Parameter is resized in place: the GatedLinear stays, its gate watches the resized weight
        assert isinstance(model.lm_head, dgg.GatedLinear) and model.lm_head.out_features == 60
        assert gate.monitor[0] is model.lm_head.weight is model.model.embed_tokens.weight
        logits, loss = _lm_loss(model, ids)
        loss.backward()
        assert logits.shape[-1] == 60 and gate.stats()["accepted"].item() == 1
    else:
        # transformers builds a new plain nn.Linear for an untied head: gate it again (docs/training.md)
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.shape == (60, 32)
        gate = _gate_head(model)
        _lm_loss(model, ids)[1].backward()
        assert gate.stats()["accepted"].item() == 1


def test_replaced_weight_is_reported_not_ungated():
    model = _qwen2(True)
    _gate_head(model)
    model.set_input_embeddings(nn.Embedding(50, 32))
    model.tie_weights()  # the lm_head now holds the new embedding's Parameter; its gate watches the old one
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match="no longer this layer's weight"):
        model(input_ids=ids)
    model.lm_head.gate = gate = dgg.DynamicGradientGate(model.lm_head.weight, backend="torch")
    _lm_loss(model, ids)[1].backward()
    assert gate.stats()["accepted"].item() == 1


def test_wrapping_keeps_the_layer_and_refuses_what_it_cannot_keep():
    lin = nn.Linear(4, 6)
    lin.eval()
    lin.custom_flag = "kept"
    gate = dgg.DynamicGradientGate(lin.weight)
    g = dgg.GatedLinear(lin, gate)
    assert g.weight is lin.weight and g.bias is lin.bias and not g.training and g.custom_flag == "kept"
    assert (g.in_features, g.out_features) == (4, 6) and "gate=" in repr(g)
    assert list(lin.state_dict()) == list(g.state_dict()) == ["weight", "bias"]
    assert isinstance(dgg.GatedLinear(g, gate), dgg.GatedLinear)  # a gated layer can take another gate

    class Quantized(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    q = Quantized(4, 6)
    with pytest.raises(TypeError, match="own forward"):
        dgg.GatedLinear(q, dgg.DynamicGradientGate(q.weight))
    handle = lin.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks registered"):
        dgg.GatedLinear(lin, gate)
    handle.remove()
    lin.forward = lambda x: x
    with pytest.raises(ValueError, match="forward replaced"):
        dgg.GatedLinear(lin, gate)
