"""backend="cuda" (csrc/): its Python-side errors on CPU, and parity with the torch backend on a GPU.

The GPU tests (marked gpu) skip without a CUDA device, and skip with the
loader's reason where the extension cannot be built (CPU torch, no nvcc).
"""
import math
import re
from pathlib import Path

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from dgg_kernels.backends import cuda_ext
from dgg_kernels.state import GateState
from semantics_model import play
from sequences import GATE_CONFIGS, assert_stats_match, bit_equal, config_id, make_sequence, run_gate

CSRC = Path(__file__).resolve().parents[1] / "csrc"


# ----------------------------------------------------------------- CPU: errors
@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader with nothing cached and no prebuilt dgg_kernels._C."""
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_ext_error", None)
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: None)
    return cuda_ext


def test_cuda_backend_on_cpu_tensors_names_cuda():
    w = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(RuntimeError, match='backend="cuda".*CUDA device'):
        dgg.DynamicGradientGate(w, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        cuda_ext.CudaBackend(torch.device("cpu"))


def test_cpu_torch_build_is_named(fresh_loader, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(RuntimeError, match=r"CPU build \(torch.version.cuda is None\)"):
        fresh_loader.load_extension()


def test_missing_nvcc_is_named(fresh_loader, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(cuda_ext, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="nvcc was not found") as info:
        fresh_loader.load_extension()
    assert "--no-build-isolation" in str(info.value)


def test_build_failure_carries_the_compiler_tail_and_is_cached(fresh_loader, monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(cuda_ext, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: True)
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'x': " + "noise " * 2000 + "gate_step.cu(42): error: boom")

    monkeypatch.setattr(cpp, "load", failing_load)
    with pytest.raises(RuntimeError, match=r"(?s)build of csrc/ failed.*gate_step.cu\(42\): error: boom") as info:
        fresh_loader.load_extension()
    assert len(str(info.value)) < 4000  # the tail, not the whole log
    assert calls and calls[0]["name"] == cuda_ext.JIT_NAME
    assert any(s.endswith("binding.cpp") for s in calls[0]["sources"])
    assert any(s.endswith("gate_step.cu") for s in calls[0]["sources"])
    with pytest.raises(RuntimeError, match="boom"):
        fresh_loader.load_extension()
    assert len(calls) == 1  # the failure is remembered, not rebuilt


def test_broken_prebuilt_is_reported_with_the_fallback_reason(fresh_loader, monkeypatch):
    def broken():
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(cuda_ext, "_import_prebuilt", broken)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(RuntimeError, match="(?s)CPU build.*prebuilt dgg_kernels._C did not load: undefined symbol"):
        fresh_loader.load_extension()


def test_slot_order_matches_the_kernel_struct():
    # The kernels read every slot index from state.py in the order StateSlots
    # declares its fields; a reordering on either side would be silent.
    # StateSlots and the group sizes are generated from state.SLOT_GROUPS (python -m dgg_kernels.csrc_header)
    from dgg_kernels.csrc_header import csrc_header

    slots_h = (CSRC / "common" / "dgg_slots.h").read_text()
    assert slots_h == csrc_header(), "csrc/common/dgg_slots.h is stale: python -m dgg_kernels.csrc_header --write"
    types_h = (CSRC / "common" / "dgg_types.h").read_text()
    assert '#include "common/dgg_slots.h"' in types_h
    header = slots_h + types_h
    body = re.search(r"struct StateSlots \{(.*?)\};", header, re.S).group(1)
    fields = re.findall(r"(\w+)(?=[,;])", re.sub(r"//[^\n]*", "", body).replace("int32_t", ""))
    want = [getattr(S, f.upper()) for f in fields]
    assert len(fields) == len(cuda_ext.SLOTS) and cuda_ext.SLOTS == want
    assert f"kMaxStepTensors = {cuda_ext.MAX_STEP_TENSORS};" in header
    # the group sizes the binding checks ints, stats and hyper against
    assert f"kNumIntSlots = {S.N_INTS};" in header and f"kNumStatSlots = {S.N_STATS};" in header
    assert f"kNumHyperSlots = {S.N_HYPER};" in header and f"kNumAccSlots = {S.N_ACC};" in header
    # every slot of each group is named once, so the finalize can reach all of them
    groups = [S.N_INTS, S.N_STATS, S.N_HYPER, S.N_ACC]
    start = 0
    for n in groups:
        assert sorted(want[start : start + n]) == list(range(n))
        start += n
    assert start == len(want)
    # the statistic and window-mode ids the kernels compare with
    from dgg_kernels.config import STATISTICS, WINDOW_MODES

    assert f"kStatEnergyIncrement = {STATISTICS.index('energy+increment')};" in header
    assert f"kWindowStep = {WINDOW_MODES.index('step')};" in header
    assert f"kWindowBatch = {WINDOW_MODES.index('batch')};" in header


def test_dense_detects_byte_spans():
    x = torch.empty(6, 5)
    assert cuda_ext._dense(x) and cuda_ext._dense(x.t()) and cuda_ext._dense(x[2:4])
    assert not cuda_ext._dense(x[:, :3]) and not cuda_ext._dense(x[::2])
    assert not cuda_ext._dense(torch.empty(3).expand(4, 3))
    assert cuda_ext._dense(torch.empty(1, 7)[:, :].expand(1, 7))


def test_sources_are_found():
    srcs = cuda_ext._sources()
    assert srcs[0].endswith("binding.cpp")
    assert {Path(s).name for s in srcs[1:]} >= {"gate_step.cu", "gate_mask.cu"}


# ----------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def ext():
    try:
        return cuda_ext.load_extension()
    except RuntimeError as e:
        if "build of csrc/ failed" in str(e):
            raise  # a GPU machine that can build must build
        pytest.skip(str(e))


STATE_NAMES = ("ring", "prev", "ints", "stats", "decision", "acc")


def same_bits(a, b):
    """Same dtype, shape and bytes (any dtype; NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _params(shapes, dtype):
    return [torch.nn.Parameter(torch.empty(s, dtype=dtype, device="cuda")) for s in shapes]


def _compare_with_torch(cfg, seq, n_steps):
    a = dgg.DynamicGradientGate(_params(seq.shapes, seq.dtype), backend="cuda", **cfg)
    b = dgg.DynamicGradientGate(_params(seq.shapes, seq.dtype), backend="torch", **cfg)
    assert a.backend == "cuda"
    got, want = run_gate(a, seq), run_gate(b, seq)
    model = play(cfg, seq)
    assert len(got) == len(want) == n_steps
    for i, (g, w, (m, _)) in enumerate(zip(got, want, model)):
        assert g["closed"] == w["closed"], (i, g, w)
        assert g["should_stop"] == w["should_stop"], i
        assert (g["untouched"], g["zeroed"]) == (w["untouched"], w["zeroed"]), i
        assert g["untouched"] if not g["closed"] else g["zeroed"], i
        for k in ("reuse_index", "accepted", "closed_total"):
            assert g["stats"][k] == w["stats"][k], (i, k)
        assert_stats_match(g["stats"], w["stats"], i, m["err_scale"], model=m)
    return got


SHAPE_SETS = {
    "two": [(37, 11), (5,)],
    "one-elem": [(1,)],
    "4095": [(4095,)],
    "4097+3": [(4097,), (3,)],
    "blocks": [(300, 1001)],  # ~300k elements: several hundred blocks
    "nine-tensors": [(17 * (i + 1),) for i in range(9)],  # more than one pointer table
}


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GATE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_with_torch_backend(ext, cfg, dtype):
    seq = make_sequence(11 + len(cfg), 200, SHAPE_SETS["two"], dtype)
    got = _compare_with_torch(cfg, seq, 200)
    assert any(r["closed"] for r in got) and not all(r["closed"] for r in got)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", list(SHAPE_SETS.values()), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_odd_sizes(ext, shapes, dtype):
    cfg = dict(window=4, threshold=0.3, statistic="norm", max_reuse=4)
    _compare_with_torch(cfg, make_sequence(5, 60, shapes, dtype), 60)


def _energy64(tensors):
    return sum(float(t.double().pow(2).sum()) for t in tensors)


def _cuda_energy(grads, backend=None):
    """backend.reduce() of ``grads``: the energy it leaves in state.acc[ACC_ENERGY] (float64, 0-dim, on the GPU)."""
    device = grads[0].device
    backend = backend or cuda_ext.CudaBackend(device)
    state = GateState.new(4, 0.3, 1e-8, device)
    backend.reduce(grads, state, dgg.GateConfig(window=4, backend="cuda"))
    return state.acc[S.ACC_ENERGY]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1, 3, 7])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 4097, 1 << 20])
