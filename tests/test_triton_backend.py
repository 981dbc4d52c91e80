"""The Triton backend against the torch backend, step for step.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py); the
tests marked gpu run the compiled kernels on CUDA.
"""
import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import ops, state as S
from dgg_kernels.backends import triton_usable
from dgg_kernels.config import GateConfig
from dgg_kernels.state import GateState
from semantics_model import play
from sequences import (
    GATE_CONFIGS, NEW_SETTINGS, assert_stats_match, bit_equal, config_id, make_sequence, run_gate, same_records,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(
    not any(triton_usable(torch.device(d)) for d in DEVICES), reason="triton unavailable"
)


def _gates(shapes, dtype, device, cfg):
    """A torch-backend gate and a triton-backend gate on separate but equal parameters."""
    out = []
    for backend in ("torch", "triton"):
        mon = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes]
        out.append(dgg.DynamicGradientGate(mon, backend=backend, **cfg))
    return out


class _Driven:
    """A backend driven without a gate, in the shape sequences.run_gate plays a sequence through.

    Its own GateConfig and GateState (made as the gate makes them) and monitor
    tensors, which are also the params it masks.  ``step()`` is the backend's
    ``step`` on the monitor grads, then its ``mask`` on the params grads;
    ``new_batch``, ``new_pass``, ``stats`` and ``should_stop`` are the gate's own
    methods, which touch nothing but ``self.state``.
    """

    new_batch = dgg.DynamicGradientGate.new_batch
    new_pass = dgg.DynamicGradientGate.new_pass
    stats = dgg.DynamicGradientGate.stats
    should_stop = dgg.DynamicGradientGate.should_stop

    def __init__(self, backend, shapes, dtype, device, cfg):
        self.backend = backend
        self.config = c = GateConfig(**cfg)
        self.state = GateState.new(c.window, c.threshold, c.eps, torch.device(device), n_rings=c.n_rings,
                                   window_mode=c.window_mode, kl_limit=c.kl_limit)
        self.monitor = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes]
        self.params = self.monitor
        # what contract.opcheck_gate_ops reads: the ops run with this backend
        self.device, self._sharding, self._kernels = torch.device(device), None, ops.GateKernels.of(backend)

    def step(self):
        self.backend.step([t.grad for t in self.monitor], self.state, self.config)
        self.backend.mask(self.state.decision, [p.grad for p in self.params if p.grad is not None])
        return self.state.decision.clone()


def _torch_gate_and_triton(shapes, dtype, device, cfg, block):
    """A torch-backend gate, and a TritonBackend(block=block) driven without a gate (_Driven), on separate but
    equal parameters.  A small block gives the interpreter's few programs several blocks each (the stride loop)."""
    from dgg_kernels.backends.triton_fused import TritonBackend

    ref = dgg.DynamicGradientGate([torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device)) for s in shapes],
                                  backend="torch", **cfg)
    return ref, _Driven(TritonBackend(block=block), shapes, dtype, device, cfg)


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
    ga, gb = _torch_gate_and_triton(shapes, dtype, "cpu", cfg, block=64)
    _assert_parity(run_gate(ga, seq), run_gate(gb, seq), play(cfg, seq))


@pytest.mark.parametrize("cfg", NEW_SETTINGS, ids=config_id)
def test_parity_new_settings_cpu(cfg):
    """The paper's rule, the batch window and the observer change only the finalize: float32, one tensor."""
    shapes = [(61, 7)]
    seq = make_sequence(17 + cfg["window"], 120, shapes, torch.float32)
    ga, gb = _torch_gate_and_triton(shapes, torch.float32, "cpu", cfg, block=64)
    _assert_parity(run_gate(ga, seq), run_gate(gb, seq), play(cfg, seq))
    assert bit_equal(ga.state.ints, gb.state.ints)


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 64 * 4 + 1, 64 * 9 - 1])
def test_odd_sizes_cpu(numel):
    """1 element, block -1/+0/+1, and more blocks than programs (the stride loop)."""
    cfg = dict(window=3, threshold=0.2)
    seq = make_sequence(numel, 60, [(numel,)], torch.float32, p_new_batch=0.1)
    ga, gb = _torch_gate_and_triton([(numel,)], torch.float32, "cpu", cfg, block=64)
    ref, got = run_gate(ga, seq), run_gate(gb, seq)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a["closed"] == b["closed"], i
        assert math.isclose(a["stats"]["energy"], b["stats"]["energy"], rel_tol=2e-6) or (
            not math.isfinite(a["stats"]["energy"]) and str(a["stats"]["energy"]) == str(b["stats"]["energy"])
        ), i


