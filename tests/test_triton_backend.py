"""The Triton backend against the torch backend, step for step.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py); the
tests marked gpu run the compiled kernels on CUDA.
"""
import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels.backends import triton_usable
from semantics_model import play
from sequences import (
    GATE_CONFIGS, NEW_SETTINGS, assert_stats_match, bit_equal, config_id, make_sequence, run_gate, same_records,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(
    not any(triton_usable(torch.device(d)) for d in DEVICES), reason="triton unavailable"
)


def _gates(shapes, dtype, device, cfg, block=None):
    """A torch-backend gate and a triton-backend gate on separate but equal parameters."""
    out = []
    for backend in ("torch", "triton"):
        mon = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes]
        gate = dgg.DynamicGradientGate(mon, backend=backend, **cfg)
        if backend == "triton" and block is not None:
            from dgg_kernels.backends.triton_fused import TritonBackend

            gate._backend = TritonBackend(block=block)
        out.append(gate)
    return out


def _assert_parity(ref, got, want):
    n_closed = 0
    for i, (a, b, (w, _)) in enumerate(zip(ref, got, want)):
        assert a["closed"] == b["closed"], (i, a, b)
        assert a["should_stop"] == b["should_stop"], i
        assert_stats_match(b["stats"], a["stats"], i, w["err_scale"], model=w)
        for k in ("reuse_index", "accepted", "closed_total"):
            assert a["stats"][k] == b["stats"][k], (i, k)
        assert b["zeroed"] if b["closed"] else b["untouched"], i
        n_closed += a["closed"]
    assert 0 < n_closed < len(ref)




@pytest.mark.parametrize("cfg", GATE_CONFIGS[:4], ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_with_torch_backend_cpu(cfg, dtype):
    shapes = [(61, 7), (3,)]  # two monitor tensors, odd sizes
    seq = make_sequence(11 + cfg["window"], 120, shapes, dtype)
    ga, gb = _gates(shapes, dtype, "cpu", cfg, block=64)
    _assert_parity(run_gate(ga, seq), run_gate(gb, seq), play(cfg, seq))


@pytest.mark.parametrize("cfg", NEW_SETTINGS, ids=config_id)
def test_parity_new_settings_cpu(cfg):
    """The paper's rule, the batch window and the observer change only the finalize: float32, one tensor."""
    shapes = [(61, 7)]
    seq = make_sequence(17 + cfg["window"], 120, shapes, torch.float32)
    ga, gb = _gates(shapes, torch.float32, "cpu", cfg, block=64)
    _assert_parity(run_gate(ga, seq), run_gate(gb, seq), play(cfg, seq))
    assert bit_equal(ga.state.ints, gb.state.ints)


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 64 * 4 + 1, 64 * 9 - 1])
def test_odd_sizes_cpu(numel):
    """1 element, block -1/+0/+1, and more blocks than programs (the stride loop)."""
    cfg = dict(window=3, threshold=0.2)
    seq = make_sequence(numel, 60, [(numel,)], torch.float32, p_new_batch=0.1)
    ga, gb = _gates([(numel,)], torch.float32, "cpu", cfg, block=64)
    ref, got = run_gate(ga, seq), run_gate(gb, seq)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a["closed"] == b["closed"], i
        assert math.isclose(a["stats"]["energy"], b["stats"]["energy"], rel_tol=2e-6) or (
            not math.isfinite(a["stats"]["energy"]) and str(a["stats"]["energy"]) == str(b["stats"]["energy"])
        ), i


def test_split_reduce_then_finalize_equals_fused_cpu():
    """reduce() -> (a collective would go here) -> finalize() gives the fused step's state bit for bit."""
    from dgg_kernels.backends.triton_fused import TritonBackend

    seq = make_sequence(5, 40, [(97,), (5, 5)], torch.float32)
    fused, split = _gates([(97,), (5, 5)], torch.float32, "cpu", dict(window=4))[1], None
    mon = [torch.nn.Parameter(torch.empty(s)) for s in [(97,), (5, 5)]]
    split = dgg.DynamicGradientGate(mon, backend="triton", window=4)
    fused._backend = TritonBackend(block=32)
    split._backend = TritonBackend(block=32)

    class SplitStep(TritonBackend):
        def step(self, grads, state, config):
            self.reduce(grads, state, config)
            self.finalize(state, config)

    split._backend = SplitStep(block=32)
    ra, rb = run_gate(fused, seq), run_gate(split, seq)
    assert same_records(ra, rb)
    for k, v in fused.state.state_dict().items():
        assert bit_equal(v, split.state.state_dict()[k]), k


def test_deterministic_and_ticket_resets_cpu():
    g = torch.randn(1000) * 3
    energies = []
    gate = None
    for _ in range(3):
        w = torch.nn.Parameter(torch.empty(1000))
        gate = dgg.DynamicGradientGate(w, backend="triton")
        for _ in range(4):
            w.grad = g.clone()
            gate.step()
        energies.append(gate.state.acc.clone())
        energies.append(gate.stats()["energy"].clone())
        _, ticket = next(iter(gate._backend._scratch.values()))
        assert ticket.item() == 0
    assert all(bit_equal(energies[1], e) for e in energies[1::2])


