"""Writes the committed gate state files: one per layout this package has ever saved (README.md here).

    python tests/data/gate_states/make_states.py              # every file in STATES
    python tests/data/gate_states/make_states.py v2_energy.pt # only those named

Each file is exactly what ``DynamicGradientGate.state_dict()`` of the commit in STATES returned
(``torch.save``), after ``PREFIX`` steps of the deterministic gradient sequence ``grad_at``.  The
commit's ``dgg_kernels`` is unpacked with ``git archive`` into a temporary folder and run in a
subprocess, so no code of today's package touches an old file.  ``commit=None`` is this checkout:
its file is today's layout, and the script refuses to write a file whose version or layout is not
the one recorded for it (dgg_kernels/state.py LAYOUTS): once today's layout is a newer version, give
that entry the commit that last wrote its version.

tests/test_state_versions.py loads every file into today's gate and checks it against the same
sequence run by today's code.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

SHAPE = (13, 3)  # the monitored tensor
PASSES = 4       # passes per rollout batch: new_batch() before steps 0, 4, 8, ...
PREFIX = 27      # steps run before saving; step 26 is a surge on pass 3, so the saved gate is closed
CONTINUE = 29    # steps the test runs after loading


def grad_at(k: int) -> torch.Tensor:
    """Step ``k``'s gradient: a fixed pattern, slowly varying, 3x on every 7th step from step 5 (a surge)."""
    n = SHAPE[0] * SHAPE[1]
    base = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    wiggle = torch.cos(torch.arange(n, dtype=torch.float64) * (0.7 + 0.13 * k))
    scale = (1.0 + 0.05 * math.sin(1.3 * k)) * (3.0 if k % 7 == 5 else 1.0)
    return ((base + 0.3 * wiggle) * scale).to(torch.float32).reshape(SHAPE)


def kl_at(k: int) -> float:
    """Step ``k``'s KL (given to a gate with a KL stop): growing over the passes of a batch, larger every 5th."""
    return 0.003 * (k % PASSES) + (0.004 if k % 5 == 3 else 0.0) + 0.0001 * math.cos(k)


def make_gate(dgg, kwargs: dict):
    """A gate on a fresh Parameter of SHAPE, torch backend (the reference every release had)."""
    w = torch.nn.Parameter(torch.zeros(SHAPE))
    return w, dgg.DynamicGradientGate(w, backend="torch", **kwargs)


def run(w, gate, steps: range) -> list[dict]:
    """Steps ``steps`` of the sequence; each step's decision and report as Python numbers."""
    out = []
    for k in steps:
        if k % PASSES == 0:
            gate.new_batch()
        w.grad = grad_at(k)
        if getattr(gate.config, "target_kl", None) is not None:
            gate.observe_kl(kl_at(k))
        closed = gate.step()
        out.append({"step": k, "closed": bool(closed), **{n: v.item() for n, v in gate.stats().items()}})
    return out


@dataclass(frozen=True)
class StateFile:
    name: str            # file name in this folder
    commit: str | None   # the commit whose dgg_kernels wrote it; None: this checkout
    version: int         # the layout version it holds (dgg_kernels/state.py LAYOUTS)
    kwargs: dict = field(default_factory=dict)  # DynamicGradientGate settings (backend="torch" added)


STATES = [
    StateFile("v1_first_release_norm.pt", "4d2ae8d", 1, dict(window=4, threshold=0.3, statistic="norm")),
    StateFile("v1_increment.pt", "344d949", 1, dict(window=4, threshold=0.3, statistic="increment")),
    StateFile("v2_energy.pt", "912531e", 2, dict(window=4, threshold=0.3, statistic="energy")),
    StateFile("v3_unversioned_paper_batch.pt", "e7a07ae", 3,
              dict(window=4, threshold=0.3, statistic="energy+increment", window_mode="batch")),
    StateFile("v4_paper_step.pt", "70e0c8e", 4, dict(window=4, threshold=0.3, statistic="energy+increment")),
    StateFile("v5_paper_kl.pt", "f35126a", 5,
              dict(window=4, threshold=0.3, statistic="energy+increment", target_kl=0.005, kl_factor=1.5)),
    StateFile("v6_paper_batch.pt", None, 6,
              dict(window=4, threshold=0.3, statistic="energy+increment", window_mode="batch")),
]

_CHILD = """
import sys, torch
sys.path[:0] = [{pkg!r}, {here!r}]
import dgg_kernels as dgg
assert dgg.__file__.startswith({pkg!r}), dgg.__file__
from make_states import PREFIX, make_gate, run
w, gate = make_gate(dgg, {kwargs!r})
run(w, gate, range(PREFIX))
torch.save(gate.state_dict(), {out!r})
"""


def write(entry: StateFile, folder: Path = HERE) -> Path:
    """Write ``entry``'s file with the code of its commit; returns its path.  Checks the version it holds
    before replacing anything."""
    out = folder / entry.name
    with tempfile.TemporaryDirectory() as tmp:
        if entry.commit is None:
            pkg = str(REPO)
        else:
            archive = subprocess.run(["git", "archive", entry.commit, "dgg_kernels"], cwd=REPO, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            pkg = tmp
        made = Path(tmp) / entry.name
        code = _CHILD.format(pkg=pkg, here=str(HERE), kwargs=entry.kwargs, out=str(made))
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp)
        sys.path.insert(0, str(REPO))
        from dgg_kernels import state

        sd = torch.load(made, weights_only=True)
        found = state.saved_version(sd)
        problem = state._mismatch(sd, state.LAYOUTS[found - 1])  # the layout recorded for that version
        who = entry.commit or "this checkout"
        if found != entry.version:
            why = f"{who} wrote version {found}, not {entry.version}"
        elif problem is not None:
            why = f"{who} wrote version {found}, but not in the layout recorded for it in LAYOUTS ({problem})"
        if found != entry.version or problem is not None:
            raise RuntimeError(f"{entry.name}: {why}; nothing written (a new layout needs a new version, see "
                               "dgg_kernels/state.py; a file of an older version names the commit that last wrote it)")
        out.write_bytes(made.read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    known = {e.name: e for e in STATES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown state files {unknown}; known: {sorted(known)}")
    for entry in [known[n] for n in names] or STATES:
        print(f"{write(entry)} (version {entry.version}, {entry.commit or 'this checkout'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
