"""A second look at the committed RLVR study: is it the signal that pays, or the amount of reuse?  Read-only over
the study's results JSONs (no training); writes rlvr_reanalysis.json and rlvr_reanalysis.md.

    python benchmarks/rlvr/reanalysis.py                       # reads and writes benchmarks/results
    python benchmarks/rlvr/reanalysis.py --results DIR --out DIR

Per task variant (addition; reverse, untied; reverse, tied) and seed:

1. amount-adjusted accuracy: each adaptive arm's final accuracy minus the same seed's fixed-K accuracy curve
   (final accuracy of fixed K=1, 2, 4, 8, linearly interpolated) at the arm's applied passes per batch (updates
   that were not discarded, per rollout batch: the same count as analysis.py's ``applied_updates_per_seed``);
   and which adaptive arms' accuracy curves equal a fixed arm's on every evaluation;
2. the calibrated gradient arm against the coin, paired per seed, and how many passes each gives a batch;
3. where the gated arms close: the fraction of batches, the pass, the z of the closing step and which of the
   paper's two tests (energy, increment) was over the threshold; the z the observer gates of the fixed-reuse arms
   record at passes >= 2; the lm_head gradient norm per pass of fixed K=8 (analysis.py's ``dwd``);
4. each signal family's "best arm" chosen leave-one-seed-out (chosen on 4 seeds by mean final accuracy, scored
   on the 5th) and its share of the gap between fixed K=8 and the best fixed K, by the formula analysis.py uses
   for ``recovered`` (the in-sample choice is recomputed the same way and must equal the committed figure);
5. the evaluation set of the addition task against its warm-up data, regenerated from the seeds in the code
   (policy.sft, cli.main); and fixed K=1's own batch of reaching its final smoothed accuracy (the target of the
   rollout-ratio measure), from the committed efficiency analysis.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np  # noqa: E402

from benchmarks.rlvr import analysis as AN  # noqa: E402
from benchmarks.rlvr import report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")
# the study's variants and their results files (study.VARIANTS, study.variant_stem)
VARIANT_FILES = {"addition": "rlvr_reuse_results.json", "reverse": "rlvr_vocab_results.json",
                 "reverse-tied": "rlvr_vocab_tied_results.json"}
FAMILIES = ("kl", "gradient")  # the families with more than one arm, whose "best arm" is a choice


# ----------------------------------------------------------------------------- loading

def load(path: str) -> dict:
    """A results JSON with its per-update records as rows (report.rows) and its committed analysis."""
    with open(path) as f:
        return prepare(json.load(f))


def prepare(res: dict) -> dict:
    """A results JSON as json.load returns it, made what ``load`` returns (in place): rows, and nan for the
    analysis's nulls.  report.py uses it to write a results .md from what its JSON keeps."""
    res["runs"] = [dict(r, updates=report.rows(r["updates"])) for r in res["runs"]]
    report._nan(res["analysis"])
    return res


def _specs(res) -> dict:
    return {s["name"]: s for s in res["arm_specs"]}


def _family(spec) -> str:
    return spec.get("signal") or spec["kind"]


def _runs_by(res) -> dict:
    return {(r["arm"], r["seed"]): r for r in res["runs"]}


def _seeds(res) -> list[int]:
    return sorted({r["seed"] for r in res["runs"]})


def applied_passes_per_batch(run, batches: int) -> float:
    """Updates applied (not discarded by a close, a KL stop or the coin) per rollout batch, on one seed: the count
    behind analysis.py's ``applied_updates_per_seed`` (``len(updates) - closes``), per batch."""
    ups = run["updates"]
    return (len(ups) - sum(bool(u["closed"]) for u in ups)) / batches


def _rng(xs) -> list[float]:
    return [float(min(xs)), float(max(xs))] if len(xs) else [float("nan"), float("nan")]


# ----------------------------------------------------------------------------- 1. amount of reuse

