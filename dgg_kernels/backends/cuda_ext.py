"""backend="cuda": the csrc/ CUDA C++ extension.

The extension is the prebuilt ``dgg_kernels._C`` when ``pip install
--no-build-isolation -e .`` built it (setup.py), else it is built just in time
from csrc/ with torch.utils.cpp_extension.load (ninja) on first use and cached
for the process.  Where neither works, constructing the backend raises a
RuntimeError that names the reason.

Loading the extension registers the CUDA implementations of the ``dgg::csrc_*`` ops (schemas in
dgg_kernels/ops.py), which this backend calls.  Per step: one launch reduces every monitor gradient and runs
the finalize (csrc/gate_step), and one launch zeroes the params' gradients when the gate closed
(csrc/gate_mask).  Neither synchronizes the host, and both can be
captured in a CUDA graph.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import ops  # noqa: F401  (declares the dgg::csrc_* schemas the extension implements)
from .. import state as S
from ..config import GateConfig
from ..state import GateState
from .base import Backend, DeviceTable, MaskPlan, dense, zero_where

# Slot indices in the order of csrc's StateSlots (generated from the same table: state.SLOT_GROUPS).
SLOTS = S.slot_order()

# Monitor tensors one reduce launch takes (csrc kMaxStepTensors); more take
# one launch each per this many.  Checked against the module on load.
MAX_STEP_TENSORS = 8

# The reduce writes the energy to the first element of the acc it is given (the state's acc, or one float64
# per monitor tensor with overlap=True).
assert S.ACC_ENERGY == 0, "csrc's reduce writes the energy to acc[0]"

# Reduce and mask grids: a few resident blocks per SM keep enough 16-byte
# loads in flight to saturate HBM, while the last block's float64 sum over
# the per-block partials stays short.
BLOCKS_PER_SM = 4

CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "dgg_kernels_cuda_jit"

_ext = None  # the loaded extension module, once loaded
_ext_error: Optional[str] = None  # why it cannot be loaded, once that is known


class CudaExtensionUnavailable(RuntimeError):
    pass


def find_nvcc() -> Optional[str]:
    """Path of the nvcc torch's extension builder would use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        path = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return shutil.which("nvcc")


def _sources() -> list[str]:
    cu = sorted(str(p) for p in CSRC.glob("*/*.cu"))
    return [str(CSRC / "binding.cpp")] + cu


def _import_prebuilt():
    """dgg_kernels._C, or None when it is not installed; raises if it exists but cannot load."""
    if importlib.util.find_spec("dgg_kernels._C") is None:
        return None
    return importlib.import_module("dgg_kernels._C")


