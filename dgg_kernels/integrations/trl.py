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

Supported: ``steps_per_generation`` a multiple of ``gradient_accumulation_steps``
(TRL's default is equal: one optimizer step per pass over a generated batch;
a multiple k gives passes of k optimizer steps, all tested at the pass's reuse
index, and a close ends the batch: the pass's remaining steps close on device
and the next pass regenerates), no fp16
GradScaler (bf16 and fp32 are fine), a single device, DDP, FSDP2 and
DeepSpeed ZeRO-1/2/3.  FSDP2: a model sharded by accelerate
(``fsdp_config={"fsdp_version": 2}``) or at load time by transformers
(``from_pretrained(..., distributed_config=DistributedConfig(...))``).
Under FSDP2 the lm_head gradient is a DTensor shard on each rank; the gate
combines the ranks' partial energies (docs/distributed.md), so every rank
reaches the same decision.  Accelerate replaces the model's parameters when it
shards them in ``accelerator.prepare``, after this trainer is built, so the
gate is rebuilt on the sharded parameters right after that (state carried
over).  DeepSpeed (accelerate's DeepSpeed plugin, ``args.deepspeed``):
accelerate runs ``engine.step()`` inside ``accelerator.backward``, so neither
``_clip_grad_norm`` nor an optimizer hook sees the gradient before the update;
once accelerate has built the engine (in ``accelerator.prepare``) the gate is
rebuilt as an ``integrations.deepspeed.DeepSpeedGate`` (state carried over),
which reads each rank's partition of the lm_head gradient in ZeRO's own
buffers and steps inside ``engine.step()``, between the gradient reduction
and DeepSpeed's optimizer step; ``gate_discard`` picks how a closed step is
discarded there.  Refused: FSDP1 (flat parameters: a rank's ``.grad`` of the
lm_head is an arbitrary slice of a flattened buffer), DeepSpeed ZeRO stage 0,
and whatever ``DeepSpeedGate`` refuses (offload, fp16, model parallelism, ...).

The KL stop (``gate_config={"target_kl": ..., "kl_factor": ...}``): each
micro-batch's loss computation adds the k3 estimate of the KL of the current
policy to the rollout policy, ``(r - 1) - log r`` with ``r = exp(logp -
old_logp)``, summed over the completion tokens (GRPOTrainer's own
``completion_mask``, times ``tool_mask`` when present), and gives the gate the
token mean over the optimizer step's micro-batches so far (observe_kl, a
device tensor: no host read).  The gate's step then judges the mean over the
whole accumulated step.  Without buffered rollout log-probs (a single pass:
``num_iterations`` 1) the KL is 0.

The pieces every trainer adapter shares (the default monitor, the fp16
refusal, settings as a GateConfig, the gate bound to the model and its
optimizer, the metrics) are ``integrations.adapter``'s; this module adds what
is TRL's: where the gate steps, the regeneration, checkpoints, logging.