def amount_adjusted(res) -> dict:
    an, specs, by, seeds = res["analysis"], _specs(res), _runs_by(res), _seeds(res)
    batches = res["args"]["batches"]
    fixed = sorted((a for a in res["arm_names"] if specs[a]["kind"] == "fixed"), key=AN.k_of)
    ks = [AN.k_of(a) for a in fixed]
    def at_fixed(passes, key):  # the seed's fixed-K curve (final accuracy by K) at each seed's passes
        return [float(np.interp(p, ks, [an["arms"][f][key][i] for f in fixed])) for i, p in enumerate(passes)]

    arms = {}
    for name in res["arm_names"]:
        if specs[name]["kind"] in ("fixed", "rep", "cap"):  # fixed reuse and the controls are no adaptive arm
            continue
        passes = [applied_passes_per_batch(by[(name, s)], batches) for s in seeds]
        final = list(an["arms"][name]["final_acc_per_seed"])
        ref = at_fixed(passes, "final_acc_per_seed")
        d = np.array(final) - np.array(ref)
        # the same with every backward pass counted (a discarded update too), and with the smoothed final accuracy
        back = [len(by[(name, s)]["updates"]) / batches for s in seeds]
        d_back = np.array(final) - np.array(at_fixed(back, "final_acc_per_seed"))
        d_smooth = (np.array(an["arms"][name]["final_smooth_per_seed"])
                    - np.array(at_fixed(passes, "final_smooth_per_seed")))
        arms[name] = {"family": _family(specs[name]), "applied_passes_per_seed": passes,
                      "applied_passes_mean": float(np.mean(passes)),
                      "applied_passes_mean_committed": an["arms"][name]["applied_updates_per_seed"] / batches,
                      "final_acc_mean": an["arms"][name]["final_acc_mean"],
                      "final_acc_per_seed": final, "fixed_k_at_same_passes_per_seed": ref,
                      "diff_per_seed": d.tolist(), "diff_mean": float(d.mean()), "diff_min": float(d.min()),
                      "diff_max": float(d.max()), "higher_seeds": int((d > 0).sum()), "seeds": len(d),
                      "backward_passes_mean": float(np.mean(back)),
                      "diff_mean_at_backward_passes": float(d_back.mean()),
                      "diff_mean_smoothed_final": float(d_smooth.mean())}
    spread = {"all": _rng([v["diff_mean"] for v in arms.values()])}
    for fam in sorted({v["family"] for v in arms.values()}):
        spread[fam] = _rng([v["diff_mean"] for v in arms.values() if v["family"] == fam])
    return {"fixed_k": ks, "arms": arms, "spread_of_arm_means": spread,
            "raw_final_acc_range": _rng([v["final_acc_mean"] for v in arms.values()]),
            "per_seed_range": _rng([x for v in arms.values() for x in v["diff_per_seed"]])}


def identical_curves(res) -> list[dict]:
    """Adaptive arms whose held-out accuracy curve equals a fixed arm's on every evaluation of a seed."""
    specs, by, seeds = _specs(res), _runs_by(res), _seeds(res)
    fixed = [a for a in res["arm_names"] if specs[a]["kind"] == "fixed"]
    out = []
    for name in res["arm_names"]:
        if specs[name]["kind"] == "fixed":
            continue
        for f in fixed:
            same = [s for s in seeds if [c[2] for c in by[(name, s)]["curve"]] == [c[2] for c in by[(f, s)]["curve"]]]
            if same:
                out.append({"arm": name, "fixed": f, "seeds_identical": len(same), "seeds": len(seeds)})
    return out


# ----------------------------------------------------------------------------- 2. the coin

def cal_vs_coin(res) -> dict | None:
    an, specs, by, seeds = res["analysis"], _specs(res), _runs_by(res), _seeds(res)
    cal = next((a for a in res["arm_names"] if specs[a]["kind"] == "cal"), None)
    coin = next((a for a in res["arm_names"] if specs[a]["kind"] == "rnd"), None)
    if cal is None or coin is None:
        return None
    d = np.array(an["arms"][cal]["final_acc_per_seed"]) - np.array(an["arms"][coin]["final_acc_per_seed"])

    def passes_hist(name):  # applied passes per batch: how many batches got 1, 2, ..., K applied updates
        h = {}
        for s in seeds:
            n = {}
            for u in by[(name, s)]["updates"]:
                n.setdefault(u["batch"], 0)
                n[u["batch"]] += not u["closed"]
            for v in n.values():
                h[v] = h.get(v, 0) + 1
        tot = sum(h.values())
        return {str(k): h[k] / tot for k in sorted(h)}

    return {"cal": cal, "coin": coin, "diff_per_seed": d.tolist(), "diff_mean": float(d.mean()),
            "higher_seeds": int((d > 0).sum()), "seeds": len(d), "verdict": AN.verdict(d),
            "applied_passes_share": {cal: passes_hist(cal), coin: passes_hist(coin)}}


