"""The SmolLM2 study's analysis, read against benchmarks/rlvr/llm_plan.md: every figure from the unit JSONs.

    python benchmarks/rlvr/llm_analysis.py [--units benchmarks/results/llm_study] [--out benchmarks/results/llm_study]

Writes <out>.json (every figure) and <out>.md (the verdict first, then the tables); <out>_accuracy.png and <out>_passes.png when
matplotlib is installed.  Only units that finished are read; what is missing is listed, not guessed.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
from pathlib import Path

import numpy as np

SIGNALS = ("z", "z_energy", "z_increment", "energy", "increment", "head_grad_norm", "grad_norm", "head_share",
           "kl_k3", "clipfrac", "pass_")  # pass_: the pass index itself, the baseline every signal must beat
N_BOOT = 2000
LAST = 3  # final accuracy: mean of the last LAST evaluations


def load_units(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*_s*.json"))]


def final_acc(u: dict) -> float:
    return statistics.fmean(u["curve"][-LAST:])


def auc(u: dict) -> float:
    return statistics.fmean(u["curve"])


def mean_applied(u: dict) -> float:
    return statistics.fmean(b["applied_passes"] for b in u["batches"])


def auroc(scores, labels) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney, with average ranks
    over ties); None without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(s))
    ranks[order] = (ends - (counts - 1) / 2.0)[inverse]  # the average 1-based rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pass_rows(units: list[dict], min_pass: int = 2, drop_zero_grad: bool = False,
              drop_z_placeholder: bool = False) -> list[tuple]:
    """(cluster, row, hurt) for every applied pass with a probe measurement; cluster = (arm, seed, batch).
    ``drop_z_placeholder``: leave out the passes whose z, z_energy and z_increment are all exactly 0, the
    observer's placeholder while its window fills (a measured z is almost never exactly 0)."""
    out = []
    for u in units:
        prev_energy = None
        for b in u["batches"]:
            for p in b["passes"]:
                row = dict(p)
                row["increment"] = p["energy"] - prev_energy if prev_energy is not None else 0.0
                if not p["closed"]:
                    prev_energy = p["energy"]
                if "probe_after" not in p or p["pass_"] < min_pass or (drop_zero_grad and p.get("zero_grad")):
                    continue
                if drop_z_placeholder and p["z"] == 0.0 and p["z_energy"] == 0.0 and p["z_increment"] == 0.0:
                    continue
                out.append(((u["arm"], u["seed"], b["batch"]), row, p["probe_after"] < p["probe_before"]))
    return out


def bootstrap_draws(rows: list[tuple], seed: int) -> list[list[int]]:
    """N_BOOT resamples of ``rows`` by batch (cluster): each draws as many batches as there are, with
    replacement, and takes every pass of each; a list of row indices per resample."""
    clusters: dict = {}
    for i, (c, _, _) in enumerate(rows):
        clusters.setdefault(c, []).append(i)
    keys = list(clusters)
    rng = random.Random(seed)
    return [[i for k in (rng.choice(keys) for _ in keys) for i in clusters[k]] for _ in range(N_BOOT)]


def auroc_table(rows: list[tuple], seed: int = 0) -> dict:
    """Per signal: AUROC for "the pass hurt" and a 95% bootstrap CI resampling batches (bootstrap_draws)."""
    labels = [h for _, _, h in rows]
    draws = bootstrap_draws(rows, seed) if rows else []
    table = {"n_passes": len(rows), "n_hurt": sum(labels), "n_batches": len({c for c, _, _ in rows}), "signals": {}}
    for sig in SIGNALS:
        scores = [float(r[sig]) for _, r, _ in rows]
        point = auroc(scores, labels)
        boots = []
        for idx in (draws if point is not None else []):
            a = auroc([scores[i] for i in idx], [labels[i] for i in idx])
            if a is not None:
                boots.append(a)
        boots.sort()
        ci = [boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]] if len(boots) > 40 else None
        # "knows": the plan's criterion (the CI excludes 0.5, either side); "direction": which side, "higher"
        # (the signal is larger before a pass that hurt) or "lower" (smaller)
        direction = None if ci is None else "higher" if ci[0] > 0.5 else "lower" if ci[1] < 0.5 else None
        table["signals"][sig] = {"auroc": point, "ci95": ci, "knows": direction is not None, "direction": direction}
    return table


