"""The torch backend's costs without its contract changing (docs/semantics.md, "The torch backend's cost").

CPU only.  The mask: an open step writes no params grad byte (version counters and bits unchanged), a
closed step writes zeros into every element of every grad, NaN-holding, gapped, transposed, of every
dtype the gate accepts; the device form (what accelerators and traced code run) keeps the same contract.
The reduction: the chunked float32 sum of squares equals the float32-per-entry reference on sizes that
span several chunks, any layout, Inf and NaN included, and never allocates more than a chunk of scratch.
No timing here: benchmarks/torch_backend_cpu.py measures the costs.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

import dgg_kernels as dgg
from dgg_kernels.backends import compiled_sumsq as CS
from dgg_kernels.backends import torch_ref as TR
from sequences import GATE_CONFIGS, bit_equal, config_id, make_sequence, run_gate

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks small enough that test-sized tensors span several of them (odd sizes: uneven tails)."""
    monkeypatch.setattr(TR, "CPU_CHUNK", 1000)
    monkeypatch.setattr(TR, "FP32_PIECE", 3000)
    monkeypatch.setattr(TR, "ROW", 64)


def _reference(g: torch.Tensor) -> float:
    """The spec: every entry rounded to float32 (float64 beyond the float32 range -> inf), squared and
    summed exactly enough (in float64) to judge float32 rounding."""
    return (g.float().double() ** 2).sum().item()


def _layouts(dtype: torch.dtype, n_rows: int, n_cols: int):
    """(name, tensor) of one dtype in every layout a monitor gradient can have, values around +-1."""
    gen = torch.Generator().manual_seed(n_rows * 7919 + n_cols)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 2 + 0.5).to(dtype)

    return [
        ("contiguous", rnd(n_rows, n_cols)),
        ("flat", rnd(n_rows * n_cols)),
        ("transposed", rnd(n_cols, n_rows).t()),
        ("permuted 3-d", rnd(3, n_rows, n_cols).permute(2, 0, 1)),
        ("gapped", rnd(n_rows, 2 * n_cols + 1)[:, 1 : 2 * n_cols + 1 : 2]),
        ("gapped rows longer than a chunk", rnd(2, 2500)[:, ::2]),
        ("expanded (overlapping)", rnd(n_cols).expand(n_rows, n_cols)),
        ("0-dim", rnd(())),
        ("empty", rnd(0, n_cols)),
    ]


# ----------------------------------------------------------------------------- reduction
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_chunked_energy_matches_the_float32_reference_in_every_layout(dtype, small_chunks):
    backend = TR.TorchBackend()
    for n_rows, n_cols in [(37, 101), (129, 61)]:  # 3737 and 7869 entries: several chunks, uneven tails
        for name, g in _layouts(dtype, n_rows, n_cols):
            got = backend._energy(g)
            assert got.dtype == torch.float64 and got.dim() == 0, name
            want = _reference(g)
            assert math.isclose(got.item(), want, rel_tol=2e-6, abs_tol=0.0), (name, got.item(), want)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_chunked_energy_keeps_inf_and_nan(dtype, small_chunks):
    backend = TR.TorchBackend()
    base = torch.randn(5003).to(dtype)
    for at in (0, 999, 1000, 4321, 5002):  # first entry, chunk edges, the tail
        g = base.clone()
        g[at] = math.inf
        assert backend._energy(g).item() == math.inf, at
        g[at] = -math.inf
        assert backend._energy(g).item() == math.inf, at
        g[(at + 1777) % g.numel()] = math.nan
        assert math.isnan(backend._energy(g).item()), at
        g = base.clone()
        g[at] = math.nan
        assert math.isnan(backend._energy(g).item()), at


def test_float64_entries_beyond_float32_become_inf(small_chunks):
    g = torch.randn(4099, dtype=torch.float64)
    g[2222] = 1e300
    assert TR.TorchBackend()._energy(g).item() == math.inf
    g[2222] = 1e-300  # rounds to float32 zero: the energy is that of the other entries
    assert math.isclose(TR.TorchBackend()._energy(g).item(), _reference(g), rel_tol=2e-6)


def test_default_chunks_on_a_gradient_of_several_chunks():
    """The shipped chunk sizes (no monkeypatch): a bf16 gradient of 3.5 chunks and a fp32 one over ROW rows."""
    backend = TR.TorchBackend()
    g16 = torch.randn(int(3.5 * TR.CPU_CHUNK) + 3).to(torch.bfloat16)
    g32 = torch.randn(5 * TR.ROW + 17)
    for g in (g16, g32, g16[::3], g32[1::2]):
        assert math.isclose(backend._energy(g).item(), _reference(g), rel_tol=1e-5)


