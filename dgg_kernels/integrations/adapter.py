"""What every trainer adapter does that is not specific to its trainer.

The TRL, verl and DeepSpeed adapters each hook the gate into a different
training loop, but they all need the same pieces, which live here:

- ``output_embedding_weight(model)``: the tensor the gate watches by default,
  the weight of the model's output embedding (``lm_head.weight``) as
  transformers' ``get_output_embeddings()`` returns it.
- ``refuse_fsdp1(model, ...)`` and ``refuse_grad_scaling(...)``: the setups
  the gate cannot judge, refused with an error that says what to do instead.
- ``resolve_config(config, **fixed)``: a ``GateConfig`` from a GateConfig, a
  mapping of its fields (a trainer's YAML section) or None, with what the
  trainer decides itself (``max_reuse``, usually) filled in; unknown keys are
  refused by name.  Adapters take a GateConfig instead of re-listing its
  defaults.
- ``GateBinding``: a gate bound to a model's parameters and to an optimizer.
  It builds the gate after the model (and its sharding) exists, registers the
  optimizer hooks in the right order, rebuilds the gate with its state when
  the trainer swaps the parameters (accelerate's FSDP2 ``prepare``), counts
  the passes over the current rollout batch and reads the metrics
  (``dgg/z``, ``dgg/closed``, ``dgg/passes``, ...) as host floats, once.

Nothing here runs in the gate's step path: ``GateBinding.step()`` is
``gate.step()``; ``should_stop()``, ``last_step_closed()`` and ``metrics()``
read the device and are the trainer's per-pass (or per-log) decisions.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..config import GateConfig
from ..gate import DynamicGradientGate

__all__ = [
    "GATE_FIELDS",
    "GateBinding",
    "METRIC_KEYS",
    "output_embedding_weight",
    "refuse_fsdp1",
    "refuse_grad_scaling",
    "resolve_config",
    "trainable_params",
    "warn_single_pass",
]

GATE_FIELDS = tuple(f.name for f in dataclasses.fields(GateConfig))

# metric name (after the prefix) -> the stats() entry it reports; "passes" is the binding's own count
METRIC_KEYS = (
    ("lm_head_grad_norm", "norm"),
    ("z", "z"),
    ("z_energy", "z_energy"),
    ("z_increment", "z_increment"),
    ("closed", "closed"),
    ("reuse_index", "reuse_index"),
    ("accepted", "accepted"),
    ("closed_total", "closed_total"),
    ("kl", "kl"),
)


# -- the monitor and the params ------------------------------------------------------------------------------------

def _unwrap(model):
    """The model inside DDP/accelerate-style wrappers (``.module``), which have no output embeddings of their own."""
    seen = set()
    while not callable(getattr(model, "get_output_embeddings", None)) and hasattr(model, "module"):
        if id(model) in seen:
            break
        seen.add(id(model))
        model = model.module
    return model


def output_embedding_weight(model) -> torch.Tensor:
    """The weight of ``model``'s output embedding (the lm_head), through ``get_output_embeddings()``.

    Raises ValueError when the model has none (a value head, a model without ``get_output_embeddings``): pass the
    tensor to watch explicitly then.
    """
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(inner, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{type(inner).__name__} has no output embedding (get_output_embeddings() returned "
            f"{type(head).__name__}): pass the tensor the gate should watch (the lm_head weight) explicitly"
        )
    return weight


def trainable_params(model) -> list[torch.Tensor]:
    """Every parameter with ``requires_grad``: what a closed gate zeroes."""
    return [p for p in model.parameters() if p.requires_grad]


def _tensors(value, what: str) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{what} must be a Tensor or a non-empty sequence of Tensors")
    return items


# -- what the gate cannot judge ------------------------------------------------------------------------------------

def refuse_fsdp1(model, *, trainer: str = "this trainer", fix: str = "Shard the model with FSDP2 (fully_shard).") -> None:
    """Raise ValueError when ``model`` is (or holds) an FSDP1 module or FSDP1's flat parameters.

    FSDP1 flattens the parameters: a rank's lm_head ``.grad`` is an arbitrary slice of a flat buffer, which the
    gate cannot combine across ranks (FSDP2's DTensor shards it can).
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # torch built without distributed
        return
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    flat = any(type(p).__name__ == "FlatParameter" for p in getattr(model, "parameters", lambda: ())())
    if flat or any(isinstance(m, FSDP1) for m in modules):
        raise ValueError(
            f"{trainer} does not support FSDP1 (FullyShardedDataParallel): it flattens parameters, so a rank's "
            f"lm_head .grad is an arbitrary slice of a flat buffer the gate cannot combine across ranks. {fix}"
        )


def refuse_grad_scaling(scaling, *, trainer: str = "this trainer", fix: str = "Use bf16 or fp32.") -> None:
    """Raise ValueError when a loss scaler multiplies the gradients the gate would read.

    ``scaling``: a bool (the trainer's fp16-with-GradScaler flag) or the scaler itself (None: no scaler; a scaler
    whose ``is_enabled()`` is False does not scale).  fp16 training scales the loss, and the trainers unscale the
    gradient inside clipping, after the gate: the gate would judge a scaled gradient whose norm jumps whenever
    the scale changes.  fp16 without a scaler, bf16 and fp32 are fine.
    """
    if isinstance(scaling, bool):
        scaled = scaling
    elif scaling is None:
        scaled = False
    else:
        enabled = getattr(scaling, "is_enabled", None)
        scaled = bool(enabled()) if callable(enabled) else True
    if scaled:
        raise ValueError(
            f"{trainer} does not support fp16 with a gradient scaler: the gradients are unscaled after the point "
            f"where the gate judges them, so it would see the loss scale's jumps as surges. {fix}"
        )


def warn_single_pass(max_reuse: int, *, setting: str = "max_reuse", stacklevel: int = 3) -> None:
    """Warn when reuse is off: every step then starts a batch (reuse index 1), so only NaN/Inf can close."""
    if max_reuse < 2:
        warnings.warn(
            f"{setting} is {max_reuse}: every rollout batch gets one pass (reuse index 1), so the gate only "
            f"closes on non-finite gradients. Set {setting} (the maximum reuse) to 2 or more.",
            stacklevel=stacklevel,
        )


# -- settings -------------------------------------------------------------------------------------------------------

def resolve_config(config: GateConfig | Mapping[str, Any] | None = None, *, defaults: Mapping[str, Any] | None = None,
                   override: Mapping[str, Any] | None = None, ignore: Iterable[str] = (),
                   where: str = "gate config") -> GateConfig:
    """A GateConfig from ``config``: a GateConfig, a mapping of GateConfig fields (a trainer's YAML section), or
    None (GateConfig's defaults).

    ``defaults``: what the trainer sets where ``config`` does not (e.g. verl's ``max_reuse=ppo_epochs``); a
    GateConfig sets every field, so defaults never apply to one.  ``override``: what the trainer decides whatever
    ``config`` says (e.g. TRL's ``max_reuse=num_iterations``).  None values in either are skipped.  ``ignore``:
    mapping keys that are the trainer's own (e.g. ``enable``).  Unknown keys raise ValueError naming ``where`` and
    the valid keys; bad values raise GateConfig's ValueError.
    """
    defaults = {k: v for k, v in dict(defaults or {}).items() if v is not None}
    override = {k: v for k, v in dict(override or {}).items() if v is not None}
    unknown = sorted((set(defaults) | set(override)) - set(GATE_FIELDS))
    if unknown:
        raise TypeError(f"resolve_config got unknown GateConfig field(s) {unknown}")
    if isinstance(config, GateConfig):
        return dataclasses.replace(config, **override) if override else config
    if not (config is None or isinstance(config, Mapping)):
        raise TypeError(f"{where} must be a GateConfig, a mapping of its fields or None, got {type(config).__name__}")
    skip = set(ignore)
    given = {str(k): v for k, v in dict(config or {}).items() if k not in skip}
    unknown = sorted(set(given) - set(GATE_FIELDS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(set(GATE_FIELDS) | skip)}")
    return GateConfig(**{**defaults, **given, **override})


# -- the gate, bound to a model and an optimizer -------------------------------------------------------------------

def _same(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class GateBinding:
    """A DynamicGradientGate on a model's parameters, hooked to its optimizer.

    Args:
        model: the policy (an ``nn.Module``, wrapped or not).  Build the binding after the model is sharded
            (FSDP2's ``fully_shard`` replaces the parameters), or call ``rebind()`` when they are replaced.
        config: a GateConfig (see ``resolve_config``).
        monitor: the tensor(s) whose gradient the gate watches (default: ``output_embedding_weight(model)``).
        params: the tensors a closed gate zeroes (default: ``trainable_params(model)``).
        trainer: the adapter's name, for error messages.
        **gate_kwargs: passed to DynamicGradientGate (``process_group``, ``decision_group``, ``overlap``).

    ``attach(optimizer, pre_step=...)`` hooks the optimizer (a fused torch optimizer then skips a closed step on
    device); ``rebind()`` rebuilds the gate on the model's current parameters, keeping its state and hooks.
    ``new_batch()`` / ``new_pass()`` forward to the gate and count the passes for the metrics.
    """

    def __init__(self, model, config: GateConfig, *, monitor=None, params=None, trainer: str = "the gate",
                 **gate_kwargs) -> None:
        if not isinstance(config, GateConfig):
            raise TypeError(f"config must be a GateConfig (see resolve_config), got {type(config).__name__}")
        refuse_fsdp1(model, trainer=trainer)
        self.model = model
        self.config = config
        self.trainer = trainer
        self._gate_kwargs = gate_kwargs
        monitor = _tensors(output_embedding_weight(model) if monitor is None else monitor, "monitor")
        self._own_params = params is None
        params = trainable_params(model) if params is None else _tensors(params, "params")
        names = {id(p): n for n, p in model.named_parameters()} if hasattr(model, "named_parameters") else {}
        self._monitor_names = [names.get(id(t)) for t in monitor]  # to find them again after the params are swapped
        self.gate = self._build(monitor, params)
        self._optimizer = None
        self._pre_step: Callable | None = None
        self._handles: list = []
        self.passes = 0  # passes begun over the current rollout batch (new_pass() calls since new_batch())

    def _build(self, monitor, params) -> DynamicGradientGate:
        fields = dataclasses.asdict(self.config)
        return DynamicGradientGate(monitor, params, **fields, **self._gate_kwargs)

    # -- parameters swapped by the trainer -----------------------------------------------------------------------

    def rebind(self, model=None) -> bool:
        """Watch ``model``'s current parameters (default: the bound model's); True when the gate was rebuilt.

        The rebuilt gate carries the old one's state (window, counters, reuse index) and the optimizer hooks are
        registered again, in the same order.  Explicit ``params`` given at construction are kept.
        """
        if model is not None:
            self.model = model
        current = dict(self.model.named_parameters())
        monitor = [t if n is None else current.get(n, t) for n, t in zip(self._monitor_names, self.gate.monitor)]
        params = trainable_params(self.model) if self._own_params else list(self.gate.params)
        if _same(monitor, self.gate.monitor) and _same(params, self.gate.params):
            return False
        refuse_fsdp1(self.model, trainer=self.trainer)
        saved = self.gate.state_dict()
        gate = self._build(monitor, params)
        gate.load_state_dict(saved)
        self.gate = gate
        if self._optimizer is not None:  # the hooks hold the old gate: register them again, in order
            optimizer, self._optimizer = self._optimizer, None
            self.attach(optimizer, pre_step=self._pre_step)
        return True

    # -- the optimizer --------------------------------------------------------------------------------------------

    def attach(self, optimizer, *, pre_step: Callable | None = None):
        """Hook ``optimizer`` (its torch optimizer, inside accelerate-style wrappers' ``.optimizer``).

        ``pre_step(optimizer, args, kwargs)``: an optional step pre-hook registered *before* the gate's own, so a
        gate step it runs has decided by the time ``gate.attach``'s hook hands the decision to a fused kernel as
        ``found_inf``.  Attaching the same optimizer again does nothing; another one replaces the hooks.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is self._optimizer:
            return inner
        self.detach()
        handles = [inner.register_step_pre_hook(pre_step)] if pre_step is not None else []
        handles.append(self.gate.attach(inner))
        self._handles, self._optimizer, self._pre_step = handles, inner, pre_step
        return inner

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._optimizer = [], None

    @property
    def optimizer(self):
        """The torch optimizer the gate is attached to (None before ``attach``)."""
        return self._optimizer

    # -- steps, passes, the loop decision ----------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """``gate.step()``: after backward, before clipping and the optimizer step.  No host sync."""
        return self.gate.step()

    def new_batch(self) -> None:
        self.gate.new_batch()
        self.passes = 0

    def new_pass(self) -> None:
        self.gate.new_pass()
        self.passes += 1

    def should_stop(self) -> bool:
        """``gate.should_stop()``: a host read, taken at a pass boundary."""
        return self.gate.should_stop()

    def last_step_closed(self) -> bool:
        """Whether the last step closed (a host read).  In pass mode a close ends the batch and every later step
        of it closes too, so within a pass this says whether the batch has closed, without ``should_stop()``'s
        max_reuse part (whose flag already goes up at the first step of the last pass)."""
        return bool(self.gate.stats()["closed"].item())  # host-read-ok: the trainer's loop decision

    def metrics(self, prefix: str = "dgg/") -> dict[str, float]:
        """The last step's report as host floats, in one device-to-host copy.

        ``{prefix}lm_head_grad_norm, z, z_energy, z_increment, closed (1.0/0.0), reuse_index, accepted,
        closed_total, kl`` from ``gate.stats()``, and ``{prefix}passes``: the passes begun over the current batch.
        Read it once per pass or per logged step, not per gate step.
        """
        s = self.gate.stats()
        values = torch.stack([s[k].to(torch.float64) for _, k in METRIC_KEYS]).tolist()  # host-read-ok: logging
        out = {prefix + name: float(v) for (name, _), v in zip(METRIC_KEYS, values)}
        out[prefix + "passes"] = float(self.passes)
        return out
