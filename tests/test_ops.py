"""The custom ops: opcheck, and torch.compile(fullgraph=True) through gate.step()."""
import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import ops


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    w = torch.nn.Parameter(torch.empty(33, 5))
    b = torch.nn.Parameter(torch.empty(5))
    gate = dgg.DynamicGradientGate([w, b], window=3, backend=backend)
    grads = [torch.randn(33, 5), torch.randn(5)]
    s = gate.state
    torch.library.opcheck(
        torch.ops.dgg.gate_step.default,
        (grads, s.ring, s.prev, s.ints, s.stats, s.decision, s.acc, s.hyper, 3, 0, 4, gate._op_key),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    torch.library.opcheck(torch.ops.dgg.gate_mask.default, (s.decision, grads, gate._op_key),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_step_fullgraph_matches_eager():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.empty(40, 8))
    w2 = torch.nn.Parameter(torch.empty(40, 8))
    eager = dgg.DynamicGradientGate(w1, window=3, threshold=0.2, backend="torch")
    compiled = dgg.DynamicGradientGate(w2, window=3, threshold=0.2, backend="torch")
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    outs = []
    for i in range(10):
        g = torch.randn(40, 8) * (10.0 if i in (5, 8) else 1.0 + 0.05 * i)
        w1.grad, w2.grad = g.clone(), g.clone()
        a, b = eager.step(), step()
        outs.append(a.item())
        assert a.item() == b.item(), i
        assert torch.equal(eager.state.stats, compiled.state.stats), i
        assert torch.equal(w1.grad, w2.grad), i
    assert any(outs) and not all(outs)


def test_unknown_backend_key_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no live gate backend"):
        ops.gate_mask(torch.zeros((), dtype=torch.bool), [torch.randn(3)], 10**9)
