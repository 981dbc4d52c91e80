"""Writes finalize_vectors.json: golden finalize vectors from the plain-Python model (tests/semantics_model.py),
independent of every backend.  Each vector is a gate state in the package's layout, one step's energy and KL,
and the state the finalize must leave: every form of the finalize (torch tensor and host forms, Triton, the
C++ finalize's CPU build) runs them in tests/test_golden_finalize.py.

    python tests/data/golden/make_golden.py      # rewrites finalize_vectors.json

The model's state is mapped onto the layout here (the only place that knows both): each test's window as its
ring (slot order), its next slot and fill count, the counters, the previous accepted energy.  Floats are
stored as float.hex() strings, so NaN, Inf, -0.0 and every bit survive JSON.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[2])]

from semantics_model import FLT_MAX, GateModel, energy_of  # noqa: E402
from sequences import GATE_CONFIGS, make_sequence  # noqa: E402

from dgg_kernels import state as S  # noqa: E402  (slot indices only)

OUT = HERE / "finalize_vectors.json"


def _f32(x: float) -> float:
    """x rounded to float32 as stats() holds it (round to nearest; beyond the range: inf)."""
    import numpy as np

    with np.errstate(over="ignore"):
        return float(np.float64(x).astype(np.float32))


def model_state(m: GateModel) -> dict:
    """The model's state in the package's layout (ints by slot, ring, prev)."""
    tests = list(m.tests.values())
    W = m.W
    ring = []
    for t in tests:
        ring += list(t.slots) + [0.0] * (W - len(t.slots))
    ints = [0] * S.N_INTS
    ints[S.POS], ints[S.COUNT] = tests[0].next, len(tests[0].slots)
    if len(tests) == 2:
        ints[S.POS2], ints[S.COUNT2] = tests[1].next, len(tests[1].slots)
    ints[S.ACCEPTED], ints[S.CLOSED_TOTAL], ints[S.REUSE] = m.accepted, m.closed_total, m.reuse
    ints[S.STOP], ints[S.HAS_PREV] = int(m.stop), int(m.prev_energy is not None)
    ints[S.PASS_MODE], ints[S.PASS_NEW], ints[S.BATCH_CLOSED] = int(m.pass_mode), int(m.pass_new), int(m.batch_closed)
    return dict(ints=ints, ring=[x.hex() for x in ring], prev=(m.prev_energy or 0.0).hex())


def vector(cfg: dict, m: GateModel, energy: float, kl: float) -> dict:
    before = model_state(m)
    out = m.step(energy, kl)
    after = model_state(m)
    stats = [0.0] * S.N_STATS
    stats[S.ENERGY] = energy if not (energy > FLT_MAX) else math.inf
    stats[S.NORM], stats[S.STATISTIC] = out["norm"], out["statistic"]
    stats[S.MEAN], stats[S.STD], stats[S.Z] = out["mean"], out["std"], out["z"]
    stats[S.CLOSED] = 1.0 if out["closed"] else 0.0
    stats[S.Z_ENERGY], stats[S.Z_INCREMENT], stats[S.KL] = out["z_energy"], out["z_increment"], kl
    return dict(config=cfg, before=before, energy=energy.hex(), kl=kl.hex(), after=after,
                stats=[_f32(x).hex() for x in stats], closed=out["closed"])


def vectors() -> list[dict]:
    out = []
    configs = GATE_CONFIGS + [dict(window=4, threshold=0.3, statistic="energy+increment", max_reuse=4,
                                   target_kl=0.02, kl_factor=1.5)]
    for ci, cfg in enumerate(configs):
        for passes in (1, 3):
            m = GateModel(**cfg)
            seq = make_sequence(100 + 10 * ci + passes, 18, [(6, 3)], p_new_batch=0.15)
            k = 0
            for j, ev in enumerate(seq.events):
                if ev[0] == "new_batch":
                    m.new_batch()
                    k = 0
                    continue
                if passes > 1 and k % passes == 0:
                    m.new_pass()
                k += 1
                kl = 0.004 * (j % 9) if "target_kl" in cfg else 0.0
                out.append(vector(cfg, m, energy_of(ev[1]), kl))
    # where the order of the window's sum decides: 2**53 then seven 1s, an energy of 2**50 + 0.5 (closes)
    for stat in ("energy", "energy+increment"):
        cfg = dict(window=8, threshold=0.0, statistic=stat, max_reuse=4, window_mode="batch")
        m = GateModel(**cfg)
        for e in [2.0**53] + [1.0] * 7:
            m.new_batch()
            m.step(e)
        v = vector(cfg, m, 2.0**50 + 0.5, 0.0)
        assert v["closed"], "the crafted summation-order vector must close"
        out.append(v)
    return out


def main() -> int:
    vs = vectors()
    OUT.write_text(json.dumps({"made_by": "tests/data/golden/make_golden.py from tests/semantics_model.py",
                               "vectors": vs}, separators=(",", ":")))
    print(f"wrote {len(vs)} vectors to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