def test_split_reduce_then_finalize_equals_fused_cpu():
    """reduce() -> (a collective would go here) -> finalize() gives the fused step's state bit for bit."""
    from dgg_kernels.backends.triton_fused import TritonBackend

    class SplitStep(TritonBackend):
        def step(self, grads, state, config):
            self.reduce(grads, state, config)
            self.finalize(state, config)

    shapes = [(97,), (5, 5)]
    seq = make_sequence(5, 40, shapes, torch.float32)
    fused = _Driven(TritonBackend(block=32), shapes, torch.float32, "cpu", dict(window=4))
    split = _Driven(SplitStep(block=32), shapes, torch.float32, "cpu", dict(window=4))
    ra, rb = run_gate(fused, seq), run_gate(split, seq)
    assert same_records(ra, rb)
    for k, v in fused.state.state_dict().items():
        assert bit_equal(v, split.state.state_dict()[k]), k


# ----------------------------------------------------------------------------- the launch functions alone
class _LaunchFunctions:
    """A step made of triton_launch's plain functions (fresh caches each call): sumsq, finalize, mask."""

    def step(self, grads, state, config):
        from dgg_kernels.backends import triton_launch as TL

        energy = TL.sumsq(grads, state)
        assert energy.dtype == torch.float64 and energy.dim() == 0
        TL.finalize(state, config)

    def mask(self, decision, grads, key=None):
        from dgg_kernels.backends import triton_launch as TL

        TL.mask(decision, grads)


