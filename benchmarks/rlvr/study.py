"""The whole study in one command: addition (untied), reverse (untied) and reverse (tied), every arm, 5 seeds,
then one summary (rlvr_study.md) across the three from their results JSONs.

    python benchmarks/rlvr/study.py --out benchmarks/results            # CPU: --jobs 2 workers, one thread each;
                                                                        # 61 min measured (2 cores, shared)
    python benchmarks/rlvr/study.py --config gpu --out benchmarks/results/gpu   # not run: no GPU here
    python benchmarks/rlvr/study.py --summary-only --out benchmarks/results   # rewrite the summary only

Each variant is one run of benchmarks/rlvr_reuse.py (the same flags); its own md/json/png go to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from benchmarks.rlvr import cli, report  # noqa: E402

VARIANTS = {"addition": [], "reverse": ["--task", "reverse"], "reverse-tied": ["--task", "reverse", "--tied"]}


def variant_stem(name: str, quick: bool) -> str:
    a = {"task": "reverse" if name.startswith("reverse") else "addition", "tied": name.endswith("tied"),
         "quick": quick}
    return cli.stem_name(a)


def summarize(out: str, names: list[str], quick: bool, extra: dict | None = None) -> str:
    """rlvr_study.md from the variants' results JSONs in ``out``."""
    data = {}
    for n in names:
        path = os.path.join(out, f"{variant_stem(n, quick)}_results.json")
        if os.path.exists(path):
            with open(path) as f:
                data[n] = json.load(f)
    L = ["# RLVR rollout reuse: the study across tasks (fixed K, KL stops, DGG)", ""]
    if not data:
        L.append("No results found.")
    env = next(iter(data.values()))["env"] if data else {}
    total = sum(d["total_seconds"] for d in data.values())
    L += [f"Date {env.get('date')}; device {env.get('device')}; torch {env.get('torch')}; {env.get('jobs', 1)} worker "
          f"process(es), one thread each. Wall time of the three runs: {total:.0f} s ({total / 60:.1f} min): "
          + ", ".join(f"{n} {d['total_seconds']:.0f} s" for n, d in data.items()) + "."
          + (f" Study command: `{extra['command']}`, {extra['wall']:.0f} s wall in all." if extra else ""), "",
          "Per variant: " + "; ".join(f"`{d['env']['command']}` -> `{variant_stem(n, quick)}_results.md`"
                                       for n, d in data.items()) + ".", ""]
    for n, d in data.items():
        an = d.get("analysis")
        if not an:
            continue
        report._nan(an)
        L += [f"## {n}: verdict", ""] + [f"- {x}" for x in report.headline(an)] + [""]
    # final accuracy per arm, every variant
    names_all = []
    for d in data.values():
        for a in d["arm_names"]:
            if a not in names_all:
                names_all.append(a)
    if data:
        L += ["## Final held-out accuracy per arm (mean over seeds) and rollouts to reach fixed K=1's final accuracy",
              "", "Rollout ratio = the arm's rollouts / fixed K=1's to first reach K=1's final smoothed accuracy "
              "(median over the seeds where it did; n/N = seeds reaching it); half-gain: the same to half of K=1's gain over "
              "the start.", "",
              "| arm | " + " | ".join(f"{n} final acc | {n} rollout ratio (n/N) | {n} half-gain ratio (n/N)"
                                       for n in data) + " |",
              "|---|" + "---|---|---|" * len(data)]
        for a in names_all:
            cells = []
            for n, d in data.items():
                an = d.get("analysis") or {}
                s = an.get("arms", {}).get(a)
                e = an.get("efficiency", {}).get(a)
                cells.append(f"{s['final_acc_mean']:.3f}" if s else "")
                for e in (e, an.get("efficiency_half", {}).get(a)):
                    if e and e.get("reached"):
                        cells.append(f"{e['rollout_ratio_median']:.2f} ({e['reached']}/{e['seeds']})")
                    else:
                        cells.append(f"never (0/{e['seeds']})" if e else "")
            L.append(f"| {a} | " + " | ".join(cells) + " |")
        L += ["", "## The paper's observations, per variant", ""]
        for n, d in data.items():
            an = d.get("analysis")
            if not an:
                continue
            L += [f"### {n}", ""] + [f"- {x}" for x in report.findings(an)
                                     if x.startswith(("**DWD", "**Does the lm_head", "**Does reuse", "**Does z"))] + [""]
    path = os.path.join(out, "rlvr_study_quick.md" if quick else "rlvr_study.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    _ = np
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--config", choices=sorted(cli.CONFIGS), default="cpu", help="as in rlvr_reuse.py")
    ap.add_argument("--out", default=cli.DEFAULT_OUT, help="folder for every variant's results and the summary")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes per run (default: the config's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="every variant with --quick")
    ap.add_argument("--summary-only", action="store_true", help="no runs: rewrite the summary from the JSONs in --out")
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = ap.parse_known_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; use {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    if not args.summary_only:
        for n in names:
            argv_n = ["--config", args.config, "--out", args.out, *VARIANTS[n], *rest]
            if args.jobs is not None:
                argv_n += ["--jobs", str(args.jobs)]
            if args.quick:
                argv_n.append("--quick")
            print(f"== {n}: python benchmarks/rlvr_reuse.py {' '.join(argv_n)}  ({datetime.datetime.now():%H:%M:%S})",
                  flush=True)
            cli.main(argv_n)
    cmd = "python benchmarks/rlvr/study.py" + ("" if not argv else " " + " ".join(argv))
    stamp = os.path.join(args.out, "rlvr_study_quick.json" if args.quick else "rlvr_study.json")
    if args.summary_only:  # the last full run's command and wall time, kept beside the summary
        extra = json.load(open(stamp)) if os.path.exists(stamp) else None
    else:
        extra = {"command": cmd, "wall": time.perf_counter() - t0,
                 "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        with open(stamp, "w") as f:
            json.dump(extra, f)
    print("wrote", summarize(args.out, names, args.quick, extra))


if __name__ == "__main__":
    main()
