"""The gate inside verl 0.9's FSDP2 engine: ``actor_rollout_ref.actor.dgg.*``.

verl reuses each rollout batch for ``actor_rollout_ref.actor.ppo_epochs``
passes of ``train_batch_size / ppo_mini_batch_size`` optimizer steps each.
With the gate, ``ppo_epochs`` becomes a maximum: every optimizer step of pass
r is tested at reuse index r, a closed step's update is discarded on device,
and the remaining mini-batches of the rollout batch are not run.

Run it (verl 0.9.1, ``trainer.use_v1=true``, the default)::

    python -m dgg_kernels.integrations.verl <verl's usual overrides> \\
        actor_rollout_ref.actor.strategy=fsdp2 \\
        actor_rollout_ref.actor.dgg.enable=true actor_rollout_ref.actor.dgg.threshold=0.3

It is verl's ``python -m verl.trainer.main_ppo`` (the same Hydra config, the
same checks, ``run_ppo`` with verl's ``TaskRunnerV1``) plus what the gate
needs, each through one of verl's (or Ray's) own extension points, with no
change to verl:

- **The engine** (``DGGFSDPEngine``, a subclass of verl's
  ``FSDPEngineWithLMHead``, verl/workers/engine/fsdp/transformer_impl.py),
  registered with ``EngineRegistry.register`` (verl/workers/engine/base.py)
  under its own model type, ``"dgg_language_model"``, so that only the actor
  worker that asks for it gets it (the reference model and the critic keep
  verl's engines).  It builds the optimizer with ``fused=True``
  (``_build_optimizer``; logged when verl's settings left it unfused), builds
  the gate once the sharded model and the optimizer exist
  (``_build_model_optimizer``) and attaches it, runs
  ``gate.step()`` first in ``optimizer_step()``, before verl clips (clipping
  would rescale the very surge the gate looks for), and saves/loads the gate
  with verl's checkpoints (``save_checkpoint`` / ``load_checkpoint``:
  ``dgg_gate.pt`` in the actor's checkpoint folder).
- **The loop** (``DGGTrainingWorker``, a subclass of verl's
  ``TrainingWorker``, verl/workers/engine_workers.py).  verl's
  ``train_mini_batch`` runs the mini-batches of all epochs in one loop and
  calls ``train_batch`` for each; the subclass wraps both: ``new_batch()``
  before the loop, ``new_pass()`` before the first mini-batch of each epoch,
  and once the gate says stop, the remaining mini-batches are not run (no
  forward, backward or optimizer step).  verl steps the LR scheduler on the
  last mini-batch of the rollout batch; when that one is not run, the
  scheduler is still stepped there, so it steps exactly once per rollout
  batch, as in plain verl.  The metrics (``dgg/z``, ``dgg/closed``,
  ``dgg/passes``, ...) are added to the worker's metric dict (the trainer
  logs them as ``actor/dgg/...``).
- **The worker** (``DGGActorRolloutRefWorker``, a subclass of verl's
  ``ActorRolloutRefWorker``) takes the ``dgg`` section out of the actor config
  (verl's ``ActorConfig`` has no such field) and sets its
  ``actor_worker_cls`` to ``DGGTrainingWorker``.
- **The trainer**: verl's v1 trainers pick ``ActorRolloutRefWorker`` in
  ``PPOTrainer._init_resource_pool_mgr``; ``register_trainers()`` registers
  ``dgg_sync`` and ``dgg_colocate_async`` (``register_trainer``,
  verl/trainer/ppo/v1/trainer_base.py), verl's ``sync`` and
  ``colocate_async`` trainers with the DGG worker, and ``prepare_config``
  (called by ``main``) selects the one for ``trainer.v1.trainer_mode``.  Ray runs ``ray_setup`` in every worker
  process (``runtime_env.worker_process_setup_hook``, which ``prepare_config`` adds), so
  the registrations exist wherever verl looks them up.

Host reads: ``gate.step()`` and the optimizer step queue device work only.
The loop reads the device once per optimizer step, between steps:
``should_stop()`` before each epoch's first mini-batch, and whether the last
step closed before the others.  verl's own step already synchronizes every
mini-batch (``FSDPEngine.optimizer_step`` branches on
``torch.isfinite(grad_norm)`` and returns the norm as a Python float), so these reads
add no stall.  ``metrics()`` reads once per rollout batch.

Refused, with an error that says what to do: FSDP1 (``strategy=fsdp``), the
Megatron engine and verl's other engines (veomni, torchtitan, automodel),
fp16 with verl's gradient scaler, LoRA (the lm_head gets no gradient), an
optimizer that cannot skip a step on device, verl's legacy trainer
(``trainer.use_v1=false``) and the ``separate_async`` trainer.  Each is
checked by ``gate_config_from_actor``, which both the entry point (before
``ray.init``) and the worker call; ``--dry-run`` runs the entry point's checks
and verl's ``validate_config`` and exits without starting Ray.

verl's private methods: the overrides above only work while verl calls them.
Importing this module checks that every method it overrides exists and that
verl's ``TrainingWorker.train_mini_batch`` still calls ``train_batch``, where
the gate decides which mini-batches run (a RuntimeError names what is
missing), and warns under a verl version other than the tested one; a gated
worker whose gate was not built, or whose mini-batches did not run through
its loop, raises instead of training as plain verl.
"""
from __future__ import annotations

