"""The whole study in one command: addition (untied), reverse (untied) and reverse (tied), every arm, 5 seeds,
then one summary (rlvr_study.md) across the three from their results JSONs.

    python benchmarks/rlvr/study.py --out benchmarks/results            # CPU: --jobs 2 workers, one thread each;
                                                                        # 61 min measured (2 cores, shared)
    python benchmarks/rlvr/study.py --config gpu --out benchmarks/results/gpu   # not run: no GPU here
    python benchmarks/rlvr/study.py --summary-only --out benchmarks/results   # rewrite the summary only
    python benchmarks/rlvr/study.py --design controls --out benchmarks/results   # the controls design (69 min
                                                    # here, 2026-12-05): into benchmarks/results/controls/

Each variant is one run of benchmarks/rlvr_reuse.py (the same flags); its own md/json/png go to --out (a design's
into --out/<design>/, so the committed results are never overwritten).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks.rlvr import arms as A  # noqa: E402
from benchmarks.rlvr import cli, report  # noqa: E402

VARIANTS = {"addition": [], "reverse": ["--task", "reverse"], "reverse-tied": ["--task", "reverse", "--tied"]}

# The controls design: the SmolLM2 study's (benchmarks/rlvr/llm_plan.md) on the small tasks.  Fixed K = 1, 2, 4, 8;
# the K=4 arms back in (the paper's rule at t=0.3 with max reuse 4, the gate's KL stop at K=4) beside their K=8
# twins, the calibrated arm and the two KL stops of the loop (stable-baselines3, CleanRL); a replay and a cap
# control of every adaptive arm (arms.with_controls); 256 fresh validation prompts measured before and after every
# pass of the fixed arms (the AUROC labels); 6 seeds over 3 warm-up checkpoints (seed s from checkpoint s mod 3).
DESIGN_BASE_ARMS = ("k1,k2,k4,k8,dgg4@0.3:paper,dgg8@0.3:paper,dkl4@0.01,dkl8@0.01,cal8@0.5:paper,sb38@0.01,"
                    "crl8@0.01")
DESIGNS = {"controls": dict(arms=A.with_controls(DESIGN_BASE_ARMS), probe=256, warmups=3, seeds=6)}
# --quick: the same arms at the quick sizes; 2 seeds over 2 warm-ups, 16 validation prompts (1-digit addition
# has ~28 prompts outside its quick evaluation set)
DESIGNS_QUICK = {"controls": dict(probe=16, warmups=2, seeds=2)}
# Measured (2026-12-05, --jobs 2 on the 2-core CPU, beside one or two SmolLM2 study processes): 4133 s wall in all;
# addition 877 s, reverse 1580 s, reverse tied 1523 s (benchmarks/results/controls/rlvr_study.md).  The --quick
# smoke of it (--design controls --quick --jobs 2 --no-plots): 83 s.
DESIGN_TIME_NOTE = ("69 min wall at --jobs 2 on a 2-core CPU (2026-12-05; addition 15 min, reverse 26, reverse tied "
                    "25)")


def variant_stem(name: str, quick: bool) -> str:
    a = {"task": "reverse" if name.startswith("reverse") else "addition", "tied": name.endswith("tied"),
         "quick": quick}
    return cli.stem_name(a)


# What the committed study's summary cannot know from its own JSONs: the studies that followed it, and where their
# results are (update it when they change).
FOLLOW_UPS = ("the controls design on these tasks (6 seeds over 3 warm-ups, the paper's K=4 arms, a replay and a "
              "cap control of every adaptive arm, AUROCs for a harmful pass: [controls/rlvr_study.md]"
              "(controls/rlvr_study.md)) and a study on a real pretrained LLM, SmolLM2-135M-Instruct "
              "([llm_study.md](llm_study.md))")


def support_paragraph(data: dict, ras: dict, design: str | None = None) -> str:
    """The study's "What these data support", from each variant's re-analysis (report.reanalysis_of): each claim
    is made only where it holds in every variant.  ``design``: a design's summary (its own folder, where the
    committed study's rlvr_reanalysis.md and follow-ups do not apply)."""
    ras = {n: ra for n, ra in ras.items() if ra and ra["amount_adjusted"]["arms"]}
    if not ras:
        return "No re-analysis (a variant without a fixed arm or without its analysis)."
    amount = all(not report._shown_above(ra) for ra in ras.values())
    clauses = []
    if amount:
        clauses.append("each adaptive arm ends where fixed K at the same applied passes per batch ends (amount of "
                       "reuse, not signal)")
    if any(ra["cal_vs_coin"] for ra in ras.values()):
        clauses.append("the coin is not a matched control")
    if all(report.premise_absent(ra) for ra in ras.values()):
        clauses.append("the premise (a surge of the lm_head gradient) is absent at this scale")
    if any(math.isfinite(x["loso_recovered"]) for ra in ras.values() for x in ra["best_arm"]["families"].values()):
        clauses.append("the best-arm figures below were chosen on the test seeds (leave-one-seed-out figures are in "
                       "each verdict)")
    lead = ("In these small from-scratch tasks no stop rule in this package did better than the amount of reuse it "
            "applies"
            if amount else "In these small from-scratch tasks some adaptive arm ends above fixed K at its own applied "
            "passes per batch on every seed (see the first line of its verdict)")
    if design:
        return (lead + (": " + "; ".join(clauses) if clauses else "") + ". Figures: each variant's verdict below "
                "(the re-analysis's functions over this design's JSONs).")
    return (lead + (": " + "; ".join(clauses) if clauses else "") + ". Figures: "
            "[rlvr_reanalysis.md](rlvr_reanalysis.md) (`python benchmarks/rlvr/reanalysis.py`). Followed by: "
            f"{FOLLOW_UPS}.")


