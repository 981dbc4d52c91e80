"""The custom ops: opcheck, and torch.compile(fullgraph=True) through gate.step()."""
import math

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
         gate._kernels),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    for closed in (False, True):  # the schema check sees the mask's writes only when it writes
        torch.library.opcheck(torch.ops.dgg.gate_mask.default,
                              (torch.tensor(closed), [g.clone() for g in grads], gate._kernels),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    for t in (s.decision, s.stats, s.ints):
        torch.library.opcheck(torch.ops.dgg.snapshot.default, (t,),
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


def test_ops_find_no_backend_by_hidden_state():
    """What an op runs with is its argument: no module-level registry; a handle whose backend cannot mask
    fails on its own, whatever other gates exist."""
    assert not any(hasattr(ops, name) for name in ("register_backend", "_backends", "_lookup"))
    grads = [torch.ones(3)]
    handle = ops.GateKernels.of(object())
    with pytest.raises(AttributeError, match="mask"):
        ops.gate_mask(torch.ones((), dtype=torch.bool), grads, handle)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_one_compiled_function_serves_two_gates_each_with_its_own_backend(compiler):
    """One compiled function stepping whichever gate it is given: each gate's handle reaches the op, so each
    decides on its own window and settings, as its eager twin does (the graph is not specialized on the
    first gate's backend)."""
    def make(threshold):
        w = torch.nn.Parameter(torch.empty(6, 5))
        return w, dgg.DynamicGradientGate(w, window=2, threshold=threshold, backend="torch")

    (wa, a), (wb, b), (wa2, a2), (wb2, b2) = make(0.5), make(50.0), make(0.5), make(50.0)

    def step(gate):
        return gate.step()

    compiled = torch.compile(step, backend=compiler)
    for i in range(8):
        g = torch.full((6, 5), 1.0 + (30.0 if i == 6 else 0.01 * i))
        for w, gate, w2, twin in ((wa, a, wa2, a2), (wb, b, wb2, b2)):
            w.grad, w2.grad = g.clone(), g.clone()
            assert bool(compiled(gate)) == bool(twin.step()), (i, gate.config.threshold)
            assert torch.equal(gate.state.ring, twin.state.ring) and torch.equal(gate.state.ints, twin.state.ints)
    # the thresholds make the two gates decide differently on the same gradients: a mixed-up backend shows
    assert a.stats()["closed_total"].item() > b.stats()["closed_total"].item()


def test_finalize_partials_op_passes_opcheck():
    """dgg::gate_finalize_partials (overlap's finalize), on a real overlap gate's per-tensor reductions."""
    from contract import OPCHECK_UTILS

    w = torch.nn.Parameter(torch.randn(9, 4))
    b = torch.nn.Parameter(torch.randn(4))
    gate = dgg.DynamicGradientGate([w, b], window=3, backend="torch", overlap=True)
    (w.sum() * 2 + b.sum()).backward()  # the hooks reduce each gradient
    s, c = gate.state, gate.config
    state = [t.clone() for t in (s.ring, s.prev, s.ints, s.stats, s.decision, s.acc)]
    torch.library.opcheck(ops.gate_finalize_partials, (*state, s.hyper, c.window, c.statistic_id, c.max_reuse, 2,
                                                       gate._kernels), test_utils=OPCHECK_UTILS)


def test_a_wrong_mutation_annotation_fails_opcheck():
    """opcheck's schema test sees a mutation the schema does not declare, through a GateKernels argument
    (so a missing ``(a!)`` on a gate op would fail test_opcheck)."""
    @torch.library.custom_op("dgg_test::undeclared_write", mutates_args=())
    def undeclared(acc: torch.Tensor, kernels: ops.GateKernels) -> None:
        acc.add_(1)

    undeclared.register_fake(lambda acc, kernels: None)
    with pytest.raises(Exception, match="not defined as mutable but was mutated"):
        torch.library.opcheck(undeclared, (torch.zeros(2), ops.GateKernels.of(None)), test_utils=("test_schema",))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("kls, want", [((0.0, 1.0), (False, True)), ((1.0, 0.0), (True, False))])
def test_two_steps_in_one_compiled_function_return_their_own_decisions(compiler, kls, want):
    """observe_kl + step() twice in one fullgraph-compiled function: each step() returns its own decision
    and stats() read between them shows the first step's energy (inductor once handed back the gate's own
    decision buffer, overwritten by the second step)."""
    w = torch.nn.Parameter(torch.empty(8, 4))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=math.inf, target_kl=0.01, backend="torch")

    def two(g1, g2, kl1, kl2):
        w.grad = g1.clone()
        gate.observe_kl(kl1)
        d1 = gate.step()
        e1 = gate.stats()["energy"]
        w.grad = g2.clone()
        gate.observe_kl(kl2)
        d2 = gate.step()
        return d1, d2, e1

    gate.new_batch()
    w.grad = torch.ones(8, 4)
    gate.observe_kl(0.0)
    gate.step()  # pass 1: the two compiled steps are passes 2 and 3, where the KL stop may close
    f = torch.compile(two, fullgraph=True, backend=compiler)
    d1, d2, e1 = f(torch.ones(8, 4), 2 * torch.ones(8, 4), torch.tensor(kls[0]), torch.tensor(kls[1]))
    assert (bool(d1), bool(d2)) == want
    assert float(e1) == 32.0  # the first step's energy (8 x 4 ones), not the second's (128)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_observe_kl_of_a_number_under_fullgraph_compile(compiler):
    """A Python-number KL in a fullgraph-compiled step: a non-finite one closes the gate (it is judged like a
    tensor's value, as docs/semantics.md says), instead of a ValueError raised while tracing that reaches
    the caller as torch._dynamo's Unsupported; finite values of every size reuse one graph."""
    w = torch.nn.Parameter(torch.empty(8, 4))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=0.3, target_kl=0.01, backend="torch")
    w.grad = torch.ones(8, 4)

    def f(x):
        gate.observe_kl(x)
        return gate.step()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    gate.new_batch()
    assert bool(compiled(0.001)) is False  # pass 1
    for bad in (float("nan"), float("inf"), 1e39):
        assert bool(compiled(bad)) is True  # closed (pass 1 too: a non-finite KL closes at any reuse index)
        assert gate.stats()["closed"]
    with torch._dynamo.config.patch(recompile_limit=2):  # 12 finite values: no recompile per value
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for i in range(12):
            gate.new_batch()
            assert bool(compiled(0.001 * (i + 1))) is False
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames <= 1


