"""Backend selection.  Each backend implements reduce, finalize and mask (see base.Backend)."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from .base import Backend
from .torch_ref import TorchBackend


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors under TRITON_INTERPRET=1 (used by CI)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device: torch.device, tensors: Sequence[torch.Tensor] = ()) -> Backend:
    """The backend called ``name`` for tensors on ``device``.

    "auto": torch off CUDA; on CUDA the measured table's pick (backends/auto.py)
    for the dtype and total size of ``tensors`` (the monitor tensors) on this
    device model, triton where the table has no measurement.  A pick of "cuda"
    uses the prebuilt extension only (never a just-in-time build at gate
    construction) and is triton when that does not load; triton is torch where
    triton is not usable.  ``backend.auto_reason`` says what was looked up.
    """
    if name == "torch":
        return TorchBackend()
    if name == "auto":
        return _auto(device, tensors)
    if name == "triton":
        if not triton_usable(device):
            reason = (
                "triton is not installed"
                if importlib.util.find_spec("triton") is None
                else f"tensors are on {device}; triton needs a CUDA device (or CPU with TRITON_INTERPRET=1)"
            )
            raise RuntimeError(f'backend="triton" is unavailable: {reason}. Use backend="torch" or "auto".')
        from .triton_fused import TritonBackend

        return TritonBackend()
    if name == "cuda":
        from .cuda_ext import CudaBackend

        return CudaBackend(device)
    raise ValueError(f"unknown backend {name!r}")


def _auto(device: torch.device, tensors: Sequence[torch.Tensor]) -> Backend:
    if device.type != "cuda":
        chosen: Backend = TorchBackend()
        chosen.auto_reason = f"tensors on {device.type}: torch"
        return chosen
    from . import auto

    dtype, nbytes = auto.monitor_dtype_and_bytes(tensors)
    pick, why = auto.choose(torch.cuda.get_device_name(device), dtype, nbytes)
    chosen = None
    if pick == "cuda":
        try:
            from .cuda_ext import CudaBackend

            chosen = CudaBackend(device, build=False)
        except Exception as e:  # no loadable prebuilt extension: triton, with no error
            pick, why = "triton", f"{why}; cuda extension not loadable ({str(e)[:120]}): triton"
    if chosen is None and pick == "triton" and not triton_usable(device):
        pick, why = "torch", f"{why}; triton not usable: torch"
    if chosen is None and pick == "torch":
        chosen = TorchBackend()
    if chosen is None:
        from .triton_fused import TritonBackend

        chosen = TritonBackend()
    chosen.auto_reason = why
    return chosen
