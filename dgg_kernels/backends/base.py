"""The small interface every backend implements.

A step is reduce -> finalize -> mask.  reduce and finalize are separate so that
a collective (an lm_head sharded across ranks) can all-reduce ``state.acc``
between them; a backend may fuse them in ``step`` when nothing sits between.
"""
from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch

from ..config import GateConfig
from ..state import GateState


class Backend:
    name = "abstract"
    auto_reason: str | None = None  # set by backend="auto": what its table lookup found

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        """Write sum(g.float()**2) over all ``grads`` into ``state.acc[ACC_ENERGY]`` (float64); no host sync."""
        raise NotImplementedError

    def finalize(self, state: GateState, config: GateConfig) -> None:
        """Energy in ``state.acc`` -> statistic -> z -> decision -> updated state and stats."""
        raise NotImplementedError

    def step(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        self.reduce(grads, state, config)
        self.finalize(state, config)

    # -- overlap: one tensor's reduction at a time, combined later ------------------
    def reduce_partial(self, index: int, grad: torch.Tensor, n_tensors: int, state: GateState, config: GateConfig) -> None:
        """Reduce monitor tensor ``index`` of ``n_tensors`` into this backend's per-tensor scratch."""
        raise NotImplementedError(f"the {self.name} backend does not support overlap=True")

    def finalize_partials(self, n_tensors: int, state: GateState, config: GateConfig) -> None:
        """Combine the per-tensor scratch of ``reduce_partial`` and finalize, as ``step`` would."""
        raise NotImplementedError(f"the {self.name} backend does not support overlap=True")

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key: tuple | None = None) -> None:
        """Overwrite every tensor in ``grads`` with zeros when ``decision`` (bool[]) is True; else touch nothing.

        ``grads`` are checked already (dgg_kernels.inputs); ``key``: their ``MaskPlan.key_of``, when the caller
        has it (computed here otherwise).
        """
        raise NotImplementedError


class DeviceTable:
    """An int64[n, 2] table of (address, size) pairs on a device, rebuilt only when the pairs change.

    The mask kernels read it to zero many gradients in one launch.  A rebuild
    goes through pinned host memory with ``non_blocking=True``, which does not
    synchronize the host.  The host buffer lives as long as its table, and a
    table built during CUDA-graph capture is kept for good: the captured copy
    and kernels read both again on every replay.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.table: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self._captured: list = []

    def update(self, key: tuple, device: torch.device, rows: Sequence | None = None) -> bool:
        """Make ``table`` hold ``rows`` (default: ``key``, a tuple of (address, size) pairs) unless ``key`` is
        the key it was last built for; True when it was rebuilt."""
        if key == self.key:
            return False
        # device="cpu": under torch.set_default_device("cuda") a bare torch.tensor lands on
        # the GPU, and pin_memory() of a CUDA tensor raises.
        host = torch.tensor(key if rows is None else list(rows), dtype=torch.int64, device="cpu").reshape(-1, 2)
        if device.type == "cuda":
            host = host.pin_memory()
            self.table = host.to(device, non_blocking=True)
            if torch.cuda.is_current_stream_capturing():
                self._captured.append((self.table, host))
        else:
            self.table = host
        self.key, self.host = key, host
        return True


# -- the params grads a closed gate zeroes -----------------------------------------
# Every dtype's zero is the all-zero bit pattern, so a grad can be zeroed as bytes whatever its dtype, except
# float8_e8m0fnu (exponent-only: it has no zero, its all-zero byte is 2**-127), which the gate refuses
# (dgg_kernels.inputs).
NO_ZERO_DTYPES = frozenset(getattr(torch, n) for n in ("float8_e8m0fnu",) if hasattr(torch, n))
# masked_fill_ has kernels for these; the others (float8, float4, uint16-64) are zeroed through an
# integer view of their bytes
_MASKED_FILL_DTYPES = frozenset((
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128, torch.complex64, torch.complex32,
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
))
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_where(g: torch.Tensor, decision: torch.Tensor) -> None:
    """Write zeros into every element of ``g`` (any layout, any dtype but NO_ZERO_DTYPES) when ``decision``
    (bool[]) is True; no host sync.  Written, not multiplied: 0 * NaN is NaN."""
    if g.dtype not in _MASKED_FILL_DTYPES:
        g = g.view(_INT_OF_SIZE[g.element_size()])
    g.masked_fill_(decision, 0)

_DATA_PTR = torch.Tensor.data_ptr
_NBYTES = operator.attrgetter("nbytes")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_NOT = operator.not_


def dense(t: torch.Tensor) -> bool:
    """True when t's elements fill one storage span exactly (any dim order), so it can be zeroed as bytes."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _field(reader, what: str) -> functools.cached_property:
    """A GradFields field: ``reader`` of every gradient, as a tuple, read once (a C-level map)."""

    def read(self) -> tuple:
        return tuple(map(reader, self.grads))

    read.__doc__ = f"Per gradient: {what}."
    return functools.cached_property(read)