def _build_jit():
    if getattr(torch.version, "hip", None):
        raise CudaExtensionUnavailable(
            f"torch {torch.__version__} is a ROCm build; the csrc/ kernels are CUDA only (use backend=\"triton\")"
        )
    if torch.version.cuda is None:
        raise CudaExtensionUnavailable(
            f"torch {torch.__version__} is a CPU build (torch.version.cuda is None); install a CUDA build of torch"
        )
    if find_nvcc() is None:
        raise CudaExtensionUnavailable(
            "nvcc was not found (set CUDA_HOME or put nvcc on PATH), so the kernels cannot be built just in time; "
            "or build dgg_kernels._C ahead of time with `pip install --no-build-isolation -e .` where nvcc exists"
        )
    sources = _sources()
    missing = [s for s in sources if not os.path.exists(s)]
    if missing or len(sources) < 2:
        raise CudaExtensionUnavailable(
            f"the csrc/ sources are not next to the package (looked in {CSRC}); "
            "install from a source checkout (`pip install --no-build-isolation -e .`)"
        )
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        raise CudaExtensionUnavailable("ninja is not installed (`pip install ninja`); the just-in-time build needs it")
    try:
        return load(
            name=JIT_NAME,
            sources=sources,
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"],
            verbose=os.environ.get("DGG_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # the compiler's output is in the message; keep its end, where the errors are
        text = str(e).strip()
        tail = text[-3000:]
        raise CudaExtensionUnavailable(
            f"the just-in-time build of csrc/ failed ({type(e).__name__}); set DGG_VERBOSE_BUILD=1 for the full log. "
            f"Compiler output (tail):\n{tail}"
        ) from e


def _check_module(mod) -> None:
    """Raise unless ``mod`` (prebuilt or just built) was compiled for this package's tables: the monitor
    tensors one launch takes and the state layout (state.py N_INTS, N_STATS, N_HYPER, N_ACC).  An extension left from
    another checkout (an editable install after a pull) fails here, on every way of loading it."""
    want = {"MAX_STEP_TENSORS": MAX_STEP_TENSORS, "STATE_LAYOUT": (S.N_INTS, S.N_STATS, S.N_HYPER, S.N_ACC)}
    for name, value in want.items():
        have = getattr(mod, name, None)
        if have != value:
            raise RuntimeError(
                f"dgg CUDA extension {getattr(mod, '__file__', mod)} is stale ({name} {have} != {value}); rebuild it "
                "(`pip install --no-build-isolation -e .`, or delete it to build just in time)"
            )
    if not isinstance(getattr(mod, "MASK_THREADS", None), int):
        raise RuntimeError(f"dgg CUDA extension {getattr(mod, '__file__', mod)} is stale (no MASK_THREADS: built "
                           "before its kernels were registered as dgg:: ops); rebuild it")


def load_extension(build: bool = True):
    """The compiled extension: prebuilt dgg_kernels._C, else a just-in-time build (cached per process).

    Raises RuntimeError naming why neither is possible.  A failure is cached
    too, so a broken build is not retried on every gate construction.
    ``build=False`` (what backend="auto" uses) never starts a just-in-time
    build: without a loadable prebuilt module it raises, and caches nothing.
    """
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    if _ext_error is not None:
        raise RuntimeError(_ext_error)
    if not build:
        try:
            mod = _import_prebuilt()
        except ImportError as e:
            raise RuntimeError(f"the prebuilt dgg_kernels._C did not load: {e}") from None
        if mod is None:
            raise RuntimeError("no prebuilt dgg_kernels._C (and build=False: no just-in-time build)")
        _check_module(mod)
        _ext = mod
        return mod
    prebuilt_note = ""
    try:
        try:
            mod = _import_prebuilt()
        except ImportError as e:  # e.g. built against another torch: say so, then try the JIT build
            mod, prebuilt_note = None, f" (the prebuilt dgg_kernels._C did not load: {e})"
        if mod is None:
            mod = _build_jit()
    except CudaExtensionUnavailable as e:
        _ext_error = (
            f'backend="cuda" is unavailable: {e}{prebuilt_note}. Use backend="triton", "torch" or "auto".'
        )
        raise RuntimeError(_ext_error) from None
    _check_module(mod)
    _ext = mod
    return mod


_dense = dense  # the byte-span test now lives in base.py (shared with the triton mask)


class CudaBackend(Backend):
    """The csrc/ kernels on one CUDA device.

    Each instance (one per gate) owns its reduce scratch: float32 partials
    (one per block of a reduce launch) and a uint32 ticket the kernel resets
    itself.  Two gates therefore never share scratch, on any stream; one gate
    must not step on two streams at once.
    """

    name = "cuda"

    def __init__(self, device: torch.device, build: bool = True) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f'backend="cuda" is unavailable: tensors are on {device}, and the CUDA C++ backend needs a CUDA device. '
                'Use backend="torch" or "auto".'
            )
        self._ext = load_extension(build=build)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        self._max_blocks = BLOCKS_PER_SM * sms
        self._partials = torch.empty(self._max_blocks, dtype=torch.float32, device=self.device)
        self._ticket = torch.zeros(1, dtype=torch.int32, device=self.device)
        # The zero fill is queued on the current stream; a step may run on
        # another (a graph-capture stream, say), so wait for it here, once,
        # rather than ever in step().
        torch.cuda.current_stream(self.device).synchronize()
        self._mask_threads = int(self._ext.MASK_THREADS)
        self._mask = DeviceTable()
        self._mask_blocks = 1
        self._plan: Optional[MaskPlan] = None
        self._overlap: Optional[tuple] = None
        # Tensors whose addresses a captured CUDA graph holds: kept alive for
        # this backend's lifetime, so replacing a cached table or growing the
        # scratch later never frees memory a graph replay still reads.
        self._graph_refs: list[torch.Tensor] = []

    def _pin_for_graph(self, *tensors: torch.Tensor) -> None:
        if torch.cuda.is_current_stream_capturing():
            self._graph_refs.extend(tensors)

    def _scratch_for(self, n_tensors: int) -> torch.Tensor:
        need = self._max_blocks * max(1, math.ceil(n_tensors / MAX_STEP_TENSORS))
        if self._partials.numel() < need:
            # Grows only when more monitor tensors arrive than ever before; the
            # old buffer is freed stream-ordered, so in-flight launches are safe.
            self._partials = torch.empty(need, dtype=torch.float32, device=self.device)
        return self._partials

    def _state_args(self, state: GateState, config: GateConfig) -> tuple:
        return (
            state.ring, state.prev, state.ints, state.stats, state.decision, state.hyper, state.acc,
            config.window, config.max_reuse, config.statistic_id, SLOTS,
        )  # fmt: skip

    def step(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        """Reduce every monitor grad and finalize in one launch (one per 8 monitor tensors beyond 8)."""
        grads = list(grads)
        partials = self._scratch_for(len(grads))
        self._pin_for_graph(partials)
        torch.ops.dgg.csrc_step(grads, partials, self._ticket, self._max_blocks, *self._state_args(state, config))

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        """Write the energy (float64) to state.acc, for a collective to all-reduce before finalize()."""
        grads = list(grads)
        partials = self._scratch_for(len(grads))
        self._pin_for_graph(partials)
        torch.ops.dgg.csrc_reduce(grads, partials, self._ticket, state.acc, self._max_blocks)

    def finalize(self, state: GateState, config: GateConfig) -> None:
        """The finalize alone (one thread), on the energy in state.acc."""
        torch.ops.dgg.csrc_finalize(*self._state_args(state, config))

    # -- overlap=True: one launch per monitor grad during backward -------------------
    def _overlap_scratch_for(self, n_tensors: int):
        """Per monitor tensor: its own partials range, ticket and float64 sum, so launches for
        different tensors never share scratch (they may sit on a side stream)."""
        if self._overlap is None or self._overlap[2].numel() != n_tensors:
            self._overlap = (
                torch.empty(n_tensors, self._max_blocks, dtype=torch.float32, device=self.device),
                torch.zeros(n_tensors, dtype=torch.int32, device=self.device),
                torch.zeros(n_tensors, dtype=torch.float64, device=self.device),
            )
        return self._overlap

    def reduce_partial(self, index: int, grad: torch.Tensor, n_tensors: int, state: GateState, config: GateConfig) -> None:
        """Sum of squares of monitor grad ``index`` into its own float64 slot (no finalize)."""
        partials, tickets, sums = self._overlap_scratch_for(n_tensors)
        self._pin_for_graph(partials, tickets, sums)
        torch.ops.dgg.csrc_reduce([grad], partials[index], tickets[index : index + 1], sums[index : index + 1],
                                  self._max_blocks)

    def finalize_partials(self, n_tensors: int, state: GateState, config: GateConfig) -> None:
        """acc = the per-tensor sums added in index order (float64), then the finalize; one launch."""
        _, _, sums = self._overlap_scratch_for(n_tensors)
        self._pin_for_graph(sums)
        torch.ops.dgg.csrc_finalize(*self._state_args(state, config), sums=sums)

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key: Optional[tuple] = None) -> None:
        """One launch over a cached (address, nbytes) table; no per-grad Python work while the grads keep
        their addresses, sizes and layouts (see base.MaskPlan)."""
        if key is None:
            key = MaskPlan.key_of(grads)
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._new_plan(key, grads)
        if plan.spans:
            torch.ops.dgg.csrc_mask(decision, self._mask.table, self._mask_blocks)
        # Gapped views cannot be zeroed as one byte span; they
        # are rare (a grad is normally its own dense tensor), so torch does them.
        for i in plan.strided:
            zero_where(grads[i], decision)

    def _new_plan(self, key: tuple, grads: Sequence[torch.Tensor]) -> MaskPlan:
        plan = MaskPlan(key, grads)
        if plan.spans:
            rows = tuple((addr, nbytes) for _, addr, nbytes in plan.spans)
            if self._mask.update(rows, self.device):
                vectors = math.ceil(max(nb for _, nb in rows) / 16)
                self._mask_blocks = max(1, min(self._max_blocks, math.ceil(vectors / self._mask_threads)))
        self._plan = plan
        return plan