def finite_rows(rows: list[tuple]) -> tuple[list[tuple], int]:
    """The rows whose every signal is finite, and how many were left out."""
    keep = [x for x in rows if all(math.isfinite(float(x[1][s])) for s in SIGNALS)]
    return keep, len(rows) - len(keep)


def minus_pass_index(rows: list[tuple], seed: int = 1) -> dict:
    """Per signal: AUROC minus the pass index's AUROC on the same passes, with a 95% CI from one batch bootstrap
    (the same resampled batches for both; llm_analysis.auroc).  ``beyond``: the signal beats the pass index,
    i.e. the CI lies above 0 (a CI below 0 means the pass index does better)."""
    labels = [h for _, _, h in rows]
    draws = bootstrap_draws(rows, seed)
    base = [float(r["pass_"]) for _, r, _ in rows]
    b = auroc(base, labels)
    base_boot = [auroc([base[i] for i in idx], [labels[i] for i in idx]) for idx in draws] if b is not None else []
    out = {}
    for sig in SIGNALS:
        if sig == "pass_":
            continue
        sc = [float(r[sig]) for _, r, _ in rows]
        a = auroc(sc, labels)
        if a is None or b is None:
            out[sig] = {"diff": None, "ci95": None, "beyond": False}
            continue
        boots = []
        for idx, y in zip(draws, base_boot):
            x = auroc([sc[i] for i in idx], [labels[i] for i in idx])
            if x is not None and y is not None:
                boots.append(x - y)
        boots.sort()
        ci = [boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]] if len(boots) > 40 else None
        out[sig] = {"diff": a - b, "ci95": ci, "beyond": ci is not None and ci[0] > 0}
    return out


