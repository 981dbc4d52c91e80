"""backend="auto" on CUDA: look the fastest backend up in the measured table (auto_table.py).

The table holds, per device model (a substring of ``torch.cuda.get_device_name()``,
e.g. "H100"), gradient dtype and gradient size, the median time of one full gate
step of each backend as overhead.py measured it, and the pick.  A gate's monitor
tensors' dtype and total size are known when it is built, so the choice is made
once, there.  Sizes between measured points take the nearest point on a log
scale (beyond the ends, the end); a device, or a dtype, with no measurements
takes the table's default (triton).  How it was measured and how to refresh it:
docs/benchmarks.md.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

BACKENDS = ("triton", "cuda", "torch")


def _table() -> dict:
    from .auto_table import TABLE

    return TABLE


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose(device_name: str, dtype: Optional[torch.dtype], nbytes: Optional[int],
           table: Optional[dict] = None) -> tuple[str, str]:
    """(backend, why) for a gate step on ``device_name`` over ``nbytes`` of ``dtype`` gradients."""
    table = _table() if table is None else table
    default = table.get("default", "triton")
    entry = next((d for d in table.get("devices", []) if d["match"].lower() in device_name.lower()), None)
    if entry is None:
        return default, f"no measurements for {device_name!r}: default {default}"
    if dtype is None or not nbytes:
        return default, "monitor dtype/size unknown: default"
    points: Sequence[dict] = entry["dtypes"].get(dtype_name(dtype), ())
    if not points:
        return default, f"{dtype_name(dtype)} not measured on {entry['device']}: default {default}"
    mb = max(nbytes / 1e6, 1e-6)
    nearest = min(points, key=lambda p: abs(math.log(p["MB"]) - math.log(mb)))
    pick = nearest["pick"] if nearest["pick"] in BACKENDS else default
    return pick, (f"{entry['device']} {dtype_name(dtype)} {mb:.3g} MB: nearest measured point {nearest['case']} "
                  f"({nearest['MB']:g} MB) ms {nearest['ms']} -> {pick}")


def _rank_bytes(t: torch.Tensor) -> int:
    """The bytes of ``t`` one rank reduces, the same number on every rank: a DTensor's global size over the
    number of shards its placements cut it into (rounded up), so that uneven shards (7 rows over 2 ranks)
    do not make ranks look up different table points and run different backends."""
    placements = getattr(t, "placements", None)
    if type(t).__name__ == "DTensor" and placements is not None:
        shards = 1
        for dim, placement in enumerate(placements):
            # any split counts (FSDP2 x TP's _StridedShard is not a Shard: is_shard() says False)
            if not (placement.is_replicate() or placement.is_partial()):
                shards *= t.device_mesh.size(dim)
        return -(-t.numel() // shards) * t.element_size()
    return t.numel() * t.element_size()


def monitor_dtype_and_bytes(tensors: Sequence[torch.Tensor]) -> tuple[Optional[torch.dtype], int]:
    """The dtype holding most of the monitor bytes, and the bytes one rank reduces (for a DTensor, its global
    size over its shard count: the same on every rank)."""
    by_dtype: dict[torch.dtype, int] = {}
    for t in tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + _rank_bytes(t)
    if not by_dtype:
        return None, 0
    return max(by_dtype, key=by_dtype.get), sum(by_dtype.values())
