"""Property-based fuzzing of the gate's contract (docs/semantics.md), on every backend here.

Hypothesis draws whole scenarios: gate settings (every statistic, window mode,
windows 2-6, thresholds 0-3 and inf, max_reuse), 1-3 monitor tensors and 0-2
more params (shapes with 0 and odd sizes; float32, bfloat16, float16,
float64; contiguous, transposed and gapped views), and a sequence of steps
with drifting scales and NaN/+-Inf/overflow injections, new_batch() and new_pass() calls and
state_dict round trips (torch.save/torch.load(weights_only=True) into a new
gate).  Every backend available on the device plays it:

- the torch backend against the plain-Python model (tests/semantics_model.py),
  every other backend against the torch backend, step for step: decisions,
  should_stop and counters exactly, statistics within float32 rounding;
- grads untouched (bit for bit, with the buffer a view lives in) when open,
  zero when closed (and nothing else in their buffer);
- refused inputs: every backend refuses with the same exception type and
  message, and nothing is modified; settings one backend refuses at
  construction, every backend (and GateConfig) refuses with the same type.

A decision is compared exactly unless the model's z lies within float32
rounding of the threshold (the spec allows either there); the comparison
stops at such a step, since the trajectories may part.

Profiles (DGG_FUZZ_PROFILE): "ci" (default; derandomized, so CI runs the same
examples every time, bounded to about a minute on 2 cores) and "dev"
(random, 10x the examples: run it locally after changing a kernel or the
semantics).  The GPU variants (marked gpu) run the same on device="cuda"
with the torch, triton and cuda backends.
"""
from __future__ import annotations

import io
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="needs hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dgg_kernels as dgg  # noqa: E402
from dgg_kernels.config import STATISTICS, WINDOW_MODES  # noqa: E402
from contract import (  # noqa: E402
    DEVICES, REFUSED, assert_unchanged, backends_for, break_input, opcheck_gate_ops, snapshot, zeroed_in_place,
)
from semantics_model import GateModel, energy_of  # noqa: E402
from sequences import assert_stats_match, bit_equal  # noqa: E402

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
CI_EXAMPLES = 30  # the ci profile's nominal budget; each test scales its own from it
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=10 * CI_EXAMPLES, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("DGG_FUZZ_PROFILE", "ci"))


def _examples(n_ci: int):
    """This test's example budget: ``n_ci`` in the ci profile, scaled with the profile otherwise."""
    return settings(PROFILE, max_examples=max(1, n_ci * PROFILE.max_examples // CI_EXAMPLES))


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EXTRA_DTYPES = DTYPES + [torch.float8_e4m3fn, torch.complex64]
INJECT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e20}  # huge: its square overflows float32
FLT_MAX = 3.4028234663852886e38


# ----------------------------------------------------------------------------- strategies
@st.composite
def tensor_specs(draw, dtypes=DTYPES):
    shape = tuple(draw(st.lists(st.integers(0, 37), min_size=1, max_size=2)))
    layouts = ["contiguous", "gapped"] + (["transposed"] if len(shape) == 2 else [])
    return dict(shape=shape, dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(layouts)))


configs = st.fixed_dictionaries(dict(
    statistic=st.sampled_from(STATISTICS),
    window=st.integers(2, 6),
    threshold=st.one_of(st.sampled_from([0.0, 0.1, 0.3, 0.5, 2.0, math.inf]), st.floats(0.0, 3.0)),
    eps=st.sampled_from([1e-8, 1e-3]),
    max_reuse=st.integers(1, 6),
    window_mode=st.sampled_from(WINDOW_MODES),
    target_kl=st.one_of(st.none(), st.sampled_from([0.005, 0.01, 0.05])),
    kl_factor=st.sampled_from([1.0, 1.5]),
))


@st.composite
def events(draw):
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return ("new_batch",)
    if kind == 1:
        return ("roundtrip",)
    if kind in (2, 3):  # passes of several steps (and, after new_batch, a switch between the two modes)
        return ("new_pass",)
    inject = None
    if draw(st.integers(0, 7)) == 0:
        inject = (draw(st.integers(0, 2)), draw(st.floats(0.0, 0.999)), draw(st.sampled_from(sorted(INJECT))))
    # the KL given to the step (observe_kl), or None: none given (0.0 as a Python number with a KL stop)
    kl = draw(st.one_of(st.none(), st.floats(-0.01, 0.12)))
    return ("step", draw(st.floats(-3.0, 3.0)), inject, kl)


