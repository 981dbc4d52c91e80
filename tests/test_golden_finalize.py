"""Golden finalize vectors (tests/data/golden/finalize_vectors.json, made by make_golden.py from the plain-Python
model alone): a state in, one step's energy and KL, the state out.  Every form of the finalize runs every vector:
the torch backend's tensor and host forms, the Triton kernel (under the interpreter on CPU), and the C++
finalize's CPU build.  Decisions, counters, windows and prev exactly; the reported stats within float32
rounding (the tensor form's CPU sqrt can be one float64 ulp off, docs/semantics.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dgg_kernels import state as S
from dgg_kernels.backends import torch_ref
from dgg_kernels.config import GateConfig

DATA = json.loads((Path(__file__).parent / "data" / "golden" / "finalize_vectors.json").read_text())["vectors"]


def _h(x: str) -> float:
    return float.fromhex(x)


def _forms():
    forms = {"tensor": torch_ref.finalize_reference, "host": torch_ref.finalize_host}
    try:
        from dgg_kernels.backends.triton_fused import TritonBackend

        forms["triton"] = TritonBackend().finalize
    except ImportError:  # pragma: no cover - triton is installed in CI
        pass
    try:
        from dgg_kernels.backends import cpp_finalize

        cpp_finalize.load()
        forms["cpp"] = cpp_finalize.finalize
    except Exception:  # no host compiler: test_cpp_finalize.py says why
        pass
    return forms


FORMS = _forms()


def _state(v: dict) -> tuple[S.GateState, GateConfig]:
    cfg = GateConfig(**v["config"])
    st = S.GateState.new(cfg.window, cfg.threshold, cfg.eps, torch.device("cpu"), n_rings=cfg.n_rings,
                         window_mode=cfg.window_mode, kl_limit=cfg.kl_limit)
    st.ring.copy_(torch.tensor([_h(x) for x in v["before"]["ring"]], dtype=torch.float64))
    st.prev[0] = _h(v["before"]["prev"])
    st.ints.copy_(torch.tensor(v["before"]["ints"], dtype=torch.int64))
    st.acc[S.ACC_ENERGY] = _h(v["energy"])
    st.acc[S.ACC_KL] = _h(v["kl"])
    return st, cfg


def _same_float(a: float, b: float, rel: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def test_the_vectors_cover_what_matters():
    closed = sum(v["closed"] for v in DATA)
    assert 0 < closed < len(DATA)
    kinds = {v["config"]["statistic"] for v in DATA} | {v["config"].get("window_mode", "step") for v in DATA}
    assert kinds >= {"norm", "energy", "increment", "energy+increment", "step", "batch"}
    assert any(not math.isfinite(_h(v["energy"])) for v in DATA)  # NaN / Inf steps
    assert any(v["before"]["ints"][S.PASS_MODE] for v in DATA)  # passes of several steps
    assert any(_h(v["kl"]) > 0.03 for v in DATA)  # KL over the limit


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_of_the_finalize_reproduces_the_golden_vectors(form):
    finalize = FORMS[form]
    for i, v in enumerate(DATA):
        st, cfg = _state(v)
        finalize(st, cfg)
        where = (form, i, v["config"])
        assert bool(st.decision) == v["closed"], where
        assert st.ints.tolist()[: S.BATCHES] == v["after"]["ints"][: S.BATCHES], where
        assert st.ints[S.BATCHES] == 0, where  # no finalize writes the new_batch() count
        # the tensor form's CPU float64 sqrt may be one ulp off (docs/semantics.md): a norm in the ring too
        ulp = 2.0**-52 if form == "tensor" else 0.0
        ring = [_h(x) for x in v["after"]["ring"]]
        assert all(_same_float(a, b, rel=ulp) for a, b in zip(st.ring.tolist(), ring)), where
        assert _same_float(float(st.prev[0]), _h(v["after"]["prev"]), rel=ulp), where
        want = [_h(x) for x in v["stats"]]
        got = st.stats.tolist()
        assert all(_same_float(a, b, rel=2 ** -23) for a, b in zip(got, want)), (where, got, want)
        assert float(st.acc[S.ACC_KL]) == 0.0, where  # the KL is consumed


def test_the_committed_vectors_are_what_the_model_gives_today():
    """finalize_vectors.json is regenerated from the model (make_golden.py): a change of the model, the
    sequences or the layout shows here, and the file is remade, not edited."""
    import importlib.util

    path = Path(__file__).parent / "data" / "golden" / "make_golden.py"
    spec = importlib.util.spec_from_file_location("make_golden", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.vectors() == DATA, "python tests/data/golden/make_golden.py, and commit finalize_vectors.json"


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_negative_or_out_of_range_energy_closes_in_every_form(form):
    """A negative energy (no sum of squares gives one: only a damaged acc) and one beyond the float32 range
    close the gate and enter no window, in every form and in the model."""
    from semantics_model import GateModel

    for energy in (-1.0, -0.5e-300, 3.5e38, math.inf, math.nan):
        cfg = GateConfig(window=2, threshold=0.3, statistic="norm")
        st = S.GateState.new(2, 0.3, 1e-8, torch.device("cpu"))
        st.acc[S.ACC_ENERGY] = energy
        FORMS[form](st, cfg)
        assert bool(st.decision) and int(st.ints[S.COUNT]) == 0, (form, energy)
        assert GateModel(window=2, threshold=0.3).step(energy)["closed"], energy
