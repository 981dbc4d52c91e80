"""Every implementation the benchmarks compare, behind one small interface.

Each entry of IMPLS builds a Runner from the tensors of one benchmark case:

    runner.step()            one gate/clip step on the current .grad values (what overhead.py times)
    runner.optimizer_step()  what a training loop calls after step() (train_step.py): most call
                             opt.step(); the hand-written DGG skips it when its host bool says closed
    runner.attach(opt) / runner.detach()
    runner.new_batch()       a fresh rollout batch (DGG semantics); a no-op for the others
    runner.report()          end-of-run counters (host reads allowed: not timed)

Peers are written the way their users write them, never tuned down:
- ZClip: the PyPI package with its default settings, ``zclip.step(model)`` after
  backward (it reads the norm to the host every step).
- hand-written DGG: torch.linalg.vector_norm + .item() + a Python window; what a
  user writes in an afternoon.  Holding a host bool, it simply skips
  optimizer.step() when closed (cheaper than zeroing gradients).
- OLMo-core-style rolling skip: our own small version of the idea (a Python list
  of the last 128 grad-norm tensors, torch.std_mean on device, skip beyond 6 sigma,
  no host read).  OLMo-core folds the 0/1 step factor into its own optimizer; with
  a stock fused AdamW the cheapest equivalent is the found_inf flag, so that is how
  it skips here.
- torch.nn.utils.get_total_norm / clip_grad_norm_ (foreach) and
  torch.linalg.vector_norm alone: what a non-fused path costs at least.

Nothing here is copied from those projects: only the behaviour is reproduced.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
import torch
import torch.nn as nn

from dgg_kernels.inputs import monitor_grads


class Unavailable(Exception):
    """This implementation cannot run here; the message says why (the row is marked n/a)."""


@dataclass
class Case:
    """The tensors and settings of one benchmark case."""

    monitor: list[torch.Tensor]          # whose .grad the gate watches (lm_head.weight)
    params: list[torch.Tensor]           # whose .grad a closed gate zeroes / that the optimizer steps
    model: nn.Module | None = None       # ZClip and the OLMo-style skip look at the whole model
    threshold: float = 0.3
    window: int = 8
    max_reuse: int = 4
    overlap: bool = False
    optimizer: torch.optim.Optimizer | None = None
    extra: dict = field(default_factory=dict)


class Runner:
    host_reads_by_design = 0
    capturable: bool | str = True  # True, or the reason it cannot be captured in a CUDA graph

    def __init__(self, case: Case):
        self.case = case
        self.opt: torch.optim.Optimizer | None = None

    def step(self):
        raise NotImplementedError

    def attach(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def detach(self) -> None:
        self.opt = None

    def optimizer_step(self) -> None:
        self.opt.step()

    def new_batch(self) -> None:
        pass

    def report(self) -> dict:
        return {}


def _grads(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.grad for t in ts if t.grad is not None]


# ----------------------------------------------------------------------------- lower bounds
class VectorNorm(Runner):
    """torch.linalg.vector_norm of the monitored gradient alone: a norm, no statistics, no decision."""

    def step(self):
        gs = _grads(self.case.monitor)
        if len(gs) == 1:
            return torch.linalg.vector_norm(gs[0], dtype=torch.float32)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]))


class TotalNorm(Runner):
    """torch.nn.utils.get_total_norm(foreach=True): the norm most trainers already compute."""

    def __init__(self, case):
        super().__init__(case)
        if not hasattr(torch.nn.utils, "get_total_norm"):
            raise Unavailable(f"torch.nn.utils.get_total_norm needs torch >= 2.6 (this is {torch.__version__})")

    def step(self):
        return torch.nn.utils.get_total_norm(_grads(self.case.monitor), foreach=True)


class ClipGradNorm(Runner):
    """torch.nn.utils.clip_grad_norm_(max_norm=1.0, foreach=True): the norm plus an in-place scale of every gradient."""

    def step(self):
        return torch.nn.utils.clip_grad_norm_(self.case.monitor, max_norm=1.0, foreach=True)


# ----------------------------------------------------------------------------- ZClip
class _Holder(nn.Module):
    """ZClip takes a model; for the gate-alone benchmark the model holds just the monitored tensors."""

    def __init__(self, ts):
        super().__init__()
        self.ps = nn.ParameterList([t if isinstance(t, nn.Parameter) else nn.Parameter(t) for t in ts])


class ZClipPeer(Runner):
    """zclip.ZClip() with its defaults, ``zclip.step(model)`` after backward: a host read every step.

    Its first 25 steps are a warm-up (plain clip_grad_norm_); callers run past
    them before timing so the steady state is what gets measured.
    """

    host_reads_by_design = 1
    capturable = "no: ZClip reads the grad norm to the host (.item()) every step"
    warmup_steps = 30

    def __init__(self, case):
        super().__init__(case)
        try:
            from zclip import ZClip
        except Exception as e:  # not installed, or its import failed against this torch
            raise Unavailable(f"zclip not importable ({type(e).__name__}: {e}); pip install zclip") from e
        self.zclip = ZClip()  # defaults, as its README shows: never tuned down here
        self.model = case.model if case.model is not None else _Holder(case.monitor)

    def step(self):
        return self.zclip.step(self.model)

    def report(self):
        return {"zclip_initialized": self.zclip.initialized}


# ----------------------------------------------------------------------------- hand-written DGG
class HandDGG(Runner):
    """DGG as a user writes it in an afternoon: norm, .item(), a Python deque, zero_() when closed."""

    host_reads_by_design = 1
    capturable = "no: reads the norm to the host (.item()) and branches in Python every step"

    def __init__(self, case):
        super().__init__(case)
        self.hist: collections.deque = collections.deque(maxlen=case.window)
        self.reuse = 0
        self.closed = False
        self.closed_total = 0

    def step(self):
        gs = _grads(self.case.monitor)
        if len(gs) == 1:
            norm = torch.linalg.vector_norm(gs[0]).item()
        else:
            norm = math.sqrt(sum(torch.linalg.vector_norm(g).item() ** 2 for g in gs))
        self.reuse += 1
        closed = not math.isfinite(norm)
        if len(self.hist) == self.hist.maxlen and self.reuse > 1:
            mean = sum(self.hist) / len(self.hist)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.hist) / len(self.hist))
            closed = closed or (norm - mean) / (std + 1e-8) > self.case.threshold
        if closed:
            self.closed_total += 1
            if self.opt is None:  # gate alone: nothing to skip, so do what the gate promises
                for g in _grads(self.case.params):
                    g.zero_()
        else:
            self.hist.append(norm)
        self.closed = closed
        return closed

    def optimizer_step(self):
        if not self.closed:  # a host bool in hand: just do not step
            self.opt.step()

    def new_batch(self):
        self.reuse = 0

    def report(self):
        return {"closed_steps": self.closed_total}


# ----------------------------------------------------------------------------- OLMo-core-style rolling skip
class RollingSkip(Runner):
    """A rolling window of grad-norm tensors on device; skip the step when the norm is beyond mean + 6 sigma.

    Our own small version of OLMo-core's idea: the history is a Python list of
    0-dim device tensors (stacked every step), the decision stays on device, and
    the skip reaches a stock fused optimizer through its found_inf flag.  It
    watches the norm of all ``monitor`` tensors (train_step passes every
    parameter: OLMo-core uses the global grad norm).
    """

    capturable = "no: the Python list of past norms changes every step; a graph replay would freeze it"

    def __init__(self, case, window: int = 128, sigma: float = 6.0):
        super().__init__(case)
        self.window, self.sigma = window, sigma
        self.hist: list[torch.Tensor] = []
        self.skip: torch.Tensor | None = None
        self.skips: list[torch.Tensor] = []

    def step(self):
        gs = _grads(self.case.monitor)
        norm = torch.nn.utils.get_total_norm(gs, foreach=True) if hasattr(torch.nn.utils, "get_total_norm") else \
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]))
        norm = norm.float()
        if len(self.hist) >= 2:  # Python length: no device read
            std, mean = torch.std_mean(torch.stack(self.hist))
            skip = (norm - mean > self.sigma * std) | ~torch.isfinite(norm)
        else:
            skip = ~torch.isfinite(norm)
        self.hist.append(norm.detach())
        if len(self.hist) > self.window:
            self.hist.pop(0)
        self.skip = skip.float()  # 1.0 = skip: the found_inf convention of fused optimizers
        if len(self.skips) < 4096:
            self.skips.append(self.skip)
        return self.skip

    def optimizer_step(self):
        self.opt.found_inf = self.skip
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf

    def report(self):
        return {"skipped_steps": int(torch.stack(self.skips).sum().item()) if self.skips else 0}


# ----------------------------------------------------------------------------- dgg-kernels
def _gate_kwargs_supported() -> set:
    import inspect

    from dgg_kernels import DynamicGradientGate

    return set(inspect.signature(DynamicGradientGate.__init__).parameters)


def overlap_supported() -> bool:
    return "overlap" in _gate_kwargs_supported()


class DGG(Runner):
    """dgg_kernels.DynamicGradientGate with one backend; a closed gate skips fused optimizers via attach()."""

    backend = "auto"

    def __init__(self, case):
        super().__init__(case)
        from dgg_kernels import DynamicGradientGate

        kw = dict(window=case.window, threshold=case.threshold, max_reuse=case.max_reuse, backend=self.backend)
        if case.overlap:
            if not overlap_supported():
                raise Unavailable("DynamicGradientGate has no overlap= argument in this version")
            kw["overlap"] = True
        try:
            self.gate = DynamicGradientGate(case.monitor, case.params, **kw)
        except (RuntimeError, ImportError, NotImplementedError) as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from e
        self._kw = kw
        self.handle = None

    def step(self):
        return self.gate.step()

    def attach(self, opt):
        super().attach(opt)
        self.handle = self.gate.attach(opt)
        if self.case.overlap and not self.gate.overlap:
            # detach() took the backward hooks off (see there): a fresh overlapped
            # gate carrying the same window and counters puts them back.
            from dgg_kernels import DynamicGradientGate

            saved = self.gate.state_dict()
            self.gate = DynamicGradientGate(self.case.monitor, self.case.params, **self._kw)
            self.gate.load_state_dict(saved)

    def detach(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.case.overlap and self.gate.overlap:
            # overlap=True hooks every backward of the monitor tensors; left on, they
            # would charge this gate's reduction to whichever mechanism runs next
            # in the interleaved train_step rounds.
            self.gate.remove_hooks()
        super().detach()

    def new_batch(self):
        self.gate.new_batch()

    def report(self):
        st = self.gate.stats()
        return {"closed_steps": int(st["closed_total"].item()), "accepted_steps": int(st["accepted"].item()),
                "backend": self.gate.backend}


class DGGTorch(DGG):
    backend = "torch"


class DGGTriton(DGG):
    backend = "triton"


class DGGCuda(DGG):
    backend = "cuda"


class DGGAuto(DGG):
    """backend="auto": the backend the measured table picks for this device, dtype and size (what users get)."""

    backend = "auto"

    def report(self):
        return {**super().report(), "auto_reason": self.gate._backend.auto_reason}


def _raise_recompile_limit() -> None:
    # Every benchmark case is a new gate (and shape): past dynamo's default of 8
    # recompiles it would silently fall back to eager and time the wrong thing.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))


class DGGTorchCompiled(DGGTorch):
    """torch.compile(gate.step), as a user compiles it: the gate's custom ops stay opaque to the compiler."""

    def __init__(self, case):
        super().__init__(case)
        _raise_recompile_limit()
        self.fn = torch.compile(self.gate.step)

    def step(self):
        return self.fn()