# Student's t, 0.975 quantile, by degrees of freedom (standard tables, 3 decimals)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom: the table to 30, then the
    Cornish-Fisher expansion around the normal's 1.96 (within 1e-3 from df 30 on)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired(xs: dict, ys: dict) -> dict:
    """x - y over the seeds both have: per seed, mean, and a t-interval (95%) when there are >= 2 seeds."""
    seeds = sorted(set(xs) & set(ys))
    d = [xs[s] - ys[s] for s in seeds]
    out = {"seeds": seeds, "diffs": d, "mean": statistics.fmean(d) if d else None, "ci95": None}
    if len(d) >= 2:
        half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def analyse(units: list[dict]) -> dict:
    by = {}
    for u in units:
        by.setdefault(u["arm"], {})[u["seed"]] = u
    arms = {}
    for arm, seeds in sorted(by.items()):
        arms[arm] = {
            "seeds": sorted(seeds),
            "final": {s: final_acc(u) for s, u in seeds.items()},
            "auc": {s: auc(u) for s, u in seeds.items()},
            "mean_applied_passes": {s: mean_applied(u) for s, u in seeds.items()},
            "start": {s: u["curve"][0] for s, u in seeds.items()},
            "wall_s": {s: u["seconds"] for s, u in seeds.items()},
            "head_rel_dw_total": {s: u["head_rel_dw_total"] for s, u in seeds.items()},
            "body_rel_dw_total": {s: u["body_rel_dw_total"] for s, u in seeds.items()},
            "zero_grad_steps": {s: sum(p.get("zero_grad", False) for b in u["batches"] for p in b["passes"])
                                for s, u in seeds.items()},
            "closed_batches": {s: sum(any(p["closed"] for p in b["passes"]) for b in u["batches"])
                               for s, u in seeds.items()},
        }
    fixed = sorted((a for a in arms if re.fullmatch(r"k\d+", a)), key=lambda a: int(a[1:]))  # not "kl4"
    out = {"arms": arms, "fixed": fixed}
    # 1. does reuse harm, from which K
    if "k1" in arms:
        out["reuse_vs_k1"] = {a: {"final": paired(arms[a]["final"], arms["k1"]["final"]),
                                  "auc": paired(arms[a]["auc"], arms["k1"]["auc"])} for a in fixed if a != "k1"}
    # DWD: per pass index, the lm_head's relative weight change over the rest's (median over batches)
    dwd = {}
    for u in units:
        if u["arm"] not in fixed:
            continue
        for b in u["batches"]:
            for p in b["passes"]:
                if not p["closed"] and p["body_rel_dw"] > 0:
                    dwd.setdefault(p["pass_"], []).append(p["head_rel_dw"] / p["body_rel_dw"])
    out["dwd_head_over_body_by_pass"] = {k: statistics.median(v) for k, v in sorted(dwd.items())}
    out["pass_profile"] = pass_profile(units)
    # 2. threshold-free knowing: AUROCs over the fixed arms' passes >= 2
    fixed_units = [u for u in units if u["arm"] in fixed]
    for key, kw in (("auroc", {}), ("auroc_without_zero_grad", {"drop_zero_grad": True}),
                    ("auroc_z_measured", {"drop_z_placeholder": True}), ("auroc_all_passes", {"min_pass": 1})):
        rows, dropped = finite_rows(pass_rows(fixed_units, **kw))
        out[key] = {**auroc_table(rows), "dropped_non_finite": dropped}
        if key in ("auroc", *ROBUSTNESS):  # every pass is the other question (pass 1 has index 1 by definition)
            out[key]["minus_pass_index"] = minus_pass_index(rows)
    # 3. adaptive arms against their controls and the best fixed K (chosen leave-one-seed-out)
    adaptive = [a for a in arms if re.fullmatch(r"(dgg|kl)\d+", a)]
    cmp = {}
    for a in adaptive:
        c = {}
        for ctl in ("rep", "cap"):
            name = f"{ctl}:{a}"
            if name in arms:
                c[f"minus_{ctl}"] = {"final": paired(arms[a]["final"], arms[name]["final"]),
                                     "auc": paired(arms[a]["auc"], arms[name]["auc"])}
        c["minus_best_fixed_loso"] = loso_best_fixed(arms[a]["final"], {k: arms[k]["final"] for k in fixed})
        cmp[a] = c
    out["adaptive"] = cmp
    return out


def loso_best_fixed(arm_final: dict, fixed_final: dict[str, dict]) -> dict:
    """Per seed s of the arm: the fixed K with the best mean final accuracy over the other seeds (llm_analysis's
    rule), and the arm minus that K on s; ``paired``: llm_analysis.paired of the arm against the chosen Ks."""
    per = {}
    for s in sorted(arm_final):
        # the candidates: the fixed Ks measured on s and on some other seed (a K measured on s alone cannot be
        # chosen without looking at s); they are compared over the same other seeds (those on which every
        # candidate was measured), so no K wins for lack of a bad seed
        cands = [k for k, v in fixed_final.items() if s in v and set(v) - {s}]
        pool = sorted(set.intersection(*(set(fixed_final[k]) for k in cands)) - {s}) if cands else []
        if pool:
            best = max(cands, key=lambda k: statistics.fmean(fixed_final[k][t] for t in pool))
            per[s] = {"best_fixed": best, "chosen_on": pool, "diff": arm_final[s] - fixed_final[best][s]}
    chosen = {s: fixed_final[v["best_fixed"]][s] for s, v in per.items()}
    return {"per_seed": per, "paired": paired({s: arm_final[s] for s in per}, chosen)}


def _f(x, nd=3):
    return "n/a" if x is None else f"{x:+.{nd}f}" if isinstance(x, float) and x < 0 else f"{x:.{nd}f}"


