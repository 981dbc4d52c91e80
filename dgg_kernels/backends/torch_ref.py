"""The semantics of one gate step, in plain torch (CPU and GPU).

Every other backend must match this one step for step: decisions exactly,
statistics within float32 rounding.  It is written with device-side ops only
(torch.where instead of Python branches) so it never synchronizes the host.  The
one value it reads on the host is the decision of a step on CPU tensors, where
the decision already sits in host memory and there is no device to wait for:
an open CPU step then writes no gradient byte (TorchBackend.mask).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import state as S
from ..config import GateConfig
from ..state import GateState
from . import compiled_sumsq
from .base import Backend, dense, zero_where
# The finalize, written once for its tensor form (finalize_reference: device ops, no host sync) and its
# host form (finalize_host: Python numbers through numpy views, for a state in host memory): finalize.py.
from .finalize import FLT_MAX, finalize_host, finalize_reference, host_state  # noqa: F401


# -- the reduction: sum of float32 squares, widened by chunks ------------------------
# Eager mode never materializes a full-size float32 copy of a gradient (what vector_norm(g, dtype=float32)
# does on a half-precision g, and g.float() on float64): entries are widened CHUNK at a time into one
# float32 scratch buffer per backend object and device.
# CPU: 2**19 entries, a 2 MiB scratch that stays in cache between the widening copy and the sum that
#      reads it back; the fastest of 2**17..2**21 measured on a 2-core AMD EPYC (smaller chunks pay the
#      two Python-level ops per chunk more often, larger ones fall out of cache).
# Accelerators: 2**24 entries, a 64 MiB scratch, so a gradient of many GB takes tens of launches.
CPU_CHUNK = 1 << 19
ACCEL_CHUNK = 1 << 24
# float32 gradients are read in place (no scratch) in pieces of FP32_PIECE entries (64 MiB), each as rows
# of ROW entries: see _sumsq_rows.
FP32_PIECE = 1 << 24
ROW = 4096


def _flat_span(g: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of every element of ``g`` in memory order when g is dense (contiguous, transposed,
    permuted), else None (gapped or overlapping views).  A sum of squares does not depend on the order."""
    if g.is_contiguous():
        return g.view(-1)
    if dense(g):
        # every stride is positive and the elements fill [offset, offset + numel) exactly
        return g.as_strided((g.numel(),), (1,))
    return None