def test_reduce_misaligned_views(ext, dtype, offset, n):
    base = torch.randn(n + 16, device="cuda").to(dtype)
    view = base[offset : offset + n]
    acc = _cuda_energy([view])
    want = _energy64([view.float()])
    assert math.isclose(acc.item(), want, rel_tol=1e-5), (acc.item(), want)


@pytest.mark.gpu
def test_reduce_reads_transposed_gapped_and_float64_grads(ext):
    x = torch.randn(300, 70, device="cuda")
    parts = [x.t(), x[:, :33], x.double()[5:], torch.randn(0, device="cuda")]
    acc = _cuda_energy(parts)
    assert math.isclose(acc.item(), _energy64([p.float() for p in parts]), rel_tol=1e-5)


@pytest.mark.gpu
def test_reduce_is_bit_deterministic(ext):
    g = [torch.randn(3_000_001, device="cuda"), torch.randn(77, device="cuda").bfloat16()]
    backend = cuda_ext.CudaBackend(g[0].device)
    accs = [_cuda_energy(g, backend) for _ in range(5)]
    assert all(bit_equal(a, accs[0]) for a in accs)


@pytest.mark.gpu
@pytest.mark.parametrize("window_mode", ["step", "batch"])
@pytest.mark.parametrize("statistic", ["norm", "energy", "increment", "energy+increment"])
def test_reduce_then_finalize_equals_fused_step(ext, statistic, window_mode):
    cfg = dgg.GateConfig(window=3, threshold=0.2, statistic=statistic, backend="cuda", window_mode=window_mode)
    backend = cuda_ext.CudaBackend(torch.device("cuda"))
    fused, split = (GateState.new(3, 0.2, 1e-8, torch.device("cuda"), n_rings=cfg.n_rings, window_mode=window_mode)
                    for _ in range(2))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(40):
        g = [torch.randn(999, device="cuda", generator=gen) * (1 + (i % 7 == 6) * 5)]
        if i % 3 == 0:  # batches of three passes (the batch window keeps the first)
            for st in (fused, split):
                st.ints[S.REUSE : S.STOP + 1].zero_()
        backend.step(g, fused, cfg)
        backend.reduce(g, split, cfg)
        backend.finalize(split, cfg)
        for name in STATE_NAMES:
            assert same_bits(getattr(fused, name), getattr(split, name)), (i, name)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 3e19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_closes_and_zeroes(ext, bad, dtype):
    if dtype == torch.float16 and bad == 3e19:
        bad = math.inf  # not representable: it is inf in float16
    w = torch.nn.Parameter(torch.empty(4, 3, dtype=dtype, device="cuda"))
    gate = dgg.DynamicGradientGate(w, window=4, backend="cuda")
    g = torch.randn(4, 3, device="cuda").to(dtype)
    g[1, 2] = bad
    w.grad = g
    assert gate.step().item()
    assert torch.equal(w.grad, torch.zeros_like(w.grad))
    s = gate.stats()
    assert s["closed"].item() and gate.should_stop()
    energy = s["energy"].item()
    assert math.isnan(energy) if math.isnan(bad) else energy == math.inf
    assert s["accepted"].item() == 0 and s["closed_total"].item() == 1


