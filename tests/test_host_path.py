"""The host side of a step: the cached mask plan and pointer tables, Triton's direct launches, backend="auto".

CPU only: the mask runs for real under TRITON_INTERPRET=1; the direct-launch
bookkeeping runs against a stand-in compiled kernel (the interpreter has none);
the auto table is looked up with stand-in device names.
"""
from __future__ import annotations

import math

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels.backends import auto, resolve_backend, triton_usable
from dgg_kernels.backends import triton_fused as TF
from dgg_kernels.backends import triton_launch as TL
from dgg_kernels.backends.base import MaskPlan
from contract import backends_for

needs_triton = pytest.mark.skipif(not triton_usable(torch.device("cpu")), reason="triton interpreter unavailable")


def _closing_gate(params, backend="triton"):
    """A gate that closes exactly when its monitor gradient is NaN (a non-finite energy always closes;
    no z reaches the threshold otherwise).  The monitor grad lives in one buffer, at one address."""
    mon = torch.nn.Parameter(torch.empty(16))
    mon.grad = torch.empty(16)
    gate = dgg.DynamicGradientGate(mon, [mon, *params], backend=backend, window=2, threshold=1e9)
    return gate, mon


def _step(gate, mon, close: bool):
    if close:
        mon.grad.fill_(math.nan)
    else:
        mon.grad.normal_()
    return bool(gate.step().item())


# ----------------------------------------------------------------------------- mask plan
@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_new_grad_tensors_each_step_are_masked(backend):
    """zero_grad(set_to_none=True): a new grad tensor every step, sometimes at a new address."""
    params = [torch.nn.Parameter(torch.empty(n, dtype=dt)) for n, dt in
              [(7, torch.float32), (33, torch.bfloat16), (1, torch.float16), (300, torch.float32)]]
    gate, mon = _closing_gate(params, backend=backend)
    keep = []
    for step in range(6):
        for p in params:
            # new tensors, never 0 (bf16 rounds randn + 1 to 0 now and then); ``keep`` holds the old ones,
            # so the addresses change
            p.grad = torch.rand_like(p) + 1
        keep.append([p.grad for p in params])
        old = [g.clone() for g in keep[-2]] if step else None
        closed = _step(gate, mon, close=step % 2 == 1)
        assert closed == (step % 2 == 1)
        for p in params:
            assert torch.equal(p.grad, torch.zeros_like(p)) if closed else bool((p.grad != 0).all())
        if old is not None:  # last step's tensors are not touched any more
            assert all(torch.equal(a, b) for a, b in zip(old, keep[-2]))


@needs_triton
def test_same_addresses_reuse_the_plan_and_table():
    params = [torch.nn.Parameter(torch.empty(64)) for _ in range(5)]
    gate, mon = _closing_gate(params)
    bufs = [torch.randn(64) for _ in params]
    plans, tables = set(), set()
    for step in range(4):
        for p, b in zip(params, bufs):
            p.grad = b[:]  # a new tensor object at the same address, like a caching allocator gives
            b.normal_().add_(3)
        closed = _step(gate, mon, close=step == 3)
        plans.add(id(gate._backend._plan))
        tables.add(id(gate._backend._mask_calls[0][4]))
        assert closed == (step == 3)
    assert len(plans) == 1 and len(tables) == 1  # built on the first step, then reused
    assert all(torch.equal(b, torch.zeros(64)) for b in bufs)