# ------------------------------------------------------------------------ 3. where the gates close, and the premise

def closes(res) -> dict:
    """Per adaptive arm: batches ended early, the pass, and for gate closes the z and the test over threshold."""
    an, specs, by, seeds = res["analysis"], _specs(res), _runs_by(res), _seeds(res)
    out = {}
    for name in res["arm_names"]:
        sp = specs[name]
        if sp["kind"] == "fixed":
            continue
        a = an["arms"][name]
        ups = [u for s in seeds for u in by[(name, s)]["updates"]]
        gate = [u for u in ups if u["closed"] and u.get("by") == "gate"]
        rec = {"family": _family(sp), "close_rate": a["close_rate"], "ended_early_rate": a["ended_early_rate"],
               "mean_close_pass": a["mean_close_pass"], "close_at_pass2": a["close_at_pass2"],
               "gate_closes": len(gate), "threshold": a["threshold"]}
        t = a["threshold"]
        if gate and t is not None and math.isfinite(t):
            ze = [u["z_energy"] for u in gate if u.get("z_energy") is not None]
            zi = [u["z_increment"] for u in gate if u.get("z_increment") is not None]
            rec["median_z_at_close"] = float(np.median([u["z"] for u in gate]))
            if ze and zi and len(ze) == len(gate) and sp["statistic"] == "energy+increment":
                ze, zi = np.array(ze), np.array(zi)
                rec["median_z_energy_at_close"] = float(np.median(ze))
                rec["median_z_increment_at_close"] = float(np.median(zi))
                rec["increment_only_share"] = float(np.mean((zi > t) & ~(ze > t)))
                rec["energy_only_share"] = float(np.mean((ze > t) & ~(zi > t)))
                rec["both_share"] = float(np.mean((ze > t) & (zi > t)))
        zs = [u["z"] for u in ups if u["pass"] >= 2 and u["z"] is not None and np.isfinite(u["z"]) and u["z"] != 0.0]
        rec["median_z_pass2plus"] = float(np.median(zs)) if zs else float("nan")
        out[name] = rec
    return out


def premise(res) -> dict:
    """At passes >= 2 of the fixed-reuse arms: the observer gates' z per rule (0 = window not yet full, left out);
    the lm_head gradient norm per pass of the arm with the most reuse (analysis.dwd, committed); DWD within a batch
    by report.findings' criterion."""
    specs = _specs(res)
    reuse = [a for a in res["arm_names"] if specs[a]["kind"] == "fixed" and AN.k_of(a) > 1]
    zs: dict[str, list] = {}
    for r in res["runs"]:
        if r["arm"] not in reuse:
            continue
        for u in r["updates"]:
            if u["pass"] >= 2:
                for q, z in (u.get("obs_z") or {}).items():
                    if z is not None and np.isfinite(z) and z != 0.0:
                        zs.setdefault(q, []).append(z)
    out = {"arms": reuse, "median_observer_z_pass2plus": {q: float(np.median(v)) for q, v in zs.items()},
           "share_observer_z_over_0_3_pass2plus": {q: float(np.mean(np.array(v) > 0.3)) for q, v in zs.items()}}
    bp = {int(k): v for k, v in res["analysis"]["dwd"].get("by_pass", {}).items()}
    if bp:
        ks = sorted(bp)
        g = [bp[k]["grad_norm"] for k in ks]
        h1, hk, b1, bk = bp[ks[0]]["lm_head"], bp[ks[-1]]["lm_head"], bp[ks[0]]["blocks"], bp[ks[-1]]["blocks"]
        def div(a, b):  # as report.findings: a tiny run can have a 0 here
            return a / b if b > 0 else float("nan")

        grows, bgrows = div(hk, h1), div(bk, b1)
        out.update({"dwd_arm": res["analysis"]["dwd"]["arm"], "grad_norm_by_pass": g,
                    "grad_norm_fall_first_to_last": div(g[0], g[-1]),
                    "grad_norm_fall_first_to_min": div(g[0], min(g)),
                    "lm_head_change_growth": grows, "blocks_change_growth": bgrows,
                    "dwd_within_batch": bool(grows > 1.5 and grows > 1.5 * bgrows)})
    return out


# ----------------------------------------------------------------------------- 4. best arm, leave one seed out