Checkpoints: every resumable Trainer checkpoint (not ``save_only_model``) gets
the gate's state next to the optimizer's, as ``dgg_gate.pt`` (written by the
process that saves, ``args.should_save``), and ``resume_from_checkpoint``
restores it on every rank (``integrations/checkpoint.py``).  GRPOTrainer
generates a fresh batch on resume, so a resumed run matches the uninterrupted
one exactly only from a checkpoint on a generation boundary
(docs/integrations.md, "Checkpoints and resume").
"""
from __future__ import annotations

import warnings

from ..config import GateConfig
from .adapter import GateBinding, refuse_grad_scaling, resolve_config, warn_single_pass
from .checkpoint import GATE_FILE, load_gate, save_gate

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
        gate_config: the gate's settings, a GateConfig or a mapping of its
            fields (default: GateConfig's defaults).  ``max_reuse`` is always
            ``args.num_iterations``.
        gate_window, gate_threshold, gate_statistic, gate_eps, gate_backend:
            single settings, overriding ``gate_config``'s (see GateConfig).
        gate_monitor: the tensor(s) whose gradient the gate watches (default:
            the model's output embedding weight, i.e. lm_head.weight; with
            tied embeddings that gradient includes the input embedding's).
        gate_discard: under DeepSpeed only, how a closed step is discarded:
            ``"overflow"`` (default; DeepSpeed's own skip, counted in
            ``skipped_steps``, the LR scheduler does not step) or
            ``"found_inf"`` (the fused torch AdamW skips; DeepSpeed and the
            scheduler count the step as applied).  See
            ``dgg_kernels.integrations.deepspeed``.

    After training, ``trainer.gate`` holds the gate (under DeepSpeed a
    ``DeepSpeedGate``), ``trainer.dgg`` its ``adapter.GateBinding``,
    ``trainer.dgg_regenerations`` counts generated batches and
    ``trainer.dgg_early_stops`` how many of them were cut short by the gate
    (both count what this process ran: after a resume, since the resume; the
    gate's own counters are saved in checkpoints).  The logs gain the
    binding's metrics, ``dgg/lm_head_grad_norm``, ``dgg/z``, ``dgg/closed``,
    ... (averaged over the optimizer steps logged).
    """

    def __init__(
        self,
        *args,
        gate_config: GateConfig | dict | None = None,
        gate_window: int | None = None,
        gate_threshold: float | None = None,
        gate_statistic: str | None = None,
        gate_eps: float | None = None,
        gate_backend: str | None = None,
        gate_monitor=None,
        gate_discard: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        if a.steps_per_generation % a.gradient_accumulation_steps:
            raise ValueError(
                f"DGGGRPOTrainer needs steps_per_generation ({a.steps_per_generation}) to be a multiple of "
                f"gradient_accumulation_steps ({a.gradient_accumulation_steps}): a pass over a generated batch "
                "must be a whole number of optimizer steps (the gate tests every step of pass r at reuse index r), "
                "or an optimizer step would mix the gradients of two passes."
            )
        refuse_grad_scaling(bool(a.fp16), trainer="DGGGRPOTrainer")
        warn_single_pass(int(self.num_iterations), setting="num_iterations")
        if self.is_deepspeed_enabled:
            stage = getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None)
            if stage not in (1, 2, 3):
                raise ValueError(
                    f"DGGGRPOTrainer under DeepSpeed needs ZeRO stage 1, 2 or 3 (got {stage!r}): the gate reads "
                    "ZeRO's partitioned gradient buffers (dgg_kernels.integrations.deepspeed)"
                )
            from .deepspeed import DISCARDS

            if gate_discard is not None and gate_discard not in DISCARDS:
                raise ValueError(f"gate_discard must be one of {DISCARDS}, got {gate_discard!r}")
        elif gate_discard is not None:
            raise ValueError(
                "gate_discard applies under DeepSpeed only (elsewhere a closed gate zeroes the gradients and "
                "gate.attach makes the fused optimizer skip the step)"
            )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "DGGGRPOTrainer supports FSDP2 only (fsdp_config={'fsdp_version': 2}): FSDP1 flattens parameters, "
                "so a rank's lm_head .grad is an arbitrary slice of a flat buffer the gate cannot combine."
            )
        single = dict(window=gate_window, threshold=gate_threshold, statistic=gate_statistic, eps=gate_eps,
                      backend=gate_backend)
        single["max_reuse"] = max(1, int(self.num_iterations))
        self.gate_config = resolve_config(gate_config, override=single, where="gate_config")
        # under DeepSpeed this gate only holds the state until the engine exists (_dgg_rebind builds the real one)
        self.dgg = GateBinding(self.model, self.gate_config, monitor=gate_monitor, trainer="DGGGRPOTrainer")
        self._dgg_discard = gate_discard or "overflow"
        self._dgg_logged = 0  # DeepSpeed: gate steps already logged (the gate steps inside engine.step())
        self._dgg_stepped = False  # set when _clip_grad_norm ran the gate for the coming optimizer step
        self._dgg_unread = False  # a gate step whose stats have not been logged yet
        self.dgg_regenerations = 0
        self.dgg_early_stops = 0
        self._dgg_kl = None  # (sum of k3 over tokens, token count) of the optimizer step so far, device tensors
        self._dgg_logps = None  # the policy log-probs the loss being computed used
        self._dgg_in_loss = False

    @property
    def gate(self):
        """The gate: a DynamicGradientGate, or under DeepSpeed (once the engine exists) a DeepSpeedGate."""
        return self.dgg.gate

    # -- accelerate's prepare: FSDP2 swaps the parameters, DeepSpeed builds its engine ---------------------------

    def _prepare_for_training(self, *args, **kwargs):
        out = super()._prepare_for_training(*args, **kwargs)
        self._dgg_rebind()
        return out

    def _dgg_rebind(self) -> None:
        """Watch the model's current parameters (accelerate's FSDP2 prepare swaps them for sharded ones), or,
        under DeepSpeed, the engine accelerate has just built.  The gate's state is carried over."""
        if self.is_deepspeed_enabled:
            self._dgg_bind_deepspeed()
        else:
            self.dgg.rebind(self.model)

    def _dgg_bind_deepspeed(self) -> None:
        from .deepspeed import DeepSpeedGate

        engine = self.model_wrapped
        old = self.dgg.gate
        if isinstance(old, DeepSpeedGate) and old.engine is engine:
            return
        # ZeRO keeps the model's parameter objects: the tensors watched so far are the engine module's
        monitor = list(old.monitor_params) if isinstance(old, DeepSpeedGate) else list(old.monitor)
        gate = DeepSpeedGate(engine, monitor, config=self.gate_config, discard=self._dgg_discard)
        gate.load_state_dict(old.state_dict())
        if isinstance(old, DeepSpeedGate):
            old.remove()  # a new engine (train() called again): unhook the old one
        self.dgg.gate = gate  # the binding's loop and metrics calls are the gate API, which a DeepSpeedGate has
        self._dgg_logged = gate.step_count

    # -- the gate's state in checkpoints: saved and loaded with the optimizer's ---------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir):
        # the Trainer calls this on every rank for each resumable checkpoint, before it writes trainer_state.json
        super()._save_optimizer_and_scheduler(output_dir)
        save_gate(self.gate, output_dir, write=self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # on resume, on every rank, inside _prepare_for_training (so a gate rebuilt for FSDP2 keeps what is loaded)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if not load_gate(self.gate, checkpoint, missing_ok=True):
            warnings.warn(
                f"the checkpoint {checkpoint} holds no gate state ({GATE_FILE}; saved without DGGGRPOTrainer or "
                "by an older dgg_kernels): the gate starts fresh and its window refills before it can close on z",
                stacklevel=2,
            )
        elif not self.gate.should_stop():  # one host read, once per resume
            # the uninterrupted run would reuse its buffered batch for the next step; GRPOTrainer regenerates
            warnings.warn(
                f"resuming from {checkpoint} in the middle of a generated batch (after pass "
                f"{int(self.gate.stats()['reuse_index'])} of at most {self.num_iterations}): GRPOTrainer does not "
                "save its buffered batch and generates a fresh one, which starts at reuse index 1, so from here "
                "the run differs from the uninterrupted one. The gate's state is restored. A checkpoint where the "
                "batch had ended (its last pass ran or the gate closed) resumes exactly (docs/integrations.md, "
                "Checkpoints and resume).",
                stacklevel=2,
            )

    # -- the gate step: on the raw gradient, before clipping and the optimizer ------------------------------------

    def _dgg_step(self) -> None:
        self.dgg.step()
        self._dgg_unread = True

    def _clip_grad_norm(self, model):
        if self.is_deepspeed_enabled:  # the update already ran, inside accelerator.backward; the gate ran with it
            return super()._clip_grad_norm(model)
        self._dgg_step()
        self._dgg_stepped = True
        return super()._clip_grad_norm(model)

    def _dgg_pre_step(self, optimizer, args, kwargs):
        if not self._dgg_stepped:  # max_grad_norm <= 0: the Trainer did not clip, the gradient is still raw
            self._dgg_step()
        self._dgg_stepped = False

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not self.is_deepspeed_enabled:  # DeepSpeed wraps this optimizer; the DeepSpeedGate hooks the engine
            # the pre-step hook goes in before attach's (hooks run in registration order): the gate decides, then
            # attach's hook hands that decision to the fused kernel as found_inf
            self.dgg.attach(optimizer, pre_step=self._dgg_pre_step)
        return optimizer

    # -- the KL stop: the KL to the rollout policy, from the loss's own log-probs ---------------------------------

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._dgg_in_loss:
            self._dgg_logps = out[0] if isinstance(out, tuple) else out
        return out

    def _compute_loss(self, model, inputs):
        if self.gate_config.target_kl is None:
            return super()._compute_loss(model, inputs)
        self._dgg_in_loss, self._dgg_logps = True, None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._dgg_in_loss = False
        self._dgg_observe_kl(inputs)
        return loss

    def _dgg_observe_kl(self, inputs) -> None:
        import torch

        logps, old = self._dgg_logps, inputs.get("old_per_token_logps")
        self._dgg_logps = None
        if logps is None:
            raise RuntimeError(
                "DGGGRPOTrainer's KL stop did not see the policy's log-probs in GRPOTrainer._compute_loss "
                "(_get_per_token_logps_and_entropies was not called): this TRL version computes the loss "
                "differently; the KL stop supports trl==1.16"
            )
        with torch.no_grad():
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            mask = mask.to(torch.float32)
            if old is None:  # no rollout log-probs buffered: the policy is the rollout policy
                k3 = torch.zeros((), dtype=torch.float32, device=logps.device)
            else:
                lr = (logps.detach() - old).to(torch.float32)
                # where, not a product: a masked-out position's log-ratio may be anything (0 * inf is NaN)
                k3 = torch.where(mask > 0, torch.expm1(lr) - lr, torch.zeros_like(lr)).sum()
            if self._step % self.args.gradient_accumulation_steps == 0 or self._dgg_kl is None:
                self._dgg_kl = (k3, mask.sum())  # the first micro-batch of an optimizer step
            else:
                self._dgg_kl = (self._dgg_kl[0] + k3, self._dgg_kl[1] + mask.sum())
            self.gate.observe_kl(self._dgg_kl[0] / self._dgg_kl[1].clamp(min=1.0))

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
                self.dgg.new_batch()
                self.dgg_regenerations += 1
            self.dgg.new_pass()
        return super()._prepare_inputs(generation_batch)

    def log(self, logs, *args, **kwargs):
        if self.model.training:
            self._dgg_log()  # the step being logged has just run the gate: report it with that step
        return super().log(logs, *args, **kwargs)

    def _dgg_log(self) -> None:
        count = getattr(self.gate, "step_count", None)
        if count is not None:  # DeepSpeed: the gate stepped inside engine.step(), where the trainer does not see
            if count == self._dgg_logged:
                return
            self._dgg_logged = count
        elif not self._dgg_unread:
            return
        m = self._metrics["train"]
        for key, value in self.dgg.metrics().items():  # one device-to-host copy
            m[key].append(value)
        self._dgg_unread = False
