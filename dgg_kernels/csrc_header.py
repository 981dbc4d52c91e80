"""csrc/common/dgg_slots.h, generated from the slot table (dgg_kernels/state.py SLOT_GROUPS).

    python -m dgg_kernels.csrc_header           # check the committed header (exit 1 on a difference; CI runs it)
    python -m dgg_kernels.csrc_header --write   # write it
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .state import SLOT_GROUPS

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "dgg_slots.h"

_HEADER_GROUPS = (("ints", "int64", "Int"), ("stats", "float32", "Stat"), ("hyper", "float64", "Hyper"),
                  ("acc", "float64", "Acc"))


def csrc_header() -> str:
    """csrc/common/dgg_slots.h: the StateSlots struct (one int32 field per slot, in slot_order()) and the group
    sizes, generated from SLOT_GROUPS."""
    lines = [
        "// Generated from dgg_kernels/state.py (SLOT_GROUPS) by `python -m dgg_kernels.csrc_header --write`:",
        "// do not edit.  CI regenerates it and fails on a difference.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace dgg {",
        "",
        "// Which entry of ints/stats/hyper/acc means what.  The values come from dgg_kernels/state.py at run",
        "// time (cuda_ext passes state.slot_order()), never from constants compiled in here.",
        "struct StateSlots {",
    ]
    for group, dtype, _ in _HEADER_GROUPS:
        lines.append(f"  int32_t {', '.join(n.lower() for n in SLOT_GROUPS[group])};  // {group} ({dtype})")
    lines += ["};", "", "// Slots per group, in StateSlots order: the lengths of ints, stats, hyper and acc."]
    for group, _, word in _HEADER_GROUPS:
        lines.append(f"constexpr int kNum{word}Slots = {len(SLOT_GROUPS[group])};")
    lines += ["constexpr int kNumSlots = kNumIntSlots + kNumStatSlots + kNumHyperSlots + kNumAccSlots;", "",
              "}  // namespace dgg", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the header (default: check it)")
    ap.add_argument("--header", default=str(HEADER))
    a = ap.parse_args(argv)
    path = Path(a.header)
    if a.write:
        path.write_text(csrc_header())
        print(f"wrote {path}")
        return 0
    if not path.exists() or path.read_text() != csrc_header():
        print(f"{path} differs from the slot table in dgg_kernels/state.py: run "
              "`python -m dgg_kernels.csrc_header --write` and commit it")
        return 1
    print(f"{path} matches the slot table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