@needs_triton
def test_a_grad_of_another_dtype_at_the_same_address_is_masked_exactly():
    """param.data changed dtype and the new grad landed where the old one was: only its bytes are zeroed."""
    raw = torch.full((64,), 7, dtype=torch.uint8)
    p = torch.nn.Parameter(torch.empty(8))
    gate, mon = _closing_gate([p])
    p.grad = raw.view(torch.float32)[:8]  # 32 bytes at raw's address
    assert not _step(gate, mon, close=False)
    p.grad = None
    p.data = torch.zeros(8, dtype=torch.bfloat16)
    p.grad = raw.view(torch.bfloat16)[:8]  # 16 bytes at the same address
    assert _step(gate, mon, close=True)
    assert torch.equal(raw[:16], torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(raw[16:], torch.full((48,), 7, dtype=torch.uint8))  # nothing past the grad


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_gapped_view_at_the_same_address_is_masked_exactly(backend):
    base = torch.full((4, 8), 5.0)
    p = torch.nn.Parameter(torch.empty(4, 4))
    gate, mon = _closing_gate([p], backend=backend)
    p.grad = base.view(-1)[:16].view(4, 4)  # dense, at base's address
    assert not _step(gate, mon, close=False)
    p.grad = base[:, :4]  # gapped, same address, same byte size
    assert _step(gate, mon, close=True)
    assert torch.equal(base[:, :4], torch.zeros(4, 4))
    assert torch.equal(base[:, 4:], torch.full((4, 4), 5.0))


@needs_triton
def test_strided_transposed_empty_and_odd_grads():
    shapes = [(6, 4), (5,), (0,), (3, 3), (2, 3)]
    params = [torch.nn.Parameter(torch.empty(s, dtype=dt)) for s, dt in
              zip(shapes, [torch.float32, torch.float16, torch.float32, torch.complex64, torch.float64])]
    gate, mon = _closing_gate(params)
    params[0].grad = torch.randn(4, 6).t()            # dense, not contiguous: one byte span
    params[1].grad = torch.randn(10, dtype=torch.float16)[1::2]  # gapped and odd-aligned
    params[2].grad = torch.empty(0)
    params[3].grad = torch.randn(3, 3, dtype=torch.complex64)    # zeroed as bytes too
    params[4].grad = torch.randn(2, 3, dtype=torch.float64)[:, :]
    before = params[1].grad._base.clone()
    assert _step(gate, mon, close=True)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p.grad))
    base = params[1].grad._base
    assert torch.equal(base[0::2], before[0::2])  # the gaps are untouched


@needs_triton
def test_odd_addresses_and_sizes_are_zeroed_in_narrower_units():
    """2-byte and 1-byte units where a grad's address or size is not a multiple of 4; neighbours untouched."""
    half = torch.nn.Parameter(torch.empty(5, dtype=torch.float16))
    byte = torch.nn.Parameter(torch.empty(7, dtype=torch.float8_e4m3fn))
    gate, mon = _closing_gate([half, byte])
    hbuf = torch.full((8,), 3.0, dtype=torch.float16)
    bbuf = torch.full((16,), 1.0).to(torch.float8_e4m3fn)
    half.grad = hbuf[1:6]   # address 2 bytes past an aligned one, 10 bytes: 2-byte units
    byte.grad = bbuf[3:10]  # odd address, 7 bytes: 1-byte units
    assert _step(gate, mon, close=True)
    assert torch.equal(hbuf[1:6], torch.zeros(5, dtype=torch.float16))
    assert hbuf[0].item() == 3.0 and bool((hbuf[6:] == 3.0).all())
    assert bool((bbuf[3:10].float() == 0).all()) and bool((bbuf[:3].float() == 1).all())
    assert bool((bbuf[10:].float() == 1).all())
    # one launch per zeroing unit in use: 4 bytes (the monitor), 2 bytes (half), 1 byte (byte); one row each
    assert [(call.unit, call.n) for call in gate._backend._mask_calls] == [(4, 1), (2, 1), (1, 1)]


def test_mask_plan_key_sees_address_size_and_layout():
    a = torch.zeros(4, 4)
    key = MaskPlan.key_of([a])
    assert MaskPlan.key_of([a[:]]) == key                       # a new tensor object, same bytes
    assert MaskPlan.key_of([a.view(torch.int16)]) == key         # the same bytes are zeroed the same way
    assert MaskPlan.key_of([a.view(-1)[:8]]) != key              # smaller
    assert MaskPlan.key_of([torch.zeros(8, 4)[:, :4]]) != key    # another address


# ----------------------------------------------------------------------------- direct launches
class _FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def runner(*args):
            self.log.append(("direct", grid, args))
        return runner


