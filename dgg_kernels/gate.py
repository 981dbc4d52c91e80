"""DynamicGradientGate: owns the device state, picks a backend, masks gradients.

The gate never does arithmetic itself: the backend reduces, finalizes and
masks (see backends/torch_ref.py for the semantics).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence, Union

import torch

from . import state as S
from .backends import resolve_backend
from .config import GateConfig
from .state import GateState

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _tensor_list(value, what: str) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    if not items:
        raise ValueError(f"{what} is empty: pass a Tensor or a non-empty sequence of Tensors")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a Tensor")
    return items


class DynamicGradientGate:
    """A sliding-window Z-score gate on the gradient of ``monitor`` (usually lm_head.weight).

    Call ``step()`` after backward and before ``optimizer.step()``.  When the
    gate closes, every ``.grad`` of ``params`` is overwritten with zeros in
    place and the trainer should stop reusing the current rollout batch
    (``should_stop()``).  All state lives on the gradients' device; ``step()``
    never synchronizes with the host.

    Args:
        monitor: a Tensor, or a sequence of Tensors, whose ``.grad`` is watched.
        params: Tensors whose ``.grad`` is zeroed when the gate closes
            (default: the monitor tensors).  Entries whose ``.grad`` is None
            at step() are skipped.
        window, threshold, statistic, eps, max_reuse, backend: see GateConfig.
    """

    def __init__(
        self,
        monitor: TensorOrTensors,
        params: Iterable[torch.Tensor] | None = None,
        *,
        window: int = 8,
        threshold: float = 0.3,
        statistic: str = "norm",
        eps: float = 1e-8,
        max_reuse: int = 4,
        backend: str = "auto",
    ) -> None:
        self.config = GateConfig(
            window=window, threshold=threshold, statistic=statistic, eps=eps, max_reuse=max_reuse, backend=backend
        )
        self.monitor = _tensor_list(monitor, "monitor")
        self.params = list(self.monitor) if params is None else _tensor_list(params, "params")
        devices = {t.device for t in self.monitor + self.params}
        if len(devices) != 1:
            raise ValueError(
                f"monitor and params must live on one device, got {sorted(str(d) for d in devices)}"
            )
        self.device = devices.pop()
        self._backend = resolve_backend(self.config.backend, self.device)
        self.state = GateState.new(self.config.window, self.config.threshold, self.config.eps, self.device)

    @property
    def backend(self) -> str:
        """The backend in use: "torch", "triton" or "cuda" (what "auto" chose)."""
        return self._backend.name

    def _monitor_grads(self) -> list[torch.Tensor]:
        grads = []
        for i, t in enumerate(self.monitor):
            if t.grad is None:
                raise RuntimeError(
                    f"monitor[{i}] (shape {tuple(t.shape)}) has no .grad: backward has not reached it. "
                    "Call gate.step() after loss.backward() and before optimizer.step()."
                )
            grads.append(t.grad)
        return grads

    def _param_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def step(self) -> torch.Tensor:
        """Run one gate step on the current gradients.

        Returns a 0-dim torch.bool tensor on the gradients' device: True when
        the gate closed (the params' gradients are now zero).  No host sync.
        """
        grads = self._monitor_grads()
        self._backend.step(grads, self.state, self.config)
        self._backend.mask(self.state.decision, self._param_grads())
        return self.state.decision.view(torch.bool).clone()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Make a closed gate skip ``optimizer.step()`` on device; returns a handle with ``.remove()``.

        Fused Adam/AdamW/SGD/Adagrad (fused=True): the whole update is skipped
        (params, every state tensor and the step count stay bit-identical),
        also under torch.amp.GradScaler.  Other optimizers only get the zeroed
        gradients, and attach() warns once saying so.
        """
        from .optim import attach

        return attach(self, optimizer)

    def new_batch(self) -> None:
        """A fresh rollout batch starts: the next step() has reuse index 1 and the stop flag is cleared."""
        self.state.ints[S.REUSE : S.STOP + 1].zero_()

    def should_stop(self) -> bool:
        """True once the gate closed, or max_reuse steps ran, since new_batch().  Reads the device."""
        return bool(self.state.ints[S.STOP].item())  # host-read-ok: the caller's loop decision, not step()

    def stats(self) -> dict[str, torch.Tensor]:
        """The last step's report as 0-dim device tensors (a snapshot; no host read).

        energy, norm, statistic, mean, std, z (float32); closed (bool);
        reuse_index, accepted, closed_total (int64).  z is 0 until the window is full.
        """
        f = self.state.stats.clone()
        i = self.state.ints.clone()
        return {
            "energy": f[S.ENERGY],
            "norm": f[S.NORM],
            "statistic": f[S.STATISTIC],
            "mean": f[S.MEAN],
            "std": f[S.STD],
            "z": f[S.Z],
            "closed": f[S.CLOSED] != 0,
            "reuse_index": i[S.REUSE],
            "accepted": i[S.ACCEPTED],
            "closed_total": i[S.CLOSED_TOTAL],
        }

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: the settings and the device state (copies)."""
        cfg = dataclasses.asdict(self.config)
        cfg.pop("backend")
        return {"config": cfg, "state": self.state.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state_dict(); refuses (and changes nothing) if the settings differ."""
        if not isinstance(sd, dict) or "config" not in sd or "state" not in sd:
            raise KeyError("gate state_dict needs the keys 'config' and 'state' (from DynamicGradientGate.state_dict())")
        mine = dataclasses.asdict(self.config)
        mine.pop("backend")
        differ = sorted(k for k in set(mine) | set(sd["config"]) if mine.get(k) != sd["config"].get(k))
        if differ:
            raise ValueError(
                "gate state_dict was saved with other settings: "
                + ", ".join(f"{k}={sd['config'].get(k)!r} (this gate: {mine.get(k)!r})" for k in differ)
            )
        self.state.load_state_dict(sd["state"])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DynamicGradientGate(window={c.window}, threshold={c.threshold}, statistic={c.statistic!r}, "
            f"eps={c.eps}, max_reuse={c.max_reuse}, backend={self.backend!r}, device={self.device})"
        )