def _inductor_core(backend, state, config, grads):
    # What gate.step() runs once it has collected the gradients, traced op by op
    # so inductor can fuse the torch reference.  Taking the gradients as an
    # argument lets one compiled graph serve every gate and shape.
    backend.step(grads, state, config)
    backend.mask(state.decision, grads)
    return state.decision.view(torch.bool).clone()


_INDUCTOR: list = []


class DGGTorchInductor(DGGTorch):
    """The torch backend's reduce, finalize and mask traced and fused by torch.compile (not the gate's custom ops)."""

    def __init__(self, case):
        super().__init__(case)
        _raise_recompile_limit()
        if not _INDUCTOR:
            _INDUCTOR.append(torch.compile(_inductor_core))
        self.fn = _INDUCTOR[0]
        g = self.gate
        # One gradient list serves both the reduce and the mask, so this variant
        # needs monitor == params (true in the gate-alone benchmark).
        if [id(p) for p in g.monitor] != [id(p) for p in g.params]:
            raise Unavailable("the inductor-fused variant is benchmarked with monitor == params only")

    def step(self):
        g = self.gate
        return self.fn(g._backend, g.state, g.config, monitor_grads(g.monitor, g._sharding, g.device))


@dataclass
class Impl:
    name: str
    cls: type
    kind: str  # "dgg" (ours), "peer" (what users run today), "bound" (a norm alone: a lower bound)
    overlap: bool = False


IMPLS: list[Impl] = [
    Impl("vector_norm (bound)", VectorNorm, "bound"),
    Impl("get_total_norm foreach", TotalNorm, "bound"),
    Impl("clip_grad_norm_ foreach", ClipGradNorm, "peer"),
    Impl("zclip", ZClipPeer, "peer"),
    Impl("hand-written dgg", HandDGG, "peer"),
    Impl("olmo-style skip", RollingSkip, "peer"),
    Impl("dgg torch", DGGTorch, "dgg"),
    Impl("dgg torch compiled", DGGTorchCompiled, "dgg"),
    Impl("dgg torch inductor-fused", DGGTorchInductor, "dgg"),
    Impl("dgg triton", DGGTriton, "dgg"),
    Impl("dgg cuda", DGGCuda, "dgg"),
    Impl("dgg auto", DGGAuto, "dgg"),
]


def build(impl: Impl, case: Case) -> Runner:
    """Build ``impl`` for ``case``; raises Unavailable with the reason when it cannot run here."""
    try:
        return impl.cls(case)
    except Unavailable:
        raise
    except (RuntimeError, ImportError) as e:
        raise Unavailable(f"{type(e).__name__}: {e}") from e