class _FakeJit:
    """A stand-in @triton.jit kernel with Triton's ``arg_names``; every launch is logged in ``log``."""

    def __init__(self, arg_names=("x", "n", "FLAG"), log=None):
        self.arg_names = list(arg_names)
        self.log = [] if log is None else log

    def __getitem__(self, grid):
        def run(*args, num_warps, **options):
            assert len(args) == len(self.arg_names)
            # every launch compiles without fused multiply-adds (the finalize's one rounding order)
            assert options == {"enable_fp_fusion": False}
            self.log.append(("jit", grid, args))
            return _FakeCompiled(self.log)
        return run


@pytest.fixture
def fake_triton(monkeypatch):
    monkeypatch.setattr(TL, "_CompiledKernel", _FakeCompiled)
    monkeypatch.setattr(TL, "_FAST_LAUNCH", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return _FakeJit()


def test_direct_launch_only_for_identical_arguments(fake_triton, monkeypatch):
    """The direct path's key is derived from every argument: any change of value, type, address or dtype,
    grid, warps or current device goes through the JIT."""
    launch = TL._Launch(fake_triton)
    a, b = torch.zeros(2), torch.zeros(2)
    launch((4,), 8, x=a, n=1, FLAG=True)
    launch((4,), 8, FLAG=True, n=1, x=a)                  # same arguments (any keyword order): direct
    launch((4,), 8, x=a, n=2, FLAG=True)                  # another value: JIT
    launch((4,), 8, x=b, n=2, FLAG=True)                  # another address: JIT
    launch((4,), 8, x=b, n=2, FLAG=True)                  # direct
    launch((4,), 8, x=b, n=2, FLAG=1)                     # 1 is not True to the JIT: JIT
    launch((4,), 8, x=b.view(torch.int32), n=2, FLAG=1)   # same address, another dtype: JIT
    launch((4,), 4, x=b.view(torch.int32), n=2, FLAG=1)   # other warps: JIT
    launch((2,), 4, x=b.view(torch.int32), n=2, FLAG=1)   # another grid: JIT
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    launch((2,), 4, x=b.view(torch.int32), n=2, FLAG=1)   # another current device: JIT
    assert [e[0] for e in fake_triton.log] == ["jit", "direct", "jit", "jit", "direct"] + ["jit"] * 5
    assert fake_triton.log[1][1] == (4, 1, 1)  # the compiled kernel's runner takes a 3-d grid
    assert fake_triton.log[1][2][0] is a and fake_triton.log[1][2][1:] == (1, True)  # signature order
    assert launch.hits == 2


def test_a_launch_with_a_missing_or_unknown_argument_raises(fake_triton):
    launch = TL._Launch(fake_triton)
    with pytest.raises(TypeError, match=r"missing arguments \['FLAG'\]"):
        launch((1,), 4, x=torch.zeros(1), n=1)
    with pytest.raises(TypeError, match=r"unknown \['extra'\]"):
        launch((1,), 4, x=torch.zeros(1), n=1, FLAG=True, extra=2)
    with pytest.raises(KeyError):
        launch((1,), 4, x=torch.zeros(1), n=1, flag=True)
    assert fake_triton.log == []


def test_a_refused_direct_launch_falls_back_to_the_jit_for_good(fake_triton):
    launch = TL._Launch(fake_triton)
    launch((1,), 4, x=1, n=1, FLAG=True)

    def refuse(*args):
        raise TypeError("function takes exactly 22 arguments")

    launch.runner = refuse
    with pytest.warns(UserWarning, match="direct kernel launch failed"):
        launch((1,), 4, x=1, n=1, FLAG=True)
    assert [e[0] for e in fake_triton.log] == ["jit", "jit"] and TL._FAST_LAUNCH is False
    launch((1,), 4, x=1, n=1, FLAG=True)
    assert [e[0] for e in fake_triton.log] == ["jit", "jit", "jit"]


def test_the_interpreter_always_takes_the_jit_path():
    assert TL._runner_of(None, (4,)) is None
    assert TL._runner_of(object(), (4,)) is None


@needs_triton
def test_gate_step_direct_launch_arguments_match_the_jit_call(fake_triton, monkeypatch):
    """The gate's second step with the same grads launches directly, with the JIT call's arguments."""
    step = _FakeJit(TL._gate_step_kernel.arg_names, fake_triton.log)
    mask = _FakeJit(TL._gate_mask_kernel.arg_names, fake_triton.log)
    # the launch layer launches the kernels it imported from triton_kernels: patched where it looks them up
    monkeypatch.setattr(TL, "_gate_step_kernel", step)
    monkeypatch.setattr(TL, "_gate_mask_kernel", mask)
    w = torch.nn.Parameter(torch.empty(100))
    gate = dgg.DynamicGradientGate(w, backend="triton")
    w.grad = torch.randn(100)
    gate.step()
    w.grad = w.grad[:]  # a new tensor at the same address
    gate.step()
    kinds = [e[0] for e in fake_triton.log]
    assert kinds == ["jit", "jit", "direct", "direct"]  # step, mask; step, mask
    (_, _, jit_step), (_, _, direct_step) = fake_triton.log[0], fake_triton.log[2]
    assert len(jit_step) == len(direct_step)
    assert jit_step[0] is not direct_step[0] and jit_step[0].data_ptr() == direct_step[0].data_ptr()
    assert all(a is b or a == b for a, b in zip(jit_step[1:], direct_step[1:]))


# ----------------------------------------------------------------------------- launch configuration
def test_per_dtype_launch_configs(monkeypatch):
    monkeypatch.setattr(TL, "_sm_count", lambda device: 100)
    b = TF.TritonBackend(configs={torch.bfloat16: TL.LaunchConfig(block=8192, programs_per_sm=2, num_warps=16)})
    lay = b._layout(torch.device("cuda", 0))
    assert lay.configs[torch.bfloat16] == (8192, 200, 16)
    assert lay.configs[torch.float32] == (4096, 400, 8)  # today's values by default
    assert lay.slots == 400  # one partials stride for every dtype: the largest grid
    assert lay.mask_programs == 200
    forced = TF.TritonBackend(block=1024, num_warps=4)._layout(torch.device("cuda", 0))
    assert set(forced.configs.values()) == {(1024, 400, 4)}
    cpu = TF.TritonBackend(block=64, cpu_programs=3)._layout(torch.device("cpu"))
    assert set(cpu.configs.values()) == {(64, 3, 1)} and cpu.slots == 3
    # without a backend: the module's tables
    plain = TL._DeviceLayout(torch.device("cuda", 0))
    assert plain.configs == {dt: (c.block, c.programs_per_sm * 100, c.num_warps) for dt, c in TL.CUDA_CONFIGS.items()}
    plain_cpu = TL._DeviceLayout(torch.device("cpu"))
    c = TL.CPU_CONFIG
    assert set(plain_cpu.configs.values()) == {(c.block, c.programs_per_sm, c.num_warps)}


def test_sm_count_is_read_once_per_device(monkeypatch):
    calls = []

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(TL, "_SM_COUNT", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(i) or Props())
    assert TL._sm_count(torch.device("cuda", 0)) == 132 and TL._sm_count(torch.device("cuda", 0)) == 132
    assert calls == [0]


# ----------------------------------------------------------------------------- backend="auto"
TABLE = {
    "default": "triton",
    "devices": [{
        "match": "H100", "device": "NVIDIA H100 80GB HBM3",
        "dtypes": {"float32": [
            {"MB": 1.0, "case": "1 MB", "ms": {"triton": 0.14, "cuda": 0.05}, "pick": "cuda"},
            {"MB": 64.0, "case": "64 MB", "ms": {"triton": 0.16, "cuda": 0.05}, "pick": "cuda"},
            {"MB": 256.0, "case": "256 MB", "ms": {"triton": 0.10, "cuda": 0.11}, "pick": "triton"},
            {"MB": 4096.0, "case": "4096 MB", "ms": {"triton": 1.33, "cuda": 1.35, "torch": 4.7}, "pick": "triton"},
        ]},
    }],
}


@pytest.mark.parametrize("mb, want", [(0.001, "cuda"), (1, "cuda"), (20, "cuda"), (150, "triton"),
                                      (256, "triton"), (10**5, "triton")])
def test_auto_table_lookup_by_size(mb, want):
    got, why = auto.choose("NVIDIA H100 80GB HBM3", torch.float32, int(mb * 1e6), TABLE)
    assert got == want, why


def test_auto_table_falls_back_to_triton_for_unmeasured_devices_and_dtypes():
    assert auto.choose("NVIDIA A100-SXM4-80GB", torch.float32, 10**6, TABLE)[0] == "triton"
    got, why = auto.choose("NVIDIA H100 PCIe", torch.float16, 10**6, TABLE)
    assert got == "triton" and "not measured" in why
    assert auto.choose("NVIDIA H100", None, 0, TABLE)[0] == "triton"


def test_packaged_table_is_well_formed():
    from dgg_kernels.backends.auto_table import TABLE as packaged

    assert packaged["default"] == "triton"
    assert any(d["match"] == "H100" for d in packaged["devices"])
    for d in packaged["devices"]:
        assert d["device"] and d["measured"]["date"]
        for dtype, points in d["dtypes"].items():
            assert hasattr(torch, dtype) and points == sorted(points, key=lambda p: p["MB"])
            for p in points:
                assert p["pick"] in auto.BACKENDS and p["pick"] in p["ms"]
                assert p["ms"][p["pick"]] <= min(p["ms"].values()) * (1 + packaged["tolerance"])


def test_monitor_dtype_and_bytes():
    ts = [torch.empty(10, dtype=torch.bfloat16), torch.empty(3), torch.empty(100, dtype=torch.bfloat16)]
    assert auto.monitor_dtype_and_bytes(ts) == (torch.bfloat16, 220 + 12)


def test_monitor_bytes_of_a_dtensor_are_its_global_size_over_its_shards():
    """What every rank computes alike: the global entries over the mesh dims that split the tensor (Shard and
    FSDP2 x TP's _StridedShard; not Replicate), rounded up; uneven local shards do not enter."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    class Mesh:
        def size(self, dim):
            return (2, 3, 5)[dim]

    class DTensor:  # the attributes monitor_dtype_and_bytes reads, without a process group
        dtype = torch.bfloat16
        device_mesh = Mesh()

        def __init__(self, placements):
            self.placements = placements

        def numel(self):
            return 1001

        def element_size(self):
            return 2

    cases = [((Shard(0), Replicate(), Replicate()), 501), ((Replicate(), Shard(1), Replicate()), 334),
             ((_StridedShard(0, split_factor=3), Shard(0), Replicate()), 167),
             ((Replicate(), Replicate(), Replicate()), 1001), ((Shard(0), Shard(1), Shard(0)), 34)]
    for placements, entries in cases:
        assert auto.monitor_dtype_and_bytes([DTensor(placements)]) == (torch.bfloat16, entries * 2), placements


def test_auto_on_cpu_stays_torch():
    gate = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(10**6)))
    assert gate.backend == "torch"
    assert resolve_backend("auto", torch.device("cpu"), [torch.empty(3)]).name == "torch"


class _FakeCudaDevice:
    """resolve_backend's view of a CUDA device on a machine without one."""

    @staticmethod
    def patch(monkeypatch, name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        import dgg_kernels.backends as B

        monkeypatch.setattr(B, "triton_usable", lambda device: True)


@needs_triton
def test_auto_picks_cuda_only_when_its_prebuilt_extension_loads(monkeypatch):
    from dgg_kernels.backends import cuda_ext

    _FakeCudaDevice.patch(monkeypatch)
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_ext_error", None)
    built = []
    monkeypatch.setattr(cuda_ext, "_build_jit", lambda: built.append(1))
    small = [torch.empty(1000)]  # 4 KB of float32: the packaged H100 table picks cuda
    assert auto.choose("NVIDIA H100 80GB HBM3", torch.float32, 4000)[0] == "cuda"
    b = resolve_backend("auto", torch.device("cuda", 0), small)  # CudaBackend refuses: no CUDA here
    assert b.name == "triton" and "cuda extension not loadable" in b.auto_reason
    assert not built and cuda_ext._ext_error is None  # no build attempted, nothing cached

    class FakeCuda:
        name = "cuda"

        def __init__(self, device, build=True):
            assert build is False
            self.auto_reason = None

    monkeypatch.setattr(cuda_ext, "CudaBackend", FakeCuda)
    assert resolve_backend("auto", torch.device("cuda", 0), small).name == "cuda"
    big = [torch.empty(2**28, dtype=torch.bfloat16, device="meta")]  # 512 MB: triton
    assert resolve_backend("auto", torch.device("cuda", 0), big).name == "triton"
    _FakeCudaDevice.patch(monkeypatch, "NVIDIA A100-SXM4-80GB")  # not in the table: triton
    assert resolve_backend("auto", torch.device("cuda", 0), small).name == "triton"


def test_load_extension_without_build_never_builds(monkeypatch):
    from dgg_kernels.backends import cuda_ext

    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_ext_error", None)
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: None)
    monkeypatch.setattr(cuda_ext, "_build_jit", lambda: pytest.fail("built"))
    with pytest.raises(RuntimeError, match="no prebuilt"):
        cuda_ext.load_extension(build=False)
    assert cuda_ext._ext_error is None


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["direct", "jit-only"])
def test_triton_direct_launches_match_the_torch_backend_gpu(fast, monkeypatch):
    """Same grads at the same addresses (direct launches after the first step) and new grads every step."""
    monkeypatch.setattr(TL, "_FAST_LAUNCH", fast)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(s, device="cuda", dtype=torch.bfloat16))
              for s in [(4096, 512), (300,), (17, 3), (1,)] * 5]
    gates = {b: dgg.DynamicGradientGate(params[0], params, backend=b, window=4, threshold=0.2)
             for b in ("torch", "triton")}
    stored = [torch.randn_like(p) for p in params]
    for step in range(24):
        scale = 1 + 3 * (step % 7 == 6)  # a spike now and then closes the gate
        fresh = step % 2 == 1  # odd steps: new tensors (new addresses); even: the stored ones again
        grads = [torch.randn_like(p) * scale if fresh else (s.normal_() * scale) for p, s in zip(params, stored)]
        out = {}
        for b, gate in gates.items():
            for p, g in zip(params, grads):
                p.grad = g.clone() if b == "torch" or fresh else g
            out[b] = (gate.step().item(), gate.stats()["energy"].item(), [p.grad.clone() for p in params])
        assert out["torch"][0] == out["triton"][0], step
        assert math.isclose(out["torch"][1], out["triton"][1], rel_tol=1e-4), step
        assert all(torch.equal(a, b) for a, b in zip(out["torch"][2], out["triton"][2])), step
    hits = {site: launch.hits for site, launch in gates["triton"]._backend._launches.items()}
    if fast:
        assert hits[("step", 0, 2)] > 0 and any(h > 0 for s, h in hits.items() if s[0] == "mask"), hits
    else:
        assert not any(hits.values()), hits


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda")[1:] if torch.cuda.is_available() else ["triton"])
def test_closed_mask_hits_new_grad_tensors_gpu(backend):
    params = [torch.nn.Parameter(torch.empty(n, device="cuda", dtype=dt))
              for n, dt in [(1000, torch.bfloat16), (7, torch.float32), (33, torch.float16)] * 100]
    mon = torch.nn.Parameter(torch.empty(64, device="cuda"))
    gate = dgg.DynamicGradientGate(mon, [mon, *params], backend=backend, window=2, threshold=1e9)
    keep = []
    for step in range(6):
        for p in params:
            p.grad = torch.rand_like(p) + 5
        keep.append([p.grad for p in params])  # the old tensors stay alive: the new ones get new addresses
        mon.grad = torch.full_like(mon, math.nan) if step % 2 else torch.randn_like(mon)
        closed = gate.step().item()
        assert closed == bool(step % 2)
        for p in params:
            assert torch.equal(p.grad, torch.zeros_like(p)) if closed else bool((p.grad != 0).all())
        if closed:  # what got zeroed are this step's tensors, not the previous (open) step's
            assert all(bool((g != 0).all()) for g in keep[-2])
