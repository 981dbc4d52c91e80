"""What the gate accepts: one check of the monitor and params gradients for every backend.

``DynamicGradientGate.step()`` runs these before any backend is called, so an
input one backend refuses is refused by every backend, with the same
exception type and message, and before the device state or any gradient is
touched.  docs/semantics.md ("Accepted inputs") is the table of what is
accepted and what each refusal raises:

- TypeError: the kind of tensor is wrong: a monitor tensor or gradient whose
  dtype is not float32, bfloat16, float16 or float64; a params gradient of
  dtype float8_e8m0fnu (no zero to write); a gradient that is not dense
  (sparse COO/CSR/CSC/BSR/BSC, mkldnn, ...).
- ValueError: a tensor of the right kind laid out in a way the gate cannot
  act on: a params gradient with overlapping memory (an expanded view), which
  cannot be zeroed in place; a DTensor gradient of a plain tensor, or the
  reverse (and the sharded layout checks of ``distributed.Sharding``).
- RuntimeError: the gradients are not where the gate's state is: a monitor
  tensor without ``.grad``, or a gradient on another device than the one the
  gate was built on.

Every check reads tensor metadata only (no device read), and the params
gradients are checked once per layout, not per step (see ``ParamGrads``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import operator
from itertools import compress, repeat

from .backends.base import NO_ZERO_DTYPES, GradFields, MaskPlan
from .backends.torch_ref import FLT_MAX as _FLT_MAX
from .distributed import is_dtensor, local_tensor

# The C++ form of ParamGrads' per-step read (csrc/host/grad_keys.cpp, built by setup.py), or None: then the
# Python form runs (the same fields, read one attribute at a time).  KEY_FORMAT: the layout of its key this
# file expects (a build from another checkout is not used).
HOST_KEY_FORMAT = 2
try:
    from . import _host as _host_module
except ImportError:  # not built (no compiler, pip's isolated build, a wheel without it): the Python form
    _host_module = None
if _host_module is not None and getattr(_host_module, "KEY_FORMAT", None) != HOST_KEY_FORMAT:
    import warnings

    warnings.warn(f"dgg_kernels._host ({_host_module.__file__}) was built from another checkout (KEY_FORMAT "
                  f"{getattr(_host_module, 'KEY_FORMAT', None)} != {HOST_KEY_FORMAT}); the gradient reads run in "
                  "Python. Rebuild it: pip install --no-build-isolation -e .", RuntimeWarning, stacklevel=1)
    _host_module = None

# float64 is read as the spec reads every dtype: each entry rounded to float32, then squared.
MONITOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16 or float64"


def check_kl_value(value: float) -> None:
    """A KL given on the host must be finite in float32 (what the finalize and stats() hold it to): raises
    ValueError otherwise."""
    if not abs(value) <= _FLT_MAX:
        raise ValueError(f"kl is {value}: the KL must be finite in float32 (a NaN, Inf or overflowing KL means a "
                         "broken loss)")


def _layout_problem(name: str, t: torch.Tensor) -> Optional[Exception]:
    if t.layout != torch.strided:
        return TypeError(
            f"{name} is a {t.layout} tensor: the gate reads and zeroes dense (torch.strided) gradients only. "
            "Sparse gradients (e.g. nn.Embedding(sparse=True)) are not supported: use a dense gradient "
            "(sparse=False), or leave that tensor out of monitor and params."
        )
    return None


def monitor_problem(name: str, t: torch.Tensor, device: Optional[torch.device]) -> Optional[Exception]:
    """Why the gate cannot read ``t`` (a monitor tensor or its gradient), or None; ``device=None``: any device."""
    problem = _layout_problem(name, t)
    if problem is not None:
        return problem
    if t.dtype not in MONITOR_DTYPES:
        return TypeError(f"{name} has dtype {t.dtype}; the gate reads monitor gradients of dtype {_DTYPE_NAMES}")
    if device is not None and t.device != device:
        return RuntimeError(f"{name} is on {t.device}, but the gate was built on {device} (its state lives there)")
    return None


def check_monitor_tensors(monitor: Sequence[torch.Tensor]) -> None:
    """At construction: every monitor tensor could have a gradient the gate reads (a .grad has its tensor's
    dtype and layout, so an int or sparse monitor tensor is refused here rather than at the first step)."""
    for i, t in enumerate(monitor):
        problem = monitor_problem(f"monitor[{i}]", local_tensor(t), None)
        if problem is not None:
            raise problem


def monitor_grads(monitor: Sequence[torch.Tensor], sharding, device: torch.device) -> list[torch.Tensor]:
    """The monitor gradients the backend reduces (a DTensor's local shard), after checking every one.

    Raises RuntimeError for a missing ``.grad`` or one on another device,
    TypeError for a dtype or layout the gate does not read, ValueError for a
    DTensor/plain mismatch or a sharded layout the gate was not built for.
    """
    grads = []
    for i, t in enumerate(monitor):
        g = t.grad
        if g is None:
            raise RuntimeError(
                f"monitor[{i}] (shape {tuple(t.shape)}) has no .grad: backward has not reached it. "
                "Call gate.step() after loss.backward() and before optimizer.step()."
            )
        grads.append(g)
    if sharding is not None:
        grads = sharding.local_grads(grads)
    else:
        for i, g in enumerate(grads):
            if is_dtensor(g):
                raise ValueError(f"monitor[{i}] is a plain tensor but its .grad is a DTensor")
    for i, g in enumerate(grads):
        problem = monitor_problem(f"monitor[{i}].grad", g, device)
        if problem is not None:
            raise problem
    return grads


def param_problem(name: str, g: torch.Tensor, device: torch.device) -> Optional[Exception]:
    """Why a closed gate could not zero ``g`` (a params gradient, a local shard for a DTensor) in place, or None.

    Any dtype but float8_e8m0fnu (which has no zero) is accepted: zeros are written as bytes.
    """
    problem = _layout_problem(name, g)
    if problem is not None:
        return problem
    if g.device != device:
        return RuntimeError(f"{name} is on {g.device}, but the gate was built on {device} (its state lives there)")
    if g.dtype in NO_ZERO_DTYPES:
        return TypeError(f"{name} has dtype {g.dtype}, which has no zero (an exponent-only format): a closed gate "
                         "could not zero it")
    if any(st == 0 and sz > 1 for st, sz in zip(g.stride(), g.shape)):
        return ValueError(
            f"{name} has overlapping memory (shape {tuple(g.shape)}, stride {g.stride()}: an expanded view), "
            "so it cannot be zeroed in place; give it memory of its own (e.g. p.grad = p.grad.clone())"
        )
    return None


class ParamGrads:
    """The gradients of ``params`` that a closed gate zeroes, checked (see ``param_problem``) once per layout.

    ``__call__`` returns the non-None gradients (a DTensor's local shard) and
    their ``MaskPlan`` key, which the backends' mask uses.  The check's result
    is cached under ``check_key``: which params have a gradient (so an error
    names the right ``params[i]``), and per gradient its Python type (DTensor
    or not), layout, device, dtype, contiguity, and the shape and strides of
    a non-contiguous one (overlapping memory).  Those are everything
    ``param_problem`` reads, so an unchanged key means an unchanged verdict;
    the address is not in it (the check does not depend on where a tensor
    lives).  The mask plan has its own key (``MaskPlan.key_for``); both read
    the same per-step ``GradFields``, so no field is read twice.  A field a
    tensor does not have (a sparse tensor's strides) makes the full check run
    and name it.  Under torch.compile every grad is checked when the step is
    traced (metadata only, no graph break).
    """

    def __init__(self, params: Sequence[torch.Tensor], device: torch.device) -> None:
        self.params = list(params)
        self.device = device
        self.dtensor = any(is_dtensor(p) for p in self.params)
        self.key: Optional[tuple | bytes] = None  # the key the last full check accepted
        # the C++ form reads plain tensors' grads (DTensor params: the Python form, which takes local shards);
        # the module is looked up per step, not held: a gate (and a model holding a GatedLinear) must stay
        # copyable and picklable, which a module attribute is not
        self.host = not self.dtensor

    @staticmethod
    def check_key(present: tuple, types: tuple, fields: GradFields) -> tuple:
        """What the check depends on (see the class docstring); raises RuntimeError for a sparse tensor."""
        return (present, types, fields.layouts, fields.devices, fields.dtypes, fields.contiguous, fields.geometry)

    def _check_all(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if is_dtensor(g) and not is_dtensor(p):
                raise ValueError(f"params[{i}] is a plain tensor but its .grad is a DTensor")
            problem = param_problem(f"params[{i}].grad", local_tensor(g), self.device)
            if problem is not None:
                raise problem

    def __call__(self) -> tuple[list[torch.Tensor], Optional[tuple | bytes]]:
        if self.host and _host_module is not None and not torch.compiler.is_compiling():
            return self._call_host(_host_module)
        raw = [p.grad for p in self.params]  # each .grad read once: this list is rebuilt every step
        present = tuple(map(operator.is_not, raw, repeat(None)))
        grads = list(compress(raw, present))
        types = tuple(map(type, grads))
        if self.dtensor:  # zero the local shards in place (a view of each DTensor grad)
            grads = [local_tensor(g) for g in grads]
        if torch.compiler.is_compiling():
            self._check_all()
            return grads, None
        return self._keyed(grads, present, types)

    def _call_host(self, host) -> tuple[list[torch.Tensor], Optional[tuple | bytes]]:
        """The C++ form: every .grad, and as bytes the fields check_key and MaskPlan.key_for hold (the check's:
        presence per param, per grad its dtype, device, layout, contiguity, and the shape and strides of a
        non-contiguous one; the plan's: per grad its address, byte size, contiguity, shape and strides).  A
        grad that is not a plain strided tensor (sparse, a tensor subclass such as a DTensor) sends the step
        through the Python form, whose check names it."""
        grads, check_key, plan_key, plain = host.read(self.params)
        if not plain:
            present = tuple(p.grad is not None for p in self.params)
            return self._keyed(grads, present, tuple(map(type, grads)))
        if check_key != self.key:
            self.key = None  # stays None if the check raises
            self._check_all()
            self.key = check_key
        return grads, plan_key

    def _keyed(self, grads, present: tuple, types: tuple) -> tuple[list[torch.Tensor], Optional[tuple]]:
        fields = GradFields(grads)
        try:
            key = self.check_key(present, types, fields)
        except RuntimeError:  # a tensor without strides (sparse): the full check says what it is
            key = None
        if key is None or key != self.key:
            self.key = None  # stays None if the check raises
            self._check_all()
            self.key = key
        return grads, MaskPlan.key_for(fields)
