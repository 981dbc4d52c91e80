"""attach(): a closed gate skips the optimizer step on device (the found_inf protocol).

PyTorch's fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) read
``optimizer.found_inf`` (a float32 tensor; exactly 1.0 skips the whole update,
step count included) and ``optimizer.grad_scale`` via getattr, which is how
GradScaler skips inf steps.  A step pre-hook runs inside ``step()`` after
GradScaler has set its own flag, so taking the max of both there keeps both.
"""
from __future__ import annotations

import warnings

import torch

from . import state as S

_FUSED_KINDS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, _FUSED_KINDS) and all(g.get("fused") for g in optimizer.param_groups)


class AttachHandle:
    """Returned by gate.attach(); ``remove()`` detaches the gate from the optimizer."""

    def __init__(self, hooks=()):
        self._hooks = list(hooks)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class _GroupsWatch:
    """What attach() relied on about the optimizer's param groups, checked in every step's pre-hook.

    Per group: whether it is fused and which params it holds, by identity
    (the params seen at attach are held here, so an id in the key is never
    reused by another tensor).  Host metadata only.  Rebuilt group dicts that
    hold the same params (an optimizer ``load_state_dict``, as accelerate does
    when it wraps one) are the same groups.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.key = self.key_of(optimizer)

    @staticmethod
    def key_of(optimizer: torch.optim.Optimizer) -> tuple:
        return tuple((bool(g.get("fused")), tuple(map(id, g["params"]))) for g in optimizer.param_groups)

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        if self.key_of(optimizer) != self.key:
            raise RuntimeError(
                f"the param groups of this {type(optimizer).__name__} changed after gate.attach() (a group added "
                "or removed, params added or replaced, or a fused flag changed): the gate would skip the new "
                "params' update without zeroing their gradients, or pass found_inf to a non-fused group, which "
                "raises. Attach again after changing the groups (handle.remove(); gate.attach(optimizer)), and "
                "build the gate with the new params in `params` if a closed gate should zero their gradients too."
            )


def attach(gate, optimizer: torch.optim.Optimizer) -> AttachHandle:
    if not is_fused(optimizer):
        warnings.warn(
            f"{type(optimizer).__name__} is not a fused optimizer: a closed gate zeroes the gradients, but the "
            "optimizer still steps (Adam moves weights by lr * m_hat / sqrt(v_hat) even at g = 0, decays its "
            "moments, applies weight decay and counts the step). Construct it with fused=True "
            "(Adam, AdamW, SGD, Adagrad) so a closed gate skips the step on device.",
            stacklevel=3,
        )
        watch = _GroupsWatch(optimizer)

        def check_groups(opt, args, kwargs):
            watch.check(opt)

        return AttachHandle([optimizer.register_step_pre_hook(check_groups)])

    flag = gate.state.stats[S.CLOSED]  # float32, exactly 1.0 when closed
    closed = gate.state.decision
    ours = {"set": False, "fresh_momentum": []}
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    watch = _GroupsWatch(optimizer)

    def pre_hook(opt, args, kwargs):
        watch.check(opt)  # before anything is set: a step over changed groups raises with nothing changed
        existing = getattr(opt, "found_inf", None)  # GradScaler's, when it drives the step
        if existing is None:
            opt.found_inf = flag
            ours["set"] = True
        else:
            opt.found_inf = torch.maximum(existing, flag.to(existing.device))
            ours["set"] = False
        if is_sgd:
            # Fused SGD creates momentum buffers with empty_like on a param's first step;
            # a skipped first step would leave uninitialized memory in the state.
            ours["fresh_momentum"] = [
                p for grp in opt.param_groups if grp.get("momentum", 0) != 0
                for p in grp["params"] if p.grad is not None and "momentum_buffer" not in opt.state.get(p, {})
            ]

    def post_hook(opt, args, kwargs):
        if ours["set"]:
            del opt.found_inf  # GradScaler removes its own; ours must not outlive this step
            ours["set"] = False
        for p in ours["fresh_momentum"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(closed, 0)  # as if zero-initialized: with dampening 0 the next step equals a first step
        ours["fresh_momentum"] = []

    return AttachHandle(
        [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
    )
