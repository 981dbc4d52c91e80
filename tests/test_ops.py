"""The custom ops: opcheck, and torch.compile(fullgraph=True) through gate.step()."""
import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import ops


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("statistic", ["norm", "energy+increment"])
def test_opcheck(backend, statistic):
    w = torch.nn.Parameter(torch.empty(33, 5))
    b = torch.nn.Parameter(torch.empty(5))
    gate = dgg.DynamicGradientGate([w, b], window=3, statistic=statistic, backend=backend)
    grads = [torch.randn(33, 5), torch.randn(5)]
    s = gate.state
    torch.library.opcheck(
        torch.ops.dgg.gate_step.default,
        (grads, s.ring, s.prev, s.ints, s.stats, s.decision, s.acc, s.hyper, 3, gate.config.statistic_id, 4,
         gate._op_key),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    torch.library.opcheck(torch.ops.dgg.gate_mask.default, (s.decision, grads, gate._op_key),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# every statistic under both compilers, each compiler with both window modes (the graph is two opaque
# custom ops and a clone, so even inductor compiles it in about a second)
COMPILE_CASES = [
    (compiler, statistic, mode)
    for compiler in ("aot_eager", "inductor")
    for statistic, mode in (("norm", "step"), ("energy", "batch"), ("increment", "batch"), ("energy+increment", "step"))
] + [("inductor", "energy+increment", "batch")]


@pytest.mark.parametrize("compiler, statistic, window_mode", COMPILE_CASES)
def test_compiled_step_fullgraph_matches_eager(compiler, statistic, window_mode):
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.empty(40, 8))
    w2 = torch.nn.Parameter(torch.empty(40, 8))
    kw = dict(window=3, threshold=0.2, statistic=statistic, window_mode=window_mode, backend="torch")
    eager = dgg.DynamicGradientGate(w1, **kw)
    compiled = dgg.DynamicGradientGate(w2, **kw)
    step = torch.compile(compiled.step, fullgraph=True, backend=compiler)  # fullgraph: a graph break raises
    outs = []
    for i in range(12):
        if i % 3 == 0:  # batches of three passes: the batch window takes the first
            eager.new_batch()
            compiled.new_batch()
        g = torch.randn(40, 8) * (10.0 if i in (7, 10) else 1.0 + 0.05 * i)
        w1.grad, w2.grad = g.clone(), g.clone()
        a, b = eager.step(), step()
        outs.append(a.item())
        assert a.item() == b.item(), i
        assert torch.equal(eager.state.stats, compiled.state.stats), i
        assert torch.equal(eager.state.ring, compiled.state.ring), i
        assert torch.equal(w1.grad, w2.grad), i
    assert any(outs) and not all(outs)


def test_unknown_backend_key_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no live gate backend"):
        ops.gate_mask(torch.zeros((), dtype=torch.bool), [torch.randn(3)], 10**9)