if __name__ == "__main__":
    # python -m: hand over to the importable module (which checks verl and registers), so nothing here runs twice
    import sys

    from dgg_kernels.integrations.verl import main

    sys.exit(main())

import dataclasses
import dis
import functools
import inspect
import logging
import os
import sys
import warnings
from typing import Any

import torch

try:
    from omegaconf import DictConfig, OmegaConf, open_dict
    from tensordict import TensorDict

    import verl
    from verl.single_controller.base.decorator import MAGIC_ATTR, make_nd_compute_dataproto_dispatch_fn, register
    from verl.utils import tensordict_utils as tu
    from verl.utils.torch_dtypes import PrecisionType
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
except ImportError as e:  # pragma: no cover - exercised only without verl
    raise ImportError(
        f"dgg_kernels.integrations.verl needs verl 0.9 ({e}). Install it in its own environment: "
        'pip install "dgg-kernels[verl]" (verl pins transformers<5.11, which TRL\'s pin does not allow).'
    ) from e

from ..config import GateConfig
from .adapter import GATE_FIELDS, GateBinding, refuse_grad_scaling, resolve_config, warn_single_pass
from .checkpoint import GATE_FILE, load_gate, save_gate

__all__ = [
    "CONFIG_KEYS",
    "TESTED_VERL_VERSIONS",
    "DGG_MODEL_TYPE",
    "DGGActorRolloutRefWorker",
    "DGGFSDPEngine",
    "DGGTrainingWorker",
    "gate_config_from_actor",
    "hydra_overrides",
    "main",
    "prepare_config",
    "ray_setup",
    "register_trainers",
]

DGG_MODEL_TYPE = "dgg_language_model"  # the engine registry key of DGGFSDPEngine (verl's own: "language_model")
CONFIG_KEYS = ("enable",) + GATE_FIELDS  # actor_rollout_ref.actor.dgg.<key>
SETUP_HOOK = "dgg_kernels.integrations.verl.ray_setup"
_DGG_KEY = "actor_rollout_ref.actor.dgg"
TRAINER_MODES = ("sync", "colocate_async")  # verl's v1 trainers that get a DGG variant, "dgg_<mode>"
_FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adagrad")  # torch.optim classes with a fused step that honours found_inf
DRY_RUN_FLAG = "--dry-run"
TESTED_VERL_VERSIONS = ("0.9.1",)

logger = logging.getLogger(__name__)

# What this module overrides or sets on verl's classes.  They are private, so a verl release may rename them; the
# override would then never be called and verl would train ungated without a word, hence the check at import.
_HOOKS = (
    (FSDPEngineWithLMHead, ("initialize", "_build_model_optimizer", "_build_optimizer", "optimizer_step",
                            "save_checkpoint", "load_checkpoint")),
    (TrainingWorker, ("train_mini_batch", "train_batch")),
    (ActorRolloutRefWorker, ("init_model", "actor_worker_cls")),
)


def _verl_version() -> str:
    return str(getattr(verl, "__version__", "unknown"))


def _verl_versions() -> str:
    return f"verl {_verl_version()}; tested with verl {', '.join(TESTED_VERL_VERSIONS)}"