def _kl_of(ev) -> float | None:
    """The KL a step event gives, as the gate stores it (rounded to float32), or None."""
    kl = ev[3] if len(ev) > 3 else None
    return None if kl is None else float(torch.tensor(kl, dtype=torch.float32))


def _observe(sc, gate, ev, device) -> None:
    """Give the gate the step's KL: a float32 tensor, or 0.0 as a number when a KL stop needs one."""
    kl = _kl_of(ev)
    if kl is not None:
        gate.observe_kl(torch.tensor(kl, dtype=torch.float32, device=device))
    elif sc["cfg"].get("target_kl") is not None:
        gate.observe_kl(0.0)


@st.composite
def scenarios(draw, min_events=8, max_events=24):
    return dict(
        cfg=draw(configs),
        monitor=draw(st.lists(tensor_specs(), min_size=1, max_size=3)),
        extra=draw(st.lists(tensor_specs(EXTRA_DTYPES), max_size=2)),
        events=draw(st.lists(events(), min_size=min_events, max_size=max_events)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ----------------------------------------------------------------------------- playing a scenario
def _values(spec, gen, scale):
    """A logical gradient of ``spec`` in float32: Gaussian times ``scale``, never all zeros unless empty."""
    return torch.randn(spec["shape"], generator=gen) * scale


def _as_layout(x: torch.Tensor, spec, gen, device) -> torch.Tensor:
    """``x`` (already in its dtype) as a grad with ``spec``'s layout, on ``device``."""
    if spec["layout"] == "transposed":
        return x.t().contiguous().t().to(device)
    if spec["layout"] == "gapped":  # every other entry of a wider buffer; the rest must survive a close
        shape = spec["shape"]
        buf = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen).to(x.dtype)
        buf[..., ::2] = x
        return buf.to(device)[..., ::2]
    return x.to(device)


def _grads_for_step(sc, step, scale_log, inject, device):
    """The monitor and extra grads of one step (the same on every backend), and the logical monitor grads."""
    gen = torch.Generator().manual_seed(sc["seed"] * 1000 + step)
    scale = 10.0 ** scale_log
    mon = []
    for spec in sc["monitor"]:
        s = min(scale, 30.0) if spec["dtype"] == torch.float16 else scale  # float16 tops out at 65504
        mon.append(_values(spec, gen, s).to(spec["dtype"]))
    if inject is not None:
        t = mon[inject[0] % len(mon)].view(-1)
        if t.numel():
            t[int(inject[1] * t.numel())] = INJECT[inject[2]]
    laid = [_as_layout(x, spec, gen, device) for x, spec in zip(mon, sc["monitor"])]
    extra = []
    for spec in sc["extra"]:
        has_grad = bool(torch.rand((), generator=gen) > 0.2)
        x = (torch.randn(spec["shape"], generator=gen) + 3.0).to(spec["dtype"])  # never 0, even in float8
        extra.append(_as_layout(x, spec, gen, device) if has_grad else None)
    return laid, mon, extra


def _new_gate(sc, backend, monitor, extra):
    return dgg.DynamicGradientGate(monitor, [*monitor, *extra], backend=backend, **sc["cfg"])


def _params(sc, device):
    monitor = [torch.nn.Parameter(torch.empty(s["shape"], dtype=s["dtype"], device=device)) for s in sc["monitor"]]
    extra = [torch.nn.Parameter(torch.empty(s["shape"], dtype=s["dtype"], device=device)) for s in sc["extra"]]
    return monitor, extra


def _roundtrip(sc, gate, backend, monitor, extra):
    buf = io.BytesIO()
    torch.save(gate.state_dict(), buf)
    buf.seek(0)
    fresh = _new_gate(sc, backend, monitor, extra)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def play(sc, backend, device):
    """One record per step: closed, should_stop, stats (Python numbers), grads_ok."""
    monitor, extra = _params(sc, device)
    gate = _new_gate(sc, backend, monitor, extra)
    records = []
    for t, ev in enumerate(sc["events"]):
        if ev[0] == "new_batch":
            gate.new_batch()
            continue
        if ev[0] == "new_pass":
            gate.new_pass()
            continue
        if ev[0] == "roundtrip":
            gate = _roundtrip(sc, gate, backend, monitor, extra)
            continue
        laid, _, extra_grads = _grads_for_step(sc, t, ev[1], ev[2], device)
        for p, g in zip(monitor, laid):
            p.grad = g
        for p, g in zip(extra, extra_grads):
            p.grad = g
        grads = [p.grad for p in monitor + extra]
        bases = [None if g is None else (g if g._base is None else g._base).clone() for g in grads]
        _observe(sc, gate, ev, device)
        if not records:
            opcheck_gate_ops(gate)  # the ops on this scenario's first step, real gradients and layouts
        closed = bool(gate.step().item())
        ok = True
        for p, g, base in zip(monitor + extra, grads, bases):
            if g is None:
                ok &= p.grad is None
                continue
            ok &= p.grad is g
            if closed:
                ok &= zeroed_in_place(g, base)
            else:
                ok &= bit_equal(g if g._base is None else g._base, base)
        stats = {k: v.item() for k, v in gate.stats().items()}
        records.append(dict(closed=closed, should_stop=gate.should_stop(), stats=stats, grads_ok=ok))
    return records


def model_records(sc, events=None):
    """The plain-Python model's record per step (energies from the logical grads, entries rounded to float32):
    (step dict, stop flag, counters (reuse index, accepted, closed total)).  Events other than "step" and
    "new_batch" and "new_pass" (round trips, refused steps) change nothing."""
    m = GateModel(**sc["cfg"])
    out = []
    for t, ev in enumerate(sc["events"] if events is None else events):
        if ev[0] == "new_batch":
            m.new_batch()
        elif ev[0] == "new_pass":
            m.new_pass()
        elif ev[0] == "step":
            _, mon, _ = _grads_for_step(sc, t, ev[1], ev[2], "cpu")
            rec = m.step(energy_of(mon), _kl_of(ev) or 0.0)
            out.append((rec, m.stop, (m.reuse, m.accepted, m.closed_total)))
    return out


def _ambiguous(w: dict, reuse: int, threshold: float) -> bool:
    """The model's decision could flip within float32 rounding: a z within its tolerance of the threshold
    (or an energy at the edge of the float32 range)."""
    e = w["energy"]
    if math.isfinite(e) and e > FLT_MAX * (1 - 1e-4):
        return True
    if reuse <= 1 or not math.isfinite(e) or math.isinf(threshold):
        return False
    d = 2e-5 * w["err_scale"]
    if d == 0:  # every energy so far is exactly 0 (empty or all-zero monitors): no rounding anywhere
        return False
    for test in ("energy", "increment"):
        z, std = w["z_" + test], w["std_" + test]
        if not w["full_" + test] or math.isnan(z):
            continue
        tol = d * (1.0 + abs(z)) / (abs(std) + 1e-8) + 1e-5 + 2e-5 * abs(z)
        if abs(z - threshold) <= tol:
            return True
    return False


def _counts(record) -> tuple:
    s = record["stats"]
    return s["reuse_index"], s["accepted"], s["closed_total"]


def _comparable(sc, want) -> int:
    """How many steps can be compared exactly: up to the first whose decision is within rounding."""
    for i, (w, _, counts) in enumerate(want):
        if _ambiguous(w, counts[0], sc["cfg"]["threshold"]):
            note(f"step {i}: z within rounding of the threshold; decisions compared up to here")
            return i
    return len(want)


def check_scenario(sc, device):
    note(f"scenario: {sc}")
    want = model_records(sc)
    runs = {b: play(sc, b, device) for b in backends_for(device)}
    ref = runs["torch"]
    for backend, got in runs.items():  # each backend's own effects hold at every step
        for i, g in enumerate(got):
            assert g["grads_ok"], (backend, i, "grads not untouched when open / zeroed when closed")
    n = _comparable(sc, want)
    closed = sum(r["closed"] for r in ref)
    event(f"steps: {len(ref)}")
    event("closed steps: " + ("none" if not closed else "all" if closed == len(ref) else "some"))
    event("compared: " + ("all steps" if n == len(want) else "cut at a step within rounding of the threshold"))
    for i in range(n):
        w, stop, counts = want[i]
        r = ref[i]
        assert r["closed"] == w["closed"], ("torch vs model", i, r, w)
        assert r["should_stop"] == stop, ("torch vs model", i)
        assert _counts(r) == counts, ("torch vs model", i)
        assert_stats_match(r["stats"], w, i, w["err_scale"])
        for backend, got in runs.items():
            g = got[i]
            if backend == "torch":
                continue
            assert g["closed"] == r["closed"] and g["should_stop"] == r["should_stop"], (backend, i, g, r)
            for k in ("reuse_index", "accepted", "closed_total"):
                assert g["stats"][k] == r["stats"][k], (backend, i, k)
            assert_stats_match(g["stats"], r["stats"], i, w["err_scale"], model=w)


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("device", DEVICES)
@_examples(60)
@given(sc=scenarios())
def test_fuzz_every_backend_matches_the_model_step_for_step(device, sc):
    check_scenario(sc, device)


def _cpp_finalize():
    """The CPU build of the C++ finalize, or None with the reason it could not be built here."""
    try:
        from dgg_kernels.backends import cpp_finalize

        cpp_finalize.load()
        return cpp_finalize, None
    except Exception as e:  # no compiler, no ninja, no csrc: say why
        return None, f"the C++ finalize could not be built here: {type(e).__name__}: {str(e)[:200]}"


@_examples(30)
@given(sc=scenarios())
def test_fuzz_the_cpp_finalize_follows_the_torch_backend_step_for_step(sc):
    """The fuzz suite's scenarios through the C++ finalize (csrc/common/gate_finalize.h, CPU build): before every
    step of a torch-backend gate, a copy of its state gets the same energy (the torch reduce) and KL, and the
    C++ finalize must leave it as the torch backend's step leaves the gate's, bit for bit (a NaN is a NaN)."""
    cpp, why = _cpp_finalize()
    if cpp is None:
        pytest.skip(why)
    from dgg_kernels import inputs
    from dgg_kernels.backends.torch_ref import TorchBackend

    monitor, extra = _params(sc, "cpu")
    gate = _new_gate(sc, "torch", monitor, extra)
    reduce = TorchBackend()
    for t, ev in enumerate(sc["events"]):
        if ev[0] in ("new_batch", "new_pass"):
            getattr(gate, ev[0])()
            continue
        if ev[0] == "roundtrip":
            gate = _roundtrip(sc, gate, "torch", monitor, extra)
            continue
        laid, _, extra_grads = _grads_for_step(sc, t, ev[1], ev[2], "cpu")
        for p, g in zip(monitor + extra, list(laid) + list(extra_grads)):
            p.grad = g
        _observe(sc, gate, ev, "cpu")
        st = dgg.state.GateState(**{k: getattr(gate.state, k).clone() for k in
                                    ("ring", "prev", "ints", "stats", "decision", "hyper", "acc")})
        reduce.reduce(inputs.monitor_grads(gate.monitor, None, gate.device), st, gate.config)
        cpp.finalize(st, gate.config)
        gate.step()
        for name in ("ring", "prev", "ints", "stats", "decision", "acc"):
            a, b = getattr(st, name), getattr(gate.state, name)
            same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(
                torch.nan_to_num(a.double(), nan=7.0), torch.nan_to_num(b.double(), nan=7.0)))
            assert same, (t, name, a, b)