@pytest.mark.gpu
def test_mask_one_launch_many_params(ext):
    gen = torch.Generator(device="cuda").manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    buf = torch.randn(50_000, device="cuda", generator=gen)
    params = []
    for i in range(300):
        size = [1, 2, 3, 7, 8, 9, 33, 4095, 4097][i % 9]
        params.append(torch.randn(size, device="cuda", generator=gen).to(dtypes[i % 3]))
    views = [buf[1:1001], buf[2003:2003 + 7], buf.view(100, 500).t()]  # misaligned spans and a transposed one
    gapped = buf.view(100, 500)[:, :10]  # not one span: zeroed by the torch fallback
    grads = params + views + [gapped]
    before = [g.clone() for g in grads]
    backend = cuda_ext.CudaBackend(buf.device)
    open_ = torch.zeros((), dtype=torch.bool, device="cuda")
    backend.mask(open_, grads)
    assert all(bit_equal(a, b) for a, b in zip(grads, before))
    closed = torch.ones((), dtype=torch.bool, device="cuda")
    backend.mask(closed, grads)
    assert all((g == 0).all().item() for g in grads)
    assert not buf.any().item()  # the transposed view spans all of buf


@pytest.mark.gpu
def test_mask_leaves_neighbours_alone(ext):
    buf = torch.randn(10_000, device="cuda").bfloat16()
    before = buf.clone()
    spans = [(1, 1), (3, 14), (40, 4097), (5000, 8)]
    grads = [buf[a : a + n] for a, n in spans]
    cuda_ext.CudaBackend(buf.device).mask(torch.ones((), dtype=torch.bool, device="cuda"), grads)
    inside = torch.zeros(10_000, dtype=torch.bool, device="cuda")
    for a, n in spans:
        inside[a : a + n] = True
    assert (buf[inside] == 0).all()
    assert bit_equal(buf[~inside], before[~inside])


