"""The gate on DeepSpeed ZeRO-1/2/3 partitioned gradients.

Under ZeRO the lm_head's ``.grad`` is None after ``engine.backward``: the
reduced gradient lives in the ZeRO optimizer's own partitioned buffers, and
each data-parallel rank holds one piece of it (ZeRO-1/2: the fragments of the
flat fp32-or-bf16 partition this rank updates, reached through DeepSpeed's own
``param._hp_mapping``; ZeRO-3: ``grad_partitions_flat_buffer``, one flat buffer
of every parameter's partition).  The update then runs inside
``engine.step()``.  ``DeepSpeedGate(engine)`` finds this rank's pieces itself
and runs the ordinary gate on them as plain-tensor shards over the
data-parallel group (``DynamicGradientGate(..., process_group=dp_group)``:
the partial energies are combined with one 16-byte all-gather per rank, summed
in rank order, so every rank finalizes on the same energy and reaches the
same decision, bit for bit).

Where it steps.  It wraps the ZeRO optimizer's ``step`` (the call
``engine.step()`` makes at a gradient accumulation boundary, after the
reduction and before DeepSpeed's own overflow check, norm, clipping and
optimizer step), so the gate runs once per optimizer step however the engine
is driven: a plain ``engine.backward(loss); engine.step()`` loop, or
accelerate, which calls ``engine.step()`` inside ``accelerator.backward``.
Calling ``gate.step()`` yourself between ``engine.backward`` (at the boundary)
and ``engine.step()`` also works, returns the decision, and the wrapped step
then does not step the gate again.  Anywhere else (before any backward, after
``engine.step()``) DeepSpeed holds no reduced gradient and ``gate.step()``
raises on every rank, the gate unchanged.

Checkpoints.  The gate also hooks the engine's ``save_checkpoint`` and
``load_checkpoint``: its state travels in DeepSpeed's ``client_state`` under
the key ``"dgg_gate"`` (written once, by the rank that writes the model
states; read on every rank), so a plain ``engine.save_checkpoint(dir)`` /
``engine.load_checkpoint(dir)`` resumes the gate with the weights, bit for
bit.  A checkpoint without that key leaves the gate as it is, with a warning;
``load_module_only=True`` (a warm start) leaves it as it is, silently;
``load_optimizer_states=False`` or ``load_lr_scheduler_states=False`` still
restore it (its window follows the weights' gradients, not the optimizer).

How a closed step is discarded (``discard=``):

- ``"overflow"`` (the default): every local gradient partition is zeroed and
  one element of it is made NaN, so DeepSpeed's own overflow path skips the
  step, on every rank (its overflow flag and grad norm are all-reduced over
  the data-parallel group).  DeepSpeed counts it: ``engine.skipped_steps``
  goes up, ``engine.was_step_applied()`` is False, the engine's LR scheduler
  does not step (and accelerate reports ``optimizer_step_was_skipped``, so
  the transformers Trainer does not step its scheduler either), the
  ``global_steps`` counter still advances.  Works with any optimizer
  DeepSpeed runs (its FusedAdam, a torch optimizer).  The element is set back
  to 0 after the step.  Needs DeepSpeed to look: ZeRO-3 always does (the
  gradient norm is checked every step); ZeRO-1/2 only with
  ``bf16.check_grad_overflow`` (bf16, default on) or, in fp32,
  ``zero_optimization.compute_grad_norm`` (default on); otherwise refused.
- ``"found_inf"``: the gradients are zeroed and the inner torch optimizer, a
  fused ``torch.optim.Adam``/``AdamW`` (``fused=True``, passed to
  ``deepspeed.initialize(optimizer=...)``), gets the gate's decision as
  ``found_inf`` and skips its update on device.  DeepSpeed does not know:
  ``skipped_steps`` stays, the LR scheduler steps, the step counts as applied
  (as under FSDP2/DDP with ``gate.attach``).  The route for a step DeepSpeed
  does not check (ZeRO-1/2 with ``compute_grad_norm: false`` and no
  ``check_grad_overflow``).

Either way the fp32 master weights, the low-precision weights and every
optimizer state (step count included) are bit-identical across a closed step
on every rank.

Host syncs: the gate adds none (host metadata, device ops, one all-gather).
DeepSpeed itself reads the device every step where it checks overflow or the
norm's validity (docs/integrations.md, "DeepSpeed", lists where).

Refused at construction, with nothing changed: a pipeline engine, ZeRO stage
0, fp16 (the partitioned gradients carry the loss scale), torch autocast,
optimizer or parameter offload, model/sequence/expert parallelism (a
data-parallel group that is not the whole job), ZenFlow, Muon, DeepCompile,
``managed_gradient_accumulation: false``, ZeRO-1/2 with
``round_robin_gradients`` (DeepSpeed maps each parameter to another one's
gradient fragment there), ZeRO-1 with bf16 weights and fp32 gradient
accumulation (DeepSpeed runs its ``BF16_Optimizer`` instead of the ZeRO
optimizer), a second gate on one engine, and a monitor tensor that is not a
trainable parameter of the engine's ZeRO groups.
Tested with DeepSpeed 0.19.8, on CPU.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import warnings

import torch
import torch.distributed as dist

from .. import state as S
from ..config import GateConfig
from ..gate import DynamicGradientGate
from .adapter import GATE_FIELDS, output_embedding_weight, resolve_config
from .checkpoint import _to_cpu

try:
    import deepspeed
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
except ImportError as e:  # pragma: no cover - exercised only without deepspeed
    raise ImportError(
        'dgg_kernels.integrations.deepspeed needs DeepSpeed: pip install "dgg-kernels[deepspeed]"'
    ) from e

__all__ = ["CLIENT_STATE_KEY", "DeepSpeedGate", "TESTED_VERSION"]

TESTED_VERSION = "0.19.8"
DISCARDS = ("overflow", "found_inf")
CLIENT_STATE_KEY = "dgg_gate"  # the gate's state_dict() in a DeepSpeed checkpoint's client_state
_ENGINE_HOOKS = ("save_checkpoint", "load_checkpoint")
NO_REDUCED_GRADIENT = (
    "DeepSpeed holds no reduced gradient now (ZeRO keeps it only between the engine.backward() of a gradient "
    "accumulation boundary and engine.step()): the gate steps after that backward, before that step"
)


def _proxy(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    """A stand-in tensor whose ``.grad`` is pointed at one local gradient piece each step (no memory of its own)."""
    return torch.nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)


def _fragment_shape(p) -> tuple:
    """The shape of this rank's ZeRO-1/2 gradient fragment of ``p``: the parameter's own when the rank owns all
    of it (what DeepSpeed hands out then), 1-D for a slice, empty for none."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return (0,)
    n = mapping.lp_fragment_address.numel
    return tuple(p.shape) if n == p.numel() else (n,)