def test_a_torch_without_opaque_op_arguments_still_steps_eagerly_and_says_why_it_cannot_compile():
    """In a process whose torch does not take GateKernels as an opaque op argument (another version of the
    private API, as the GPU machines' torch 2.11 may have): the package imports, eager steps work, the csrc
    op schemas exist, and compiling a step raises the reason."""
    import subprocess
    import sys

    code = """
import torch
import torch._library.opaque_object as opaque
real = opaque.register_opaque_type

def older(cls, *args, **kwargs):  # a version of the private API that does not take our class
    if cls.__name__ == "GateKernels":
        raise TypeError("register_opaque_type() got an unexpected keyword argument 'typ'")
    return real(cls, *args, **kwargs)

opaque.register_opaque_type = older
import dgg_kernels as dgg
from dgg_kernels import ops
assert ops.COMPILE_UNAVAILABLE and ops.gate_step is None
assert hasattr(torch.ops.dgg, "csrc_finalize")
w = torch.nn.Parameter(torch.zeros(4, 3))
gate = dgg.DynamicGradientGate(w, window=2, backend="torch")
for i in range(4):
    w.grad = torch.full((4, 3), 1.0 + i)
    gate.step()
assert int(gate.stats()["accepted"]) + int(gate.stats()["closed_total"]) == 4
try:
    torch.compile(gate.step, fullgraph=True, backend="aot_eager")()
except Exception as e:
    assert "did not take GateKernels as an opaque reference type" in str(e), e
    print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
