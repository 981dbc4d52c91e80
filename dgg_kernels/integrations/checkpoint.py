"""The gate's state in a trainer's checkpoint folder: one file next to the trainer's own state.

``save_gate(gate, folder)`` writes ``gate.state_dict()`` to ``folder/dgg_gate.pt``
(``torch.save``, tensors on the CPU, written to a temporary name and renamed,
so a crash never leaves a truncated file); ``load_gate(gate, folder)`` reads
it back onto the gate's device through ``gate.load_state_dict`` (which checks
the settings and upgrades older layouts).  Neither touches anything else, and
both run at checkpoint time only, never in the step path.

Multi-process: every rank holds the same gate state (ranks reach every
decision together), so one process writes and every process loads.  By
default the writer is rank 0 of the default process group (the only process
when torch.distributed is not initialized); a trainer that knows better
passes ``write=`` (transformers: ``args.should_save``).

Used by ``dgg_kernels.integrations.trl``; an adapter for another trainer calls
``save_gate`` where that trainer writes its checkpoint and ``load_gate`` where
it restores one.
"""
from __future__ import annotations

import os

import torch

__all__ = ["GATE_FILE", "gate_file", "load_gate", "save_gate"]

GATE_FILE = "dgg_gate.pt"


def gate_file(folder: str | os.PathLike) -> str:
    """The path of the gate's file in a checkpoint folder."""
    return os.path.join(os.fspath(folder), GATE_FILE)


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()  # host-read-ok: writing a checkpoint, not the step
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_gate(gate, folder: str | os.PathLike, *, write: bool | None = None) -> str | None:
    """Write ``gate.state_dict()`` to ``folder/dgg_gate.pt``; returns the path, or None where this process does
    not write.

    ``write``: whether this process writes (default: rank 0, or the only process).  The folder is created if
    needed.  Reads the gate's device state (a host sync): call it at checkpoint time, not per step.
    """
    if not callable(getattr(gate, "state_dict", None)):
        raise TypeError(f"save_gate needs a DynamicGradientGate, got {type(gate).__name__}")
    if not (_is_writer() if write is None else write):
        return None
    path = gate_file(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(_to_cpu(gate.state_dict()), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_gate(gate, folder: str | os.PathLike, *, missing_ok: bool = False) -> bool:
    """Restore the gate from ``folder/dgg_gate.pt``; True when it did.

    Without the file: FileNotFoundError, or False with ``missing_ok=True`` (the gate is left as it was).  A file
    saved with other gate settings, or that is no gate state, raises (ValueError/KeyError/TypeError, naming the
    file) and leaves the gate as it was.
    """
    if not callable(getattr(gate, "load_state_dict", None)):
        raise TypeError(f"load_gate needs a DynamicGradientGate, got {type(gate).__name__}")
    path = gate_file(folder)
    if not os.path.isfile(path):
        if missing_ok:
            return False
        raise FileNotFoundError(
            f"no gate state in {os.fspath(folder)!r} ({GATE_FILE} not found): it was not saved by save_gate"
        )
    try:
        sd = torch.load(path, map_location=gate.device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a gate state ({type(e).__name__}: {e})") from e
    try:
        gate.load_state_dict(sd)
    except (KeyError, TypeError, ValueError) as e:
        message = e.args[0] if e.args else str(e)
        cls = type(e) if type(e) in (KeyError, TypeError, ValueError) else ValueError
        raise cls(
            f"{path}: {message}. Resume with the gate settings the run was saved with, or remove {GATE_FILE} "
            "from the checkpoint to start a fresh gate (its window refills)."
        ) from e
    return True
