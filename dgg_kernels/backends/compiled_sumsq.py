"""The sum of float32 squares of a large half-precision CPU gradient, compiled once by torch.compile.

Why: eager torch on a CPU has no op that reads a bfloat16 or float16 tensor once and sums its squares in
float32 (vector_norm(g, dtype=torch.float32) and sum(..., dtype=...) take a slow per-element path; the
chunked widening TorchBackend uses otherwise costs about 2x a plain vector_norm, its copy and its dot
running one after the other).  Inductor fuses the widening, the square and the sum into one vectorized
pass: about 1.0-1.3x vector_norm for bfloat16 (benchmarks/torch_backend_cpu.py).

The expression: rows of ROW entries, each row's squares summed in float32 (at most ROW terms per float32
run), the rows' sums added in float64, the same arithmetic as the chunked path with shorter runs.  It is
traced with dynamic shapes, so one graph per dtype serves every gradient size.

When it is not used (TorchBackend falls back to the chunked path, same result within float32 rounding):
- the tensor is below MIN_ENTRIES (a compile costs seconds, the chunked path a few ms per step there);
- torch.compile does not compile this call (TORCHDYNAMO_DISABLE=1, TORCH_COMPILE_DISABLE=1,
  torch.compiler.set_stance("force_eager"), or a new guard variant past dynamo's recompile limit): the
  function then runs eagerly, sees that it is not being traced and returns None instead of widening the
  whole gradient into a float32 temporary (not fullgraph=True, which would raise at the limit);
- a TorchDispatchMode is active (torch's schema check, a FlopCounterMode, a debugging mode): dynamo does
  not compile under one, and it then runs this function eagerly for good, also after the mode ends (seen
  with torch 2.13), so the compiled path is not called at all there;
- compiling failed once in this process (no C++ compiler, no Python headers, a read-only cache
  directory): one RuntimeWarning names the error, and the compiled path is not tried again.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

DTYPES = (torch.bfloat16, torch.float16)
MIN_ENTRIES = 1 << 22  # 8 MiB of bfloat16
ROW = 1024

_compiled = None  # the torch.compile'd _rows_sumsq, built on first use
_failure: Exception | None = None  # why compiling failed, if it did: the compiled path is off for the process


def _rows_sumsq(x: torch.Tensor) -> torch.Tensor | None:
    """sum(float32(x)**2) of a 2-D ``x`` (rows, ROW) as float64 0-dim; None when not being traced."""
    if not torch.compiler.is_compiling():
        return None  # eager: x.float() would be a full-size float32 copy
    rows = torch.sum(torch.square(x.float()), dim=1, dtype=torch.float32)
    return torch.sum(rows, dtype=torch.float64)


def applies(g: torch.Tensor) -> bool:
    """Whether the compiled path is to be tried for a dense CPU ``g`` (dtype and size; not its values)."""
    return _failure is None and g.dtype in DTYPES and g.numel() >= MIN_ENTRIES


def split_rows(span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D contiguous ``span`` as (its whole rows, an (n, ROW) view for rows_sumsq; the rest, under ROW
    entries, 1-D)."""
    n_rows = span.numel() // ROW
    return span[: n_rows * ROW].view(n_rows, ROW), span[n_rows * ROW:]


def rows_sumsq(rows: torch.Tensor) -> torch.Tensor | None:
    """sum(float32(rows)**2) of a contiguous (n, ROW) half-precision CPU tensor, float64 0-dim, or None
    when the compiled path is unavailable (the caller then sums the chunked way)."""
    global _compiled, _failure
    if is_in_torch_dispatch_mode():
        return None  # calling it here would turn the compiled path off for the rest of the process
    try:
        if _compiled is None:  # torch.compile itself refuses some Pythons: inside the try as well
            _compiled = torch.compile(_rows_sumsq, dynamic=True)
        with torch.no_grad():  # one grad mode in the guards: no recompile when step() runs under no_grad
            return _compiled(rows)
    except Exception as e:  # compiling failed (a sum of squares raises on no value): off for the process
        _failure = e
        warnings.warn(f"dgg_kernels: the compiled CPU reduction for half-precision gradients is unavailable "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the torch backend "
                      "uses its chunked reduction instead (about 2x the time of a vector_norm)",
                      RuntimeWarning, stacklevel=2)
        return None