def test_scratch_is_one_chunk_at_most_and_fp32_dense_needs_none():
    backend = TR.TorchBackend()
    backend._energy(torch.randn(4 * TR.CPU_CHUNK + 5))  # dense float32: read in place
    assert backend._scratch == {}
    backend._energy(torch.randn(100).to(torch.bfloat16))
    assert backend._scratch[torch.device("cpu")].numel() == 100  # only as much as needed
    backend._energy(torch.randn(3 * TR.CPU_CHUNK + 5).to(torch.float16))
    scratch = backend._scratch[torch.device("cpu")]
    assert scratch.numel() == TR.CPU_CHUNK and scratch.dtype == torch.float32
    backend._energy(torch.randn(3 * TR.CPU_CHUNK + 5, dtype=torch.float64))
    assert backend._scratch[torch.device("cpu")] is scratch  # reused across steps and dtypes


def test_the_traced_form_agrees(monkeypatch, small_chunks):
    """Under torch.compile tracing the backend uses one vector_norm expression (fused by the compiler);
    it agrees with the chunked eager form."""
    backend = TR.TorchBackend()
    gs = [g for _, g in _layouts(torch.bfloat16, 37, 101)] + [torch.randn(3001, dtype=torch.float64)]
    eager = [backend._energy(g).item() for g in gs]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = [backend._energy(g).item() for g in gs]
    for e, t in zip(eager, traced):
        assert math.isclose(e, t, rel_tol=1e-5, abs_tol=0.0)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_the_accelerator_form_computes_the_same_sum(dtype, monkeypatch):
    """_device_energy (CUDA and other accelerators) run on CPU tensors: its arithmetic, not its speed."""
    monkeypatch.setattr(TR, "ACCEL_CHUNK", 1000)
    scratch = torch.empty(1000)
    for name, g in _layouts(dtype, 37, 101):
        got = TR._device_energy(g, scratch).item()
        assert math.isclose(got, _reference(g), rel_tol=2e-6, abs_tol=0.0), name


def _gate(monitor, params, **kw):
    return dgg.DynamicGradientGate(monitor, params, backend="torch", **kw)


def test_nan_energy_closes_the_gate_through_every_chunk_path(small_chunks):
    for dtype in FLOATS:
        w = torch.nn.Parameter(torch.zeros(4001, dtype=dtype))
        gate = _gate(w, [w], threshold=math.inf)
        w.grad = torch.randn(4001).to(dtype)
        assert not bool(gate.step())
        w.grad[3999] = math.nan
        assert bool(gate.step()), dtype
        assert math.isnan(gate.stats()["energy"].item())
        assert torch.equal(w.grad, torch.zeros_like(w.grad))


def test_gate_energy_is_the_reference_on_a_multi_chunk_mix(small_chunks):
    a = torch.nn.Parameter(torch.zeros(70, 90))
    b = torch.nn.Parameter(torch.zeros(3333, dtype=torch.bfloat16))
    gate = _gate([a, b], [a, b], threshold=math.inf)
    a.grad = torch.randn(90, 70).t()
    b.grad = torch.randn(3333).to(torch.bfloat16)
    gate.step()
    want = _reference(a.grad) + _reference(b.grad)
    assert math.isclose(gate.stats()["energy"].item(), want, rel_tol=2e-6)


def test_overlap_reduction_uses_the_same_energy(small_chunks):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 77, bias=False).to(torch.bfloat16)
    gate = _gate(lin.weight, [lin.weight], threshold=math.inf, overlap=True)
    lin(torch.randn(5, 40).to(torch.bfloat16)).float().pow(2).sum().backward()
    want = _reference(lin.weight.grad)
    gate.step()
    assert math.isclose(gate.stats()["energy"].item(), want, rel_tol=2e-6)