def _fit(g: torch.Tensor, x: torch.Tensor, addr) -> torch.Tensor:
    """A ZeRO-1/2 gradient fragment as a view of ``x``'s shape: this rank's slice ``addr`` of a whole gradient, or
    the fragment reshaped.  Raises when it is no contiguous view (it could not be zeroed in place)."""
    try:
        flat = g.view(-1)
    except RuntimeError as e:
        raise RuntimeError(
            f"a gradient fragment is not a contiguous piece of DeepSpeed's gradient buffer (shape {tuple(g.shape)}, "
            f"strides {g.stride()}): the gate could not zero it in place"
        ) from e
    if flat.numel() != addr.numel:  # a whole gradient of which this rank owns a slice
        flat = flat.narrow(0, addr.start, addr.numel)
    return flat.view(x.shape) if flat.numel() == x.numel() else flat


class DeepSpeedGate:
    """The DGG gate on a DeepSpeed ZeRO-1/2/3 engine's partitioned gradients.

    Build it on every rank, after ``deepspeed.initialize`` (its construction
    exchanges the ranks' layouts once)::

        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        gate = DeepSpeedGate(engine, threshold=0.3, max_reuse=4)
        for batch in rollouts():
            for k in dgg.reuse_passes(gate):
                engine.backward(loss_of(engine, batch))
                engine.step()          # the gate steps inside, before DeepSpeed's optimizer step

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` with ZeRO stage 1, 2 or 3.
        monitor: the model parameter(s) whose gradient the gate watches
            (default: the output embedding weight, ``get_output_embeddings()``
            or ``lm_head``); trainable and in the ZeRO optimizer's groups.
        config: a GateConfig (or a mapping of its fields); ``**settings``
            (``window=``, ``threshold=``, ``max_reuse=``, ... any GateConfig
            field) override it.  Default: GateConfig's defaults.
        discard: ``"overflow"`` (default) or ``"found_inf"``; see the module
            docstring for what each does and what DeepSpeed reports.

    Every local gradient partition is zeroed on a closed step (the update is
    discarded as a whole, so there is no ``params`` subset).  The gate API
    (``new_batch``, ``should_stop``, ``stats``, ``state_dict``, ...) is the
    core gate's; ``gate.gate`` is the underlying ``DynamicGradientGate``.
    ``engine.save_checkpoint`` / ``engine.load_checkpoint`` carry the gate's
    state (in ``client_state["dgg_gate"]``; see the module docstring).
    ``remove()`` unhooks it from the engine.
    """

    def __init__(self, engine, monitor=None, *, config: GateConfig | None = None, discard: str = "overflow",
                 **settings) -> None:
        # every check runs before anything is built, hooked or exchanged
        unknown = sorted(set(settings) - set(GATE_FIELDS))
        if unknown:
            raise TypeError(f"DeepSpeedGate got unknown setting(s) {unknown}; the gate's settings: {list(GATE_FIELDS)}")
        config = resolve_config(config, override=settings, where="DeepSpeedGate config")
        if discard not in DISCARDS:
            raise ValueError(f"discard must be one of {DISCARDS}, got {discard!r}")
        zopt = _check_engine(engine)
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.discard = discard
        self._zopt = zopt
        members = list(itertools.chain.from_iterable(zopt.bit16_groups if self.stage < 3 else zopt.fp16_groups))
        self.monitor_params = _monitor_params(engine, monitor, members)
        _check_discard(zopt, discard, self.stage)
        self._group = zopt.dp_process_group
        if self.stage < 3:
            self._device = torch.device(deepspeed.get_accelerator().current_device_name())
            dtype = zopt.gradient_accumulation_dtype
            self._owned = [p for p in members if getattr(p, "_hp_mapping", None) is not None]
            sizes_m = [_fragment_shape(p) for p in self.monitor_params]
            sizes_p = [_fragment_shape(p) for p in self._owned]
        else:
            buf = zopt.grad_partitions_flat_buffer
            self._device, dtype = buf.device, buf.dtype
            offsets, off = {}, 0
            for p in members:  # the flat buffer's layout: every parameter's partition, in group order
                offsets[id(p)] = off
                off += p.partition_numel()
            if off != buf.numel():
                raise RuntimeError(
                    f"ZeRO-3's grad_partitions_flat_buffer holds {buf.numel()} elements, but the optimizer's "
                    f"parameter partitions add up to {off}: a DeepSpeed layout the gate does not know (tested with "
                    f"{TESTED_VERSION})"
                )
            self._z3_slices = []  # per monitor param: (offset, valid elements of this rank's partition)
            for p in self.monitor_params:
                r = dist.get_rank(p.ds_process_group)
                pn = p.partition_numel()
                self._z3_slices.append((offsets[id(p)], max(0, min(pn, p.ds_numel - r * pn))))
            first = next((p for p in members if p.requires_grad), None)
            self._z3_poison_at = offsets[id(first)]
            sizes_m = [(n,) for _, n in self._z3_slices]
            sizes_p = [(buf.numel(),)]
        self._empty = torch.zeros((0,), dtype=dtype, device=self._device)
        self._m_proxies = [_proxy(n, dtype, self._device) for n in sizes_m]
        self._p_proxies = [_proxy(n, dtype, self._device) for n in sizes_p]
        self.gate = DynamicGradientGate(self._m_proxies, self._p_proxies, **dataclasses.asdict(config),
                                        process_group=self._group)
        self._stepped = False  # gate.step() ran for the coming optimizer step
        self._poisoned = None  # the one element made NaN for DeepSpeed's overflow check
        self.step_count = 0  # gate steps taken (host counter, for trainers that log per step)
        self._original_step = zopt.step
        self._original_save = engine.save_checkpoint
        self._original_load = engine.load_checkpoint
        self._load_signature = inspect.signature(self._original_load)
        zopt.step = self._optimizer_step
        engine.save_checkpoint = self._save_checkpoint
        engine.load_checkpoint = self._load_checkpoint
        zopt._dgg_gate = self

    # -- the core gate's API ----------------------------------------------------------------------------------------

    @property
    def config(self):
        return self.gate.config

    @property
    def state(self):
        return self.gate.state

    @property
    def device(self):
        return self.gate.device

    @property
    def backend(self) -> str:
        return self.gate.backend

    def new_batch(self) -> None:
        self.gate.new_batch()

    def new_pass(self) -> None:
        self.gate.new_pass()

    def observe_kl(self, kl) -> None:
        """DynamicGradientGate.observe_kl: the KL the next step judges (call it before engine.step())."""
        self.gate.observe_kl(kl)

    def should_stop(self) -> bool:
        return self.gate.should_stop()

    def stats(self) -> dict:
        return self.gate.stats()

    def state_dict(self) -> dict:
        return self.gate.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.gate.load_state_dict(sd)

    # -- stepping ----------------------------------------------------------------------------------------------------

    def step(self) -> torch.Tensor:
        """Step the gate now, on the reduced gradient of this accumulation boundary; returns the decision.

        Call it after ``engine.backward`` of the boundary micro-batch and before ``engine.step()`` (which then
        does not step the gate again).  Optional: ``engine.step()`` steps the gate itself when this was not
        called.  No host sync.
        """
        if self._stepped:
            raise RuntimeError(
                "gate.step() was already called for this optimizer step: call engine.step() before stepping the "
                "gate again (one gate step per optimizer step)"
            )
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "gate.step() outside a gradient accumulation boundary: the gradient is not complete (DeepSpeed "
                f"accumulates {self.engine.gradient_accumulation_steps()} micro-batches). Call it after the "
                "engine.backward() of the last micro-batch, or leave it to engine.step()."
            )
        closed = self._gate_step()
        self._stepped = True
        return closed

    def _gate_step(self) -> torch.Tensor:
        self._bind()
        closed = self.gate.step()
        self.step_count += 1
        return closed

    def _bind(self) -> None:
        """Point every proxy's ``.grad`` at this rank's current gradient pieces (host metadata only).

        Per piece: DeepSpeed's own lookup and one ``.grad`` assignment (torch checks shape, dtype and device);
        only a piece that does not fit as it is goes through the slower reshaping and the layout error.
        """
        if self.stage == 3:
            self._check_z3_pending()
            buf = self._zopt.grad_partitions_flat_buffer
            self._assign(self._p_proxies[0], buf)
            for x, (off, n) in zip(self._m_proxies, self._z3_slices):
                self._assign(x, buf.narrow(0, off, n))
            return
        try:
            for proxies, owners in ((self._p_proxies, self._owned), (self._m_proxies, self.monitor_params)):
                for x, p in zip(proxies, owners):
                    mapping = p._hp_mapping
                    if mapping is None:  # a monitor tensor this rank owns none of
                        x.grad = self._empty
                        continue
                    g = mapping.get_lp_grad_fragment(p._index_in_param_group)
                    try:
                        x.grad = g
                    except RuntimeError:
                        self._assign(x, _fit(g, x, mapping.lp_fragment_address))
        except ValueError as e:  # get_lp_grad_fragment: DeepSpeed holds no reduced gradient
            raise RuntimeError(f"{NO_REDUCED_GRADIENT} ({e})") from None

    def _check_z3_pending(self) -> None:
        """Raise unless ZeRO-3 holds a reduced gradient for the coming step (host state, the same on every rank).

        grad_partitions_flat_buffer outlives the step, so it cannot tell: a gate stepped on it after
        engine.step() would judge the last step's gradient and hand that decision to the next step.  ZeRO-3's
        ``averaged_gradients`` can: its backward epilogue fills one list per parameter sub-group, and its
        step sets each to None as it consumes it (or empties the dict when it skips on overflow).
        """
        pending = getattr(self._zopt, "averaged_gradients", None)
        if not isinstance(pending, dict):
            raise RuntimeError(
                f"ZeRO-3's optimizer has no averaged_gradients dict (got {type(pending).__name__}): a DeepSpeed "
                f"layout the gate does not know (DeepSpeed {deepspeed.__version__}; tested with {TESTED_VERSION})"
            )
        groups = len(self._zopt.fp16_groups)
        if len(pending) != groups or any(pending.get(i) is None for i in range(groups)):
            raise RuntimeError(NO_REDUCED_GRADIENT)

    @staticmethod
    def _assign(x: torch.Tensor, g: torch.Tensor) -> None:
        if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
            raise RuntimeError(
                f"this rank's gradient piece has shape {tuple(g.shape)}, {g.dtype} on {g.device}, but the gate was "
                f"built for {tuple(x.shape)}, {x.dtype} on {x.device}: DeepSpeed's partition layout changed since "
                "the gate was built; build a new DeepSpeedGate (carry the state with state_dict())"
            )
        x.grad = g

    def _poison_target(self):
        if self.stage == 3:
            return self._zopt.grad_partitions_flat_buffer.narrow(0, self._z3_poison_at, 1)
        for x in self._p_proxies:
            if x.numel() > 0:
                return x.grad.view(-1).narrow(0, 0, 1)
        return None  # this rank updates nothing; the other ranks' NaN reaches DeepSpeed's all-reduced check

    def _optimizer_step(self, *args, **kwargs):
        """Replaces the ZeRO optimizer's ``step`` (what ``engine.step()`` calls at a boundary)."""
        inner = self._zopt.optimizer
        closed = self.gate.state.decision  # a fixed tensor the gate's step writes in place
        try:
            if not self._stepped:
                self._gate_step()
            if self.discard == "overflow":
                self._poisoned = self._poison_target()
                if self._poisoned is not None:
                    self._poisoned.masked_fill_(closed, float("nan"))  # device op: no host read
            else:
                inner.found_inf = self.gate.state.stats[S.CLOSED]  # float32, exactly 1.0 when closed
            return self._original_step(*args, **kwargs)
        finally:
            if self._poisoned is not None:
                self._poisoned.masked_fill_(closed, 0.0)  # what the closed gate had written there
                self._poisoned = None
            if self.discard == "found_inf" and "found_inf" in vars(inner):
                del inner.found_inf
            for x in self._m_proxies + self._p_proxies:  # do not keep DeepSpeed's buffers alive
                x.grad = None
            self._stepped = False

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _check_between_steps(self, what: str) -> None:
        if self._stepped:
            raise RuntimeError(
                f"engine.{what}() between gate.step() and engine.step(): the gate has judged a step the weights have "
                f"not taken yet, so its state and the engine's would not match; call engine.{what}() after "
                "engine.step()"
            )

    def _save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):
        """Replaces ``engine.save_checkpoint``: the same call, with the gate's state added to ``client_state``."""
        self._check_between_steps("save_checkpoint")
        client_state = dict(client_state or {})
        if CLIENT_STATE_KEY in client_state:
            raise ValueError(
                f"client_state already holds the key {CLIENT_STATE_KEY!r}, where DeepSpeedGate saves the gate's "
                "state: rename that entry (the gate is saved with the engine without it)"
            )
        # tensors on the CPU: the checkpoint loads on any device (a host read, at checkpoint time only)
        client_state[CLIENT_STATE_KEY] = _to_cpu(self.gate.state_dict())
        return self._original_save(save_dir, tag, client_state, *args, **kwargs)

    def _load_checkpoint(self, load_dir, tag=None, *args, **kwargs):
        """Replaces ``engine.load_checkpoint``: the same call and return value; then the gate's state is restored
        from the checkpoint's ``client_state`` (not with ``load_module_only=True``, a warm start)."""
        self._check_between_steps("load_checkpoint")
        call = self._load_signature.bind(load_dir, tag, *args, **kwargs)  # a bad call raises before any load
        module_only = bool(call.arguments.get("load_module_only", False))
        load_path, client_state = self._original_load(*call.args, **call.kwargs)
        if load_path is None or module_only:  # nothing loaded (DeepSpeed has warned), or only the weights
            return load_path, client_state
        saved = (client_state or {}).get(CLIENT_STATE_KEY)
        if saved is None:
            warnings.warn(
                f"the DeepSpeed checkpoint {load_path} holds no gate state (client_state has no "
                f"{CLIENT_STATE_KEY!r}: saved without a DeepSpeedGate): the gate is left as it was, and a fresh "
                "gate's window refills before it can close on z",
                stacklevel=2,
            )
            return load_path, client_state
        try:
            self.gate.load_state_dict(saved)
        except (KeyError, TypeError, ValueError) as e:
            # DeepSpeed reads its checkpoint and restores the engine in one call; the gate's state is only
            # seen once that is done, so this error comes after the engine's restore
            message = e.args[0] if e.args else str(e)
            raise type(e)(
                f"{load_path}: {message}. The engine's state was restored, the gate's was not (it is as it was): "
                "build the DeepSpeedGate with the settings the run was saved with and load the checkpoint again"
            ) from e
        return load_path, client_state

    def remove(self) -> None:
        """Unhook the gate from the engine (``engine.step()`` no longer steps it; its checkpoints no longer carry
        the gate)."""
        for name in _ENGINE_HOOKS:
            if self.engine.__dict__.get(name) == getattr(self, f"_{name}"):
                delattr(self.engine, name)
        if self._zopt.__dict__.get("step") == self._optimizer_step:
            del self._zopt.step
        if getattr(self._zopt, "_dgg_gate", None) is self:
            del self._zopt._dgg_gate

    def __repr__(self) -> str:
        return f"DeepSpeedGate(ZeRO-{self.stage}, discard={self.discard!r}, {self.gate!r})"


