"""The small interface every backend implements.

A step is reduce -> finalize -> mask.  reduce and finalize are separate so that
a collective (an lm_head sharded across ranks) can all-reduce ``state.acc``
between them; a backend may fuse them in ``step`` when nothing sits between.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import GateConfig
from ..state import GateState


class Backend:
    name = "abstract"

    def reduce(self, grads: Sequence[torch.Tensor], state: GateState, config: GateConfig) -> None:
        """Write sum(g.float()**2) over all ``grads`` into ``state.acc`` (float64[1]); no host sync."""
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

    def mask(self, decision: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        """Overwrite every tensor in ``grads`` with zeros when ``decision`` (bool[]) is True; else touch nothing."""
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

    def update(self, key: tuple, device: torch.device) -> bool:
        """Make ``table`` hold ``key`` (a tuple of (address, size) pairs); True when it was rebuilt."""
        if key == self.key:
            return False
        # device="cpu": under torch.set_default_device("cuda") a bare torch.tensor lands on
        # the GPU, and pin_memory() of a CUDA tensor raises.
        host = torch.tensor(key, dtype=torch.int64, device="cpu").reshape(-1, 2)
        if device.type == "cuda":
            host = host.pin_memory()
            self.table = host.to(device, non_blocking=True)
            if torch.cuda.is_current_stream_capturing():
                self._captured.append((self.table, host))
        else:
            self.table = host
        self.key, self.host = key, host
        return True