def _missing_hooks(hooks) -> None:
    """Raise RuntimeError naming each ``(verl class, attribute)`` of ``hooks`` that verl does not have."""
    missing = [f"{cls.__name__}.{name}" for cls, names in hooks for name in names if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(
            f"dgg_kernels.integrations.verl overrides {', '.join(missing)}, which this verl does not have "
            f"({_verl_versions()}): the gate would never be built or stepped, and training would run ungated. Install "
            f"verl=={TESTED_VERL_VERSIONS[-1]}, or port the integration to this verl's methods."
        )


# What verl's own code must call for an override to take effect: the gate decides, mini-batch by mini-batch, in
# DGGTrainingWorker.train_batch, which verl's TrainingWorker.train_mini_batch calls for each mini-batch.  A verl
# whose loop stops calling it would run every mini-batch of a closed batch; this is checked at import (the names
# its code refers to), before any step, and again after each batch (the count of mini-batches seen).
_CALLS = ((TrainingWorker, "train_mini_batch", "train_batch"),)


def _self_calls(fn, callee: str) -> bool:
    """Whether ``fn``'s code (or a function nested in it) reads ``self.<callee>``: the instruction loading ``self``
    directly followed by the attribute load (``self.engine.<callee>`` or a helper that calls it do not count)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    todo = [code] if code is not None else []
    while todo:
        c = todo.pop()
        todo += [x for x in c.co_consts if inspect.iscode(x)]
        ins = list(dis.get_instructions(c))
        for a, b in zip(ins, ins[1:]):
            if a.opname.startswith(("LOAD_FAST", "LOAD_DEREF")) and a.argval == "self" \
                    and b.opname in ("LOAD_ATTR", "LOAD_METHOD") \
                    and b.argval == callee:
                return True
    return False


def _missing_calls(calls) -> None:
    """Raise RuntimeError naming each ``(verl class, method, callee)`` of ``calls`` whose method no longer calls
    ``self.<callee>`` itself."""
    missing = [f"{cls.__name__}.{meth} no longer calls self.{callee}" for cls, meth, callee in calls
               if not _self_calls(getattr(cls, meth), callee)]
    if missing:
        raise RuntimeError(
            f"dgg_kernels.integrations.verl: {'; '.join(missing)} ({_verl_versions()}), so the gate's override "
            f"may never run and a closed batch's remaining mini-batches would train. Install "
            f"verl=={TESTED_VERL_VERSIONS[-1]}, or port the integration to this verl's loop."
        )


def _check_verl() -> None:
    """At import: warn under an untested verl version; raise when a method this module overrides is missing, or
    when verl's loop no longer calls one."""
    if _verl_version() not in TESTED_VERL_VERSIONS:
        warnings.warn(
            f"dgg_kernels.integrations.verl runs under {_verl_versions()}. The verl methods it overrides exist, but if "
            "verl changed when it calls them the gate may not run: check that actor/dgg/* metrics are logged, or run "
            "the integration's tests against this verl (bash .ci/verl.sh)",
            stacklevel=3,
        )
    _missing_hooks(_HOOKS)
    _missing_calls(_CALLS)


_check_verl()  # before the classes below, which read some of these hook points

_STRATEGY_HELP = {
    "fsdp": (
        "FSDP1 (strategy=fsdp) flattens the parameters, so a rank's lm_head .grad is an arbitrary slice of a flat "
        "buffer the gate cannot combine across ranks. Set actor_rollout_ref.actor.strategy=fsdp2 (verl's FSDP2 "
        "engine, same model and optimizer settings)."
    ),
    "megatron": (
        "verl's Megatron engine is not supported: its optimizer step runs inside Megatron's distributed optimizer "
        "(with its own gradient buffers and clipping), where this adapter cannot run the gate before clipping. "
        "Use actor_rollout_ref.actor.strategy=fsdp2 (add Ulysses sequence parallelism for long sequences), or, in "
        "your own Megatron loop, build dgg_kernels.DynamicGradientGate on the vocab-parallel lm_head shard with "
        "process_group=<the tensor-parallel group> and step it before the optimizer (docs/distributed.md)."
    ),
}


# -- settings -------------------------------------------------------------------------------------------------------

def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise TypeError(f"actor_rollout_ref.actor.dgg must be a mapping of {list(CONFIG_KEYS)}, got {node!r}")
    return dict(node)


def _get(cfg, key: str, default=None):
    getter = getattr(cfg, "get", None)
    return getter(key, default) if callable(getter) else getattr(cfg, key, default)


# -- what the gate does not support: one function per rule, called on the config (gate_config_from_actor, before
# -- Ray and in the worker) and again by the engine on what verl actually built

def _refuse_strategy(strategy) -> None:
    if strategy != "fsdp2":
        why = _STRATEGY_HELP.get(strategy) or (
            f"verl's {strategy!r} engine is not supported; the gate runs in verl's FSDP2 engine "
            "(actor_rollout_ref.actor.strategy=fsdp2)."
        )
        raise ValueError(f"actor_rollout_ref.actor.dgg.enable=true with strategy={strategy!r}: {why}")


def _refuse_lora(lora: bool) -> None:
    if lora:
        raise ValueError(
            "the DGG engine does not support LoRA (actor_rollout_ref.model.lora_rank > 0): the lm_head is frozen and "
            "gets no gradient for the gate to watch. Train without LoRA, or drive the gate yourself with a monitor "
            "tensor that gets a gradient."
        )


def _refuse_scaler(scaled: bool) -> None:
    refuse_grad_scaling(scaled, trainer="the DGG engine",
                        fix="Set actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16 (or fp32).")


def _fused_override(impl, name, override) -> dict:
    """``override_optimizer_config`` with ``fused=True``, for an optimizer that can skip a discarded step on device.

    A closed gate skips the fused step through ``found_inf``; an unfused or foreach step would still move the
    weights (Adam's moments) on the zeroed gradient.  Anything else raises ValueError.
    """
    if impl != "torch.optim" or name not in _FUSED_OPTIMIZERS:
        raise ValueError(
            f"the DGG engine needs an optimizer that skips a discarded step on device (torch.optim "
            f"{'/'.join(_FUSED_OPTIMIZERS)} with fused=True), got {impl}.{name}: set "
            "actor_rollout_ref.actor.optim.optimizer_impl=torch.optim and optimizer=AdamW"
        )
    override = dict(_plain_optional(override))
    if override.get("fused") is False or override.get("foreach"):
        raise ValueError(
            f"the DGG engine builds {name} with fused=True (a closed gate skips the fused step on device; "
            f"a non-fused {name} still moves the weights on a zeroed gradient), but "
            f"actor_rollout_ref.actor.optim.override_optimizer_config sets {override}: remove fused/foreach there"
        )
    override["fused"] = True
    return override


def _plain_optional(node) -> dict:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _fp16_params(actor) -> bool:
    """Whether verl's FSDP engine will train ``actor`` in fp16, which is when it builds a ShardedGradScaler.

    verl 0.9.1's ``FSDPEngine._build_fsdp_module``: no ``fsdp_config.mixed_precision`` means bf16; without
    ``param_dtype`` there, bf16 too.
    """
    fsdp = _get(actor, "fsdp_config")
    mixed = None if fsdp is None else _get(fsdp, "mixed_precision")
    if mixed is None:
        return False
    return PrecisionType.to_dtype(_get(mixed, "param_dtype", "bf16")) == torch.float16


def _refuse_unsupported(actor, model) -> None:
    """The gate's refusals on verl's config: strategy, LoRA (with ``model``), fp16, the optimizer."""
    _refuse_strategy(_get(actor, "strategy", "fsdp2"))
    if model is not None:
        _refuse_lora((_get(model, "lora_rank", 0) or 0) > 0)  # verl's FSDP engine: lora_rank > 0 means LoRA
    _refuse_scaler(_fp16_params(actor))
    optim = _get(actor, "optim")
    if optim is not None:
        _fused_override(_get(optim, "optimizer_impl", "torch.optim"), _get(optim, "optimizer", "AdamW"),
                        _get(optim, "override_optimizer_config"))


def gate_config_from_actor(actor, dgg=None, *, model=None) -> GateConfig | None:
    """The gate's settings from verl's actor config (``actor_rollout_ref.actor``), or None when the gate is off.

    ``dgg``: the ``dgg`` section when it was already taken out of ``actor`` (default: ``actor.dgg``).  Keys:
    ``enable`` (default false) and GateConfig's fields (window, threshold, statistic, max_reuse, window_mode,
    eps, backend); ``max_reuse`` defaults to ``ppo_epochs``.  ``model``: ``actor_rollout_ref.model``, for the LoRA
    refusal.  Unknown keys, a bad value, and what the gate does not support (a strategy other than fsdp2, LoRA,
    fp16 with verl's gradient scaler, an optimizer without a fused step) raise ValueError.  The entry point calls
    it before Ray starts and the worker again when it is built.
    """
    section = _plain(_get(actor, "dgg") if dgg is None else dgg)
    enable = section.get("enable", False)
    if not isinstance(enable, bool):
        raise ValueError(f"actor_rollout_ref.actor.dgg.enable must be true or false, got {enable!r}")
    # the keys are checked even when the gate is off: a typo should not pass silently
    config = resolve_config(section, ignore=("enable",), defaults={"max_reuse": _get(actor, "ppo_epochs")},
                            where="actor_rollout_ref.actor.dgg")
    if config.target_kl is not None:
        raise ValueError(
            "actor_rollout_ref.actor.dgg.target_kl: the KL stop is not wired into verl's engine yet (nothing gives "
            "the gate the KL each step); use the gradient test here, or the KL stop with DGGGRPOTrainer (TRL) or "
            "your own loop (gate.observe_kl)"
        )
    if not enable:
        return None
    _refuse_unsupported(actor, model)
    epochs = _get(actor, "ppo_epochs")
    if isinstance(epochs, int) and config.max_reuse > epochs:
        warnings.warn(
            f"actor_rollout_ref.actor.dgg.max_reuse={config.max_reuse} is above ppo_epochs={epochs}: verl runs at "
            f"most ppo_epochs passes, so the gate stops reuse at {epochs} passes",
            stacklevel=2,
        )
    warn_single_pass(min(config.max_reuse, epochs) if isinstance(epochs, int) else config.max_reuse,
                     setting="actor_rollout_ref.actor.ppo_epochs")
    return config


def _take_dgg(config) -> Any:
    """Remove and return ``config.actor.dgg`` (verl's ActorConfig would refuse the unknown field)."""
    actor = _get(config, "actor")
    if actor is None or "dgg" not in actor:
        return None
    if isinstance(actor, DictConfig):
        with open_dict(actor):
            return actor.pop("dgg")
    return actor.pop("dgg")


# -- the engine -----------------------------------------------------------------------------------------------------

class DGGFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP2 engine with the gate: stepped first in ``optimizer_step``, before clipping.

    ``gate_config`` (set by DGGTrainingWorker before ``initialize()``): the gate's settings; None runs plain
    verl.  After ``initialize()``, ``engine.dgg`` is the GateBinding (``engine.dgg.gate`` the gate) on a
    training engine, None on a forward-only one.
    """

    def __init__(self, model_config, *args, **kwargs):
        if getattr(model_config, "model_type", None) == DGG_MODEL_TYPE:
            model_config.model_type = "language_model"  # what verl's model building reads from here on
        super().__init__(model_config, *args, **kwargs)
        self.gate_config: GateConfig | None = None
        self.dgg: GateBinding | None = None

    @property
    def _gated(self) -> bool:
        return self.gate_config is not None and not self.engine_config.forward_only

    def _build_optimizer(self, module):
        if not self._gated:
            return super()._build_optimizer(module)
        from verl.workers.config.optimizer import build_optimizer

        cfg = self.optimizer_config
        override = _fused_override(cfg.optimizer_impl, cfg.optimizer, cfg.override_optimizer_config)
        if "fused" not in _plain_optional(cfg.override_optimizer_config):
            # verl leaves fused unset (torch's default: an unfused AdamW), so this run's updates differ from plain
            # verl's by rounding: say so, since an observer run (threshold=inf) is meant to match plain verl
            logger.warning(
                "the DGG engine builds %s with fused=True (a closed gate skips the fused step on device); verl's "
                "default is torch's unfused %s. Updates therefore differ from a plain verl run with default settings "
                "by float rounding (a few 1e-6 in the parameters after one rollout batch of the tests' model); set "
                "actor_rollout_ref.actor.optim.override_optimizer_config.fused=true to run plain verl the same way and "
                "to silence this message", cfg.optimizer, cfg.optimizer,
            )
        return build_optimizer(module.parameters(), dataclasses.replace(cfg, override_optimizer_config=override))

    def _build_model_optimizer(self):
        if self._gated:
            _refuse_lora(self._is_lora)
        super()._build_model_optimizer()
        if not self._gated or self.optimizer is None:
            return
        _refuse_scaler(self.scaler is not None)  # what verl built: its ShardedGradScaler
        # after fully_shard: the lm_head weight is a DTensor and the gate combines the ranks' shards over its mesh
        self.dgg = GateBinding(self.module, self.gate_config, trainer="the DGG engine")
        self.dgg.attach(self.optimizer)

    def initialize(self):
        super().initialize()
        self._require_gate()

    def _require_gate(self) -> None:
        """Raise when this engine should gate and has no gate (training would run as plain verl)."""
        if self._gated and self.dgg is None:
            raise RuntimeError(
                "the DGG engine has gate settings but its gate was never built: it is built in "
                "DGGFSDPEngine._build_model_optimizer, which verl's FSDPEngine.initialize() did not call "
                f"({_verl_versions()}). Training would run ungated: install verl=={TESTED_VERL_VERSIONS[-1]}, or port "
                "the integration to where this verl builds its model and optimizer."
            )

    def optimizer_step(self):
        if self.dgg is not None:
            self.dgg.step()  # the raw gradient: before verl clips it (inside super().optimizer_step())
        return super().optimizer_step()

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None, **kwargs):
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep, **kwargs)
        if self.dgg is not None and local_path is not None:
            save_gate(self.dgg.gate, local_path)  # rank 0 writes; every rank holds the same state

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=True, **kwargs):
        if self.dgg is not None and local_path is not None:  # before verl may delete the local copy
            if not load_gate(self.dgg.gate, local_path, missing_ok=True):
                warnings.warn(
                    f"the checkpoint {local_path} holds no gate state ({GATE_FILE}; saved without the gate): the "
                    "gate starts fresh and its window refills before it can close on z",
                    stacklevel=2,
                )
        super().load_checkpoint(local_path, hdfs_path, del_local_after_load, **kwargs)


# -- the loop -------------------------------------------------------------------------------------------------------

class _BatchRun:
    """One rollout batch on one worker: which mini-batches run, and what to report."""

    def __init__(self, dgg: GateBinding, per_pass: int) -> None:
        self.dgg = dgg
        self.per_pass = per_pass
        self.index = 0  # mini-batches seen
        self.ran = 0
        self.stopped = False

    def skip_next(self) -> bool:
        """Called before each mini-batch: True when it must not run.  One host read, except on the first."""
        k, self.index = self.index, self.index + 1
        if not self.stopped:
            if k % self.per_pass == 0:  # an epoch (a pass) begins
                if k > 0 and self.dgg.should_stop():  # closed, or max_reuse passes ran
                    self.stopped = True
                else:
                    self.dgg.new_pass()
            elif self.dgg.last_step_closed():  # mid-pass: a close ends the batch (the max_reuse flag does not)
                self.stopped = True
        if not self.stopped:
            self.ran += 1
        return self.stopped

    def metrics(self) -> dict[str, float]:
        out = self.dgg.metrics("dgg/")
        out["dgg/mini_batches"] = float(self.ran)
        out["dgg/skipped_mini_batches"] = float(self.index - self.ran)
        return out


def _steps_per_pass(worker, data) -> int:
    """Mini-batches per epoch, as TrainingWorker.train_mini_batch splits ``data``."""
    rows = data.shape[0]
    mini_batch_size = tu.get(data, "mini_batch_size", None)
    if mini_batch_size is None:
        num_mini_batch = tu.get(data, "num_mini_batch", None)
        if not num_mini_batch:
            raise ValueError("train_mini_batch needs mini_batch_size or num_mini_batch in the batch")
        per_rank = rows // num_mini_batch
    else:
        per_rank = mini_batch_size // worker.engine.get_data_parallel_size()
    if per_rank < 1 or rows % per_rank:
        raise ValueError(f"a batch of {rows} rows per rank does not split into mini-batches of {per_rank}")
    return rows // per_rank


class DGGTrainingWorker(TrainingWorker):
    """verl's TrainingWorker with the gate's pass loop around ``train_mini_batch``.

    ``gate_config``: the gate's settings (None: plain verl).  The worker builds DGGFSDPEngine (through verl's
    engine registry) and hands it the settings before ``reset()`` initializes it.
    """

    def __init__(self, config, gate_config: GateConfig | None = None):
        self._dgg_run: _BatchRun | None = None
        if gate_config is None:
            super().__init__(config)
            return
        if not isinstance(gate_config, GateConfig):
            raise TypeError(f"gate_config must be a GateConfig, got {type(gate_config).__name__}")
        _refuse_strategy(_get(config.engine_config, "strategy"))
        if config.model_type not in (None, "language_model"):
            raise ValueError(f"the gate watches a language model's lm_head; got model_type={config.model_type!r}")
        super().__init__(dataclasses.replace(config, model_type=DGG_MODEL_TYPE))
        if not isinstance(self.engine, DGGFSDPEngine):  # another engine registered under our key
            raise TypeError(f"verl's engine registry gave {type(self.engine).__name__} for {DGG_MODEL_TYPE!r}")
        self.engine.gate_config = gate_config

    @property
    def gate(self):
        """The gate (None before ``reset()`` and without one)."""
        dgg = getattr(self.engine, "dgg", None)
        return None if dgg is None else dgg.gate

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_mini_batch(self, data: TensorDict) -> TensorDict:
        if isinstance(self.engine, DGGFSDPEngine):
            self.engine._require_gate()  # gate settings without a gate: refuse rather than run plain verl
        dgg = getattr(self.engine, "dgg", None)
        if dgg is None:
            return super().train_mini_batch(data)
        per_pass = _steps_per_pass(self, data)
        expected = per_pass * tu.get(data, "epochs", 1)  # read before verl's loop pops it
        run = _BatchRun(dgg, per_pass)
        dgg.new_batch()
        self._dgg_run = run
        try:
            output = super().train_mini_batch(data)
        finally:
            self._dgg_run = None
        if run.index != expected:
            # the loop decides in train_batch; a verl whose loop no longer calls it runs every mini-batch
            raise RuntimeError(
                f"verl's TrainingWorker.train_mini_batch passed {run.index} of the batch's {expected} mini-batches "
                f"through train_batch, where the gate decides which of them run ({_verl_versions()}): a closed batch's "
                "remaining mini-batches would run. Install the tested verl, or port the integration."
            )
        if output is None:  # a rank that returns no outputs
            return None
        metrics = dict(tu.get(output, "metrics"))
        metrics.update(run.metrics())
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics}).cpu()  # host-read-ok: the report verl's worker returns, as its own does

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data: TensorDict) -> TensorDict:
        run = self._dgg_run
        if run is None or not run.skip_next():
            return super().train_batch(data)
        # not run: no forward, backward or optimizer step; only what verl does once per rollout batch
        lr = self.engine.lr_scheduler_step() if tu.get(data, "update_lr_scheduler", False) else None
        if not self.engine.is_mp_src_rank_with_outputs():
            return None
        metrics = {} if lr is None else {"lr": lr}
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics}).cpu()  # host-read-ok: the report verl's worker returns, as its own does


# -- the worker -----------------------------------------------------------------------------------------------------

class DGGActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's ActorRolloutRefWorker whose actor runs DGGTrainingWorker, with ``actor_rollout_ref.actor.dgg``."""

    def __init__(self, config, role: str, distillation_config=None, **kwargs):
        section = _take_dgg(config)
        gate_config = None
        if "actor" in str(role):
            gate_config = gate_config_from_actor(config.actor, section, model=_get(config, "model"))
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        self.gate_config = gate_config
        if gate_config is not None:
            self.actor_worker_cls = functools.partial(DGGTrainingWorker, gate_config=gate_config)

    @register(**getattr(ActorRolloutRefWorker.init_model, MAGIC_ATTR))  # verl's dispatch settings, as they are
    def init_model(self):
        super().init_model()
        if self.gate_config is not None and not isinstance(self.actor, DGGTrainingWorker):
            raise RuntimeError(
                f"verl's ActorRolloutRefWorker.init_model built the actor as {type(self.actor).__name__}, not from "
                f"actor_worker_cls (DGGTrainingWorker), so it would train ungated ({_verl_versions()}). Install the "
                "tested verl, or port the integration."
            )