def _strided_pieces(g: torch.Tensor, chunk: int):
    """Views of a non-dense ``g`` (any shape, gapped or overlapping), at most ``chunk`` entries each,
    that together visit every logical entry once: slices along dim 0, recursing into a slice that is
    itself longer than a chunk."""
    if g.numel() <= chunk:
        yield g
    elif g.dim() == 1:
        yield from g.split(chunk)
    elif g[0].numel() <= chunk:
        yield from g.split(max(1, chunk // g[0].numel()))
    else:
        for row in g.unbind(0):
            yield from _strided_pieces(row, chunk)


def _pieces(g: torch.Tensor, chunk: int):
    """Views covering every entry of ``g`` once, at most ``chunk`` entries each (1-D and contiguous when
    g is dense)."""
    span = _flat_span(g)
    return span.split(chunk) if span is not None else _strided_pieces(g, chunk)


def _sumsq_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a 1-D contiguous float32 CPU ``x`` (float32 0-dim), reading x once, in place.

    The norms of rows of ROW entries (vector_norm's vectorized last-dim kernel: as fast as one
    vector_norm of x), then their squares summed: no float32 accumulation runs over more than ROW
    terms, so the result stays within a few float32 roundings of the exact sum at any length (a single
    vector_norm of 16M entries is off by about 1e-3 relative).
    """
    n = x.numel()
    rows = n // ROW
    if rows == 0:
        return torch.dot(x, x)
    if rows * ROW == n:  # no tail: no slice (each op costs tens of microseconds with cold caches)
        norms = torch.linalg.vector_norm(x.view(rows, ROW), dim=1)
    else:
        norms = torch.cat([torch.linalg.vector_norm(x[: rows * ROW].view(rows, ROW), dim=1),
                           torch.linalg.vector_norm(x[rows * ROW:]).reshape(1)])
    return torch.dot(norms, norms)


def _widened(p: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``p`` (any dtype and layout, at most scratch.numel() entries) rounded to float32 entry by entry, as a
    1-D contiguous view of ``scratch`` (float64 beyond the float32 range becomes inf, as in the kernels)."""
    n = p.numel()
    x = scratch if n == scratch.numel() else scratch[:n]  # a full chunk (the common case) needs no slice
    (x if p.dim() == 1 else x.view(p.shape)).copy_(p)
    return x


def _sum64(parts: list, device: torch.device) -> torch.Tensor:
    """The float32 0-dim ``parts`` added in float64 (0 for none)."""
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    if len(parts) == 1:
        return parts[0].to(torch.float64)
    return torch.sum(torch.stack(parts), dtype=torch.float64)


def _cpu_energy(g: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """sum(float32(g)**2) of a CPU ``g`` as a float64 0-dim tensor.

    Dense float32: read in place (_sumsq_rows).  Dense bfloat16/float16 of compiled_sumsq.MIN_ENTRIES or
    more: one compiled pass (compiled_sumsq), when torch.compile works here.  Anything else (smaller half
    types, float64, gapped views): _chunked_sumsq.
    """
    span = _flat_span(g)
    if g.dtype == torch.float32 and span is not None:
        pieces = (span,) if span.numel() <= FP32_PIECE else span.split(FP32_PIECE)
        return _sum64([_sumsq_rows(p) for p in pieces], g.device)
    if span is not None and compiled_sumsq.applies(g):
        rows, tail = compiled_sumsq.split_rows(span)
        head = compiled_sumsq.rows_sumsq(rows)
        if head is not None:  # the tail (under ROW entries) the chunked way
            return head + _chunked_sumsq(tail, scratch) if tail.numel() else head
    return _chunked_sumsq(g, scratch)


def _chunked_sumsq(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum(float32(g)**2) of a CPU ``g`` of any dtype and layout as a float64 0-dim tensor.

    CPU_CHUNK entries at a time widened into ``scratch`` and summed with BLAS dot there, the fastest
    eager float32 sum of squares torch has on a CPU (the chunk is in cache; its float32 accumulation over
    a chunk measured within about 2e-5 relative of the exact sum).  Chunk sums are added in float64.
    """
    parts = []
    for p in _pieces(g, CPU_CHUNK):
        x = _widened(p, scratch)
        parts.append(torch.dot(x, x))
    return _sum64(parts, g.device)


def _device_energy(g: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """sum(float32(g)**2) of ``g`` on an accelerator as a float64 0-dim tensor, without a host sync.

    float32: one vector_norm kernel reads g in place, whatever its layout.  Other dtypes: ACCEL_CHUNK
    entries at a time widened into ``scratch`` and reduced there (a fixed number of launches per
    gradient size, no data-dependent control flow).
    """
    if g.dtype == torch.float32:
        return torch.linalg.vector_norm(g).to(torch.float64).square()
    parts = [torch.linalg.vector_norm(_widened(p, scratch)).square() for p in _pieces(g, ACCEL_CHUNK)]
    return _sum64(parts, g.device)


def _norm32(g: torch.Tensor) -> torch.Tensor:
    """The float32 L2 norm of ``g`` with every entry rounded to float32 first, in one traced expression.

    What the compiled path (torch.compile tracing the backend) uses: inductor fuses the widening into its
    reduction, so no temporary is materialized there.  vector_norm refuses to narrow float64, hence the
    explicit cast (fused as well).  In eager mode this form would widen into a full-size float32 copy
    (vector_norm(dtype=...) on a half type, or .float()), which TorchBackend avoids by chunking.
    """
    return torch.linalg.vector_norm(g.float() if g.dtype == torch.float64 else g, dtype=torch.float32)


# -- the mask ----------------------------------------------------------------------------------------------
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_value(t: torch.Tensor) -> bool | int | float | None:
    """The 0-dim ``t`` as a Python number when reading it costs no synchronization, else None.

    A value only for a plain tensor in host memory (device "cpu") outside tracing: CPU ops run synchronously,
    so the value is final when the op that wrote it returns, and reading it is a load of a few bytes.  On CUDA
    and other accelerators, under torch.compile tracing, and for tensor subclasses (fake, functional, DTensor)
    it returns None and the caller must stay on the device.
    """
    if t.device.type != "cpu" or type(t) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    return t.item()  # host-read-ok: a plain CPU tensor, already computed: no device to wait for


def _write_zeros(g: torch.Tensor) -> None:
    """Write zeros into every element of ``g`` (any layout; any dtype whose zero is all-zero bits).

    Through an integer view of the same element size, so float8/float4/uint16-64 (no fill kernels) go
    the same way as the rest; a write only, g is not read (half the traffic of masked_fill_).
    """
    view = _INT_OF_SIZE.get(g.element_size())
    (g.view(view) if view is not None else g).zero_()


class TorchBackend(Backend):
    """The plain-torch backend: the executable spec, and the fallback wherever the kernels do not run.

    Costs (docs/semantics.md, "The torch backend's cost"): the reduction reads each monitor gradient once
    (half types and float64 widened through a chunk-sized float32 scratch); the mask writes nothing on an
    open CPU step and only zeros on a closed one; on accelerators it reads and writes every params byte
    (masked_fill_ with the 0-dim device decision), which needs no host synchronization.
    """

    name = "torch"

    def __init__(self) -> None:
        self._scratch: dict = {}  # device -> float32[<= one chunk], the widening buffer, kept across steps
        self._parts = None

    # -- reduction ------------------------------------------------------------------------------------
    def _scratch_for(self, device: torch.device, n: int) -> torch.Tensor:
        """A float32 buffer of at least ``n`` (<= one chunk) entries on ``device``, reused across steps.

        Reused because a fresh allocation of a chunk costs page faults each step on CPU.  A CUDA step on
        a side stream (overlap=True) uses it only after the main stream's last use (gate.py waits).
        """
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, device=device)
            self._scratch[device] = buf
        return buf

    def _energy(self, g: torch.Tensor) -> torch.Tensor:
        """sum(float32(g)**2) as a float64 0-dim tensor on g's device; no host sync, no full-size temporary."""
        if torch.compiler.is_compiling():
            # traced: the compiler fuses the widening into its reduction, no temporary is materialized
            return _norm32(g).to(torch.float64) ** 2
        cpu = g.device.type == "cpu"
        # float32 is read in place (on CPU when dense); everything else is widened through the scratch
        widens = g.dtype != torch.float32 or (cpu and _flat_span(g) is None)
        scratch = self._scratch_for(g.device, min(CPU_CHUNK if cpu else ACCEL_CHUNK, g.numel())) if widens else None
        return _cpu_energy(g, scratch) if cpu else _device_energy(g, scratch)

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        energies = [self._energy(g) for g in grads]
        total = energies[0] if len(energies) == 1 else torch.stack(energies).sum()
        state.acc[S.ACC_ENERGY] = total

    def finalize(self, state: GateState, config: GateConfig) -> None:
        (finalize_host if host_state(state) else finalize_reference)(state, config)

    def reduce_partial(self, index, grad, n_tensors, state, config) -> None:
        if self._parts is None or self._parts.numel() != n_tensors or self._parts.device != grad.device:
            self._parts = torch.zeros(n_tensors, dtype=torch.float64, device=grad.device)
        self._parts[index].copy_(self._energy(grad))

    def finalize_partials(self, n_tensors, state, config) -> None:
        state.acc[S.ACC_ENERGY] = self._parts.sum()
        self.finalize(state, config)

    # -- mask -----------------------------------------------------------------------------------------
    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor], key=None) -> None:
        closed = host_value(decision)
        if closed is None:
            # On a device the decision stays there: masked_fill_ with the 0-dim bool decision reads and
            # writes every byte, open or closed (docs/semantics.md, "The torch backend's cost").
            for g in grads:
                zero_where(g, decision)
        elif closed:
            for g in grads:
                _write_zeros(g)