@pytest.mark.gpu
def test_huge_bf16_tensor_beyond_int32_indexing(ext):
    n = (1 << 31) + 37
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n + (1 << 30):
        pytest.skip(f"needs {2 * n / 2**30:.1f} GiB free on the GPU")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1] = 3.0  # beyond 2^31: read only if the indexing is 64-bit
    backend = cuda_ext.CudaBackend(g.device)
    acc = _cuda_energy([g], backend)
    # Every partial is a sum of small integers, exact in float32: the energy is exact.
    assert acc.item() == float(n - 1 + 9)
    backend.mask(torch.ones((), dtype=torch.bool, device="cuda"), [g])
    assert g[-1].item() == 0 and g[(1 << 31) - 1].item() == 0 and not g.any().item()


@pytest.mark.gpu
def test_step_never_syncs(ext):
    ws = [torch.nn.Parameter(torch.empty(64, 33, device="cuda")), torch.nn.Parameter(torch.empty(5, device="cuda"))]
    extra = torch.nn.Parameter(torch.empty(7, device="cuda", dtype=torch.bfloat16))
    gate = dgg.DynamicGradientGate(ws, ws + [extra], window=3, threshold=0.0, backend="cuda")
    torch.cuda.synchronize()
    outs = []
    for i in range(12):
        for w in ws + [extra]:
            w.grad = torch.randn_like(w) * (1 + 10 * (i % 5 == 4))
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs.append(gate.step())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert any(o.item() for o in outs)


