"""Backend selection.  Each backend implements reduce, finalize and mask (see base.Backend)."""
from __future__ import annotations

import importlib.util
import os

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


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` for tensors on ``device``; "auto" picks triton on CUDA, else torch."""
    if name == "torch":
        return TorchBackend()
    if name == "auto":
        if device.type == "cuda" and triton_usable(device):
            from .triton_fused import TritonBackend

            return TritonBackend()
        return TorchBackend()
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