@st.composite
def bad_cases(draw):
    sc = draw(scenarios(min_events=1, max_events=6))
    # the refused kinds need a params tensor of its own with two or more rows (an expanded view)
    sc["extra"] = [dict(shape=(3, 2), dtype=draw(st.sampled_from(DTYPES)), layout="contiguous")] + sc["extra"]
    kind = draw(st.sampled_from(sorted(REFUSED)))
    return sc, kind, draw(st.integers(0, 2)) if kind.startswith("monitor") else 0  # params: extra[0]


@pytest.mark.parametrize("device", DEVICES)
@_examples(30)
@given(case=bad_cases())
def test_fuzz_refused_inputs_are_refused_alike_and_modify_nothing(device, case):
    """After a random prefix of steps: a refused input raises the same error on every backend, nothing
    changes, and once repaired the gate goes on as the model says (the refused step left no trace)."""
    sc, kind, index = case
    note(f"scenario: {sc}; kind {kind} at {index}")
    errors, after = {}, {}
    for backend in backends_for(device):
        monitor, extra = _params(sc, device)
        gate = _new_gate(sc, backend, monitor, extra)
        t = 0
        for t, ev in enumerate(sc["events"]):
            if ev[0] == "new_batch":
                gate.new_batch()
            elif ev[0] == "new_pass":
                gate.new_pass()
            elif ev[0] == "roundtrip":
                gate = _roundtrip(sc, gate, backend, monitor, extra)
            else:
                laid, _, extra_grads = _grads_for_step(sc, t, ev[1], ev[2], device)
                for p, g in zip(monitor + extra, laid + extra_grads):
                    p.grad = g
                _observe(sc, gate, ev, device)
                gate.step()
        laid, _, extra_grads = _grads_for_step(sc, t + 1, 0.0, None, device)
        _observe(sc, gate, ("step", 0.0, None, None), device)
        for p, g in zip(monitor + extra, laid + extra_grads):
            p.grad = g
        name = break_input(kind, monitor, extra, index)
        snap = snapshot(gate, monitor + extra)
        with pytest.raises(Exception) as info:
            gate.step()
        errors[backend] = (type(info.value), str(info.value))
        assert isinstance(info.value, REFUSED[kind][0]) and name in str(info.value), errors[backend]
        assert_unchanged(gate, snap)
        # repair: the tensors back to their dtypes, fresh valid grads; the next step is an ordinary one
        for p, spec in zip(monitor + extra, sc["monitor"] + sc["extra"]):
            if p.dtype != spec["dtype"]:
                p.grad = None
                p.data = torch.empty(spec["shape"], dtype=spec["dtype"], device=device)
        laid, _, extra_grads = _grads_for_step(sc, t + 2, 0.0, None, device)
        for p, g in zip(monitor + extra, laid + extra_grads):
            p.grad = g
        _observe(sc, gate, ("step", 0.0, None, None), device)
        closed = bool(gate.step().item())
        after[backend] = (closed, gate.should_stop(), _counts({"stats": {k: v.item() for k, v in gate.stats().items()}}))
    assert len(set(errors.values())) == 1, errors
    # the refused step left no trace: the repaired step is the model's next step
    events = sc["events"][: t + 1] + [("refused",), ("step", 0.0, None)]
    want = model_records(sc, events)
    if _comparable(sc, want) == len(want):
        w, stop, counts = want[-1]
        for backend, got in after.items():
            assert got == (w["closed"], stop, counts), (backend, got, want[-1][1:], w)


