"""backend="cuda": the csrc extension (built by setup.py, or just in time on first use)."""
from __future__ import annotations

import torch

from .base import Backend


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f'backend="cuda" is unavailable: tensors are on {device}, and the CUDA C++ backend needs a CUDA device. '
                'Use backend="torch" or "auto".'
            )
        raise RuntimeError('backend="cuda" is not built yet in this version of dgg-kernels; use "triton" or "torch".')
