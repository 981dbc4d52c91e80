"""GatedLinear: the gate inside the lm_head's own backward.

Forward is exactly F.linear.  Backward computes dW (this backward's lm_head
gradient: only the lm_head's share, even when the weight is tied to the input
embedding), db and dh, runs one gate step on dW (and db when the gate watches
the bias) through the gate's backend, and, when the gate closes, writes zeros
into dW, db and dh in place.  With dh zero nothing of that backward reaches
any parameter upstream either.

One backward is one gate step.  With gradient accumulation over k
micro-batches that means k gate steps per optimizer step, each judging one
micro-batch's lm_head gradient; a closed micro-batch contributes nothing to
the accumulated gradients, the others still do.  Do not also call
``gate.step()`` for the same backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _GatedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, gate, watch):
        ctx.save_for_backward(hidden, weight)
        ctx.gate, ctx.watch, ctx.has_bias = gate, watch, bias is not None
        return F.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        go = grad_out.reshape(-1, grad_out.shape[-1])
        dW = go.t().mm(hidden.reshape(-1, hidden.shape[-1]))  # always: the gate needs it
        db = go.sum(0) if ctx.has_bias else None
        dh = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        by_name = {"weight": dW, "bias": db}
        ctx.gate._step_on([by_name[w] for w in ctx.watch], [t for t in (dW, db, dh) if t is not None])
        return (
            dh,
            dW if ctx.needs_input_grad[1] else None,
            db if ctx.has_bias and ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def _watch_list(gate, weight, bias) -> tuple:
    if getattr(gate, "_sharding", None) is not None:
        raise ValueError(
            "a gated linear layer cannot use a gate on sharded (DTensor or process_group) monitor tensors: the dW "
            "its backward sees is this rank's gradient before the engine reduces it across ranks, not the shard "
            "the gate combines. Call gate.step() after backward instead (see docs/distributed.md)."
        )
    watch = []
    for i, t in enumerate(gate.monitor):
        if t is weight:
            watch.append("weight")
        elif bias is not None and t is bias:
            watch.append("bias")
        else:
            raise ValueError(
                f"gate.monitor[{i}] is neither this layer's weight nor its bias: a gated linear layer can only "
                "watch its own gradients (build the gate with monitor=linear.weight)"
            )
    return tuple(watch)


def gated_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate) -> torch.Tensor:
    """F.linear(hidden, weight, bias) whose backward runs one step of ``gate`` on dW (see module doc).

    hidden: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    """
    return _GatedLinearFn.apply(hidden, weight, bias, gate, _watch_list(gate, weight, bias))


class GatedLinear(nn.Module):
    """Wraps an existing nn.Linear lm_head so its backward runs the gate (see module doc).

    ``GatedLinear(model.lm_head, gate)`` with ``gate`` watching ``model.lm_head.weight``.
    """

    def __init__(self, linear: nn.Linear, gate) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GatedLinear wraps an nn.Linear, got {type(linear).__name__}")
        _watch_list(gate, linear.weight, linear.bias)
        self.linear = linear
        self.gate = gate

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return gated_linear(hidden, self.linear.weight, self.linear.bias, self.gate)

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"