# ----------------------------------------------------------------------------- compiled half-precision path
@pytest.fixture
def small_compiled(monkeypatch):
    """The compiled path on test-sized tensors (its graph has dynamic shapes: rows of 64 entries serve as well
    as 1024), with its module state restored afterwards and a spy: one entry per call, True when the compiled
    pass returned the sum (False: it declined and the chunked path ran; "mode": under a TorchDispatchMode)."""
    monkeypatch.setattr(CS, "MIN_ENTRIES", 3000)
    monkeypatch.setattr(CS, "ROW", 64)
    monkeypatch.setattr(CS, "_failure", None)
    if CS.rows_sumsq(torch.ones(3, 64, dtype=torch.bfloat16)) is None:
        pytest.skip("torch.compile does not run in this process (switched off, or no compiler): nothing to test")
    calls = []
    real = CS.rows_sumsq

    def spy(rows):
        out = real(rows)
        # "mode": called under a TorchDispatchMode (opcheck's schema check in run_gate), where it declines
        calls.append("mode" if is_in_torch_dispatch_mode() else out is not None)
        return out

    monkeypatch.setattr(CS, "rows_sumsq", spy)
    return calls


@pytest.mark.parametrize("dtype", CS.DTYPES, ids=str)
def test_compiled_energy_matches_the_float32_reference(dtype, small_compiled):
    backend = TR.TorchBackend()
    gen = torch.Generator().manual_seed(11)
    cases = [
        ("contiguous, uneven tail", torch.randn(61, 67, generator=gen)),
        ("whole rows", torch.randn(64 * 53, generator=gen)),
        ("transposed", torch.randn(71, 59, generator=gen).t()),
        ("permuted 3-d", torch.randn(3, 41, 37, generator=gen).permute(2, 0, 1)),
        ("offset view", torch.randn(4100, generator=gen)[3:]),
    ]
    for name, g in cases:
        g = (g * 3 + 0.25).to(dtype)
        n_before = len(small_compiled)
        got = backend._energy(g)
        assert small_compiled[n_before:] == [True], name  # the compiled pass ran and returned the sum
        assert got.dtype == torch.float64 and got.dim() == 0, name
        assert math.isclose(got.item(), _reference(g), rel_tol=2e-6, abs_tol=0.0), (name, got.item(), _reference(g))
    assert CS._failure is None


@pytest.mark.parametrize("dtype", CS.DTYPES, ids=str)
def test_compiled_energy_keeps_inf_and_nan(dtype, small_compiled):
    backend = TR.TorchBackend()
    base = torch.randn(64 * 60 + 23).to(dtype)
    for at in (0, 64 * 31 + 5, 64 * 60 - 1, 64 * 60 + 22):  # first entry, inside, last row, the tail
        g = base.clone()
        g[at] = math.inf
        assert backend._energy(g).item() == math.inf, at
        g[(at + 1777) % g.numel()] = math.nan
        assert math.isnan(backend._energy(g).item()), at
        g = base.clone()
        g[at] = -math.nan
        assert math.isnan(backend._energy(g).item()), at
    assert small_compiled == [True] * 12


def test_gapped_small_and_other_dtypes_take_the_chunked_path(small_compiled):
    backend = TR.TorchBackend()
    for g in [torch.randn(9000).to(torch.bfloat16)[::2], torch.randn(2999).to(torch.float16),
              torch.randn(9000, dtype=torch.float64), torch.randn(9000)[::3]]:
        assert math.isclose(backend._energy(g).item(), _reference(g), rel_tol=2e-6)
    assert small_compiled == []