def _paired_text(p: dict | None) -> str:
    """A paired difference as a verdict says it: mean, 95% CI and the seeds, or 'not measured yet'."""
    if not p or p["mean"] is None:
        return "not measured yet"
    ci = f", 95% CI {_f(p['ci95'][0])}..{_f(p['ci95'][1])}" if p["ci95"] else ", no CI (one seed)"
    return f"{_f(p['mean'])} (seeds {p['seeds']}{ci})"


# the same AUROC tables on subsets of the passes (keys of an analysis), against which a signal that beats the
# pass index is checked: does it still beat it there?
ROBUSTNESS = {"auroc_without_zero_grad": "the zero-gradient steps left out",
              "auroc_z_measured": "the observer's placeholder z (0 while its window fills) left out"}


def robustness_text(an: dict, signals: list[str]) -> str:
    """For each signal of ``signals`` (each beats the pass index in an["auroc"]): its AUROC minus the pass index's
    in each ROBUSTNESS table of the analysis ``an`` that has one, and whether the CI still lies above 0."""
    parts = []
    for key, label in ROBUSTNESS.items():
        mpi = an.get(key, {}).get("minus_pass_index")
        if not mpi:
            continue
        for sig in signals:
            d = mpi.get(sig)
            if not d or d["diff"] is None or not d["ci95"]:
                continue
            parts.append(f"with {label}, {sig} minus the pass index is {d['diff']:+.3f} (CI {d['ci95'][0]:+.3f}.."
                         f"{d['ci95'][1]:+.3f}), {'still above 0' if d['beyond'] else 'no longer above 0'}")
    return ("" if not parts else " Robustness: " + "; ".join(parts) + ".")


def knowing_line(t: dict, measure: str, an: dict | None = None) -> str:
    """The verdict's answer to "does any signal know when a pass hurts?" from an auroc_table ``t`` with its
    minus_pass_index: which signals' CIs exclude 0.5, on which side, and which of them beat the pass index
    (checked, when the whole analysis ``an`` is given, on the ROBUSTNESS subsets of the passes).
    ``measure``: the word for the before/after measurement ("probe", "validation")."""
    knowing = [s for s, v in t["signals"].items() if v["knows"] and s != "pass_"]
    if t["n_passes"] == 0 or t["n_hurt"] == 0:
        return ("Does any signal know when a pass hurts? Not measured (no fixed-K pass >= 2 with a "
                f"{measure} measurement, or none hurt).")
    if not knowing:
        base = t["signals"]["pass_"]
        return (f"Does any signal know when a pass hurts? No: on {t['n_passes']} passes >= 2 of the fixed "
                f"arms ({t['n_hurt']} hurt), no signal's AUROC has a 95% CI excluding 0.5 (the pass index alone: "
                f"{_f(base['auroc'])}{', CI excluding 0.5' if base['knows'] else ''}).")
    mpi = t.get("minus_pass_index", {})
    beyond = [s for s in knowing if t["signals"][s]["direction"] == "higher" and mpi.get(s, {}).get("beyond")]
    named = [f"{s} ({'higher' if t['signals'][s]['direction'] == 'higher' else 'LOWER'} before a hurt pass)"
             for s in knowing]
    return (f"Does any signal know when a pass hurts? On {t['n_passes']} passes >= 2 of the fixed arms "
            f"({t['n_hurt']} hurt), the AUROC's 95% CI excludes 0.5 for: {', '.join(named)} (the "
            f"plan's criterion); the pass index alone scores {_f(t['signals']['pass_']['auroc'])}"
            + (" (CI excludes 0.5 too)" if t["signals"]["pass_"]["knows"] else "")
            + (f", and {', '.join(beyond)} beat it (the CI of the difference lies above 0)." if beyond else
               ", and none of them beats it (no signal's AUROC minus the pass index's has a CI above 0).")
            + (robustness_text(an, beyond) if an is not None and beyond else ""))


def ci_above(p: dict | None) -> bool:
    """A paired() difference whose 95% CI lies above 0 (False when not measured or without a CI)."""
    return bool(p and p.get("ci95") and p["ci95"][0] > 0)