def recovered(acc: float, lo: float, hi: float) -> float:
    """analysis.analyse's ``recovered``: the share of the gap between the most reuse (lo) and the best fixed K (hi)."""
    return (acc - lo) / (hi - lo) if hi - lo > 1e-9 else float("nan")


def best_of(per_seed: dict[str, list[float]], seeds_idx: list[int]) -> str:
    """The arm with the highest mean final accuracy over ``seeds_idx`` (the first listed on a tie, as max() in
    analysis._by_signal picks)."""
    return max(per_seed, key=lambda n: float(np.mean([per_seed[n][i] for i in seeds_idx])))


def loso(per_seed: dict[str, list[float]]) -> list[dict]:
    """Per held-out seed index i: the arm chosen on the other seeds, and its final accuracy on seed i."""
    n = len(next(iter(per_seed.values())))
    out = []
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        c = best_of(per_seed, rest)
        out.append({"held_out": i, "chosen": c, "score": per_seed[c][i]})
    return out


def best_arm_loso(res) -> dict:
    an, specs, seeds = res["analysis"], _specs(res), _seeds(res)
    arms = an["arms"]
    fixed = [a for a in res["arm_names"] if specs[a]["kind"] == "fixed"]
    worst, best_fixed = an["recovered_ref"]["worst"], an["recovered_ref"]["best"]
    lo, hi = arms[worst]["final_acc_mean"], arms[best_fixed]["final_acc_mean"]
    fixed_ps = {a: arms[a]["final_acc_per_seed"] for a in fixed}
    fixed_folds = loso(fixed_ps)
    hi_loso = float(np.mean([f["score"] for f in fixed_folds]))
    out = {"worst": worst, "best_fixed": best_fixed, "lo": lo, "hi": hi, "seeds": seeds,
           "best_fixed_loso": {"folds": [dict(f, held_out_seed=seeds[f["held_out"]]) for f in fixed_folds],
                               "mean": hi_loso}, "families": {}}
    for fam in FAMILIES:
        names = an["by_signal"].get(fam, {}).get("arms", [])
        if len(names) < 2:
            continue
        ps = {n: arms[n]["final_acc_per_seed"] for n in names}
        ins = best_of(ps, list(range(len(seeds))))
        folds = loso(ps)
        m = float(np.mean([f["score"] for f in folds]))
        out["families"][fam] = {
            "arms": names, "in_sample_best": ins, "in_sample_final": arms[ins]["final_acc_mean"],
            "in_sample_recovered": recovered(arms[ins]["final_acc_mean"], lo, hi),
            "committed_best": an["by_signal"][fam].get("best"),
            "committed_recovered": an.get("recovered", {}).get(an["by_signal"][fam].get("best"), float("nan")),
            "folds": [dict(f, held_out_seed=seeds[f["held_out"]]) for f in folds],
            "loso_final": m, "loso_recovered": recovered(m, lo, hi),
            "loso_recovered_vs_loso_best_fixed": recovered(m, lo, hi_loso)}
    return out


# ------------------------------------------------------------------------ 5. labels: evaluation set, rollout target

def rollout_target(res) -> dict | None:
    """fixed K=1's own first batch at its final smoothed accuracy (the rollout-ratio target), per seed."""
    eff = res["analysis"].get("efficiency", {}).get("fixed K=1")
    if not eff:
        return None
    n = res["args"]["prompts"] * res["args"]["group"]
    b = [int(round(p["rollouts"] / n)) for p in eff["per_seed"] if p.get("reached")]
    return {"k1_reach_batch_per_seed": b, "batches": res["args"]["batches"], "smooth": AN.SMOOTH}


def final_acc_se(res) -> dict:
    """The binomial standard error of one evaluation of the fixed arms' mean final accuracy (items = --heldout)."""
    n = res["args"]["heldout"]
    specs = _specs(res)
    return {"items": n, "per_fixed_arm": {a: math.sqrt(s["final_acc_mean"] * (1 - s["final_acc_mean"]) / n)
                                          for a, s in res["analysis"]["arms"].items()
                                          if specs[a]["kind"] == "fixed"}}


