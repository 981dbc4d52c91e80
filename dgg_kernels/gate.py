"""DynamicGradientGate: owns the device state, picks a backend, masks gradients.

The gate never does arithmetic itself: the backend reduces, finalizes and
masks (see backends/torch_ref.py for the semantics).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Iterable, Sequence, Union

import torch

from . import inputs, ops
from .inputs import check_kl_value
from . import state as S
from .distributed import is_dtensor, sharding_for
from .backends import resolve_backend
from .backends.base import Backend
from .backends.torch_ref import host_value
from .config import GateConfig
from .state import GateState

TensorOrTensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _grad_trace(g: torch.Tensor) -> tuple:
    """What overlap compares between the hook's read and step(): the tensor object (held, so it cannot be
    freed and its memory reused meanwhile), its version counter (every in-place op through autograd's view
    of it bumps it), and its address, dtype, shape and strides (a ``.data =`` or ``set_`` swap keeps the
    object and the version).  Host metadata only."""
    return (g, g._version, g.data_ptr(), g.dtype, g.shape, g.stride())


def _tensor_list(value, what: str) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    if not items:
        raise ValueError(f"{what} is empty: pass a Tensor or a non-empty sequence of Tensors")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a Tensor")
    return items


def _grad_scaler_classes() -> list[type]:
    """The GradScaler classes that define their own ``unscale_``: torch.amp's (torch.cuda.amp's inherits it)
    and FSDP's ShardedGradScaler, where it can be imported."""
    classes = [torch.amp.GradScaler]
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    except ImportError:  # pragma: no cover - torch built without distributed
        ShardedGradScaler = None
    if ShardedGradScaler is not None and "unscale_" in vars(ShardedGradScaler):
        classes.append(ShardedGradScaler)
    return classes


def _bump_versions_on_unscale() -> None:
    """Make ``GradScaler.unscale_`` bump the version counter of every gradient it unscales.

    GradScaler divides the gradients in place with ``torch._amp_foreach_non_finite_check_and_unscale_``,
    which does not bump their version counters, so overlap's key (``_grad_trace``) would take the hooks'
    reduction of the *scaled* gradient as current: an energy scale**2 too large, and every scale growth
    would look like a surge.  Wrapping the public method of each class that defines one (it stays the same
    method otherwise) makes the unscale an invalidation like any in-place op.  A disabled scaler
    (``enabled=False``) changes nothing and bumps nothing, so it does not cost overlap its reduction.
    Installed when the first overlap gate is built; installing again does nothing.
    """
    for cls in _grad_scaler_classes():
        original = vars(cls)["unscale_"]
        if getattr(original, "_dgg_bumps_versions", False):
            continue

        def unscale_(self, optimizer, _original=original):
            out = _original(self, optimizer)
            if self.is_enabled():
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                if grads:
                    torch.autograd.graph.increment_version(grads)
            return out

        functools.update_wrapper(unscale_, original)
        unscale_._dgg_bumps_versions = True
        cls.unscale_ = unscale_


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a state tensor that later steps do not change: ``t.clone()``, and under torch.compile an
    opaque op, because inductor may drop the clone of a graph input that a later custom op mutates and hand
    back the input itself, which then shows a later step's values (ops.snapshot)."""
    return ops.snapshot(t) if torch.compiler.is_compiling() else t.clone()


