"""Loop helpers that make the right reuse loop the easy one."""
from __future__ import annotations

import operator
from typing import Iterator


def reuse_passes(gate, max_reuse: int | None = None) -> Iterator[int]:
    """Passes over one rollout batch: 1, 2, ... up to max_reuse, ending early once the gate closes.

    Calls ``gate.new_batch()`` when iteration starts and ``gate.new_pass()``
    before each pass, so a pass may hold several optimizer steps (one per
    mini-batch), all tested at the pass's reuse index.  After each pass the
    loop body must have run ``gate.step()``; the iterator then asks
    ``gate.should_stop()`` (one host read per pass, outside the gate's step)
    and ends when it says stop::

        for k in dgg.reuse_passes(gate):
            for mb in minibatches:          # one or more optimizer steps per pass
                loss = ...; loss.backward(); gate.step(); opt.step(); opt.zero_grad()

    ``max_reuse`` defaults to the gate's own; a larger value cannot extend
    reuse past the gate's max_reuse, whose stop flag ends the loop first.
    A bad ``max_reuse`` raises here, at the call, not at the first pass.
    """
    limit = gate.config.max_reuse if max_reuse is None else max_reuse
    try:
        if isinstance(limit, bool):
            raise TypeError
        limit = operator.index(limit)  # ints and integer scalars (numpy, 0-dim int tensors), not floats
    except TypeError:
        raise TypeError(f"max_reuse must be an int, got {type(limit).__name__} {limit!r}") from None
    if limit < 1:
        raise ValueError(f"max_reuse must be >= 1, got {limit}")
    return _passes(gate, limit)


def _passes(gate, limit: int) -> Iterator[int]:
    gate.new_batch()
    for k in range(1, limit + 1):
        gate.new_pass()
        yield k
        if gate.should_stop():
            return
