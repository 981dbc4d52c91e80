"""RLVR rollout-batch reuse with and without the gate: does DGG (or a KL stop) beat fixed reuse at equal rollouts?

The thin entry point of the study in benchmarks/rlvr/ (see benchmarks/rlvr/cli.py for the flags):

    python benchmarks/rlvr_reuse.py                          # addition, CPU configuration (--jobs 2)
    python benchmarks/rlvr_reuse.py --task reverse           # symbols over an 8192-id vocabulary, untied lm_head
    python benchmarks/rlvr_reuse.py --task reverse --tied    # ... tied lm_head
    python benchmarks/rlvr_reuse.py --quick                  # smoke run, well under a minute
    python benchmarks/rlvr_reuse.py --config gpu [--task reverse [--tied]]   # GPU configuration
    python benchmarks/rlvr_reuse.py --from-json PATH --out DIR   # re-analyse a finished run
    python benchmarks/rlvr_reuse.py --out benchmarks/results     # where the committed results go

Results go to --out (default: a folder under the system temp dir, so a run never overwrites the committed
results by accident).  Measured wall time of the whole CPU study on a 2-core machine: see
benchmarks/results/rlvr_study.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.rlvr import analysis, arms, cli, policy, report, runner, tasks  # noqa: E402
from benchmarks.rlvr import rollout as rollout_mod  # noqa: E402
from benchmarks.rlvr.analysis import analyse  # noqa: E402,F401
from benchmarks.rlvr.arms import Arm, default_rule, observer_rules, parse_arms, rule_name  # noqa: E402,F401
from benchmarks.rlvr.cli import (CONFIGS, DEFAULT_ARMS, DEFAULT_OUT, GPU_COMMAND, QUICK, build_parser,  # noqa: E402,F401
                                 main, parse_args, preset)
from benchmarks.rlvr.policy import TinyLM, make_model  # noqa: E402,F401
from benchmarks.rlvr.rollout import approx_kl_k1, approx_kl_k3  # noqa: E402,F401

__all__ = ["analysis", "arms", "cli", "policy", "report", "rollout_mod", "runner", "tasks", "main"]

if __name__ == "__main__":
    main()