def _check_overlap_allowed(monitor, process_group, decision_group) -> None:
    """overlap=True only where the hook's read is provably the gradient step() would read: one process."""
    from .distributed import multi_rank

    if any(is_dtensor(t) for t in monitor) or process_group is not None or decision_group is not None or multi_rank():
        raise ValueError(
            "overlap=True is not supported under torch.distributed with more than one rank, nor for sharded "
            "(DTensor or process_group) monitor tensors: gradient synchronization (DDP's all-reduce, FSDP's "
            "reduce-scatter, a dist.all_reduce(p.grad) written by hand) rewrites the gradient after the hook has "
            "read it, without a trace the gate can see, and ranks would judge different gradients. Use "
            "overlap=False (the default): step() then reads the synchronized gradient."
        )


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
        window, threshold, statistic, eps, max_reuse, backend, window_mode, target_kl, kl_factor:
            see GateConfig.  statistic="energy+increment" is the paper's rule
            (energy and increment tests, closing when either fires);
            threshold=float("inf") is the observer mode (z reported, never
            closes on a finite gradient; see dgg_kernels.calibration);
            window_mode="batch" keeps one statistic per rollout batch in the
            window (the first step after new_batch()); target_kl turns on the
            KL stop (the trainer gives the KL each step with observe_kl()).
            The defaults are GateConfig's.  docs/semantics.md has the exact rules.
        overlap: launch the monitor reduction from a post-accumulate-grad hook
            during backward (on a side stream on CUDA), so step() only
            finalizes and masks.  step() uses that reduction only if every
            monitor ``.grad`` is still the tensor the hook read, at the same
            version, address, dtype, shape and strides; otherwise (the
            gradient changed after backward through autograd, e.g.
            GradScaler.unscale_ or clipping, was swapped through ``.data =``,
            or a hook did not fire) it reduces again itself.  Writes that
            bypass autograd's version counter (``grad.data.mul_()``, a numpy
            view, an in-place collective) are not seen: with overlap=True,
            do not write the monitor gradient that way between backward and
            step().  With gradient accumulation the hook runs on every
            micro-batch and the last one, on the fully accumulated gradient,
            is the one used.  Monitor tensors must be leaves.  Refused under
            torch.distributed with more than one rank (gradient
            synchronization rewrites the gradient after the hook read it).
        process_group: for monitor tensors that are plain-tensor shards (a
            Megatron vocab-parallel or hand-sharded lm_head): the
            torch.distributed group whose ranks hold the other shards.  DTensor
            monitor tensors (FSDP2, tensor parallel) need no group: the ranks
            are read from their mesh and placements (a group given anyway must
            hold exactly those ranks).  See docs/distributed.md.
        decision_group: the ranks that reach every decision together: every
            rank that steps this gate.  Default: the DTensor monitor's mesh,
            else every rank of the job when torch.distributed runs more than
            one; pass it when only some ranks step this gate (pipeline
            stages).  Each step combines the ranks' partial energies with one
            small all-gather over it (shards summed in rank order, replicas
            taking the largest sum), so every rank finalizes on the same
            energy and reaches the same decision, bit for bit, even when
            replicas' gradients differ.  See docs/distributed.md.
    """

    def __init__(
        self,
        monitor: TensorOrTensors,
        params: Iterable[torch.Tensor] | None = None,
        *,
        window: int = 8,
        threshold: float = 0.3,
        statistic: str = GateConfig.statistic,
        eps: float = 1e-8,
        max_reuse: int = 4,
        backend: str = "auto",
        overlap: bool = False,
        process_group=None,
        window_mode: str = GateConfig.window_mode,
        decision_group=None,
        target_kl: float | None = None,
        kl_factor: float = GateConfig.kl_factor,
    ) -> None:
        self.config = GateConfig(
            window=window, threshold=threshold, statistic=statistic, eps=eps, max_reuse=max_reuse, backend=backend,
            window_mode=window_mode, target_kl=target_kl, kl_factor=kl_factor,
        )
        self.monitor = _tensor_list(monitor, "monitor")
        self.params = list(self.monitor) if params is None else _tensor_list(params, "params")
        devices = {t.device for t in self.monitor + self.params}
        if len(devices) != 1:
            raise ValueError(
                f"monitor and params must live on one device, got {sorted(str(d) for d in devices)}"
            )
        self.device = devices.pop()
        inputs.check_monitor_tensors(self.monitor)
        if overlap:
            _check_overlap_allowed(self.monitor, process_group, decision_group)
        # which ranks share the decision, and how their partial energies combine (checked here, once; None on a
        # single rank with nothing sharded)
        self._sharding = sharding_for(self.monitor, process_group, self.device, decision_group)
        self._param_grads = inputs.ParamGrads(self.params, self.device)
        self._backend = resolve_backend(self.config.backend, self.device, self.monitor)
        # what the ops run with (an argument of every op, eager or compiled): the backend and the combine
        self._kernels = ops.GateKernels.of(self._backend, self._sharding)
        self.state = GateState.new(
            self.config.window, self.config.threshold, self.config.eps, self.device,
            n_rings=self.config.n_rings, window_mode=self.config.window_mode, kl_limit=self.config.kl_limit,
        )
        self._kl_observed = False  # observe_kl() called since the last step (required each step with target_kl)
        self.overlap = bool(overlap)
        self._overlap_hooks: list = []
        if self.overlap:
            self._setup_overlap()

    # -- overlap ------------------------------------------------------------------
    def _setup_overlap(self) -> None:
        if type(self._backend).reduce_partial is Backend.reduce_partial:
            raise ValueError(f"overlap=True is not supported by the {self.backend} backend")
        for i, t in enumerate(self.monitor):
            if not (t.is_leaf and t.requires_grad):
                raise ValueError(f"overlap=True needs leaf monitor tensors that require grad; monitor[{i}] is not")
        _bump_versions_on_unscale()
        n = len(self.monitor)
        self._seen: list = [None] * n  # per monitor tensor: what the hook reduced (see _grad_trace)
        self._events: list = [None] * n
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for i, t in enumerate(self.monitor):
            self._overlap_hooks.append(t.register_post_accumulate_grad_hook(self._make_hook(i)))

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if inputs.monitor_problem("", grad, self.device) is not None:
                self._seen[index] = None  # not reduced: step() reduces again, and its check names the problem
                return
            if self._side is None:
                self._backend.reduce_partial(index, grad, len(self.monitor), self.state, self.config)
            else:
                # The side stream must not overwrite scratch the main stream's last finalize still reads.
                self._side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side):
                    self._backend.reduce_partial(index, grad, len(self.monitor), self.state, self.config)
                    event = torch.cuda.Event()
                    event.record(self._side)
                grad.record_stream(self._side)  # the allocator must not reuse grad's memory before the read ends
                self._events[index] = event
            self._seen[index] = _grad_trace(grad)

        return hook

    def _consume_overlap(self, grads) -> bool:
        """Order this stream after the hooks' reads; True when they read exactly these gradients.

        The wait happens either way: a stale read still in flight on the side
        stream writes the same scratch a fresh reduce would.  Everything
        compared is host metadata, so there is no device read.
        """
        from .distributed import multi_rank

        if multi_rank():  # initialized after construction: the hooks read gradients before their sync
            _check_overlap_allowed(self.monitor, None, None)
        current = all(seen is not None and seen[0] is g and seen[1:] == _grad_trace(g)[1:]
                      for seen, g in zip(self._seen, grads))
        if self._side is not None:
            stream = torch.cuda.current_stream(self.device)
            for event in self._events:
                if event is not None:
                    stream.wait_event(event)
        self._seen = [None] * len(grads)
        self._events = [None] * len(grads)
        return current

    def remove_hooks(self) -> None:
        """Remove the overlap hooks (the gate then reduces inside step())."""
        for h in self._overlap_hooks:
            h.remove()
        self._overlap_hooks.clear()
        self.overlap = False

    @property
    def backend(self) -> str:
        """The backend in use: "torch", "triton" or "cuda" (what "auto" chose)."""
        return self._backend.name

    @property
    def sharded(self) -> bool:
        """True when the monitor gradient is split across ranks (DTensor shards or process_group)."""
        return self._sharding is not None and self._sharding.sharded

    @property
    def decision_group(self):
        """The process group whose ranks reach every decision together (None: a single rank)."""
        return None if self._sharding is None else self._sharding.group

    def step(self) -> torch.Tensor:
        """Run one gate step on the current gradients.

        Returns a 0-dim torch.bool tensor on the gradients' device: True when
        the gate closed (the params' gradients are now zero).  No host sync.
        """
        # every input is checked here, for every backend, before the state or any gradient is touched
        self._check_kl()
        grads = inputs.monitor_grads(self.monitor, self._sharding, self.device)
        zero, key = self._param_grads()
        if self.overlap and self._consume_overlap(grads):
            ops.finalize_partials(self._kernels, len(grads), self.state, self.config)
            self._kl_observed = False  # the finalize consumed it
            return self._mask(zero, key)
        return self._step_on(grads, zero, key)

    def _check_kl(self) -> None:
        """A gate with a KL stop judges no step without its KL (raises RuntimeError, nothing modified)."""
        if self.config.target_kl is not None and not self._kl_observed:
            raise RuntimeError(
                f"this gate has a KL stop (target_kl={self.config.target_kl}) but observe_kl() was not called "
                "since the last step(): give it the step's KL (a 0-dim tensor) before every step()"
            )

    def _step_on(self, grads: Sequence[torch.Tensor], zero: Sequence[torch.Tensor], key=None) -> torch.Tensor:
        """One step judging ``grads``; when closed, writes zeros into every tensor of ``zero``.

        The inputs are checked already (``inputs``); ``key``: ``zero``'s MaskPlan key, if computed.  The KL
        stop's KL is checked here (GatedLinear's backward comes in here, not through step()).
        """
        self._check_kl()
        ops.step(self._kernels, grads, self.state, self.config)
        self._kl_observed = False  # the finalize consumed it (a step that raised before leaves it for a retry)
        return self._mask(zero, key)

    def _mask(self, zero: Sequence[torch.Tensor], key=None) -> torch.Tensor:
        ops.mask(self._kernels, self.state.decision, zero, key)
        return _copy(self.state.decision)

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
        self.state.ints[S.PASS_MODE : S.BATCH_CLOSED + 1].zero_()
        # counted on the device (saved with the state): calibration.Recorder tells rollout batches apart by it
        self.state.ints[S.BATCHES : S.BATCHES + 1].add_(1)

    def new_pass(self) -> None:
        """A pass over the rollout batch starts (call it before the pass's first step; no host sync).

        From the first new_pass() after new_batch() on, the reuse index counts
        passes, not steps: the first step() after each new_pass() advances it,
        and every other step of the pass (one per mini-batch, with several
        mini-batches per pass) is tested at the same index.  A closed step
        ends the batch: every later step() until new_batch() closes too, so
        no update after it is applied even if the trainer does not stop at
        once.  max_reuse counts passes.  Without new_pass() calls each step
        is its own pass.  ``dgg.reuse_passes`` calls it for you.
        """
        self.state.ints[S.PASS_MODE : S.PASS_NEW + 1].fill_(1)

    def observe_kl(self, kl) -> None:
        """Give the next step() the approximate KL of the current policy to the rollout policy (no host sync).

        ``kl``: a 0-dim floating tensor on the gate's device (any float dtype;
        detached here), or a Python number, usually the batch mean of a k1
        (log r) or k3 ((r - 1) - log r) estimator over the tokens of the
        loss, with r = exp(logp - old_logp).  The next step() judges it and
        then forgets it: with target_kl set, call this before every step()
        (step() raises otherwise); without, a given KL is reported in
        stats()["kl"] and closes the gate only when it is not finite.  The
        gate closes when kl is not finite, or the reuse index is above 1 and
        kl > kl_factor * target_kl.  On several ranks the KL judged is the
        mean over the decision group's ranks.

        Raises (nothing modified): TypeError for a non-tensor non-number, a
        non-floating dtype or a DTensor; ValueError for a tensor that is not
        0-dim, or a value that is not finite in float32 (NaN, Inf, beyond
        3.4e38) given as a number or a plain CPU tensor; RuntimeError for a
        tensor on another device.  Such a value in an accelerator tensor (or
        one under torch.compile tracing) cannot be seen without a host sync:
        it closes the gate (docs/semantics.md, "The KL stop").  Under
        torch.compile give a float or a tensor: torch's tracing can raise
        OverflowError for a Python int beyond int64 (torch 2.13).
        """
        slot = self.state.acc[S.ACC_KL]
        if isinstance(kl, torch.Tensor):
            if is_dtensor(kl):
                raise TypeError("kl is a DTensor: pass a plain 0-dim tensor (kl.full_tensor() or kl.to_local() "
                                "for a replicated value)")
            if not kl.is_floating_point():
                raise TypeError(f"kl must be a floating-point tensor, got dtype {kl.dtype}")
            if kl.dim() != 0:
                raise ValueError(f"kl must be a 0-dim tensor (one number: the batch's mean KL), got shape "
                                 f"{tuple(kl.shape)}")
            if kl.device != self.device:
                raise RuntimeError(f"kl is on {kl.device}, but the gate was built on {self.device} (its state "
                                   "lives there)")
            value = host_value(kl)
            if value is not None:
                check_kl_value(value)
            with torch.no_grad():
                slot.copy_(kl.detach())
        else:
            if isinstance(kl, bool) or not isinstance(kl, numbers.Real):
                raise TypeError(f"kl must be a 0-dim tensor or a number, got {type(kl).__name__}")
            try:
                value = float(kl)
            except OverflowError:
                value = math.inf
            if torch.compiler.is_compiling():
                # Not checked here but judged like a tensor's value (a KL that is not finite closes the gate):
                # a check would guard the graph on the value, and the ValueError it raises while tracing
                # reaches a fullgraph caller as torch._dynamo's Unsupported.  zero_().add_() keeps the number
                # symbolic (fill_ or torch.tensor would specialize the graph on it: a recompile per value).
                slot.zero_().add_(value)
            else:
                check_kl_value(value)
                slot.fill_(value)
        self._kl_observed = True

    def should_stop(self) -> bool:
        """True once the gate closed, or the max_reuse-th pass ran, since new_batch().  Reads the device: the
        trainer's loop decision, once per pass (after the pass's last step)."""
        return bool(self.state.ints[S.STOP].item())  # host-read-ok: the caller's loop decision, not step()

    def stats(self) -> dict[str, torch.Tensor]:
        """The last step's report as 0-dim device tensors (a snapshot; no host read).

        energy, norm, statistic, mean, std, z, z_energy, z_increment (float32);
        closed (bool); reuse_index, accepted, closed_total (int64); kl
        (float32: the KL the step judged, observe_kl(); 0 when none was
        given).  A test's z is 0 until its window is full.

        z_energy is the z of the magnitude test (statistic "norm": of the norm;
        "energy" and "energy+increment": of the energy), z_increment the z of the
        increment test; a statistic without that test reports 0 there (as a
        test whose window is still filling does).  For
        "energy+increment", z is the larger of the two, and statistic, mean and
        std are those of the test whose z is reported (the increment test only
        when its z is strictly larger).  For every statistic the gate closed iff
        the energy or the given KL was not finite, or the reuse index is above
        1 and z > threshold or kl > kl_factor * target_kl (or, in passes of
        several steps, an earlier step of the batch closed).
        """
        f = _copy(self.state.stats)
        i = _copy(self.state.ints)
        # every stats slot under its name (the slot table, state.SLOT_GROUPS), then three counters
        out = {name.lower(): f[getattr(S, name)] for name in S.SLOT_GROUPS["stats"]}
        out["closed"] = out["closed"] != 0
        out.update(reuse_index=i[S.REUSE], accepted=i[S.ACCEPTED], closed_total=i[S.CLOSED_TOTAL])
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: the layout's version, the settings and the device state.

        ``{"version": state.STATE_VERSION, "config": {...}, "state": {name: Tensor}}`` (copies); the
        versions and what each holds: dgg_kernels/state.py (LAYOUTS) and docs/semantics.md.
        """
        cfg = dataclasses.asdict(self.config)
        cfg.pop("backend")
        return {"version": S.STATE_VERSION, "config": cfg, "state": self.state.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state_dict() saved by this or any earlier release (older layouts are upgraded).

        Refuses, and changes nothing, when the settings differ or the dict is no layout this package wrote
        (ValueError naming the version found and what to do).
        """
        if not isinstance(sd, dict) or "config" not in sd or "state" not in sd:
            raise KeyError("gate state_dict needs the keys 'config' and 'state' (from DynamicGradientGate.state_dict())")
        sd = S.upgrade(sd)  # a new dict in today's layout; ``sd`` itself is not modified
        mine = dataclasses.asdict(self.config)
        mine.pop("backend")
        theirs = sd["config"]
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                "gate state_dict was saved with other settings: "
                + ", ".join(f"{k}={theirs.get(k)!r} (this gate: {mine.get(k)!r})" for k in differ)
            )
        ints = sd["state"].get("ints")
        if isinstance(ints, torch.Tensor) and ints.shape == self.state.ints.shape:
            problem = S.ints_problem(ints, self.config.window)
            if problem is not None:
                raise ValueError(f"gate state_dict['state']['ints'] cannot be a gate's counters: {problem}. It was "
                                 "changed after saving or made by hand; nothing was loaded")
        self.state.load_state_dict(sd["state"])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DynamicGradientGate(window={c.window}, threshold={c.threshold}, statistic={c.statistic!r}, "
            f"eps={c.eps}, max_reuse={c.max_reuse}, window_mode={c.window_mode!r}, target_kl={c.target_kl!r}, "
            f"kl_factor={c.kl_factor!r}, backend={self.backend!r}, device={self.device})"
        )