@pytest.mark.gpu
@pytest.mark.parametrize("statistic", ["norm", "increment", "energy+increment"])
def test_cuda_graph_replay_matches_eager(ext, statistic):
    cfg = dict(window=4, threshold=0.3, statistic=statistic, max_reuse=100)
    shapes = [(257, 129), (3,)]
    w_graph = _params(shapes, torch.bfloat16)
    w_eager = _params(shapes, torch.bfloat16)
    g_graph = dgg.DynamicGradientGate(w_graph, backend="cuda", **cfg)
    g_eager = dgg.DynamicGradientGate(w_eager, backend="cuda", **cfg)
    for w in w_graph:
        w.grad = torch.zeros_like(w)
    gen = torch.Generator(device="cuda").manual_seed(3)

    def batch(i):
        scale = 1.0 + (20.0 if i % 9 == 8 else 0.1 * (i % 3))
        return [torch.randn(s, device="cuda", generator=gen).bfloat16() * scale for s in shapes]

    first = batch(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step outside capture builds the mask table
        for w, g in zip(w_graph, first):
            w.grad.copy_(g)
        g_graph.step()
    torch.cuda.current_stream().wait_stream(side)
    for w, g in zip(w_eager, first):
        w.grad = g.clone()
    g_eager.step()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = g_graph.step()
    closed_any = False
    for i in range(1, 60):
        grads = batch(i)
        for w, g in zip(w_graph, grads):
            w.grad.copy_(g)
        graph.replay()
        for w, g in zip(w_eager, grads):
            w.grad = g.clone()
        want = g_eager.step()
        assert out.item() == want.item(), i
        closed_any |= want.item()
        for name in STATE_NAMES:
            assert same_bits(getattr(g_graph.state, name), getattr(g_eager.state, name)), (i, name)
        for a, b in zip(w_graph, w_eager):
            assert bit_equal(a.grad, b.grad), i
    assert closed_any


@pytest.mark.gpu
def test_two_gates_interleaved_back_to_back(ext):
    cfg_a = dict(window=3, threshold=0.2, statistic="norm", max_reuse=3)
    cfg_b = dict(window=5, threshold=0.4, statistic="increment", max_reuse=5)
    seq_a = make_sequence(21, 80, [(1000,)], torch.float32)
    seq_b = make_sequence(22, 80, [(31, 7), (2,)], torch.float16)
    gates = {}
    for tag, cfg, seq in (("a", cfg_a, seq_a), ("b", cfg_b, seq_b)):
        for backend in ("cuda", "torch"):
            gates[tag, backend] = dgg.DynamicGradientGate(_params(seq.shapes, seq.dtype), backend=backend, **cfg)
    outs = {key: [] for key in gates}
    for ev_a, ev_b in zip(seq_a.events, seq_b.events):
        for tag, ev in (("a", ev_a), ("b", ev_b)):
            for backend in ("cuda", "torch"):
                gate = gates[tag, backend]
                if ev[0] == "new_batch":
                    gate.new_batch()
                else:
                    for t, g in zip(gate.monitor, ev[1]):
                        t.grad = g.cuda()
                    # no host read in between: the steps of both gates queue back to back
                    outs[tag, backend].append((gate.step(), gate.stats()))
    for tag in ("a", "b"):
        got, want = outs[tag, "cuda"], outs[tag, "torch"]
        assert len(got) == len(want) > 0
        for i, ((gd, gs), (wd, ws)) in enumerate(zip(got, want)):
            assert gd.item() == wd.item(), (tag, i)
            for k in ("reuse_index", "accepted", "closed_total"):
                assert gs[k].item() == ws[k].item(), (tag, i, k)
            e, f = gs["energy"].item(), ws["energy"].item()
            assert (math.isnan(e) and math.isnan(f)) or math.isclose(e, f, rel_tol=1e-5), (tag, i, e, f)


@pytest.mark.gpu
@pytest.mark.parametrize("statistic", ["norm", "increment", "energy+increment"])
def test_reduce_partial_then_finalize_partials_matches_step(ext, statistic):
    """The overlap=True path: one reduce launch per monitor grad (each its own scratch), then one finalize."""
    cfg = dgg.GateConfig(window=3, threshold=0.2, statistic=statistic, backend="cuda")
    backend = cuda_ext.CudaBackend(torch.device("cuda"))
    fused, parts = (GateState.new(3, 0.2, 1e-8, torch.device("cuda"), n_rings=cfg.n_rings) for _ in range(2))
    gen = torch.Generator(device="cuda").manual_seed(4)
    closed = 0
    for i in range(40):
        scale = 1 + (i % 7 == 6) * 5
        g = [torch.randn(s, device="cuda", generator=gen).to(dt) * scale
             for s, dt in (((513, 3), torch.bfloat16), ((77,), torch.float32), ((100_003,), torch.float16))]
        backend.step(g, fused, cfg)
        for k in (2, 0, 1):  # backward produces them in any order
            backend.reduce_partial(k, g[k], len(g), parts, cfg)
        backend.finalize_partials(len(g), parts, cfg)
        assert same_bits(fused.decision, parts.decision) and same_bits(fused.ints, parts.ints), i
        assert math.isclose(fused.acc[S.ACC_ENERGY].item(), parts.acc[S.ACC_ENERGY].item(), rel_tol=1e-6), i
        closed += fused.decision.item()
    assert 0 < closed < 40


def test_csrc_header_check_fails_on_a_stale_header(tmp_path, capsys):
    """What CI runs (python -m dgg_kernels.csrc_header): exit 1 on a header that differs from the table."""
    from dgg_kernels import csrc_header

    stale = tmp_path / "dgg_slots.h"
    stale.write_text(csrc_header.csrc_header().replace("batches", "batches, extra"))
    assert csrc_header.main(["--header", str(stale)]) == 1
    assert "differs from the slot table" in capsys.readouterr().out
    assert csrc_header.main(["--header", str(stale), "--write"]) == 0
    assert csrc_header.main(["--header", str(stale)]) == 0


@pytest.mark.gpu
def test_every_csrc_op_passes_opcheck_gpu():
    """The dgg::csrc_* ops through torch's dispatcher on CUDA (their C++ kernels registered by loading the
    extension): opcheck of each, on clones of a real gate's state and scratch."""
    from contract import OPCHECK_UTILS

    w = torch.nn.Parameter(torch.zeros(333, 7, device="cuda"))
    gate = dgg.DynamicGradientGate(w, backend="cuda", window=3, statistic="energy+increment")
    be, st, c = gate._backend, gate.state, gate.config
    grads = [torch.randn(333, 7, device="cuda"), torch.randn(5, device="cuda", dtype=torch.bfloat16)]

    def state():
        return (st.ring.clone(), st.prev.clone(), st.ints.clone(), st.stats.clone(), st.decision.clone(),
                st.hyper, st.acc.clone(), c.window, c.max_reuse, c.statistic_id, list(cuda_ext.SLOTS))

    scratch = (be._scratch_for(2).clone(), torch.zeros(1, dtype=torch.int32, device="cuda"))
    torch.library.opcheck(torch.ops.dgg.csrc_step.default, (grads, *scratch, be._max_blocks, *state()),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.dgg.csrc_reduce.default,
                          (grads, *scratch, st.acc.clone(), be._max_blocks), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.dgg.csrc_finalize.default, state(), test_utils=OPCHECK_UTILS)
    sums = torch.tensor([1.0, 2.0], dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.dgg.csrc_finalize.default, (*state(), sums), test_utils=OPCHECK_UTILS)
    g = torch.ones(64, device="cuda")
    table = torch.tensor([[g.data_ptr(), g.nbytes]], dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.dgg.csrc_mask.default, (torch.zeros((), dtype=torch.bool, device="cuda"),
                                                           table, 1), test_utils=OPCHECK_UTILS)
