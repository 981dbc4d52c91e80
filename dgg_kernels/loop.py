"""Loop helpers that make the right reuse loop the easy one."""
from __future__ import annotations

from typing import Iterator


def reuse_passes(gate, max_reuse: int | None = None) -> Iterator[int]:
    """Passes over one rollout batch: 1, 2, ... up to max_reuse, ending early once the gate closes.

    Calls ``gate.new_batch()`` first.  After each pass the loop body must have
    run ``gate.step()``; the iterator then asks ``gate.should_stop()`` (one
    host read per pass, outside the gate's step) and ends when it says stop::

        for k in dgg.reuse_passes(gate):
            loss = ...; loss.backward(); gate.step(); opt.step(); opt.zero_grad()
    """
    limit = gate.config.max_reuse if max_reuse is None else max_reuse
    if limit < 1:
        raise ValueError(f"max_reuse must be >= 1, got {limit}")
    gate.new_batch()
    for k in range(1, limit + 1):
        yield k
        if gate.should_stop():
            return