# -- checks, before anything is changed ------------------------------------------------------------------------------

def _check_engine(engine):
    if isinstance(engine, PipelineEngine):
        raise ValueError(
            "DeepSpeedGate does not support DeepSpeed's PipelineEngine: only the last stage holds the lm_head and "
            "its train_batch() runs backward and step itself; untested"
        )
    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(
            f"DeepSpeedGate needs a deepspeed.DeepSpeedEngine (what deepspeed.initialize returns), got "
            f"{type(engine).__name__}"
        )
    stage = int(engine.zero_optimization_stage())
    if stage not in (1, 2, 3):
        raise ValueError(
            f"DeepSpeedGate supports ZeRO stages 1, 2 and 3, this engine runs stage {stage}: without ZeRO the "
            "gradients are not partitioned (fp32 stage 0 keeps whole, all-reduced param.grad: use the plain "
            "DynamicGradientGate there, stepped before engine.step(); untested)"
        )
    problems = []
    if engine.fp16_enabled():
        problems.append("fp16: the partitioned gradients carry the dynamic loss scale, so the gate would judge a "
                        "norm that jumps whenever the scale changes (use bf16 or fp32)")
    if engine.torch_autocast_enabled():
        problems.append("torch_autocast: untested")
    for what, cfg in (("offload_optimizer", engine.zero_offload_optimizer()),
                      ("offload_param", engine.zero_offload_param())):
        device = getattr(getattr(cfg, "device", None), "value", getattr(cfg, "device", None))
        if device not in (None, "none"):
            problems.append(f"{what} (device {device}): the gradients or the optimizer live in host or NVMe buffers "
                            "the gate does not read; untested")
    if engine.mpu is not None or getattr(engine, "has_moe_layers", False):
        problems.append("model, sequence or expert parallelism (engine.mpu / MoE layers): each rank's lm_head "
                        "pieces would not be a data-parallel partition of one gradient; untested")
    if getattr(engine, "zenflow", False):
        problems.append("ZenFlow: untested")
    if not engine.managed_gradient_accumulation():
        problems.append("managed_gradient_accumulation: false: untested")
    deepcompile = getattr(engine, "is_deepcompile_enabled", None)
    if callable(deepcompile) and deepcompile():
        problems.append("DeepCompile: it replaces ZeRO's gradient handling with compiled passes; untested")
    zopt = engine.optimizer
    if isinstance(zopt, BF16_Optimizer):
        problems.append(
            "ZeRO-1 with bf16 weights and fp32 gradient accumulation (data_types.grad_accum_dtype: fp32) makes "
            "DeepSpeed run its BF16_Optimizer instead of the ZeRO optimizer, and the gate reads only the ZeRO "
            "optimizer's gradient partitions; use ZeRO-2, or ZeRO-1 with bf16 gradient accumulation (the default)")
    inner = getattr(zopt, "optimizer", None)
    if "muon" in type(inner).__name__.lower():
        problems.append(f"the {type(inner).__name__} optimizer: it rewrites the gradient inside step(); untested")
    if problems:
        raise ValueError("DeepSpeedGate does not support this engine: " + "; ".join(problems))
    needed = ("bit16_groups", "dp_process_group", "round_robin_gradients") if stage < 3 else (
        "fp16_groups", "dp_process_group", "grad_partitions_flat_buffer", "averaged_gradients")
    missing = [a for a in needed if getattr(zopt, a, None) is None]
    if missing or not callable(getattr(zopt, "step", None)):
        raise RuntimeError(
            f"engine.optimizer ({type(zopt).__name__}) lacks {missing or ['step']}: not the ZeRO optimizer layout "
            f"the gate knows (DeepSpeed {deepspeed.__version__}; tested with {TESTED_VERSION})"
        )
    if getattr(zopt, "_dgg_gate", None) is not None:
        raise RuntimeError("this engine already has a DeepSpeedGate: remove() it before building another "
                           "(two gates would each step per optimizer step)")
    if stage < 3 and zopt.round_robin_gradients:
        # DeepSpeed (0.19.8) lays each rank's partition out in round-robin order but builds param._hp_mapping in
        # parameter-group order, so a parameter's get_lp_grad_fragment (and safe_get_full_grad) returns another
        # parameter's gradient: the gate would judge that one, silently
        raise ValueError(
            "DeepSpeedGate does not support zero_optimization.round_robin_gradients: true under ZeRO-1/2: "
            "DeepSpeed's param._hp_mapping then points a parameter at another one's gradient fragment (the mapping "
            "follows the parameter-group order, the partitions the round-robin order), so the gate would judge the "
            "wrong gradient. Set zero_optimization.round_robin_gradients to false"
        )
    if "step" in vars(zopt):
        raise RuntimeError("engine.optimizer.step is already replaced on this object (by something other than "
                           "DeepSpeedGate): the gate hooks it and will not stack on an unknown wrapper")
    if "load_module_only" not in inspect.signature(engine.load_checkpoint).parameters:
        raise RuntimeError(
            f"engine.load_checkpoint takes no load_module_only argument (DeepSpeed {deepspeed.__version__}; tested "
            f"with {TESTED_VERSION}): the gate could not tell a warm start, which must leave it alone, from a resume"
        )
    replaced = [name for name in _ENGINE_HOOKS if name in vars(engine)]
    if replaced:
        raise RuntimeError(f"engine.{replaced[0]} is already replaced on this object (by something other than "
                           "DeepSpeedGate): the gate hooks it to carry its state and will not stack on an unknown "
                           "wrapper")
    group = zopt.dp_process_group
    if dist.get_world_size(group) != dist.get_world_size():
        raise ValueError(
            f"DeepSpeedGate needs the data-parallel group to be the whole job: it has {dist.get_world_size(group)} "
            f"of {dist.get_world_size()} ranks (model, sequence or expert parallelism is untested)"
        )
    if stage < 3:
        groups = getattr(zopt, "real_dp_process_group", [group])
        if any(g is not group for g in groups):
            raise ValueError("the ZeRO parameter groups reduce over different process groups (MoE?): untested")
    return zopt