# -- registrations ------------------------------------------------------------------------------------------------

def _register_engine() -> None:
    registered = EngineRegistry._engines.get(DGG_MODEL_TYPE, {}).get("fsdp2", {})
    if any(cls is DGGFSDPEngine for cls in registered.values()):
        return
    EngineRegistry.register(model_type=DGG_MODEL_TYPE, backend="fsdp2", device=["cuda", "npu"])(DGGFSDPEngine)


_TRAINERS: dict[str, type] = {}


def register_trainers() -> dict[str, type]:
    """Register ``dgg_sync`` and ``dgg_colocate_async`` with verl's v1 trainer registry; returns them by name.

    Each is verl's trainer of that mode whose actor worker is DGGActorRolloutRefWorker.  Needs verl's v1
    trainer (and its ``transfer_queue`` dependency).
    """
    if _TRAINERS:
        return dict(_TRAINERS)
    import ray
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import get_trainer_cls, register_trainer

    roles = tuple(getattr(Role, n) for n in ("ActorRollout", "ActorRolloutRef", "Actor") if hasattr(Role, n))
    bases = {mode: get_trainer_cls(mode) for mode in TRAINER_MODES}
    _missing_hooks([(base, ("_init_resource_pool_mgr",)) for base in bases.values()])

    def with_dgg_worker(base):
        class Trainer(base):
            def _init_resource_pool_mgr(self):
                super()._init_resource_pool_mgr()  # verl maps the actor roles to ActorRolloutRefWorker here
                mapped = [role for role in roles if role in self.role_worker_mapping]
                if not mapped:  # verl renamed the roles or the mapping: the actor would get verl's own worker
                    raise RuntimeError(
                        f"verl's {base.__name__}._init_resource_pool_mgr mapped none of {[str(r) for r in roles]} "
                        f"to a worker ({_verl_versions()}): cannot give the actor the DGG worker"
                    )
                for role in mapped:
                    self.role_worker_mapping[role] = ray.remote(DGGActorRolloutRefWorker)

        Trainer.__name__ = Trainer.__qualname__ = f"DGG{base.__name__}"
        Trainer.__doc__ = f"verl's {base.__name__} whose actor worker is DGGActorRolloutRefWorker."
        return Trainer

    for mode, base in bases.items():
        _TRAINERS[f"dgg_{mode}"] = register_trainer(f"dgg_{mode}")(with_dgg_worker(base))
    return dict(_TRAINERS)


