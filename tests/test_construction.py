"""What a CPU can check of every backend, GPU-only paths included.

The first GPU run found a backend whose constructor used a name it never
imported (a NameError no CPU test reached) and a crash under
torch.set_default_device("cuda").  These tests catch both kinds on a CPU.
"""
import builtins
import dis
import importlib
import pkgutil
import types

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels.backends.base import DeviceTable

# Optional packages a module may need; without them its import is skipped, not failed.
_NEEDS = {
    "dgg_kernels.backends.triton_fused": "triton",
    "dgg_kernels.backends.triton_kernels": "triton",
    "dgg_kernels.backends.triton_launch": "triton",
    "dgg_kernels.integrations.trl": "trl",
    "dgg_kernels.integrations.deepspeed": "deepspeed",
    "dgg_kernels.integrations.verl": "verl",
}


def _modules():
    names = ["dgg_kernels"]
    for info in pkgutil.walk_packages(dgg.__path__, "dgg_kernels."):
        names.append(info.name)
    return sorted(n for n in names if not n.endswith("._C"))


def _import(name):
    if name in _NEEDS:
        pytest.importorskip(_NEEDS[name], reason=f"{name} needs {_NEEDS[name]}")
    return importlib.import_module(name)


def _global_loads(code: types.CodeType):
    """Every name a code object (and the functions nested in it) loads as a global."""
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield code.co_name, ins.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_loads(const)


@pytest.mark.parametrize("name", _modules())
def test_module_imports_and_every_global_name_resolves(name):
    """A function's global names must exist in its module, whether or not a CPU ever runs it."""
    mod = _import(name)
    missing = set()
    for obj in list(vars(mod).values()):
        funcs = []
        if isinstance(obj, types.FunctionType) and obj.__module__ == name:
            funcs.append(obj)
        elif isinstance(obj, type) and obj.__module__ == name:
            for attr in vars(obj).values():
                attr = getattr(attr, "__func__", attr)
                if isinstance(attr, property):
                    funcs += [f for f in (attr.fget, attr.fset) if f is not None]
                elif isinstance(attr, types.FunctionType):
                    funcs.append(attr)
        for f in funcs:
            f = getattr(f, "fn", f)  # a triton JITFunction wraps its Python function
            if f.__code__.co_filename != mod.__file__:
                continue  # generated elsewhere (dataclass methods)
            for where, g in _global_loads(f.__code__):
                if g not in vars(mod) and not hasattr(builtins, g):
                    missing.add(f"{where}: {g}")
    assert not missing, f"{name} uses names it never defines or imports: {sorted(missing)}"


def test_the_check_catches_an_unimported_name():
    src = "def f():\n    return DeviceTable()\n"
    mod = types.ModuleType("probe")
    exec(compile(src, "probe", "exec"), vars(mod))
    assert ("f", "DeviceTable") in set(_global_loads(mod.f.__code__))
    assert "DeviceTable" not in vars(mod)


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_every_cpu_backend_constructs_and_steps(backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="backend='triton' needs triton")
    w = torch.nn.Parameter(torch.empty(17, 3))
    gate = dgg.DynamicGradientGate(w, backend=backend)
    w.grad = torch.randn(17, 3)
    assert gate.step().dtype == torch.bool
    assert gate.backend == ("torch" if backend == "auto" else backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_backend_without_a_gpu_is_a_clear_error_and_builds_nothing():
    from dgg_kernels.backends import cuda_ext

    w = torch.nn.Parameter(torch.empty(5))
    with pytest.raises(RuntimeError, match=r'backend="cuda" is unavailable: .*needs a CUDA device'):
        dgg.DynamicGradientGate(w, backend="cuda")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda_ext.CudaBackend(torch.device("cuda", 0))
    assert cuda_ext._ext is None  # no build was attempted on the way to the error


def test_device_table_builds_its_host_table_on_cpu_whatever_the_default_device():
    key = ((1024, 7), (4096, 9))
    with torch.device("meta"):  # stands in for "cuda": a bare torch.tensor would land there
        table = DeviceTable()
        assert table.update(key, torch.device("cpu"))
    assert table.host.device.type == "cpu" and table.table.device.type == "cpu"
    assert table.host.tolist() == [[1024, 7], [4096, 9]]
    assert not table.update(key, torch.device("cpu"))  # same key: not rebuilt


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_works_under_a_default_device(backend):
    """torch.set_default_device elsewhere must not move any of the gate's own tensors."""
    if backend == "triton":
        pytest.importorskip("triton", reason="backend='triton' needs triton")
    lm = torch.nn.Parameter(torch.empty(33, 4, device="cpu"))
    other = torch.nn.Parameter(torch.empty(9, device="cpu", dtype=torch.bfloat16))
    torch.set_default_device("meta")
    try:
        gate = dgg.DynamicGradientGate(lm, [lm, other], window=2, threshold=0.0, backend=backend)
        for scale in (1.0, 1.1, 1.2, 50.0):
            gate.new_batch()
            for _ in range(2):
                lm.grad = torch.randn(33, 4, device="cpu") * scale
                other.grad = torch.randn(9, device="cpu", dtype=torch.bfloat16)
                closed = gate.step()
        stats = gate.stats()
        sd = gate.state_dict()
    finally:
        torch.set_default_device(None)
    assert closed.device.type == "cpu" and bool(closed)  # the 50x surge on pass 2 closes
    assert all(v.device.type == "cpu" for v in stats.values())
    assert all(v.device.type == "cpu" for v in sd["state"].values())
    assert torch.equal(other.grad, torch.zeros_like(other.grad))
