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
results by accident).

Measured wall time (2026-12-01, 2-core AMD EPYC shared with other work, torch 2.13 CPU, --jobs 2 = two worker
processes of one thread each; 20 arms x 5 seeds per run): addition 1403 s, reverse 1001 s, reverse --tied
1198 s; the whole study (python benchmarks/rlvr/study.py --out benchmarks/results) 61 min.  Per (arm, seed)
unit: addition fixed K=1 8 s, fixed K=8 51 s; reverse fixed K=1 10 s, fixed K=8 32 s.  --quick: under a
minute.  GPU (--config gpu): not run (no GPU in the session that set it up); an estimate is in cli.py.
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