class GradFields:
    """The metadata of one step's list of gradients that a cache on the step path may depend on.

    Each field is a tuple with one entry per gradient, read from the tensors
    the first time a cache asks for it (a C-level ``map``, no per-gradient
    Python code, no device read) and at most once per step.  A cache's key is
    the tuple of the fields it depends on (``MaskPlan.key_for``,
    ``inputs.ParamGrads.check_key``): each cache declares its own, and a field
    not read this step costs nothing.

    ``geometry`` is (index, sizes, strides) of every non-contiguous gradient:
    a contiguous tensor is described completely by its address, dtype and
    byte size, the others also need their shape and strides (a transposed
    view and a gapped view can share address and byte size).  Reading a field
    that a tensor does not have (the address of a sparse tensor) raises
    RuntimeError; the caller then runs its full check, which names the tensor.
    """

    def __init__(self, grads: Sequence[torch.Tensor]) -> None:
        self.grads = grads

    ptrs = _field(_DATA_PTR, "addresses (int)")
    nbytes = _field(_NBYTES, "byte sizes (int)")
    dtypes = _field(_DTYPE, "dtypes")
    devices = _field(_DEVICE, "devices")
    layouts = _field(_LAYOUT, "layouts (torch.strided, torch.sparse_coo, ...)")
    types = _field(type, "Python types (a DTensor is not a plain Tensor)")
    contiguous = _field(_IS_CONTIGUOUS, "is_contiguous() (bool)")

    @functools.cached_property
    def geometry(self) -> tuple:
        """(index, shape, strides) of every non-contiguous gradient; () when all are contiguous."""
        contiguous = self.contiguous
        if all(contiguous):
            return ()
        return tuple((i, tuple(g.shape), g.stride()) for i, (g, c) in enumerate(zip(self.grads, contiguous)) if not c)


class MaskPlan:
    """Which params grads a mask kernel can zero as byte spans, cached per list of grads.

    ``key_for(fields)`` is everything the plan depends on, read with C-level
    loops (no per-grad Python code): the number of grads and every grad's
    address, byte size and contiguity, plus shape and strides of the
    non-contiguous ones.  A contiguous grad is one byte span whatever its
    dtype or shape; a non-contiguous one is a span only if dense, which its
    shape and strides decide.  A new grad tensor each step
    (``zero_grad(set_to_none=True)``) usually lands at the same address, so the
    key, and with it the plan and the device table built from it, stays the
    same.  Anything else (a grad that moved, changed size, was replaced by
    another view of a shared buffer, appeared or disappeared) changes the key
    and the plan is rebuilt from the grads themselves.  The dtype is not in the
    key: zeros are written as bytes, which is right for every accepted dtype
    (``dgg_kernels.inputs`` refuses the one without a zero).

    spans:   (index, address, nbytes) of every dense grad (the common case:
             every grad), zeroed as bytes whatever its dtype;
    strided: indices of the rest (gapped views), which the caller zeroes
             with ``zero_where``.
    Empty grads are in neither.
    """

    __slots__ = ("key", "spans", "strided", "n")

    def __init__(self, key: tuple, grads: Sequence[torch.Tensor]) -> None:
        # the grads were checked (dense, on the gate's device, no overlapping memory) by dgg_kernels.inputs
        spans, strided = [], []
        for i, g in enumerate(grads):
            if g.numel() == 0:
                continue
            if dense(g):
                spans.append((i, g.data_ptr(), g.numel() * g.element_size()))
            else:
                strided.append(i)
        self.key, self.spans, self.strided, self.n = key, spans, strided, len(grads)

    @staticmethod
    def key_for(fields: GradFields) -> tuple:
        """Everything a plan depends on: the number of grads and, per grad, its address, byte size and (for a
        non-contiguous grad) shape and strides, which decide whether it is one byte span and which one."""
        return (len(fields.grads), fields.ptrs, fields.nbytes, fields.contiguous, fields.geometry)

    @staticmethod
    def key_of(grads: Sequence[torch.Tensor]) -> tuple:
        return MaskPlan.key_for(GradFields(grads))
