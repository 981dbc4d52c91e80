"""Dynamic Gradient Gating for TRL's GRPOTrainer.

``DGGGRPOTrainer`` is a drop-in GRPOTrainer whose ``num_iterations`` (the
number of optimizer steps taken on one generated batch) becomes a *maximum*:

- The gate steps on the accumulated gradient *before* gradient clipping and
  before ``optimizer.step()``.  transformers' Trainer clips in
  ``_clip_grad_norm`` and only then fires ``on_pre_optimizer_step`` and calls
  ``optimizer.step()``, so neither a callback nor an optimizer wrapper sees
  the raw gradient; overriding ``_clip_grad_norm`` does.  With
  ``max_grad_norm <= 0`` the Trainer never calls it, and an optimizer step
  pre-hook steps the gate instead (no clipping happens in that case).
- A closed gate zeroes the gradients and, through ``gate.attach``, makes a
  fused optimizer (``optim="adamw_torch_fused"``) skip its step on device.
- GRPOTrainer regenerates completions when its micro-step counter ``_step``
  reaches a multiple of ``steps_per_generation * num_iterations`` and
  otherwise serves slices of the buffered batch.  At the start of every pass
  over that buffer this trainer asks ``gate.should_stop()`` (the one host
  read per pass) and, when the gate has closed, moves ``_step`` forward to
  the next multiple so that GRPOTrainer regenerates instead of reusing.

Supported: ``steps_per_generation == gradient_accumulation_steps`` (TRL's
default: one optimizer step per pass over a generated batch), no fp16
GradScaler (bf16 and fp32 are fine), a single device, DDP, and FSDP2: a model
sharded by accelerate (``fsdp_config={"fsdp_version": 2}``) or at load time by
transformers (``from_pretrained(..., distributed_config=DistributedConfig(...))``).
Under FSDP2 the lm_head gradient is a DTensor shard on each rank; the gate
combines the ranks' partial energies (docs/distributed.md), so every rank
reaches the same decision.  Accelerate replaces the model's parameters when it
shards them in ``accelerator.prepare``, after this trainer is built, so the
gate is rebuilt on the sharded parameters right after that (state carried
over).  Refused: DeepSpeed (its engine steps the optimizer inside backward,
before the gate could judge, and ZeRO keeps the reduced gradients in its own
partitioned buffers) and FSDP1 (flat parameters: a rank's ``.grad`` of the
lm_head is an arbitrary slice of a flattened buffer).
"""
from __future__ import annotations

import warnings

import torch

from ..gate import DynamicGradientGate

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "dgg_kernels.integrations.trl needs TRL: pip install trl transformers"
    ) from e

__all__ = ["DGGGRPOTrainer"]


class DGGGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that stops reusing a generated batch once the DGG gate closes.

    Takes every GRPOTrainer argument, plus:

    Args:
        gate_window, gate_threshold, gate_statistic, gate_eps, gate_backend:
            the gate's settings (see GateConfig).  ``max_reuse`` is
            ``args.num_iterations``.
        gate_monitor: the tensor(s) whose gradient the gate watches (default:
            the model's output embedding weight, i.e. lm_head.weight; with
            tied embeddings that gradient includes the input embedding's).

    After training, ``trainer.gate`` holds the gate, ``trainer.dgg_regenerations``
    counts generated batches and ``trainer.dgg_early_stops`` how many of them
    were cut short by the gate.  The logs gain ``dgg/lm_head_grad_norm``,
    ``dgg/z`` and ``dgg/closed`` (averaged over the optimizer steps logged).
    """

    def __init__(
        self,
        *args,
        gate_window: int = 8,
        gate_threshold: float = 0.3,
        gate_statistic: str = "norm",
        gate_eps: float = 1e-8,
        gate_backend: str = "auto",
        gate_monitor=None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        if a.steps_per_generation != a.gradient_accumulation_steps:
            raise ValueError(
                f"DGGGRPOTrainer needs steps_per_generation == gradient_accumulation_steps (got "
                f"{a.steps_per_generation} and {a.gradient_accumulation_steps}): the gate's reuse index counts "
                "passes over a generated batch, so each pass must be exactly one optimizer step."
            )
        if a.fp16:
            raise ValueError(
                "DGGGRPOTrainer does not support fp16 with GradScaler: the gate would see scaled gradients "
                "(accelerate unscales them inside clipping, after the gate). Use bf16 or fp32."
            )
        if self.num_iterations < 2:
            warnings.warn(
                "num_iterations is 1: every optimizer step starts a new batch (reuse index 1), so the gate only "
                "closes on non-finite gradients. Set num_iterations (the maximum reuse) to 2 or more.",
                stacklevel=2,
            )
        if self.is_deepspeed_enabled:
            raise ValueError(
                "DGGGRPOTrainer does not support DeepSpeed: its engine runs the optimizer step inside backward, "
                "before the Trainer's clipping hook where the gate judges the gradient, and ZeRO keeps the reduced "
                "gradients in its own partitioned buffers. Use FSDP2 (fsdp_config={'fsdp_version': 2}) or DDP."
            )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "DGGGRPOTrainer supports FSDP2 only (fsdp_config={'fsdp_version': 2}): FSDP1 flattens parameters, "
                "so a rank's lm_head .grad is an arbitrary slice of a flat buffer the gate cannot combine."
            )
        if gate_monitor is None:
            head = self.model.get_output_embeddings()
            if head is None:
                raise ValueError("the model has no output embeddings; pass gate_monitor=<the lm_head weight>")
            gate_monitor = head.weight
        self._dgg_settings = dict(
            window=gate_window, threshold=gate_threshold, statistic=gate_statistic, eps=gate_eps,
            max_reuse=max(1, int(self.num_iterations)), backend=gate_backend,
        )
        monitor = [gate_monitor] if isinstance(gate_monitor, torch.Tensor) else list(gate_monitor)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._dgg_monitor_names = [names.get(id(t)) for t in monitor]  # to find them again after sharding
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.gate = DynamicGradientGate(monitor, params, **self._dgg_settings)
        self._dgg_optimizer = None
        self._dgg_handles = []
        self._dgg_stepped = False  # set when _clip_grad_norm ran the gate for the coming optimizer step
        self._dgg_unread = False  # a gate step whose stats have not been logged yet
        self.dgg_regenerations = 0
        self.dgg_early_stops = 0

    # -- FSDP2 through accelerate: the parameters are replaced when the model is prepared -------------------------

    def _prepare_for_training(self, *args, **kwargs):
        out = super()._prepare_for_training(*args, **kwargs)
        self._dgg_rebind()
        return out

    def _dgg_rebind(self) -> None:
        """Watch the model's current parameters (accelerate's FSDP2 prepare swaps them for sharded ones)."""
        current = dict(self.model.named_parameters())
        monitor = [t if n is None else current.get(n, t) for n, t in zip(self._dgg_monitor_names, self.gate.monitor)]
        params = [p for p in self.model.parameters() if p.requires_grad]
        same = lambda a, b: len(a) == len(b) and all(x is y for x, y in zip(a, b))  # noqa: E731
        if same(monitor, self.gate.monitor) and same(params, self.gate.params):
            return
        saved = self.gate.state_dict()
        self.gate = DynamicGradientGate(monitor, params, **self._dgg_settings)
        self.gate.load_state_dict(saved)
        if self._dgg_optimizer is not None:  # the hooks hold the old gate: register them again, in order
            inner, self._dgg_optimizer = self._dgg_optimizer, None
            self._dgg_hook(inner)

    # -- the gate step: on the raw gradient, before clipping and the optimizer ------------------------------------

    def _dgg_step(self) -> None:
        self.gate.step()
        self._dgg_unread = True

    def _clip_grad_norm(self, model):
        self._dgg_step()
        self._dgg_stepped = True
        return super()._clip_grad_norm(model)

    def _dgg_pre_step(self, optimizer, args, kwargs):
        if not self._dgg_stepped:  # max_grad_norm <= 0: the Trainer did not clip, the gradient is still raw
            self._dgg_step()
        self._dgg_stepped = False

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._dgg_hook(optimizer)
        return optimizer

    def _dgg_hook(self, optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper keeps the torch optimizer here
        if inner is self._dgg_optimizer:
            return
        for h in self._dgg_handles:
            h.remove()
        # registered before attach's hook, and hooks run in registration order: the gate decides, then
        # attach's hook hands that decision to the fused kernel as found_inf
        self._dgg_handles = [inner.register_step_pre_hook(self._dgg_pre_step), self.gate.attach(inner)]
        self._dgg_optimizer = inner

    # -- regenerate instead of reusing once the gate has closed ----------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        per_pass = self.args.steps_per_generation
        every = per_pass * self.num_iterations
        if self._step % per_pass == 0:  # a pass begins; the previous pass's optimizer step has run
            self._dgg_log()
            regenerate = self._buffered_inputs is None or self._step % every == 0
            if not regenerate and self.gate.should_stop():
                # GRPOTrainer regenerates exactly when _step is a multiple of `every`; jumping there by whole
                # passes keeps _step's phase within gradient accumulation, which its own timing logs rely on
                self._step += every - self._step % every
                self.dgg_early_stops += 1
                regenerate = True
            if regenerate:
                self.gate.new_batch()
                self.dgg_regenerations += 1
        return super()._prepare_inputs(generation_batch)

    def log(self, logs, *args, **kwargs):
        if self.model.training:
            self._dgg_log()  # the step being logged has just run the gate: report it with that step
        return super().log(logs, *args, **kwargs)

    def _dgg_log(self) -> None:
        if not self._dgg_unread:
            return
        s = self.gate.stats()
        m = self._metrics["train"]
        m["dgg/lm_head_grad_norm"].append(float(s["norm"]))
        m["dgg/z"].append(float(s["z"]))
        m["dgg/closed"].append(float(s["closed"]))
        self._dgg_unread = False
