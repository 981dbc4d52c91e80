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
  (``_build_optimizer``), builds the gate once the sharded model and the
  optimizer exist (``_build_model_optimizer``) and attaches it, runs
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
(``trainer.use_v1=false``) and the ``separate_async`` trainer.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from typing import Any

try:
    from omegaconf import DictConfig, OmegaConf, open_dict
    from tensordict import TensorDict

    from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
    from verl.utils import tensordict_utils as tu
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


def gate_config_from_actor(actor, dgg=None) -> GateConfig | None:
    """The gate's settings from verl's actor config (``actor_rollout_ref.actor``), or None when the gate is off.

    ``dgg``: the ``dgg`` section when it was already taken out of ``actor`` (default: ``actor.dgg``).  Keys:
    ``enable`` (default false) and GateConfig's fields (window, threshold, statistic, max_reuse, window_mode,
    eps, backend); ``max_reuse`` defaults to ``ppo_epochs``.  Unknown keys, a bad value, and a strategy the gate
    does not support raise ValueError.
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
    strategy = _get(actor, "strategy", "fsdp2")
    if strategy != "fsdp2":
        why = _STRATEGY_HELP.get(strategy) or (
            f"verl's {strategy!r} engine is not supported; the gate runs in verl's FSDP2 engine "
            "(actor_rollout_ref.actor.strategy=fsdp2)."
        )
        raise ValueError(f"actor_rollout_ref.actor.dgg.enable=true with strategy={strategy!r}: {why}")
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
        name, impl = cfg.optimizer, cfg.optimizer_impl
        if impl != "torch.optim" or name not in _FUSED_OPTIMIZERS:
            raise ValueError(
                f"the DGG engine needs an optimizer that skips a discarded step on device (torch.optim "
                f"{'/'.join(_FUSED_OPTIMIZERS)} with fused=True), got {impl}.{name}: set "
                "actor_rollout_ref.actor.optim.optimizer_impl=torch.optim and optimizer=AdamW"
            )
        override = dict(cfg.override_optimizer_config or {})
        if override.get("fused") is False or override.get("foreach"):
            raise ValueError(
                f"the DGG engine builds {name} with fused=True (a closed gate skips the fused step on device; "
                f"a non-fused {name} still moves the weights on a zeroed gradient), but "
                f"actor_rollout_ref.actor.optim.override_optimizer_config sets {override}: remove fused/foreach there"
            )
        override["fused"] = True
        return build_optimizer(module.parameters(), dataclasses.replace(cfg, override_optimizer_config=override))

    def _build_model_optimizer(self):
        if self._gated and self._is_lora:
            raise ValueError(
                "the DGG engine does not support LoRA (model.lora_rank > 0): the lm_head is frozen and gets no "
                "gradient for the gate to watch. Train without LoRA, or drive the gate yourself with a monitor "
                "tensor that gets a gradient."
            )
        super()._build_model_optimizer()
        if not self._gated or self.optimizer is None:
            return
        refuse_grad_scaling(  # verl builds a ShardedGradScaler exactly when param_dtype is fp16
            self.scaler is not None, trainer="the DGG engine",
            fix="Set actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=bf16 (or fp32).",
        )
        # after fully_shard: the lm_head weight is a DTensor and the gate combines the ranks' shards over its mesh
        self.dgg = GateBinding(self.module, self.gate_config, trainer="the DGG engine")
        self.dgg.attach(self.optimizer)

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
        strategy = _get(config.engine_config, "strategy")
        if strategy != "fsdp2":
            raise ValueError(f"the gate runs in verl's FSDP2 engine only (strategy={strategy!r}): "
                             + _STRATEGY_HELP.get(strategy, "set actor_rollout_ref.actor.strategy=fsdp2"))
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
        dgg = getattr(self.engine, "dgg", None)
        if dgg is None:
            return super().train_mini_batch(data)
        run = _BatchRun(dgg, _steps_per_pass(self, data))
        dgg.new_batch()
        self._dgg_run = run
        try:
            output = super().train_mini_batch(data)
        finally:
            self._dgg_run = None
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
            gate_config = gate_config_from_actor(config.actor, section)
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        self.gate_config = gate_config
        if gate_config is not None:
            self.actor_worker_cls = functools.partial(DGGTrainingWorker, gate_config=gate_config)


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

    def with_dgg_worker(base):
        class Trainer(base):
            def _init_resource_pool_mgr(self):
                super()._init_resource_pool_mgr()  # verl maps the actor roles to ActorRolloutRefWorker here
                for role in roles:
                    if role in self.role_worker_mapping:
                        self.role_worker_mapping[role] = ray.remote(DGGActorRolloutRefWorker)

        Trainer.__name__ = Trainer.__qualname__ = f"DGG{base.__name__}"
        Trainer.__doc__ = f"verl's {base.__name__} whose actor worker is DGGActorRolloutRefWorker."
        return Trainer

    for mode in TRAINER_MODES:
        _TRAINERS[f"dgg_{mode}"] = register_trainer(f"dgg_{mode}")(with_dgg_worker(get_trainer_cls(mode)))
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
    such field.  Raises ValueError for what the gate does not support.
    """
    gate_config = gate_config_from_actor(config.actor_rollout_ref.actor)
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
    return checked


def _run(config) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    checked = prepare_config(config)
    validate_config(config=checked, use_reference_policy=need_reference_policy(checked),
                    use_critic=need_critic(checked))
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
    """``python -m dgg_kernels.integrations.verl [hydra overrides]``: verl's PPO trainer with the gate.

    Takes verl's overrides (and Hydra's ``--config-path``/``--config-name``); ``actor_rollout_ref.actor.dgg.<key>
    =...`` is accepted with or without Hydra's leading ``+``.
    """
    import hydra
    import verl.trainer

    sys.argv = [sys.argv[0], *hydra_overrides(sys.argv[1:] if argv is None else argv)]
    config_dir = os.path.join(os.path.dirname(verl.trainer.__file__), "config")
    hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)(_run)()


if __name__ == "__main__":
    # run as a script, this file is module __main__: hand over to the importable module, which registers
    from dgg_kernels.integrations.verl import main as _main

    _main()
else:
    _register_engine()