def ci_below(p: dict | None) -> bool:
    """A paired() difference whose 95% CI lies below 0."""
    return bool(p and p.get("ci95") and p["ci95"][1] < 0)


def stopping_line(arms: dict[str, tuple[dict | None, dict | None]]) -> str:
    """The verdict's answer to "does any stop rule beat its replay control and the best fixed K?" from, per
    adaptive arm, its final accuracy minus its replay control and minus the best fixed K chosen leave-one-seed-out
    (paired() results): an arm beats one where the difference's 95% CI lies above 0."""
    if not arms:
        return "Does any stop rule beat its replay control and the best fixed K? Not measured (no adaptive arm)."
    both = [a for a, (r, b) in arms.items() if ci_above(r) and ci_above(b)]
    rep = [a for a, (r, _) in arms.items() if ci_above(r)]
    best = [a for a, (_, b) in arms.items() if ci_above(b)]
    worse = [a for a, (_, b) in arms.items() if ci_below(b)]
    head = (f"Yes: {', '.join(both)}" if both else "No: no stop rule's final accuracy minus its replay control and "
            "minus the best fixed K both have a 95% CI above 0")
    parts = [f"above its replay control: {', '.join(rep) or 'none'}",
             f"above the best fixed K: {', '.join(best) or 'none'}"]
    if worse:
        parts.append(f"below the best fixed K: {', '.join(worse)}")
    return f"Does any stop rule beat its replay control and the best fixed K? {head} ({'; '.join(parts)})."


# the plan's arms (llm_plan.md) and seeds: what "the study is complete" means
PLAN_ARMS = ("k1", "k2", "k4", "k8", "dgg4", "dgg8", "kl4", "kl8",
             *(f"{c}:{a}" for a in ("dgg4", "dgg8", "kl4", "kl8") for c in ("rep", "cap")))
PLAN_SEEDS = (0, 1, 2)


def verdict(res: dict) -> list[str]:
    lines = []
    seeds = sorted({s for a in res["arms"].values() for s in a["seeds"]})
    missing = [f"{a} s{s}" for a in PLAN_ARMS for s in PLAN_SEEDS if s not in res["arms"].get(a, {}).get("seeds", [])]
    lines.append(f"Units read: {sum(len(a['seeds']) for a in res['arms'].values())} "
                 f"({', '.join(sorted(res['arms']))}), seeds {seeds}. The plan asks for 3 seeds of every arm "
                 "and its controls: " + (f"not yet measured: {', '.join(missing)}." if missing else "all present."))
    lines.append(knowing_line(res["auroc"], "probe", res))
    ad = res["adaptive"]
    lines.append(stopping_line({a: (c.get("minus_rep", {}).get("final"), c["minus_best_fixed_loso"]["paired"])
                                for a, c in ad.items()}))
    for a, c in ad.items():
        parts = []
        for key, what in (("minus_rep", "its replay control"), ("minus_cap", "its fixed cap")):
            parts.append(f"minus {what} {_paired_text(c.get(key, {}).get('final'))}")
        parts.append("minus the best fixed K chosen leave-one-seed-out "
                     + _paired_text(c["minus_best_fixed_loso"]["paired"]))
        lines.append(f"{a}: final accuracy " + "; ".join(parts) + ".")
    return lines