def ray_setup() -> None:
    """Ray's worker_process_setup_hook: the registrations, in every Ray worker process (see ``main``)."""
    _register_engine()
    try:
        register_trainers()
    except ImportError:  # a process without the v1 trainer's dependencies never looks a trainer up
        pass


# -- the entry point --------------------------------------------------------------------------------------------

def prepare_config(config) -> Any:
    """Set up ``config`` (verl's PPO trainer config, a DictConfig) for the gate; returns a copy for verl's checks.

    With ``actor_rollout_ref.actor.dgg.enable=true``: selects the DGG trainer for ``trainer.v1.trainer_mode`` and
    adds ``ray_setup`` as Ray's worker_process_setup_hook.  The ``dgg`` section stays in ``config`` (the worker
    takes it out); the returned copy has none, for ``verl.utils.config.validate_config``, whose ActorConfig has no
    such field.  Raises ValueError for what the gate does not support (``gate_config_from_actor``, the check the
    worker runs), before it changes ``config``.
    """
    return _prepare(config)[0]


def _prepare(config) -> tuple[Any, GateConfig | None]:
    gate_config = gate_config_from_actor(config.actor_rollout_ref.actor, model=config.actor_rollout_ref.get("model"))
    if gate_config is not None:
        if not _get(config.trainer, "use_v1", True):
            raise ValueError("the gate runs with verl's v1 trainer: set trainer.use_v1=true (verl 0.9's default)")
        mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default="sync")
        if mode.startswith("dgg_"):
            mode = mode[len("dgg_"):]
        if mode not in TRAINER_MODES:
            raise ValueError(f"trainer.v1.trainer_mode={mode!r} is not supported with the gate; use one of "
                             f"{list(TRAINER_MODES)}")
        with open_dict(config):
            config.trainer.v1.trainer_mode = f"dgg_{mode}"
            init = config.ray_kwargs.setdefault("ray_init", {})
            if init.get("runtime_env") is None:
                init.runtime_env = {}
            env = init.runtime_env
            hook = env.get("worker_process_setup_hook")
            if hook not in (None, SETUP_HOOK):
                raise ValueError(f"ray_kwargs.ray_init.runtime_env.worker_process_setup_hook is already {hook!r}; "
                                 f"the gate needs {SETUP_HOOK!r} there (call both from one function of yours)")
            env.worker_process_setup_hook = SETUP_HOOK
    checked = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    _take_dgg(checked.actor_rollout_ref)
    return checked, gate_config


