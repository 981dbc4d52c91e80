"""The caches on the step path cannot go stale (docs/semantics.md, "Caches on the step path").

Each cache is checked against what it depends on:

- the mask plan (triton and cuda backends): which byte spans a closed gate zeroes;
- the params input check, cached per layout;
- overlap=True's reuse of the reduction the post-accumulate-grad hook did;
- attach()'s view of the optimizer's param groups;
- the Triton launch device, and the prebuilt CUDA extension's tables.

The layout fuzz draws sequences of gradient layouts (views into one shared
byte arena: contiguous, transposed and gapped views, dtype swaps at the same
address, grads appearing and disappearing, a new tensor every step) and checks
after every step, byte for byte against a copy of the arena taken before the
step: closed, every grad is zero and every other byte is as it was; open,
nothing changed; refused, nothing changed and the error names the right
tensor.  The mutation tests weaken a key and show the same checks then fail.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import inputs
from dgg_kernels.backends import cuda_ext
from dgg_kernels.backends import triton_launch as TL
from dgg_kernels.backends.base import MaskPlan
from contract import assert_unchanged, backends_for, snapshot
from sequences import bit_equal

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (pip install -e '.[test]')")
from hypothesis import Phase, currently_in_test_context, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_fuzz import _examples  # noqa: E402  (the fuzz suite's profiles)

CPU_BACKENDS = backends_for("cpu")
needs_triton = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton interpreter unavailable")
E8M0 = getattr(torch, "float8_e8m0fnu", None)
ARENA_BYTES = 1024


# ----------------------------------------------------------------------------- the checker
from contract import KEY_FORMS, key_form_of  # noqa: E402


def test_ci_builds_the_cpp_key_form():
    """Where CI runs, the C++ form is built (else its invalidation tests would skip unseen)."""
    if os.environ.get("CI") != "true":
        pytest.skip("not CI")
    assert inputs._host_module is not None


def test_the_cpp_form_returns_the_grads_and_keys_that_hold_every_field():
    """The C++ read gives the same grad objects as .grad, in params order; its check key changes with each
    field the input check reads (presence, dtype, contiguity, strides) and not with the address, its plan key
    with each field the mask plan reads (address, byte size, contiguity, strides)."""
    if inputs._host_module is None:
        pytest.skip("dgg_kernels._host is not built here")
    read = inputs._host_module.read
    buf = torch.zeros(64)
    ps = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    ps[0].grad, ps[2].grad = buf[:16].view(4, 4), buf[16:32].view(4, 4)
    grads, check, plan, plain = read(ps)
    assert plain and len(grads) == 2 and grads[0] is ps[0].grad and grads[1] is ps[2].grad
    # variant -> (changes the check key, changes the plan key)
    variants = {
        "moved": (lambda: buf[32:48].view(4, 4), False, True),
        "dtype": (lambda: buf[:16].view(torch.float16).view(4, 8), True, False),  # the same address and bytes
        "transposed": (lambda: buf[:16].view(4, 4).t(), True, True),
        "gapped": (lambda: buf[:20].view(4, 5)[:, :4], True, True),
        "smaller": (lambda: buf[:8].view(2, 4), False, True),
    }
    for name, (make, check_changes, plan_changes) in variants.items():
        ps[0].grad = None
        g = make()
        ps[0].data = torch.zeros(g.shape, dtype=g.dtype)  # a grad of another dtype needs a param of it
        ps[0].grad = g
        _, c, p_, _ = read(ps)
        assert (c != check, p_ != plan) == (check_changes, plan_changes), name
        ps[0].grad = None
        ps[0].data = torch.zeros(4, 4)
        ps[0].grad = buf[:16].view(4, 4)
        assert read(ps)[1:3] == (check, plan), name
    ps[0].grad, ps[1].grad = None, buf[:16].view(4, 4)  # the same grads, another param has one
    assert read(ps)[1] != check
    ps[1].grad = buf[:16].view(4, 4).to_sparse()
    assert read(ps)[3] is False  # not plain: the Python form runs and names it


def _gate(params, backend, device="cpu"):
    """A gate that closes exactly when its monitor gradient is NaN (no finite z reaches 1e9)."""
    mon = torch.nn.Parameter(torch.empty(16, device=device))
    mon.grad = torch.empty(16, device=device)
    gate = dgg.DynamicGradientGate(mon, [mon, *params], backend=backend, window=2, threshold=1e9)
    return gate, mon


def _view(arena: torch.Tensor, spec: dict) -> torch.Tensor:
    """The gradient ``spec`` describes, as a view into ``arena`` (uint8)."""
    dtype, off, rows, cols = spec["dtype"], spec["offset"], spec["rows"], spec["cols"]
    base = arena.view(dtype)
    if spec["kind"] == "contiguous":
        return torch.as_strided(base, (rows, cols), (cols, 1), off)
    if spec["kind"] == "transposed":  # dense, not contiguous
        return torch.as_strided(base, (rows, cols), (1, rows), off)
    return torch.as_strided(base, (rows, cols), (cols + spec["gap"], 1), off)  # gapped


def _expected_after_close(before: torch.Tensor, grads) -> torch.Tensor:
    want = before.clone()
    for g in grads:
        if g is not None:
            _view(want, g).zero_()
    return want


def play_layouts(backend: str, steps: list, device: str = "cpu") -> None:
    """Play ``steps`` (per step: ``close`` and one spec or None per param) and check every byte after each."""
    n = len(steps[0]["grads"])
    params = [torch.nn.Parameter(torch.empty(1, device=device)) for _ in range(n)]
    gate, mon = _gate(params, backend, device)
    gen = torch.Generator().manual_seed(0)
    arena = torch.empty(ARENA_BYTES, dtype=torch.uint8, device=device)
    for k, step in enumerate(steps):
        arena.copy_(torch.randint(1, 255, (ARENA_BYTES,), dtype=torch.uint8, generator=gen))  # no zero byte
        for p, spec in zip(params, step["grads"]):
            p.grad = None
            if spec is not None:
                p.data = torch.empty((spec["rows"], spec["cols"]), dtype=spec["dtype"], device=device)
                p.grad = _view(arena, spec)  # a new tensor every step, maybe at the last step's address
        # in place: the monitor grad keeps its address, so only the params' layouts can change a key
        mon.grad.copy_(torch.full((16,), math.nan) if step["close"] else torch.randn(16, generator=gen))
        before = arena.clone()
        refused = [i for i, s in enumerate(step["grads"]) if s is not None and s["dtype"] is E8M0]
        if currently_in_test_context():
            note(f"step {k}: {step}")
        if refused:
            snap = snapshot(gate, [mon, *params])
            with pytest.raises(TypeError, match=rf"params\[{1 + refused[0]}\]\.grad has dtype"):
                gate.step()
            assert_unchanged(gate, snap)
            assert bit_equal(arena, before), f"step {k}: a refused step wrote the arena"
            continue
        closed = bool(gate.step())
        assert closed == step["close"], k
        want = _expected_after_close(before, step["grads"]) if closed else before
        assert bit_equal(arena, want), (
            f"step {k} ({'closed' if closed else 'open'}): bytes {torch.nonzero(arena != want).flatten().tolist()} "
            "differ from the reference")
        if closed:
            assert bit_equal(mon.grad, torch.zeros_like(mon.grad))


# ----------------------------------------------------------------------------- strategies
LAYOUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


@st.composite
def grad_specs(draw, refusals: bool):
    dtypes = LAYOUT_DTYPES + ([E8M0] if refusals and E8M0 is not None else [])
    dtype = draw(st.sampled_from(dtypes))
    size = torch.empty(0, dtype=dtype).element_size()
    # sizes from a small set (and an odd one), so byte sizes of different layouts often coincide
    rows, cols = draw(st.sampled_from([2, 4, 8, 3])), draw(st.sampled_from([2, 4, 8, 1]))
    kind = draw(st.sampled_from(["contiguous", "transposed", "gapped"]))
    gap = draw(st.integers(1, 3))
    extent = rows * (cols + gap) * size
    # few distinct byte offsets, so layouts often land on the address (and byte size) an earlier one had
    offset_bytes = draw(st.sampled_from([0, 0, 16, 64, 2, 1]))
    offset_bytes = min(offset_bytes - offset_bytes % size, ARENA_BYTES - extent)
    return dict(kind=kind, dtype=dtype, offset=offset_bytes // size, rows=rows, cols=cols, gap=gap)


def _same_bytes_variants(spec: dict) -> list:
    """Other layouts with ``spec``'s address, dtype and element count (hence byte size): the swaps a cache keyed
    on less than the whole layout confuses."""
    n = spec["rows"] * spec["cols"]
    shapes = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    return [dict(spec, kind=k, rows=r, cols=c, gap=g) for k in ("contiguous", "transposed", "gapped")
            for r, c in shapes for g in (1, 2)
            if (k, r, c, g) != (spec["kind"], spec["rows"], spec["cols"], spec["gap"])
            and spec["offset"] * torch.empty(0, dtype=spec["dtype"]).element_size() + r * (c + g) * 2 <= ARENA_BYTES]


@st.composite
def layout_sequences(draw, refusals: bool = True):
    """Per step, per param: a new tensor with last step's layout, another layout of the same bytes, a dtype
    swap, a fresh layout, or no grad; the gate closes or opens at random."""
    n = draw(st.integers(1, 3))
    prev = [draw(st.one_of(st.none(), grad_specs(refusals))) for _ in range(n)]
    steps = [dict(close=draw(st.booleans()), grads=prev)]
    for _ in range(draw(st.integers(1, 7))):
        # usually one param changes and the others get new tensors of their last layout (so only that change
        # can tell a key apart); sometimes every param changes
        changing = set(range(n)) if draw(st.booleans()) and draw(st.booleans()) else {draw(st.integers(0, n - 1))}
        grads = []
        for i, spec in enumerate(prev):
            move = draw(st.sampled_from(["same_bytes", "same_bytes", "fresh", "none"])) if i in changing else "keep"
            if spec is not None and move == "keep":
                spec = dict(spec)
            elif spec is not None and move == "same_bytes" and _same_bytes_variants(spec):
                spec = draw(st.sampled_from(_same_bytes_variants(spec)))
            elif move == "none" or (move == "keep" and spec is None):
                spec = None
            else:
                spec = draw(grad_specs(refusals))
            grads.append(spec)
        steps.append(dict(close=draw(st.booleans()), grads=grads))
        prev = [g if g is None or g["dtype"] is not E8M0 else None for g in grads]
    return steps


# ----------------------------------------------------------------------------- the layout fuzz
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_examples(30)
@given(steps=layout_sequences())
@pytest.mark.parametrize("key_form", KEY_FORMS)  # not a fixture: hypothesis runs many examples per call
def test_layout_sequences_zero_exactly_the_grads(key_form, backend, steps):
    with key_form_of(key_form):
        play_layouts(backend, steps)


# The two layouts a plan keyed on (address, byte size, contiguity) confuses: a dense transposed view and a
# gapped view with the same address and byte size (16 x 4 bytes each).
TRANSPOSED = dict(kind="transposed", dtype=torch.float32, offset=0, rows=4, cols=4, gap=1)
GAPPED = dict(kind="gapped", dtype=torch.float32, offset=0, rows=2, cols=8, gap=2)  # 2 x 8 of a 2 x 10 block
assert GAPPED["rows"] * GAPPED["cols"] == TRANSPOSED["rows"] * TRANSPOSED["cols"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key_form", KEY_FORMS, indirect=True)
def test_transposed_then_gapped_view_at_the_same_address(key_form, backend):
    """A dense transposed grad replaced by a gapped view at the same address with the same byte size."""
    play_layouts(backend, [dict(close=True, grads=[TRANSPOSED]), dict(close=True, grads=[GAPPED])])


@pytest.mark.skipif(E8M0 is None, reason="torch without float8_e8m0fnu")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key_form", KEY_FORMS, indirect=True)
def test_a_refused_dtype_at_an_accepted_grads_address_is_refused(key_form, backend):
    """float8_e8m0fnu (no zero) at the address and byte size of an accepted float8_e4m3fn grad."""
    ok = dict(kind="contiguous", dtype=torch.float8_e4m3fn, offset=0, rows=3, cols=5, gap=1)
    play_layouts(backend, [dict(close=True, grads=[ok]), dict(close=True, grads=[dict(ok, dtype=E8M0)])])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key_form", KEY_FORMS, indirect=True)
def test_the_error_names_the_param_whose_grad_is_refused(key_form, backend):
    """The set of present grads changes while the addresses stay: the error names params[2], not params[1]."""
    a, b = torch.nn.Parameter(torch.empty(4, 3)), torch.nn.Parameter(torch.empty(4, 3))
    gate, mon = _gate([a, b], backend)
    buf = torch.randn(3, 4)
    mon.grad = torch.randn(16)
    a.grad = buf.t()  # non-contiguous, accepted
    gate.step()
    a.grad = None
    b.grad = buf[:1].expand(3, 4).t()  # overlapping memory at the same address and byte size, not contiguous
    snap = snapshot(gate, [mon, a, b])
    with pytest.raises(ValueError, match=r"params\[2\]\.grad has overlapping memory"):
        gate.step()
    assert_unchanged(gate, snap)


# ----------------------------------------------------------------------------- mutation: weaker keys fail
def _weak_plan_key(fields):
    return (fields.ptrs, fields.nbytes, fields.contiguous)  # no shape or strides


def _weak_check_key(present, types, fields):
    return (present, fields.ptrs, fields.nbytes, fields.contiguous)  # no dtype


@needs_triton
def test_a_plan_key_without_shape_and_strides_fails_the_checks(monkeypatch):
    monkeypatch.setattr(inputs, "_host_module", None)  # the Python form's keys, weakened
    monkeypatch.setattr(MaskPlan, "key_for", staticmethod(_weak_plan_key))
    with pytest.raises(AssertionError, match="differ from the reference"):
        test_transposed_then_gapped_view_at_the_same_address("python", "triton")

    # no shrinking: finding the failing example is the point, making it small would cost minutes
    @settings(test_layout_sequences_zero_exactly_the_grads._hypothesis_internal_use_settings, max_examples=300,
              phases=[Phase.generate])
    @given(steps=layout_sequences())
    def fuzz(steps):
        play_layouts("triton", steps)

    with pytest.raises(AssertionError, match="differ from the reference"):
        fuzz()  # the layout fuzz finds it too (stops at the first failing example)


@pytest.mark.skipif(E8M0 is None, reason="torch without float8_e8m0fnu")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_check_key_without_dtype_fails_the_checks(backend, monkeypatch):
    monkeypatch.setattr(inputs, "_host_module", None)  # the Python form's keys, weakened
    monkeypatch.setattr(inputs.ParamGrads, "check_key", staticmethod(_weak_check_key))
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_a_refused_dtype_at_an_accepted_grads_address_is_refused("python", backend)


# ----------------------------------------------------------------------------- overlap
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overlap_sees_a_gradient_swapped_through_data(backend):
    """``grad.data = ...`` after backward keeps the tensor object and its version counter; the address moves,
    and step() reduces the new data (a NaN there closes the gate)."""
    w = torch.nn.Parameter(torch.randn(9, 4))
    gate = dgg.DynamicGradientGate(w, backend=backend, overlap=True, window=2, threshold=1e9)
    for step in range(3):
        (w * torch.randn(9, 4)).sum().backward()
        if step == 2:
            w.grad.data = torch.full((9, 4), math.nan)
        closed = bool(gate.step())
        assert closed == (step == 2), step
        w.grad = None


def test_decision_group_without_init_is_refused():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(3)), decision_group=object())


# ----------------------------------------------------------------------------- optimizer groups
@pytest.mark.parametrize("fused", [True, False])
def test_param_groups_added_after_attach_are_noticed(fused):
    w, extra = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    gate = dgg.DynamicGradientGate(w, backend="torch", window=2, threshold=1e9)
    handle = gate.attach(opt)
    opt.add_param_group({"params": [extra], "fused": fused})
    w.grad, extra.grad = torch.randn(5, 3), torch.randn(4)
    gate.step()
    before = (w.detach().clone(), extra.detach().clone())
    with pytest.raises(RuntimeError, match=r"param groups of this AdamW changed after gate.attach\(\)"):
        opt.step()
    assert bit_equal(w, before[0]) and bit_equal(extra, before[1]) and not opt.state
    handle.remove()
    if fused:
        gate.attach(opt)  # attached again: the new group is watched too
        opt.step()
        assert not bit_equal(w, before[0])
    else:
        with pytest.warns(UserWarning, match="not a fused optimizer"):
            gate.attach(opt)


def test_rebuilt_groups_holding_the_same_params_are_the_same_groups():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    gate = dgg.DynamicGradientGate(w, backend="torch", window=2, threshold=1e9)
    gate.attach(opt)
    opt.load_state_dict(opt.state_dict())  # new group dicts, same params (accelerate does this)
    w.grad = torch.randn(5, 3)
    gate.step()
    opt.step()


# ----------------------------------------------------------------------------- launch device, extension tables
def test_triton_launches_run_under_a_guard_for_the_gates_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    entered = []

    class Guard:
        def __init__(self, index):
            entered.append(index)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    with TL._on(torch.device("cuda", 1)):
        pass
    with TL._on(torch.device("cuda", 0)):
        pass
    with TL._on(torch.device("cpu")):
        pass
    assert entered == [1]


@needs_triton
def test_every_triton_launch_site_is_guarded(monkeypatch):
    import contextlib

    seen = []
    monkeypatch.setattr(TL, "_on", lambda device: seen.append(device) or contextlib.nullcontext())
    w = torch.nn.Parameter(torch.randn(8))
    gate = dgg.DynamicGradientGate(w, backend="triton", window=2)
    w.grad = torch.randn(8)
    gate.step()  # step (reduce + finalize) and mask
    assert len(seen) == 2 and all(d == w.device for d in seen)


class _StaleModule:
    MAX_STEP_TENSORS = cuda_ext.MAX_STEP_TENSORS
    STATE_LAYOUT = (1, 2, 3)
    __file__ = "stale/_C.so"


@pytest.mark.parametrize("build", [True, False])
def test_every_way_of_loading_the_extension_checks_its_state_layout(build, monkeypatch):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_ext_error", None)
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: _StaleModule)
    with pytest.raises(RuntimeError, match=r"stale \(STATE_LAYOUT \(1, 2, 3\) != "):
        cuda_ext.load_extension(build=build)
    assert cuda_ext._ext is None


class _PybindModule:
    """An extension built before its kernels were registered as dgg:: ops: the right tables, no MASK_THREADS."""
    MAX_STEP_TENSORS = cuda_ext.MAX_STEP_TENSORS
    STATE_LAYOUT = (dgg.state.N_INTS, dgg.state.N_STATS, dgg.state.N_HYPER, dgg.state.N_ACC)
    __file__ = "old/_C.so"


def test_an_extension_without_the_op_registrations_is_refused(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_ext_error", None)
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: _PybindModule)
    with pytest.raises(RuntimeError, match="no MASK_THREADS"):
        cuda_ext.load_extension(build=False)
    assert cuda_ext._ext is None


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda") if torch.cuda.is_available() else ["triton"])
@_examples(10)
@given(steps=layout_sequences())
def test_layout_sequences_zero_exactly_the_grads_gpu(backend, steps):
    play_layouts(backend, steps, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_gate_on_the_second_device_launches_there_gpu():
    with torch.cuda.device(0):
        w = torch.nn.Parameter(torch.zeros(4099, 33, device="cuda:1"))
        gates = {b: dgg.DynamicGradientGate(w, backend=b, window=2, threshold=0.1) for b in ("torch", "triton")}
        for step in range(6):
            g = torch.randn(4099, 33, device="cuda:1") * (1 + 5 * (step == 4))
            out = {}
            for b, gate in gates.items():
                w.grad = g.clone()
                out[b] = (bool(gate.step()), gate.stats()["energy"].item())
            assert out["torch"][0] == out["triton"][0]
            assert math.isclose(out["torch"][1], out["triton"][1], rel_tol=1e-4)
