"""Helpers the test modules share: the backends a device offers (as a list, or as pytest params), loading a
script as a module, snapshots that show nothing was modified, and the bad inputs the gate must refuse."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dgg_kernels import inputs
from dgg_kernels.backends import cuda_ext, triton_usable
from sequences import bit_equal

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def backends_for(device: str) -> list[str]:
    """Every backend that runs on ``device`` here: torch always, triton where usable (the interpreter on
    CPU), cuda on a GPU where the extension builds or loads (a failed build is an error, not a skip)."""
    dev = torch.device(device)
    names = ["torch"]
    if triton_usable(dev):
        names.append("triton")
    if dev.type == "cuda":
        try:
            cuda_ext.load_extension()
            names.append("cuda")
        except RuntimeError as e:
            if "build of csrc/ failed" in str(e):
                raise
    return names


# Every backend as a pytest param: triton skips without the package, cuda without a GPU.
BACKEND_PARAMS = ["torch", pytest.param("triton", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]
CPU_BACKEND_PARAMS = BACKEND_PARAMS[:2]


def load_module(path: Path, name: str):
    """The Python file at ``path`` imported as module ``name`` (a script outside the package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str = "rlvr_reuse"):
    return load_module(REPO / "benchmarks" / f"{name}.py", f"{name}_bench")


# -- nothing modified ---------------------------------------------------------------------------
def _copy(t):
    if t is None:
        return None
    if t.layout != torch.strided:
        return ("sparse", t.layout, t.to_dense().clone())
    base = t if t._base is None else t._base
    return ("dense", t, base, base.clone())


def _same(t, saved) -> bool:
    if saved is None:
        return t is None
    if saved[0] == "sparse":
        return t is not None and t.layout == saved[1] and bit_equal(t.to_dense(), saved[2])
    _, obj, base, copy = saved
    return t is obj and bit_equal(base, copy)


def snapshot(gate, tensors) -> tuple:
    """The gate's state and every ``tensors[i].grad`` (with the buffer a view lives in), bit for bit."""
    return gate.state_dict(), [(t, _copy(t.grad)) for t in tensors]


def assert_unchanged(gate, snap) -> None:
    sd, grads = snap
    now = gate.state_dict()
    assert now["config"] == sd["config"]
    for k, v in sd["state"].items():
        assert bit_equal(now["state"][k], v), f"gate state {k!r} changed"
    for i, (t, saved) in enumerate(grads):
        assert _same(t.grad, saved), f"tensor {i}: its .grad changed"


def zeroed_in_place(grad, base_before) -> bool:
    """``grad`` is all zeros and the rest of the buffer it is a view of is as it was (``base_before``)."""
    base = grad if grad._base is None else grad._base
    want = base_before.clone()
    want.as_strided(grad.size(), grad.stride(), grad.storage_offset() - base.storage_offset()).zero_()
    return bit_equal(base, want)


def swap_dtype(p: torch.nn.Parameter, dtype: torch.dtype) -> None:
    """Make ``p`` (and so the grad it accepts) ``dtype`` after a gate was built on it: the route by which a
    refused dtype reaches step() (a monitor tensor of that dtype is refused at construction)."""
    p.grad = None
    p.data = torch.ones(p.shape, device=p.device).to(dtype)
    p.grad = (torch.rand(p.shape, device=p.device) + 0.5).to(dtype)


# The step-time refusals: kind -> (exception type, what the message names).  Each kind has one way into
# step() below; docs/semantics.md ("Accepted inputs") is the table these check.
REFUSED = {
    "monitor_grad_missing": (RuntimeError, "has no .grad"),
    "monitor_grad_sparse": (TypeError, "torch.sparse_coo tensor"),
    "monitor_grad_complex": (TypeError, "has dtype torch.complex64"),
    "monitor_grad_float8": (TypeError, "has dtype torch.float8_e4m3fn"),
    "params_grad_sparse": (TypeError, "torch.sparse_coo tensor"),
    "params_grad_expanded": (ValueError, "overlapping memory"),
}