def eval_sets_text(data: dict, ras: dict) -> str:
    """Which evaluation sets are held out and which are drawn from the warm-up's data, by task."""
    by_task: dict[str, list[str]] = {}
    for n, d in data.items():
        by_task.setdefault(d["args"].get("task", "addition"), []).append(n)
    parts = []
    for task, names in by_task.items():
        ov = {n: (ras.get(n) or {}).get("eval_overlap") for n in names}
        if not all(ov.values()):
            continue
        if all(o["eval_items_in_warmup"] == 0 for o in ov.values()):
            parts.append(f"{task}'s evaluation items do not occur in its warm-up data")
        elif len(names) == 1:
            parts.append(f"{task}'s evaluation set: " + report.eval_set_text(ov[names[0]]))
        else:
            parts += [f"{n}'s evaluation set: " + report.eval_set_text(o) if o["eval_items_in_warmup"] else
                      f"{n}'s evaluation items do not occur in its warm-up data" for n, o in ov.items()]
    if not parts:
        return ""
    text = "; ".join(parts) + ". "
    return text[0].upper() + text[1:]


def summarize(out: str, names: list[str], quick: bool, extra: dict | None = None,
              design: str | None = None) -> str:
    """rlvr_study.md from the variants' results JSONs in ``out``; each verdict's re-analysed figures come from
    benchmarks/rlvr/reanalysis.py's functions over the same JSON (report.reanalysis_of)."""
    data, ras = {}, {}
    for n in names:
        path = os.path.join(out, f"{variant_stem(n, quick)}_results.json")
        if os.path.exists(path):
            with open(path) as f:
                data[n] = json.load(f)
            ras[n] = report.reanalysis_of(data[n])
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
    ctl = {n: os.path.join(out, f"{variant_stem(n, quick)}_controls.json") for n in data}
    ctl = {n: p for n, p in ctl.items() if os.path.exists(p)}
    cans = {}
    for n, p in ctl.items():
        with open(p) as f:
            cans[n] = json.load(f)
    if cans:
        from benchmarks.rlvr import controls
    if data:
        L += ["## What these data support", ""]
        if cans:  # the design's two questions first, per variant (controls.verdict's first two lines)
            L += ["Replay and cap controls and the AUROC test, per variant (definitions: "
                  "[llm_plan.md](../../rlvr/llm_plan.md)):", ""]
            L += [f"- **{n}**: " + " ".join(controls.verdict(can)[:2]) for n, can in cans.items()] + [""]
        L += [support_paragraph(data, ras, design), ""]
    for n, d in data.items():
        an = d.get("analysis")
        if not an:
            continue
        report._nan(an)
        L += [f"## {n}: verdict", ""] + [f"- {x}" for x in report.headline(an, ras[n])] + [""]
    # final accuracy per arm, every variant
    names_all = []
    for d in data.values():
        for a in d["arm_names"]:
            if a not in names_all:
                names_all.append(a)
    if data:
        L += ["## Final accuracy on the evaluation set per arm (mean over seeds) and rollouts to reach fixed K=1's "
              "final accuracy", "", eval_sets_text(data, ras) + "Rollout ratio = the arm's rollouts / fixed K=1's to "
              "first reach K=1's final smoothed accuracy (median over the seeds where it did; n/N = seeds reaching "
              "it); half-gain: the same to half of K=1's gain over the start.", "",
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
            seen = report.findings(an, report.eval_label(ras[n]))
            L += [f"### {n}", ""] + [f"- {x}" for x in seen
                                     if x.startswith(("**DWD", "**Does the lm_head", "**Does reuse", "**Does z"))] + [""]
    if cans:  # the controls design (controls.py): its verdict per variant, from <stem>_controls.json
        L += ["## The controls design: replay and cap controls, AUROCs for \"this pass hurt\"", ""]
        for n, can in cans.items():
            L += [f"### {n} ([{os.path.basename(ctl[n])[:-5]}.md]({os.path.basename(ctl[n])[:-5]}.md))", ""]
            L += [f"- {x}" for x in controls.verdict(can)] + [""]
    path = os.path.join(out, "rlvr_study_quick.md" if quick else "rlvr_study.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--config", choices=sorted(cli.CONFIGS), default="cpu", help="as in rlvr_reuse.py")
    ap.add_argument("--out", default=cli.DEFAULT_OUT, help="folder for every variant's results and the summary")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes per run (default: the config's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="every variant with --quick")
    ap.add_argument("--summary-only", action="store_true", help="no runs: rewrite the summary from the JSONs in --out")
    ap.add_argument("--design", choices=sorted(DESIGNS), default=None,
                    help="a study design other than the committed one: its arms, seeds, warm-ups and validation set "
                         "(flags after it still win), its results in --out/<design>/; controls: "
                         + DESIGN_TIME_NOTE)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = ap.parse_known_args(argv)
    design = []
    if args.design:
        d = {**DESIGNS[args.design], **(DESIGNS_QUICK[args.design] if args.quick else {})}
        design = [x for k, v in d.items() for x in (f"--{k}", str(v))]
        args.out = os.path.join(args.out, args.design)
        os.makedirs(args.out, exist_ok=True)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; use {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    if not args.summary_only:
        for n in names:
            argv_n = ["--config", args.config, "--out", args.out, *VARIANTS[n], *design, *rest]
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
    print("wrote", summarize(args.out, names, args.quick, extra, args.design))


if __name__ == "__main__":
    main()