SETTINGS_VALID = dict(
    window=st.integers(2, 9), threshold=st.one_of(st.floats(0.0, 5.0), st.just(math.inf)),
    statistic=st.sampled_from(STATISTICS), eps=st.floats(1e-12, 1.0), max_reuse=st.integers(1, 8),
    window_mode=st.sampled_from(WINDOW_MODES), target_kl=st.one_of(st.none(), st.floats(1e-6, 1.0)),
    kl_factor=st.floats(0.5, 3.0),
)
SETTINGS_MISTYPED = dict(  # values a user might pass by mistake
    window=st.sampled_from([-1, 0, 1, 2.0, 2.5, "4", None, True]),
    threshold=st.sampled_from([-0.1, -math.inf, math.nan, "0.3", None, True]),
    statistic=st.sampled_from(["l1", "energy+norm", "Norm", None, ""]),
    eps=st.sampled_from([0, 0.0, -1e-8, math.nan, math.inf, None, False, "1e-8"]),
    max_reuse=st.sampled_from([0, -2, 1.0, "2", None, True]),
    window_mode=st.sampled_from(["epoch", "Step", None, 0]),
    target_kl=st.sampled_from([0, 0.0, -0.01, math.nan, math.inf, "0.01", True]),
    kl_factor=st.sampled_from([0, -1.5, math.nan, math.inf, None, "1.5", True]),
)


