"""GatedLinear: the gate inside the lm_head's own backward.

Forward is exactly F.linear (under autocast, in the autocast dtype, as
nn.Linear computes it).  Backward computes dW (this backward's lm_head
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

``GatedLinear`` is an ``nn.Linear`` that holds the very Parameter objects of
the layer it replaces and only overrides ``forward``: the model's state dict,
weight tying, ``save_pretrained``/``from_pretrained`` and anything that checks
``isinstance(m, nn.Linear)`` see the layer they saw before (docs/training.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _autocast_dtype(device_type: str):
    """The dtype autocast computes F.linear in on ``device_type``, or None when autocast is off there."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _GatedLinearFn(torch.autograd.Function):
    """F.linear with the gate in its backward; its inputs already have the dtypes to compute in."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, gate, watch):
        ctx.save_for_backward(hidden, weight)
        ctx.gate, ctx.watch, ctx.has_bias = gate, watch, bias is not None
        return F.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        # the forward's dtypes, whatever autocast state backward() was called under
        with _no_autocast(grad_out.device.type):
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


def _watch_list(gate, weight, bias, module: bool = False) -> tuple:
    sharding = getattr(gate, "_sharding", None)
    if sharding is not None and getattr(sharding, "sharded", True):
        raise ValueError(
            "a gated linear layer cannot use a gate on sharded (DTensor or process_group) monitor tensors: the dW "
            "its backward sees is this rank's gradient before the engine reduces it across ranks, not the shard "
            "the gate combines. Call gate.step() after backward instead (see docs/distributed.md)."
        )
    if sharding is not None:
        raise ValueError(
            "a gated linear layer cannot use a gate whose decisions are shared by several ranks (built under "
            "torch.distributed with more than one rank): the dW its backward sees is this rank's gradient before "
            "DDP or FSDP reduce it across ranks, so each rank would judge a different gradient. Call gate.step() "
            "after backward instead (see docs/distributed.md)."
        )
    watch = []
    for i, t in enumerate(gate.monitor):
        if t is weight:
            watch.append("weight")
        elif bias is not None and t is bias:
            watch.append("bias")
        elif module:
            raise ValueError(
                f"GatedLinear's gate.monitor[{i}] is no longer this layer's weight or bias: the layer's Parameter "
                "was replaced after the gate was built (tie_weights() after set_input_embeddings(), "
                "load_state_dict(assign=True), an assignment to .weight, ...). Give the layer a gate on its "
                "current weight: layer.gate = dgg.DynamicGradientGate(layer.weight) (docs/training.md)"
            )
        else:
            raise ValueError(
                f"gate.monitor[{i}] is neither this layer's weight nor its bias: a gated linear layer can only "
                "watch its own gradients (build the gate with monitor=linear.weight)"
            )
    return tuple(watch)


def _apply(hidden, weight, bias, gate, watch):
    device_type = hidden.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return _GatedLinearFn.apply(hidden, weight, bias, gate, watch)

    # What autocast does for F.linear: every floating input but float64 in the autocast dtype.  The casts are
    # ordinary autograd ops outside the Function, so dW, db and dh arrive in the parameters' and the hidden
    # state's own dtypes, and the Function computes (and saves) exactly what nn.Linear would.
    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        return t.to(dtype)

    with _no_autocast(device_type):
        return _GatedLinearFn.apply(cast(hidden), cast(weight), cast(bias), gate, watch)


def gated_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate) -> torch.Tensor:
    """F.linear(hidden, weight, bias) whose backward runs one step of ``gate`` on dW (see module doc).

    hidden: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    Under ``torch.autocast`` it computes in the autocast dtype, as F.linear does.
    """
    return _apply(hidden, weight, bias, gate, _watch_list(gate, weight, bias))


# the hook tables of nn.Module: a layer carrying any of these is refused (its hooks would not follow)
_HOOK_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
# what nn.Module.__init__ creates: built fresh, never shared with the layer replaced
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


class GatedLinear(nn.Linear):
    """The ``nn.Linear`` ``linear``, whose backward runs ``gate`` (see module doc).

    ``model.lm_head = GatedLinear(model.lm_head, gate)`` with ``gate`` watching
    ``model.lm_head.weight``.  The new module holds the same Parameter objects
    (so ``lm_head.weight`` stays ``lm_head.weight``, tied or not) and the same
    attributes; only ``forward`` differs.  ``linear`` itself is left as it was.

    Refused (nothing is modified): a subclass of nn.Linear with its own
    forward (a quantized layer, say), and a layer with hooks registered on it
    (they would stay on ``linear``): register them on the GatedLinear.  Each
    forward checks that the gate still monitors this layer's weight (or
    bias), so a Parameter replaced later is reported, not silently ungated.
    """

    def __init__(self, linear: nn.Linear, gate) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GatedLinear wraps an nn.Linear, got {type(linear).__name__}")
        if type(linear).forward not in (nn.Linear.forward, GatedLinear.forward):
            raise TypeError(
                f"GatedLinear computes F.linear(input, weight, bias); {type(linear).__name__} subclasses nn.Linear "
                "with its own forward, which GatedLinear would replace"
            )
        if "forward" in linear.__dict__:
            raise ValueError(
                "this nn.Linear has its forward replaced on the instance (e.g. by accelerate's device hooks): "
                "GatedLinear would drop that; wrap the layer before dispatching the model"
            )
        hooked = [name for name in _HOOK_TABLES if getattr(linear, name, None)]
        if hooked:
            raise ValueError(
                f"this nn.Linear has hooks registered ({', '.join(hooked)}): they would stay on the old module, "
                "not on the GatedLinear that replaces it. Wrap the layer first, then register them on the GatedLinear"
            )
        _watch_list(gate, linear.weight, linear.bias)
        nn.Module.__init__(self)
        for name, value in linear.__dict__.items():  # in_features, out_features, anything set on the layer
            if name not in _MODULE_INTERNALS:
                self.__dict__[name] = value
        self.training = linear.training
        self._parameters.update(linear._parameters)  # the same Parameter objects (bias: None included)
        self._buffers.update(linear._buffers)
        self._non_persistent_buffers_set.update(linear._non_persistent_buffers_set)
        self._modules.update(linear._modules)
        self.gate = gate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _apply(input, self.weight, self.bias, self.gate, _watch_list(self.gate, self.weight, self.bias, True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.gate!r}"