def test_mask_many_params_mixed_dtypes_cpu():
    lm = torch.nn.Parameter(torch.empty(40, 3))
    params = [lm] + [
        torch.nn.Parameter(torch.empty(n, dtype=dt)) for n, dt in
        [(1, torch.float32), (257, torch.bfloat16), (33, torch.float16), (500, torch.float32), (7, torch.float64)]
    ] * 5
    gate = dgg.DynamicGradientGate(lm, params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    assert not gate.step().item()
    assert all(bit_equal(p.grad, b) for p, b in zip(params, before))
    lm.grad[0, 0] = math.inf
    assert gate.step().item()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_mask_strided_grad_cpu():
    lm = torch.nn.Parameter(torch.empty(6, 4))
    other = torch.nn.Parameter(torch.empty(4, 6))
    gate = dgg.DynamicGradientGate(lm, [lm, other], backend="triton")
    lm.grad = torch.full((6, 4), math.nan)
    other.grad = torch.randn(6, 4).t()  # non-contiguous
    assert gate.step().item()
    assert torch.equal(other.grad, torch.zeros(4, 6)) and torch.equal(lm.grad, torch.zeros(6, 4))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GATE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_with_torch_backend_gpu(cfg, dtype):
    shapes = [(1531, 129), (4097,), (1,)]
    seq = make_sequence(23 + cfg["window"], 200, shapes, dtype)
    ga, gb = _gates(shapes, dtype, "cuda", cfg)
    _assert_parity(run_gate(ga, seq), run_gate(gb, seq), play(cfg, seq))


@pytest.mark.gpu
def test_auto_picks_the_measured_table_on_cuda():
    from dgg_kernels.backends import auto

    for numel in (3, 2**26):  # 12 bytes and 256 MB of float32
        w = torch.nn.Parameter(torch.empty(numel, device="cuda"))
        gate = dgg.DynamicGradientGate(w)
        want, _ = auto.choose(torch.cuda.get_device_name(), torch.float32, numel * 4)
        # the table's pick, or triton where it says cuda and no prebuilt extension loads
        assert gate.backend in ({want, "triton"} if want == "cuda" else {want}), gate._backend.auto_reason


@pytest.mark.gpu
def test_no_host_sync_in_step_gpu():
    lm = torch.nn.Parameter(torch.empty(4096, 512, device="cuda", dtype=torch.bfloat16))
    others = [torch.nn.Parameter(torch.empty(1000, device="cuda")) for _ in range(20)]
    gate = dgg.DynamicGradientGate(lm, [lm, *others], window=4, backend="triton")
    for p in [lm, *others]:
        p.grad = torch.randn_like(p)
    gate.step()  # compile outside the check; the pointer table is built here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            gate.step()
            gate.new_batch()
            gate.stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_gpu():
    shapes = [(2048, 300)]
    seq = make_sequence(99, 40, shapes, torch.bfloat16, p_new_batch=0.0)
    steps = [ev[1][0].cuda() for ev in seq.events if ev[0] == "step"]
    eager_w = torch.nn.Parameter(torch.empty(shapes[0], device="cuda", dtype=torch.bfloat16))
    graph_w = torch.nn.Parameter(torch.empty(shapes[0], device="cuda", dtype=torch.bfloat16))
    eager = dgg.DynamicGradientGate(eager_w, window=4, threshold=0.2, backend="triton")
    graphed = dgg.DynamicGradientGate(graph_w, window=4, threshold=0.2, backend="triton")
    graph_w.grad = torch.zeros_like(graph_w)
    static_grad = graph_w.grad
    # warm up (compiles) on a side stream, then reset the state to fresh
    fresh = graphed.state_dict()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static_grad.copy_(steps[0])
        graphed.step()
    torch.cuda.current_stream().wait_stream(s)
    graphed.load_state_dict(fresh)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = graphed.step()
    for i, grad in enumerate(steps):
        eager_w.grad = grad.clone()
        want = eager.step()
        static_grad.copy_(grad)
        g.replay()
        assert out.item() == want.item(), i
        # the same kernel on the same input: the same bits, NaN stats included (NaN != NaN under torch.equal)
        assert bit_equal(graphed.state.stats, eager.state.stats), i
        assert torch.equal(graphed.state.ints, eager.state.ints), i


@pytest.mark.gpu
def test_two_gates_interleaved_gpu():
    seq_a = make_sequence(1, 50, [(3000, 7)], torch.float32)
    seq_b = make_sequence(2, 50, [(999,)], torch.bfloat16)
    ref_a, ref_b = (_gates(s.shapes, s.dtype, "cuda", dict(window=3))[0] for s in (seq_a, seq_b))
    want_a, want_b = run_gate(ref_a, seq_a), run_gate(ref_b, seq_b)
    ga = _gates(seq_a.shapes, seq_a.dtype, "cuda", dict(window=3))[1]
    gb = _gates(seq_b.shapes, seq_b.dtype, "cuda", dict(window=3))[1]
    got_a, got_b = [], []
    for ea, eb in zip(seq_a.events, seq_b.events):  # alternate single events between the two gates
        for gate, ev, got, seq in ((ga, ea, got_a, seq_a), (gb, eb, got_b, seq_b)):
            one = type(seq)(shapes=seq.shapes, dtype=seq.dtype, events=[ev])
            got.extend(run_gate(gate, one))
    assert [r["closed"] for r in got_a] == [r["closed"] for r in want_a]
    assert [r["closed"] for r in got_b] == [r["closed"] for r in want_b]


@pytest.mark.gpu
def test_more_than_2_pow_31_elements_gpu():
    n = 2**31 + 4097
    free, _ = torch.cuda.mem_get_info()
    if free < n * 2 * 2.2:
        pytest.skip("not enough GPU memory for a 4.3 GB bf16 parameter and its grad")
    # a real Parameter of that size: autograd refuses a grad whose shape differs from its tensor's
    w = torch.nn.Parameter(torch.empty(n, device="cuda", dtype=torch.bfloat16))
    gate = dgg.DynamicGradientGate(w, backend="triton")
    w.grad = torch.full_like(w, 0.5)
    w.grad[-7:] = 3.0  # the far end must be read: int32 offsets would wrap before it
    gate.step()
    want = (n - 7) * 0.25 + 7 * 9.0
    got = gate.stats()["energy"].item()
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)