def test_launch_functions_equal_the_backends_step_cpu():
    """sumsq -> finalize -> mask, each called alone, give the fused step's records and state bit for bit."""
    from dgg_kernels.backends.triton_fused import TritonBackend

    shapes = [(300,), (7, 9)]
    cfg = dict(window=3, threshold=0.2, statistic="energy+increment")
    seq = make_sequence(8, 40, shapes, torch.float32)
    fused = _Driven(TritonBackend(), shapes, torch.float32, "cpu", cfg)  # the default layout, as the functions'
    plain = _Driven(_LaunchFunctions(), shapes, torch.float32, "cpu", cfg)
    ra, rb = run_gate(fused, seq), run_gate(plain, seq)
    assert same_records(ra, rb)
    assert 0 < sum(r["closed"] for r in rb) < len(rb) and all(r["zeroed"] for r in rb if r["closed"])
    for k, v in fused.state.state_dict().items():
        assert bit_equal(v, plain.state.state_dict()[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sumsq_alone_cpu(dtype):
    from dgg_kernels.backends import triton_launch as TL

    g = torch.Generator().manual_seed(3)
    grads = [(torch.randn(s, generator=g) * 3).to(dtype) for s in [(1,), (255,), (256,), (4097,), (33, 70)]]
    grads.append((torch.randn(40, 30, generator=g)).to(dtype).t())  # non-contiguous
    want = sum(float(x.double().pow(2).sum()) for x in grads)
    got = TL.sumsq(grads)
    assert got.dtype == torch.float64 and got.dim() == 0 and got.device == grads[0].device
    assert math.isclose(got.item(), want, rel_tol=2e-6), (got.item(), want)
    assert bit_equal(TL.sumsq(grads), got)  # the same grads, the same bits
    # into a given state: acc[ACC_ENERGY] only; nothing else of the state changes
    state = GateState.new(4, 0.3, 1e-8, torch.device("cpu"))
    before = {k: v.clone() for k, v in vars(state).items()}
    assert bit_equal(TL.sumsq(grads, state), got) and bit_equal(state.acc[S.ACC_ENERGY], got)
    for k, v in vars(state).items():
        if k == "acc":
            v, b = v.clone(), before[k].clone()
            v[S.ACC_ENERGY] = b[S.ACC_ENERGY] = 0
        else:
            b = before[k]
        assert bit_equal(v, b), k
    # mixed dtypes, and what is not finite
    assert math.isclose(TL.sumsq([grads[0].float(), grads[1].half()]).item(),
                        float(grads[0].double().pow(2).sum() + grads[1].half().double().pow(2).sum()), rel_tol=2e-6)
    bad = grads[3].clone()
    bad[17] = math.nan
    assert math.isnan(TL.sumsq([grads[0], bad]).item())
    bad[17] = math.inf
    assert TL.sumsq([bad, grads[0]]).item() == math.inf


def test_finalize_alone_matches_the_torch_form_cpu():
    """The finalize kernel on a GateState whose acc holds the energy, against torch_ref's tensor form."""
    from dgg_kernels.backends import torch_ref
    from dgg_kernels.backends import triton_launch as TL

    for cfg in (GateConfig(window=3, threshold=0.1), GateConfig(window=4, threshold=0.2, statistic="energy+increment")):
        states = [GateState.new(cfg.window, cfg.threshold, cfg.eps, torch.device("cpu"), n_rings=cfg.n_rings)
                  for _ in range(2)]
        for i, energy in enumerate([4.0, 4.2, 3.9, 4.1, 40.0, math.nan, 4.0, 5.0, math.inf, 4.05]):
            if i == 6:  # a new batch: the reuse index starts again
                for st in states:
                    st.ints[S.REUSE : S.STOP + 1].zero_()
            for st in states:
                st.acc[S.ACC_ENERGY] = energy
            TL.finalize(states[0], cfg)
            torch_ref.finalize_reference(states[1], cfg)
            assert bool(states[0].decision) == bool(states[1].decision), (cfg, i)
            assert torch.equal(states[0].ints, states[1].ints), (cfg, i)
            assert bit_equal(states[0].ring, states[1].ring) and bit_equal(states[0].prev, states[1].prev), (cfg, i)
            assert torch.allclose(states[0].stats, states[1].stats, rtol=1e-6, equal_nan=True), (cfg, i)
        assert 0 < int(states[0].ints[S.CLOSED_TOTAL]) < 10


def test_mask_alone_cpu():
    """Open: nothing touched; closed: every grad zeroed (dense as bytes in 4-, 2- and 1-byte units, a gapped
    view by torch), and nothing beside them."""
    from dgg_kernels.backends import triton_launch as TL

    buf32 = torch.full((64,), 5.0)
    buf16 = torch.full((16,), 3.0, dtype=torch.float16)
    buf8 = torch.full((16,), 1.0).to(torch.float8_e4m3fn)
    base = torch.full((4, 8), 7.0)

    def grads():
        return [buf32[:40], buf16[1:6], buf8[3:10], base[:, :4], torch.empty(0)]

    snapshot = [t.clone() for t in (buf32, buf16, buf8, base)]
    TL.mask(torch.tensor(False), grads())
    assert all(bit_equal(a, b) for a, b in zip((buf32, buf16, buf8, base), snapshot))
    TL.mask(torch.tensor(True), grads())
    assert bool((buf32[:40] == 0).all()) and bool((buf32[40:] == 5).all())
    assert bool((buf16[1:6] == 0).all()) and buf16[0].item() == 3 and bool((buf16[6:] == 3).all())
    assert bool((buf8[3:10].float() == 0).all()) and bool((buf8[:3].float() == 1).all())
    assert bool((buf8[10:].float() == 1).all())
    assert bool((base[:, :4] == 0).all()) and bool((base[:, 4:] == 7).all())


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