def break_input(kind: str, monitor: list, extra: list, index: int) -> str:
    """Put the bad input ``kind`` on ``monitor[index]`` (a monitor kind) or ``extra[index]`` (a params kind);
    returns the name the error must use (params are monitor + extra, in that order)."""
    if kind.startswith("monitor"):
        p = monitor[index % len(monitor)]
        name = f"monitor[{index % len(monitor)}]"
        if kind == "monitor_grad_missing":
            p.grad = None
        elif kind == "monitor_grad_sparse":
            p.grad = (torch.rand(p.shape, device=p.device) + 0.5).to(p.dtype).to_sparse()
        elif kind == "monitor_grad_complex":
            swap_dtype(p, torch.complex64)
        else:
            swap_dtype(p, torch.float8_e4m3fn)
        return name
    j = index % len(extra)
    p = extra[j]
    name = f"params[{len(monitor) + j}].grad"
    if kind == "params_grad_sparse":
        p.grad = torch.ones(p.shape, device=p.device, dtype=p.dtype).to_sparse()
    else:  # expanded: every row is the same memory
        row = torch.ones((1,) + tuple(p.shape[1:]), device=p.device, dtype=p.dtype)
        p.grad = row.expand(p.shape)
    return name


# -- opcheck inside the parity runs -------------------------------------------------------------
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


_ARITHMETIC = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128}


def _arithmetic(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in _ARITHMETIC else t.view({1: torch.int8, 2: torch.int16, 4: torch.int32,
                                                     8: torch.int64}[t.element_size()])


def opcheck_gate_ops(gate) -> None:
    """torch.library.opcheck of every gate op (dgg::gate_step, dgg::gate_mask, dgg::snapshot) on this step's
    real gradients and the gate's current state, all cloned, so the run itself is not touched.  The parity
    runs call it at their first step; dgg::gate_finalize_partials has its own (tests/test_ops.py)."""
    from dgg_kernels import inputs, ops

    grads = [g.clone() for g in inputs.monitor_grads(gate.monitor, gate._sharding, gate.device)]
    # torch's schema check compares tensors with arithmetic that float8 and the unsigned dtypes lack: those
    # are checked as integers of their width (the mask writes bytes, whatever the dtype)
    zero = [_arithmetic(p.grad.clone()) for p in gate.params if p.grad is not None]
    s, c = gate.state, gate.config
    state = [t.clone() for t in (s.ring, s.prev, s.ints, s.stats, s.decision, s.acc)]
    torch.library.opcheck(ops.gate_step, (grads, *state, s.hyper, c.window, c.statistic_id, c.max_reuse,
                                          gate._kernels), test_utils=OPCHECK_UTILS)
    # a closed decision too: the schema check only sees a mutation that happens
    for closed in (state[4], torch.ones((), dtype=torch.bool, device=gate.device)):
        torch.library.opcheck(ops.gate_mask, (closed, [g.clone() for g in zero], gate._kernels),
                              test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.snapshot, (state[3],), test_utils=OPCHECK_UTILS)


# -- the two forms of the params-grad read -------------------------------------------------------
# The params-grad read and its keys exist in two forms (dgg_kernels/inputs.py): C++ (dgg_kernels._host, built by
# setup.py; CI builds it) and Python.  The invalidation tests run each form with the real operations.
KEY_FORMS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    inputs._host_module is None, reason="dgg_kernels._host is not built here (pip install --no-build-isolation -e .)"))]


class _CountingHost:
    """The C++ form, counting its reads (a "cpp" case that never reached it would re-test the Python form)."""

    def __init__(self, module) -> None:
        self.module, self.reads = module, 0

    def read(self, params):
        self.reads += 1
        return self.module.read(params)


@contextlib.contextmanager
def key_form_of(name: str):
    """Steps inside use the C++ form ("cpp": at least one step must read through it) or the Python form
    ("python") of the params-grad read."""
    saved = inputs._host_module
    counting = _CountingHost(saved) if name == "cpp" else None
    inputs._host_module = counting
    try:
        yield
    finally:
        inputs._host_module = saved
    if counting is not None:
        assert counting.reads > 0, "the C++ form was never used"

