"""What the multi-rank workers share (tests/dist_worker.py, ds_worker.py, verl_worker.py): an expected error, a
tensor equal on every rank, a gate's whole saved state as bytes, and the gloo worker's main."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def expect_error(exc, fragment: str, fn):
    """Run ``fn``; it must raise ``exc`` with ``fragment`` in its message (returned)."""
    try:
        fn()
    except exc as e:
        assert fragment in str(e), f"expected {fragment!r} in: {e}"
        return e
    raise AssertionError(f"expected {exc.__name__} containing {fragment!r}")


def assert_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    """``t`` is bit-for-bit the same on every rank of the default group (an all-gather, then torch.equal)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    for r, o in enumerate(out):
        assert torch.equal(o, out[0]), f"{what}: rank {r} differs from rank 0"


def state_bits(gate) -> torch.Tensor:
    """The gate's whole saved state as bytes (NaN payloads included)."""
    parts = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in gate.state.state_dict().values()]
    return torch.cat(parts)


def run_case(cases: dict) -> None:
    """A worker's main: join the gloo group (file rendezvous at $DGG_STORE, 60 s collective timeout), run the case
    named by argv[1] on one thread, and print the line the launcher looks for once every rank got through."""
    case, rank = sys.argv[1], int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["DGG_STORE"], rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        cases[case]()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"RANK {rank} OK {case}", flush=True)