def eval_overlap(res) -> dict:
    """Regenerate the evaluation set and the warm-up's draws of a run from the seeds the code uses (cli.main:
    task.sample(heldout, Generator().manual_seed(12345)); policy.sft: Generator().manual_seed(sft_seed), one
    draw of sft_batch per step, the pretraining phase's draws first) and count the overlap.  Needs torch; the
    draws are on the CPU generator, as in the study."""
    import torch

    from benchmarks.rlvr import tasks

    a = res["args"]
    args = SimpleNamespace(**a)
    task = tasks.get(a["task"])(args)
    heldout = task.sample(a["heldout"], torch.Generator().manual_seed(12345))
    gen = torch.Generator().manual_seed(a["sft_seed"])
    pre = res["sft"].get("pretrain_steps") or 0
    seen, seen_pre = set(), set()
    for _ in range(pre):  # the pretraining phase (copying: the same prompts, another answer) draws first
        p, _ = task.pretrain_sample(a["sft_batch"], gen)
        seen_pre.update(map(tuple, p.tolist()))
    for _ in range(res["sft"]["steps"]):
        p, _ = task.sample(a["sft_batch"], gen)
        seen.update(map(tuple, p.tolist()))
    items = [tuple(x) for x in heldout[0].tolist()]
    out = {"task": a["task"], "eval_items": len(items), "eval_distinct": len(set(items)),
           "eval_items_in_warmup": sum(x in seen for x in items),
           "warmup_draws": res["sft"]["steps"] * a["sft_batch"], "warmup_distinct_problems": len(seen),
           "pretraining_draws": pre * a["sft_batch"], "eval_prompts_in_pretraining": sum(x in seen_pre for x in items),
           # with several warm-up checkpoints (--warmups) only the first one's draws are replayed here
           "for_sft_seed": a["sft_seed"]}
    if a["task"] == "addition":
        out["problem_space"] = (10 ** a["digits"]) ** 2
    return out


# ----------------------------------------------------------------------------- all of it

def reanalyse_variant(res, overlap: bool = True) -> dict:
    out = {"batches": res["args"]["batches"], "seeds": _seeds(res), "eval_items": res["args"]["heldout"],
           "warmup_checkpoints": int(res["args"].get("warmups", 1) or 1), "sft_seed": res["args"]["sft_seed"],
           "amount_adjusted": amount_adjusted(res), "identical_curves": identical_curves(res),
           "cal_vs_coin": cal_vs_coin(res), "closes": closes(res), "premise": premise(res),
           "best_arm": best_arm_loso(res), "rollout_target": rollout_target(res), "final_acc_se": final_acc_se(res)}
    if overlap:
        out["eval_overlap"] = eval_overlap(res)
    return out


def reanalyse(results_dir: str = RESULTS, overlap: bool = True) -> dict:
    variants = {}
    for name, fn in VARIANT_FILES.items():
        path = os.path.join(results_dir, fn)
        if os.path.exists(path):
            variants[name] = reanalyse_variant(load(path), overlap)
    aa = [v["amount_adjusted"]["arms"] for v in variants.values()]
    summary = {
        "amount_adjusted_all_arms": _rng([x["diff_mean"] for arms in aa for x in arms.values()]),
        "amount_adjusted_kl_arms": _rng([x["diff_mean"] for arms in aa for x in arms.values() if x["family"] == "kl"]),
        "amount_adjusted_gradient_arms": _rng([x["diff_mean"] for arms in aa for x in arms.values()
                                               if x["family"] == "gradient"]),
        "sensitivity": {key: {"all": _rng([x[key] for arms in aa for x in arms.values()]),
                              "kl": _rng([x[key] for arms in aa for x in arms.values() if x["family"] == "kl"])}
                        for key in ("diff_mean_at_backward_passes", "diff_mean_smoothed_final")},
        "adaptive_arms_per_variant": {n: len(v["amount_adjusted"]["arms"]) for n, v in variants.items()},
        "best_kl_arm_applied_passes": {
            n: v["amount_adjusted"]["arms"][v["best_arm"]["families"]["kl"]["in_sample_best"]]["applied_passes_mean"]
            for n, v in variants.items() if "kl" in v["best_arm"]["families"]},
    }
    summary["adaptive_max_reuse"] = sorted({AN.k_of(a) for v in variants.values()
                                            for a in v["amount_adjusted"]["arms"]})
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    # the folder as the reader gave it (relative to where they run it), or the default's path in the repository
    rel = (os.path.normpath(results_dir) if not os.path.isabs(results_dir)
           else os.path.relpath(results_dir, os.path.abspath(repo)))
    cmd = "python benchmarks/rlvr/reanalysis.py" + ("" if os.path.samefile(results_dir, RESULTS) else
                                                     f" --results {rel} --out {rel}")
    return {"generated_by": cmd, "date": datetime.date.today().isoformat(),
            "inputs": {n: f"{rel}/{VARIANT_FILES[n]}" for n in variants},
            "summary": summary, "variants": variants}