def test_a_compile_failure_warns_once_and_falls_back(monkeypatch, small_compiled):
    def broken(x):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(CS, "_compiled", broken)
    backend = TR.TorchBackend()
    g = torch.randn(5000).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="compiled CPU reduction.*no C\\+\\+ compiler here"):
        got = backend._energy(g)
    assert math.isclose(got.item(), _reference(g), rel_tol=2e-6)
    assert isinstance(CS._failure, RuntimeError) and not CS.applies(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isclose(backend._energy(g).item(), _reference(g), rel_tol=2e-6)  # not tried again
    assert small_compiled == [False]


def test_a_torch_compile_that_refuses_at_construction_falls_back(monkeypatch, small_compiled):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(CS, "_compiled", None)
    monkeypatch.setattr(torch, "compile", refuse)
    g = torch.randn(5000).to(torch.float16)
    with pytest.warns(RuntimeWarning, match="not supported on this Python"):
        got = TR.TorchBackend()._energy(g)
    assert math.isclose(got.item(), _reference(g), rel_tol=2e-6) and isinstance(CS._failure, RuntimeError)


def test_with_torch_compile_switched_off_the_chunked_path_runs(small_compiled):
    """force_eager runs the compiled function eagerly: it must decline (None), not widen the whole gradient."""
    g = torch.randn(64 * 80).to(torch.bfloat16)
    with torch.compiler.set_stance("force_eager"):
        assert CS._rows_sumsq(g.view(-1, 64)) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = TR.TorchBackend()._energy(g)
    assert math.isclose(got.item(), _reference(g), rel_tol=2e-6)
    assert small_compiled == [False] and CS._failure is None


def test_past_the_recompile_limit_a_new_variant_takes_the_chunked_path(monkeypatch, small_compiled):
    """Dynamo runs a frame eagerly past its recompile limit: the compiled function declines there, that
    call is chunked, and the compiled path stays on for the variants it holds (no warning, no failure)."""
    backend = TR.TorchBackend()
    g = torch.randn(64 * 70 + 5).to(torch.bfloat16)
    backend._energy(g)  # a graph for this variant exists
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    variant = torch.randn(64 * 70 + 5).to(torch.bfloat16).requires_grad_()  # a guard the graph does not pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = backend._energy(variant)
        again = backend._energy(g)
    assert math.isclose(got.item(), _reference(variant.detach()), rel_tol=2e-6)
    assert math.isclose(again.item(), _reference(g), rel_tol=2e-6)
    assert small_compiled == [True, False, True] and CS._failure is None


def test_the_compiled_path_allocates_no_full_size_temporary(small_compiled):
    """The widening is fused into the compiled reduction: no allocation near a float32 copy of the gradient
    (4 bytes per entry) happens during a step's reduction, only a float per row at most."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.randn(64 * 500 + 7).to(torch.bfloat16)
    backend = TR.TorchBackend()
    backend._energy(g)  # compiled, scratch for the tail allocated: the profiled call is a steady-state step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = backend._energy(g)
    allocs = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocs and max(allocs) <= 4 * (g.numel() // 64 + 1), allocs  # one float per row of 64, at most
    assert math.isclose(got.item(), _reference(g), rel_tol=2e-6)
    assert small_compiled == [True, True]  # the profiled call ran the compiled pass


def test_the_overlap_path_uses_the_compiled_reduction(small_compiled):
    """overlap=True reduces each gradient in its backward hook: the compiled pass runs there too."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(67, 61, bias=False).to(torch.bfloat16)
    gate = _gate(lin.weight, [lin.weight], threshold=math.inf, overlap=True)
    lin(torch.randn(5, 67).to(torch.bfloat16)).float().pow(2).sum().backward()
    gate.step()
    assert small_compiled == [True]
    assert math.isclose(gate.stats()["energy"].item(), _reference(lin.weight.grad), rel_tol=2e-6)


def test_a_dispatch_mode_does_not_turn_the_compiled_path_off(small_compiled):
    """A step under a TorchDispatchMode (opcheck's schema check, a FlopCounterMode) uses the chunked path, and
    the compiled path still runs afterwards: dynamo, called under such a mode, ran the function eagerly for
    the rest of the process."""
    from torch.utils.flop_counter import FlopCounterMode

    w = torch.nn.Parameter(torch.zeros(61, 67, dtype=torch.bfloat16))
    gate = dgg.DynamicGradientGate(w, backend="torch", window=4)
    w.grad = torch.ones(61, 67, dtype=torch.bfloat16)
    gate.step()
    assert small_compiled == [True]
    with FlopCounterMode(display=False):
        gate.step()
    assert small_compiled == [True, "mode"]  # declined under the mode (the chunked path ran)
    gate.step()
    assert small_compiled == [True, "mode", True] and float(gate.stats()["energy"]) == 61 * 67


def test_a_gate_on_the_compiled_path_decides_as_on_the_chunked_path(monkeypatch, small_compiled):
    """The same bf16 sequence (spikes, NaN/Inf, new batches) through both reductions: decisions and counters
    exactly, statistics within float32 rounding of the energy."""
    seq = make_sequence(5, 40, [(61, 67), (4001,)], dtype=torch.bfloat16)
    runs = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(CS, "MIN_ENTRIES", 1 << 40)
        mon = [torch.nn.Parameter(torch.zeros(61, 67, dtype=torch.bfloat16)),
               torch.nn.Parameter(torch.zeros(4001, dtype=torch.bfloat16))]
        # no opcheck: its compiled run of the op calls the reduction where dynamo does not nest (it declines)
        runs.append(run_gate(dgg.DynamicGradientGate(mon, backend="torch", window=4, threshold=0.3), seq,
                             opcheck=False))
    assert len(small_compiled) > 40 and all(small_compiled)  # both gradients, every step of the first run
    a_run, b_run = runs
    assert any(r["closed"] for r in a_run) and not all(r["closed"] for r in a_run)
    for i, (a, b) in enumerate(zip(a_run, b_run)):
        assert a["closed"] == b["closed"] and a["stats"]["reuse_index"] == b["stats"]["reuse_index"], i
        e, f = a["stats"]["energy"], b["stats"]["energy"]
        assert (math.isnan(e) and math.isnan(f)) or e == pytest.approx(f, rel=1e-5), (i, e, f)


# ----------------------------------------------------------------------------- mask
def _param_grads():
    """(params, the buffers their grads live in): every dtype family and layout a params grad can have."""
    params, buffers = [], []

    def add(shape, dtype, grad, buffer=None):
        p = torch.nn.Parameter(torch.zeros(shape), requires_grad=dtype.is_floating_point or dtype.is_complex)
        if p.dtype != dtype:
            p.data = torch.zeros(shape).to(dtype)
        p.grad = grad
        params.append(p)
        buffers.append(grad if buffer is None else buffer)

    for dtype in FLOATS:
        add((3, 5), dtype, (torch.rand(3, 5) + 1).to(dtype))
        g = (torch.rand(3, 5) + 1).to(dtype)
        g[1, 2] = math.nan  # 0 * NaN is NaN: a closed step must write, not multiply
        add((3, 5), dtype, g)
        add((4, 6), dtype, (torch.rand(6, 4) + 1).to(dtype).t())  # transposed: dense, not contiguous
        buf = (torch.rand(4, 9) + 1).to(dtype)
        add((4, 4), dtype, buf[:, 1:9:2], buf)  # gapped: the gaps must stay as they were
    add((7,), torch.int32, torch.arange(1, 8, dtype=torch.int32))
    add((5,), torch.int64, torch.arange(1, 6, dtype=torch.int64))
    add((6,), torch.complex64, torch.full((6,), complex(1, math.nan), dtype=torch.complex64))
    if hasattr(torch, "float8_e4m3fn"):
        add((8,), torch.float8_e4m3fn, torch.full((8,), 1.5).to(torch.float8_e4m3fn))
        buf = torch.full((3, 8), 0.75).to(torch.float8_e5m2)
        add((3, 4), torch.float8_e5m2, buf[:, ::2], buf)
    return params, buffers


def _closing_gate(params):
    """A gate whose monitor is its own 16-entry gradient: NaN there closes it, randn keeps it open."""
    mon = torch.nn.Parameter(torch.zeros(16))
    mon.grad = torch.randn(16)
    return _gate(mon, [mon, *params], threshold=math.inf, window=2), mon


def _expected_zeroed(p, buf_before, buf_after):
    """The grad's own elements are zero, every other element of the buffer it is a view of is as it was."""
    assert bit_equal(p.grad, torch.zeros_like(p.grad)), p.grad
    # which elements of the buffer the grad covers: the grad's geometry applied to an index tensor
    offset = (p.grad.data_ptr() - buf_after.data_ptr()) // p.grad.element_size()
    covered = torch.zeros(buf_after.numel(), dtype=torch.bool)
    covered[torch.arange(buf_after.numel()).as_strided(p.grad.shape, p.grad.stride(), offset).reshape(-1)] = True
    rest = ~covered.view(buf_after.shape)
    assert bit_equal(buf_after[rest], buf_before[rest])


def test_an_open_cpu_step_writes_no_params_grad():
    params, buffers = _param_grads()
    gate, mon = _closing_gate(params)
    for _ in range(3):  # the window fills, later steps test z; threshold=inf: never closes on finite data
        versions = [b._version for b in buffers] + [mon.grad._version]
        before = [b.clone() for b in buffers] + [mon.grad.clone()]
        assert not bool(gate.step())
        after = buffers + [mon.grad]
        assert [b._version for b in after] == versions  # not written at all, not even with the same values
        assert all(bit_equal(a, b) for a, b in zip(after, before))


def test_a_closed_cpu_step_zeroes_every_element_and_nothing_else():
    params, buffers = _param_grads()
    gate, mon = _closing_gate(params)
    assert not bool(gate.step())
    before = [b.clone() for b in buffers]
    mon.grad[3] = math.nan
    assert bool(gate.step())
    assert torch.equal(mon.grad, torch.zeros(16))
    for p, b0, b1 in zip(params, before, buffers):
        _expected_zeroed(p, b0, b1)


@pytest.mark.parametrize("closed", [False, True])
def test_the_device_form_keeps_the_contract(closed, monkeypatch):
    """What accelerators and traced code run (masked_fill_ with the 0-dim decision, no host read): forced
    on CPU here by making the decision unreadable on the host."""
    monkeypatch.setattr(TR, "host_value", lambda decision: None)
    params, buffers = _param_grads()
    gate, mon = _closing_gate(params)
    assert not bool(gate.step())
    before = [b.clone() for b in buffers]
    if closed:
        mon.grad[0] = math.nan
    assert bool(gate.step()) == closed
    for p, b0, b1 in zip(params, before, buffers):
        if closed:
            _expected_zeroed(p, b0, b1)
        else:
            assert bit_equal(b1, b0)


def test_the_host_read_happens_only_for_plain_cpu_tensors_outside_tracing(monkeypatch):
    closed, open_ = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    assert TR.host_value(closed) is True and TR.host_value(open_) is False
    assert TR.host_value(torch.zeros((), dtype=torch.bool, device="meta")) is None  # a device: stay there

    class Sub(torch.Tensor):
        pass

    assert TR.host_value(open_.as_subclass(Sub)) is None  # fake, functional, DTensor: never read
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert TR.host_value(closed) is None


def test_a_traced_mask_uses_the_device_form(monkeypatch):
    """Under torch.compile tracing the mask must not branch on the decision: it goes through zero_where."""
    calls = []
    real = TR.zero_where
    monkeypatch.setattr(TR, "zero_where", lambda g, d: (calls.append(g), real(g, d)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.full((5,), math.nan)
    TR.TorchBackend().mask(torch.ones((), dtype=torch.bool), [g])
    assert len(calls) == 1 and torch.equal(g, torch.zeros(5))


def test_write_zeros_handles_every_byte_size():
    for t in [torch.full((3,), 7, dtype=torch.uint8), torch.full((4,), -1, dtype=torch.int16),
              torch.full((2, 3), math.nan).t(), torch.full((5,), complex(math.nan, 1), dtype=torch.complex128),
              torch.ones(4, dtype=torch.bool)]:
        TR._write_zeros(t)
        assert bit_equal(t, torch.zeros_like(t)), t.dtype


@pytest.mark.parametrize("cfg", GATE_CONFIGS + [dict(window=3, threshold=0.3, statistic="energy+increment",
                                                     target_kl=0.01, kl_factor=1.5)], ids=config_id)
def test_the_host_finalize_matches_the_tensor_finalize_step_for_step(cfg, monkeypatch):
    """On CPU the finalize runs on host numbers (finalize_host); accelerators and traced code run the tensor
    form (finalize_reference).  Same sequence (spikes, NaN/Inf, new batches, KLs): decisions and counters
    exactly, float stats within float64-vs-order rounding."""
    seq = make_sequence(17, 90, [(13, 7), (5,)])
    kls = [float(x) for x in (torch.rand(200, generator=torch.Generator().manual_seed(3)) * 0.03)]
    runs = []
    for host in (True, False):
        if not host:
            monkeypatch.setattr(TR, "host_state", lambda state: False)
        mon = [torch.nn.Parameter(torch.zeros(13, 7)), torch.nn.Parameter(torch.zeros(5))]
        gate = dgg.DynamicGradientGate(mon, backend="torch", **cfg)
        orig = gate.step

        def step(gate=gate, orig=orig, it=iter(kls)):
            gate.observe_kl(next(it))
            return orig()

        gate.step = step
        runs.append(run_gate(gate, seq))
    host, tensor = runs
    assert len(host) == len(tensor) > 50
    assert any(r["closed"] for r in host) and not all(r["closed"] for r in host)
    for i, (a, b) in enumerate(zip(host, tensor)):
        assert a["closed"] == b["closed"] and a["should_stop"] == b["should_stop"], i
        for k in ("reuse_index", "accepted", "closed_total", "closed"):
            assert a["stats"][k] == b["stats"][k], (i, k)
        for k, v in a["stats"].items():
            w = b["stats"][k]
            if isinstance(v, float) and not (math.isnan(v) and math.isnan(w)):
                assert v == pytest.approx(w, rel=1e-6, abs=1e-9 * (1 + abs(a["stats"]["energy"]))), (i, k, v, w)