def markdown(res: dict) -> str:
    out = ["# The SmolLM2-135M-Instruct study (GRPO on CPU, two-digit addition)", "",
           "Read against benchmarks/rlvr/llm_plan.md. Every figure comes from the unit JSONs in "
           "benchmarks/results/llm_study/ (llm_study.json holds them all).", ""]
    out += [f"- {line}" for line in verdict(res)] + [""]
    out += ["## Arms", "", "| arm | seeds | start | final (mean of last 3) | final per seed | AUC | applied passes / batch | "
            "closed batches | zero-gradient steps | lm_head / rest weight change, whole run | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, v in res["arms"].items():
        def m(d):
            return statistics.fmean(d.values()) if d else None
        ratio = m({s: v["head_rel_dw_total"][s] / v["body_rel_dw_total"][s] for s in v["seeds"]})
        per_seed = ", ".join(_f(v["final"][t]) for t in v["seeds"])
        out.append(f"| {a} | {v['seeds']} | {_f(m(v['start']))} | {_f(m(v['final']))} | {per_seed} | {_f(m(v['auc']))} | "
                   f"{_f(m(v['mean_applied_passes']), 2)} | {sum(v['closed_batches'].values())} | "
                   f"{sum(v['zero_grad_steps'].values())} | {_f(ratio, 2)} | {m(v['wall_s']):.0f} |")
    if res.get("reuse_vs_k1"):
        out += ["", "## Reuse against K=1 (paired by seed)", "", "| arm | final minus K=1 | AUC minus K=1 | seeds |",
                "|---|---|---|---|"]
        for a, v in res["reuse_vs_k1"].items():
            out.append(f"| {a} | {_f(v['final']['mean'])} | {_f(v['auc']['mean'])} | {v['final']['seeds']} |")
    out += ["", "## DWD: the lm_head's relative weight change over the rest's, per pass (median)", "",
            " ".join(f"pass {k}: {v:.2f};" for k, v in res["dwd_head_over_body_by_pass"].items()) or "not measured", ""]
    prof = res.get("pass_profile", {})
    if prof:
        out += ["## Per pass in the fixed arms (llm_study_passes.png)", "",
                "Medians over the arm's batches and seeds; the share of passes that lowered the probe is a mean. "
                "The lm_head gradient norm is relative to the batch's pass 1.", "",
                "| arm | pass | " + " | ".join(t for _, t in PASS_PANELS) + " |",
                "|---|---|" + "---|" * len(PASS_PANELS)]
        for arm, p in prof.items():
            for i in sorted(p["z"], key=int):
                out.append(f"| {arm} | {i} | " + " | ".join(_f(p[k].get(i), 3) for k, _ in PASS_PANELS) + " |")
        out.append("")
    for key, title in (("auroc", "passes >= 2"), ("auroc_without_zero_grad", "passes >= 2, zero-gradient steps left out"),
                       ("auroc_z_measured", "passes >= 2, the observer's z placeholder (0 while its window fills) "
                                            "left out"),
                       ("auroc_all_passes", "every pass")):
        t = res[key]
        out += [f"## AUROC for \"this pass lowered the probe accuracy\" ({title})", "",
                f"{t['n_passes']} passes, {t['n_hurt']} hurt, {t['n_batches']} batches (the bootstrap resamples "
                "batches).", "", "| signal | AUROC | 95% CI |", "|---|---|---|"]
        for s, v in t["signals"].items():
            ci = f"{v['ci95'][0]:.2f}..{v['ci95'][1]:.2f}" if v["ci95"] else "n/a"
            out.append(f"| {s} | {_f(v['auroc'], 2)} | {ci} |")
        out.append("")
    mpi = res["auroc"].get("minus_pass_index", {})
    if mpi:
        out += ["## Each signal's AUROC minus the pass index's (passes >= 2; the same resampled batches)", "",
                "A signal that only tracks how many passes have run does no better than the pass index itself.", "",
                "| signal | AUROC minus pass index | 95% CI |", "|---|---|---|"]
        for s, v in mpi.items():
            ci = f"{v['ci95'][0]:+.2f}..{v['ci95'][1]:+.2f}" if v["ci95"] else "n/a"
            out.append(f"| {s} | {_f(v['diff'], 2)} | {ci} |")
        out.append("")
    return "\n".join(out) + "\n"


FIXED_STYLE = {"k1": "C0", "k2": "C1", "k4": "C2", "k8": "C3"}
GATED_STYLE = {"dgg4": "C4", "dgg8": "C5", "kl4": "C6", "kl8": "C7"}
PASS_PANELS = (("head_grad_norm", "lm_head gradient norm / pass 1's"), ("z", "the paper's z (observer)"),
               ("kl_k3", "KL to the rollout policy (k3)"), ("clipfrac", "PPO clip fraction"),
               ("dwd", "lm_head / rest relative weight change"), ("hurt", "share of passes that lowered the probe"))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(units: list[dict], path: Path) -> bool:
    """One panel per seed: the fixed arms' accuracy curves (solid) and the stop rules' (dashed; the controls are
    in the tables, not drawn)."""
    plt = _pyplot()
    if plt is None:
        return False
    seeds = sorted({u["seed"] for u in units})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.6), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for u in sorted((u for u in units if u["seed"] == seed), key=lambda u: u["arm"]):
            style = FIXED_STYLE.get(u["arm"]) or GATED_STYLE.get(u["arm"])
            if style is None:
                continue
            ax.plot(range(len(u["curve"])), u["curve"], color=style, label=u["arm"],
                    linestyle="-" if u["arm"] in FIXED_STYLE else "--")
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("rollout batches")
    axes[0][0].set_ylabel("greedy accuracy (128 evaluation pairs)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [a for a in (*FIXED_STYLE, *GATED_STYLE) if a in handles]
    fig.legend([handles[a] for a in order], order, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def pass_profile(units: list[dict]) -> dict[str, dict[int, dict[int, float | None]]]:
    """Per fixed arm (k2, k4, k8), per pass index, the median over its batches and seeds of each PASS_PANELS
    signal: the lm_head gradient norm relative to the batch's pass 1, z, the KL, the clip fraction, the
    lm_head's relative weight change over the rest's, and the share of passes that lowered the probe."""
    out: dict[str, dict[int, dict[int, float | None]]] = {}
    for arm in ("k2", "k4", "k8"):
        rows: dict[str, dict[int, list[float]]] = {k: {} for k, _ in PASS_PANELS}
        for u in (u for u in units if u["arm"] == arm):
            for b in u["batches"]:
                first = b["passes"][0]["head_grad_norm"] if b["passes"] else None
                for p in b["passes"]:
                    i = p["pass_"]
                    vals = {"z": p["z"], "kl_k3": p["kl_k3"], "clipfrac": p["clipfrac"],
                            "head_grad_norm": p["head_grad_norm"] / first if first else None,
                            "dwd": p["head_rel_dw"] / p["body_rel_dw"] if p["body_rel_dw"] else None,
                            "hurt": float(p["probe_after"] < p["probe_before"])
                            if p.get("probe_after") is not None else None}
                    for k, v in vals.items():
                        if v is not None and math.isfinite(v):
                            rows[k].setdefault(i, []).append(v)
        if any(rows[k] for k in rows):
            out[arm] = {k: {i: (statistics.fmean(v) if k == "hurt" else statistics.median(v))
                            for i, v in sorted(r.items())} for k, r in rows.items()}
    return out


def plot_passes(units: list[dict], path: Path) -> bool:
    """The fixed arms' per-pass medians (pass_profile): does anything surge at the passes that hurt?"""
    plt = _pyplot()
    prof = pass_profile(units)
    if plt is None or not prof:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, (key, title) in zip(axes.flat, PASS_PANELS):
        for arm, p in prof.items():
            xs = sorted(p[key])
            ax.plot(xs, [p[key][i] for i in xs], marker="o", color=FIXED_STYLE[arm], label=arm)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("pass within the batch")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Fixed-K runs, medians over batches and seeds (share: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", default="benchmarks/results/llm_study")
    ap.add_argument("--out", default="benchmarks/results/llm_study")
    a = ap.parse_args(argv)
    units = load_units(Path(a.units))
    res = analyse(units)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1, default=str))
    Path(a.out + ".md").write_text(markdown(res))
    plot(units, Path(a.out + "_accuracy.png"))
    plot_passes(units, Path(a.out + "_passes.png"))
    print("\n".join(verdict(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
