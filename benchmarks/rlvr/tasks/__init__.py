"""The tasks: each module in this folder defines one task class, registered with ``@register``.

A task is a checker with a prompt generator: ``sample(n, gen) -> (prompt, answer)`` (int64 token ids,
shapes (n, prompt_len) and (n, answer_len)), reward 1 for an exact answer.  It also names the vocabulary
it needs, its own result-file stem, one line for the report, and its presets per configuration (what
``--config cpu|gpu`` and ``--quick`` fill in for it).  Adding a task = one small file here.
"""
from __future__ import annotations

import importlib
import pkgutil

TASKS: dict[str, type] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls


def _load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


_load_all()


def get(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"no task {name!r}: known {sorted(TASKS)}")
    return TASKS[name]