@st.composite
def settings_kwargs(draw):
    """Gate settings with none, one or two mistyped values; the rest valid."""
    wrong = draw(st.sets(st.sampled_from(sorted(SETTINGS_VALID)), max_size=2))
    return {k: draw(SETTINGS_MISTYPED[k] if k in wrong else SETTINGS_VALID[k]) for k in sorted(SETTINGS_VALID)}


@pytest.mark.parametrize("device", DEVICES)
@_examples(150)
@given(kw=settings_kwargs(), dtype=st.sampled_from(DTYPES + [torch.int32, torch.complex64, torch.bool]))
def test_fuzz_settings_are_refused_alike_by_every_backend(device, kw, dtype):
    outcomes = {}
    for backend in backends_for(device) + ["GateConfig"]:
        try:
            if backend == "GateConfig":
                dgg.GateConfig(**kw)
                if dtype not in DTYPES:  # GateConfig sees no tensors: the dtype refusal is the gate's
                    raise TypeError("dtype")
            else:
                dgg.DynamicGradientGate(torch.ones(3, device=device).to(dtype), backend=backend, **kw)
            outcomes[backend] = None
        except (TypeError, ValueError) as e:
            outcomes[backend] = type(e)
    assert len(set(outcomes.values())) == 1, (kw, dtype, outcomes)
