"""The RLVR rollout-reuse study behind benchmarks/rlvr_reuse.py (its thin entry point).

    tasks/      one file per task (addition; reverse: symbols over the whole vocabulary)
    policy.py   TinyLM (untied or tied lm_head), sampling, greedy accuracy, supervised warm-up
    rollout.py  one rollout batch, the PPO-clip loss, the KL estimators (k3, k1, full vocabulary)
    arms.py     the arm kinds as data (spec grammar, names, signals)
    runner.py   one (arm, seed) unit, calibration, the units over --jobs forked workers
    analysis.py sample efficiency, paired verdicts, DWD, lead time of the lm_head energy
    report.py   JSON, Markdown, plots
    cli.py      configurations, flags, main()
"""