def _monitor_params(engine, monitor, members):
    if monitor is None:
        monitor = [output_embedding_weight(engine.module)]
    monitor = [monitor] if isinstance(monitor, torch.Tensor) else list(monitor)
    if not monitor:
        raise ValueError("monitor is empty")
    ids = {id(p) for p in members}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for i, t in enumerate(monitor):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"monitor[{i}] is a {type(t).__name__}, not a parameter of the engine's model")
        if id(t) not in ids:
            where = f"the model's parameter {names[id(t)]!r}" if id(t) in names else "not a parameter of the model"
            raise ValueError(
                f"monitor[{i}] ({where}) is not in the ZeRO optimizer's parameter groups (frozen, or not passed to "
                "the optimizer): DeepSpeed keeps no gradient for it"
            )
        if not t.requires_grad:
            raise ValueError(f"monitor[{i}] ({names.get(id(t))!r}) does not require grad")
    return monitor


def _check_discard(zopt, discard: str, stage: int) -> None:
    if discard == "found_inf":
        inner = getattr(zopt, "optimizer", None)
        fused = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and all(
            g.get("fused") for g in inner.param_groups)
        if not fused:
            raise ValueError(
                f"discard='found_inf' needs a fused torch.optim.Adam or AdamW (fused=True) as DeepSpeed's "
                f"optimizer (passed to deepspeed.initialize(optimizer=...)); this engine runs "
                f"{type(inner).__name__}, which has no found_inf. Use discard='overflow' (DeepSpeed's own skip)"
            )
        if getattr(zopt, "torch_autocast_gradscaler", None) is not None:
            raise ValueError("discard='found_inf' with torch autocast's GradScaler: untested")
        return
    if stage < 3 and not (zopt.check_grad_overflow or (zopt.compute_grad_norm and zopt.dtype != torch.bfloat16)):
        raise ValueError(
            "discard='overflow' needs DeepSpeed to check the gradient for NaN, and this ZeRO-1/2 engine does not "
            f"({zopt.dtype}, check_grad_overflow={zopt.check_grad_overflow}, compute_grad_norm="
            f"{zopt.compute_grad_norm}): a NaN would reach the weights. Turn on bf16.check_grad_overflow (bf16) or "
            "zero_optimization.compute_grad_norm (fp32), or use discard='found_inf' with a fused torch AdamW"
        )