# ----------------------------------------------------------------------------- markdown

def _p(x, nd=0) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.{nd}f}%"


def _s(x, nd=3) -> str:
    return "nan" if x is None or x != x else f"{x:+.{nd}f}"


def markdown(out: dict) -> str:
    V = out["variants"]
    S = out["summary"]
    L = ["# RLVR study, re-analysed: amount of reuse, the coin, the premise, best-arm selection", "",
         f"Written by `{out['generated_by']}` from the committed results JSONs ("
         + ", ".join(f"`{p}`" for p in out["inputs"].values()) + "); no training was run. Every figure below is in "
         "`rlvr_reanalysis.json`.", "",
         "## What the data support", "",
         f"- **Amount of reuse, not signal.** Against the same seed's fixed-K accuracy curve (K = 1, 2, 4, 8, "
         f"interpolated) at the arm's own applied passes per batch, every adaptive arm of every task lands within "
         f"{_s(S['amount_adjusted_all_arms'][0], 3)} .. {_s(S['amount_adjusted_all_arms'][1], 3)} (mean over seeds; "
         f"the arms' unadjusted final accuracies span " + ", ".join(
             "{:.2f}-{:.2f}".format(*v["amount_adjusted"]["raw_final_acc_range"])
             for v in V.values()) + f"); the KL arms within {_s(S['amount_adjusted_kl_arms'][0], 3)} .. "
         f"{_s(S['amount_adjusted_kl_arms'][1], 3)}, the gradient-rule arms within "
         f"{_s(S['amount_adjusted_gradient_arms'][0], 3)} .. {_s(S['amount_adjusted_gradient_arms'][1], 3)}. The "
         "best KL arms apply " + " / ".join(f"{x:.2f}" for x in S["best_kl_arm_applied_passes"].values())
         + f" passes per batch ({' / '.join(S['best_kl_arm_applied_passes'])}): they land on the best fixed K.",
         "- **The coin is not a matched control**: it gives a batch 1 or 8 applied passes, never the spread of "
         "stopping passes a gate gives (section 2).",
         "- **The premise is absent at this scale**: over the passes of a batch the lm_head gradient norm falls, "
         "there is no DWD within a batch, and the observer z at passes >= 2 sits near or below 0; the calibrated "
         "arm ends most batches early, mostly through the increment test near z = 0 (section 3).",
         "- **Best-arm figures were chosen on the test seeds**; chosen leave-one-seed-out they are lower or equal (section 4). "
         "All seeds start from one warm-up checkpoint, and a final accuracy is one evaluation of "
         f"{next(iter(V.values()))['eval_items']} items.", ""]
    # 1
    L += ["## 1. Adaptive arms against fixed K at the same amount of reuse", "",
          "diff = arm's final accuracy - the seed's fixed-K final accuracy interpolated at the arm's applied passes "
          "per batch (mean over seeds [min .. max over seeds], seeds higher).", "",
          "| arm | " + " | ".join(f"{n} passes | {n} diff" for n in V) + " |", "|---|" + "---|---|" * len(V)]
    names = list(next(iter(V.values()))["amount_adjusted"]["arms"])
    for a in names:
        cells = []
        for v in V.values():
            x = v["amount_adjusted"]["arms"].get(a)
            cells += ([f"{x['applied_passes_mean']:.2f}",
                       f"{_s(x['diff_mean'])} [{_s(x['diff_min'], 2)} .. {_s(x['diff_max'], 2)}] "
                       f"{x['higher_seeds']}/{x['seeds']}"] if x else ["", ""])
        L.append(f"| {a} | " + " | ".join(cells) + " |")
    L += ["", "Spread of the arm means: " + "; ".join(
        f"{n}: all {_s(v['amount_adjusted']['spread_of_arm_means']['all'][0], 3)} .. "
        f"{_s(v['amount_adjusted']['spread_of_arm_means']['all'][1], 3)}, KL "
        f"{_s(v['amount_adjusted']['spread_of_arm_means']['kl'][0], 3)} .. "
        f"{_s(v['amount_adjusted']['spread_of_arm_means']['kl'][1], 3)}, gradient "
        f"{_s(v['amount_adjusted']['spread_of_arm_means']['gradient'][0], 3)} .. "
        f"{_s(v['amount_adjusted']['spread_of_arm_means']['gradient'][1], 3)}" for n, v in V.items()) + ".", "",
          "The same, counting every backward pass (a discarded update too) instead of the applied ones: all arms "
          f"{_s(S['sensitivity']['diff_mean_at_backward_passes']['all'][0], 3)} .. "
          f"{_s(S['sensitivity']['diff_mean_at_backward_passes']['all'][1], 3)}, KL arms "
          f"{_s(S['sensitivity']['diff_mean_at_backward_passes']['kl'][0], 3)} .. "
          f"{_s(S['sensitivity']['diff_mean_at_backward_passes']['kl'][1], 3)}; on the smoothed final accuracy (mean "
          f"of the last {AN.SMOOTH} evaluations): all "
          f"{_s(S['sensitivity']['diff_mean_smoothed_final']['all'][0], 3)} .. "
          f"{_s(S['sensitivity']['diff_mean_smoothed_final']['all'][1], 3)}, KL arms "
          f"{_s(S['sensitivity']['diff_mean_smoothed_final']['kl'][0], 3)} .. "
          f"{_s(S['sensitivity']['diff_mean_smoothed_final']['kl'][1], 3)}.", ""]
    ident = [f"{n}: `{x['arm']}` = `{x['fixed']}` on {x['seeds_identical']}/{x['seeds']} seeds"
             for n, v in V.items() for x in v["identical_curves"]]
    L += ["Accuracy curves identical to a fixed arm's on every evaluation of a seed: "
          + ("; ".join(ident) if ident else "none") + ".", ""]
    # 2
    L += ["## 2. The calibrated gradient arm against the coin", "",
          "| task | cal - coin (mean) | per seed | seeds higher | calibrated arm: share of batches by applied passes "
          "| coin: the same |", "|---|---|---|---|---|---|"]
    for n, v in V.items():
        c = v["cal_vs_coin"]
        if not c:
            continue
        h = c["applied_passes_share"]
        L.append(f"| {n} | {_s(c['diff_mean'])} | " + ", ".join(_s(x, 3) for x in c["diff_per_seed"])
                 + f" | {c['higher_seeds']}/{c['seeds']} | "
                 + ", ".join(f"{k}: {_p(s)}" for k, s in h[c["cal"]].items()) + " | "
                 + ", ".join(f"{k}: {_p(s)}" for k, s in h[c["coin"]].items()) + " |")
    # 3
    L += ["", "## 3. Where the gates close, and the premise", "",
          "| task | arm | threshold | batches ended early | mean close pass | median z at the close | increment "
          "test alone over t | energy test alone | both | median z, passes >= 2 |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in V.items():
        for a, c in v["closes"].items():
            if c["family"] not in ("gradient", "gradient+kl"):
                continue
            L.append(f"| {n} | `{a}` | {c['threshold']:.3g} | {_p(c['ended_early_rate'])} | "
                     f"{c['mean_close_pass']:.2f} | {_s(c.get('median_z_at_close', float('nan')), 2)} | "
                     f"{_p(c.get('increment_only_share'))} | {_p(c.get('energy_only_share'))} | "
                     f"{_p(c.get('both_share'))} | {_s(c['median_z_pass2plus'], 2)} |")
    L += ["", "| task | observer z at passes >= 2 in the fixed-reuse arms: median (share > 0.3) | lm_head grad norm, "
          "fixed K=8, pass 1 -> pass 8 (fall; to the smallest pass) | DWD within a batch |", "|---|---|---|---|"]
    for n, v in V.items():
        p = v["premise"]
        L.append(f"| {n} | " + "; ".join(f"`{q}` {_s(z, 2)} ({_p(p['share_observer_z_over_0_3_pass2plus'][q])})"
                                         for q, z in p["median_observer_z_pass2plus"].items())
                 + f" | {p['grad_norm_by_pass'][0]:.3g} -> {p['grad_norm_by_pass'][-1]:.3g} "
                 f"({p['grad_norm_fall_first_to_last']:.1f}x; {p['grad_norm_fall_first_to_min']:.1f}x) | "
                 f"{'yes' if p['dwd_within_batch'] else 'no'} (lm_head change x{p['lm_head_change_growth']:.2f}, "
                 f"blocks x{p['blocks_change_growth']:.2f}) |")
    # 4
    L += ["", "## 4. Best arm chosen leave-one-seed-out", "",
          "Share of the gap between fixed K=8 and the best fixed K (analysis.py's `recovered`: (acc - K=8) / (best "
          "fixed - K=8), means over seeds). Committed: the best arm chosen on all 5 seeds and scored on them. LOSO: "
          "chosen on 4 seeds by mean final accuracy, scored on the 5th, 5 folds averaged; the last column also "
          "chooses the best fixed K leave-one-seed-out.", "",
          "| task | family (arms) | committed best arm | committed | recomputed in-sample | LOSO | LOSO, best fixed "
          "LOSO too | choices per held-out seed |", "|---|---|---|---|---|---|---|---|"]
    for n, v in V.items():
        for fam, f in v["best_arm"]["families"].items():
            L.append(f"| {n} | {fam} ({len(f['arms'])}) | `{f['committed_best']}` | {_p(f['committed_recovered'])} | "
                     f"{_p(f['in_sample_recovered'])} | {_p(f['loso_recovered'])} | "
                     f"{_p(f['loso_recovered_vs_loso_best_fixed'])} | "
                     + ", ".join(f"{x['held_out_seed']}: `{x['chosen']}`" for x in f["folds"]) + " |")
    # 5
    L += ["", "## 5. Labels", ""]
    for n, v in V.items():
        o = v.get("eval_overlap")
        rt = v["rollout_target"]
        se = v["final_acc_se"]
        parts = []
        if o and o["task"] == "addition":
            parts.append(f"the evaluation set ({o['eval_items']} problems, {o['eval_distinct']} distinct) is drawn "
                         f"from the warm-up's distribution: the warm-up's {o['warmup_draws']:,} draws cover "
                         f"{o['warmup_distinct_problems']:,} of the {o['problem_space']:,} problems, and "
                         f"{o['eval_items_in_warmup']} of the {o['eval_items']} evaluation items are among them")
        elif o:
            parts.append(f"{o['eval_items_in_warmup']} of the {o['eval_items']} evaluation items occur in the "
                         f"warm-up's {o['warmup_draws']:,} reverse-task draws, and {o['eval_prompts_in_pretraining']} "
                         f"of their prompts in its {o['pretraining_draws']:,} copy-pretraining draws")
        if rt:
            parts.append(f"fixed K=1 first reaches its own final smoothed accuracy (the rollout-ratio target) at batch "
                         f"{min(rt['k1_reach_batch_per_seed'])}-{max(rt['k1_reach_batch_per_seed'])} of "
                         f"{rt['batches']}")
        parts.append(f"one evaluation of {se['items']} items has a binomial SE of "
                     + ", ".join(f"{x:.3f}" for x in se["per_fixed_arm"].values()) + " at the fixed arms' accuracies")
        n_warm = int(v.get("warmup_checkpoints", 1) or 1)
        parts.append(f"all {len(v['seeds'])} seeds start from one warm-up checkpoint (sft seed {v['sft_seed']})"
                     if n_warm == 1 else f"the {len(v['seeds'])} seeds start from {n_warm} warm-up checkpoints "
                     f"(sft seeds {v['sft_seed']} to {v['sft_seed'] + n_warm - 1}; seed s from checkpoint s mod "
                     f"{n_warm})")
        L.append(f"- {n}: " + "; ".join(parts) + ".")
    ks = S.get("adaptive_max_reuse", [])
    L += ["- The paper's setting, a gate at max reuse K=4, is in the study (adaptive arms at max reuse "
          + ", ".join(f"K={k}" for k in ks) + ")." if 4 in ks else
          "- The paper's setting, a gate at max reuse K=4, is not in the study (every adaptive arm runs at "
          + ", ".join(f"K={k}" for k in ks) + "); fixed K=4 is.", ""]
    return "\n".join(L) + "\n"


def _clean(obj):
    """nan -> None for JSON; floats to 5 significant digits (report._round)."""
    return report._round(obj)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--results", default=RESULTS, help="folder with the study's results JSONs")
    ap.add_argument("--out", default=RESULTS, help="folder for rlvr_reanalysis.json and .md")
    args = ap.parse_args(argv)
    out = reanalyse(args.results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rlvr_reanalysis.json"), "w") as f:
        json.dump(_clean(out), f, indent=1)
    with open(os.path.join(args.out, "rlvr_reanalysis.md"), "w") as f:
        f.write(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