def _run(config, dry_run: bool = False) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    checked, gate_config = _prepare(config)
    validate_config(config=checked, use_reference_policy=need_reference_policy(checked),
                    use_critic=need_critic(checked))
    if gate_config is not None:
        ray_setup()  # the registrations here too: a verl whose trainers changed fails before Ray starts
    if dry_run:
        mode = OmegaConf.select(config, "trainer.v1.trainer_mode")
        print(f"dry run: the config passed the gate's checks and verl's validate_config (gate: {gate_config}, "
              f"trainer.v1.trainer_mode={mode}); Ray was not started", flush=True)
        return
    run_ppo(config, task_runner_class=TaskRunnerV1)


def hydra_overrides(argv) -> list[str]:
    """``argv`` for Hydra: ``actor_rollout_ref.actor.dgg.<key>=...``, written bare or with Hydra's ``+``, gets
    ``++`` (add or override): verl's ppo_trainer has no dgg section, so a bare key would be refused, while a config
    of the user's own (``--config-name``) that extends it may set one, where ``+`` would be refused.  Everything
    else is passed as it is."""
    out = []
    for a in argv:
        bare = a[1:] if a.startswith("+") and not a.startswith("++") else a
        out.append(f"++{bare}" if bare.startswith(f"{_DGG_KEY}.") else a)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m dgg_kernels.integrations.verl [--dry-run] [hydra overrides]``: verl's PPO trainer with the gate.

    Takes verl's overrides (and Hydra's ``--config-path``/``--config-name``); ``actor_rollout_ref.actor.dgg.<key>
    =...`` is accepted with or without Hydra's leading ``+``.  ``--dry-run``: compose the config, run the gate's
    checks and verl's ``validate_config``, print the result and exit without starting Ray.
    """
    import hydra
    import verl.trainer

    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = DRY_RUN_FLAG in args
    sys.argv = [sys.argv[0], *hydra_overrides([a for a in args if a != DRY_RUN_FLAG])]
    config_dir = os.path.join(os.path.dirname(verl.trainer.__file__), "config")

    def task(config) -> None:
        _run(config, dry_run=dry_run)

    hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)(task)()


_register_engine()
