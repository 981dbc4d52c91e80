"""The README's and the demo's figures about the studies, computed from the committed JSONs, so that a test can
check the text against them (tests/test_claims.py) and nothing is typed by hand:

- ``knowing_table()``: the README's table of both questions across the four settings (the small tasks' controls
  design, benchmarks/results/controls/, and the SmolLM2 study, benchmarks/results/llm_study.json);
- ``figures()``: the few numbers the README's introduction and the demo's closing lines quote;
- ``reuse_figures()``: the numbers of the README's bullets on reuse harm, weight divergence and the caps.

    python benchmarks/rlvr/claims.py        # prints the table and the figures
"""
from __future__ import annotations

import json
import os

try:
    from .llm_analysis import ROBUSTNESS, ci_above, ci_below
except ImportError:  # run as a script
    from llm_analysis import ROBUSTNESS, ci_above, ci_below

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")

# setting -> (its analysis JSON under benchmarks/results, the fixed K=1 arm's name there)
SETTINGS = {
    "addition": ("controls/rlvr_reuse_controls.json", "fixed K=1"),
    "reverse": ("controls/rlvr_vocab_controls.json", "fixed K=1"),
    "reverse, tied": ("controls/rlvr_vocab_tied_controls.json", "fixed K=1"),
    "SmolLM2-135M": ("llm_study.json", "k1"),
}
SIGNALS = (("pass_", "the pass index alone"), ("z", "the paper's z (its rule's statistic)"),
           ("kl_k3", "KL to the rollout policy"), ("clipfrac", "PPO clip fraction"))


def load(results: str = RESULTS) -> dict[str, dict]:
    out = {}
    for name, (path, _) in SETTINGS.items():
        with open(os.path.join(results, path)) as f:
            out[name] = json.load(f)
    return out


def _final_vs(c: dict, key: str) -> dict | None:
    """An adaptive arm's final accuracy minus its replay control ("minus_rep"), its cap control ("minus_cap": a
    fixed cap at the arm's mean applied passes per batch on that seed, rounded) or the best fixed K chosen
    leave-one-seed-out ("loso"), paired by seed, in either analysis's layout (controls.py nests by measure,
    llm_analysis not)."""
    if key in ("minus_rep", "minus_cap"):
        return c.get(key, {}).get("final")
    lo = c.get("minus_best_fixed_loso", {})
    return (lo.get("final") or lo).get("paired")


def _auroc_cell(t: dict, sig: str) -> str:
    v = t["signals"][sig]
    cell = f"{v['auroc']:.2f}" + (f" ({v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})" if v["ci95"] else "")
    beats = t.get("minus_pass_index", {}).get(sig, {}).get("beyond") and v["direction"] == "higher"
    return f"**{cell}**" if beats else cell


def knowing_table(results: str = RESULTS) -> str:
    """Markdown: per setting, the AUROCs of the pass index, z, the KL and the clip fraction for "this pass lowered
    the validation (probe) accuracy" over the fixed arms' passes >= 2, with 95% batch-bootstrap CIs (bold: beats
    the pass index, i.e. the CI of the difference lies above 0); and the stop rules against their replay
    controls and the best fixed K chosen leave-one-seed-out (final accuracy, paired by seed)."""
    data = load(results)
    names = list(SETTINGS)
    L = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    row = []
    for n in names:
        an, k1 = data[n], SETTINGS[n][1]
        t = an["auroc"]
        row.append(f"{len(an['arms'][k1]['seeds'])} seeds; {t['n_passes']} ({t['n_hurt']} hurt)")
    L.append("| seeds; fixed-arm passes >= 2 | " + " | ".join(row) + " |")
    for sig, label in SIGNALS:
        L.append(f"| AUROC: {label} | " + " | ".join(_auroc_cell(data[n]["auroc"], sig) for n in names) + " |")
    for key, label in (("minus_rep", "their replay controls"),
                       ("loso", "the best fixed K (chosen leave-one-seed-out)")):
        cells = []
        for n in names:
            ds = [(a, _final_vs(c, key)) for a, c in data[n]["adaptive"].items()]
            ms = [p["mean"] for _, p in ds if p and p.get("mean") is not None]
            above = [a for a, p in ds if ci_above(p)]
            cells.append((f"{min(ms):+.2f} .. {max(ms):+.2f}" if ms else "n/a") + f"; CI above 0: {len(above)} of "
                         f"{len(ds)}")
        L.append(f"| stop rules' final accuracy minus {label} | " + " | ".join(cells) + " |")
    return "\n".join(L)


def figures(results: str = RESULTS) -> dict[str, str]:
    """The numbers the introduction and the demo quote, as they are written there."""
    data = load(results)
    z_knows = [n for n, an in data.items() if an["auroc"]["signals"]["z"]["direction"] == "higher"]
    if not z_knows:
        raise ValueError("no setting's z ranks harmful passes above chance: the text's sentence about it must change")
    zs = [data[n]["auroc"]["signals"]["z"]["auroc"] for n in z_knows]
    beats = {n: [s for s, v in an["auroc"].get("minus_pass_index", {}).items()
                 if v.get("beyond") and an["auroc"]["signals"][s]["direction"] == "higher"] for n, an in data.items()}
    rules = sum(len(an["adaptive"]) for an in data.values())
    # arms that are one run (the same curves on every seed: the small tasks' KL stops never reach pass 4, so at
    # max reuse 4 and 8 and in stable-baselines3's loop they decide alike; SmolLM2's same_as units)
    runs = sum(len({json.dumps([an["arms"][a][k] for k in ("final", "auc", "mean_applied_passes")], sort_keys=True)
                    for a in an["adaptive"]}) for an in data.values())
    above = sum(ci_above(_final_vs(c, k)) for an in data.values() for c in an["adaptive"].values()
                for k in ("minus_rep", "loso"))
    z_beats = [(n, an["auroc"]["minus_pass_index"]["z"]) for n, an in data.items() if "z" in beats[n]]
    # the robustness check of z: its AUROC with the observer's placeholder z (0 while its window fills) left out
    z_measured = {n: an["auroc_z_measured"]["signals"]["z"] for n, an in data.items() if "z" in beats[n]}
    caps = [_final_vs(c, "minus_cap") for an in data.values() for c in an["adaptive"].values()]
    caps = [p for p in caps if p and p.get("ci95")]
    # a signal that beats the pass index and still does on every robustness subset of the passes
    robust = {n: [s for s in b if all(data[n][k]["minus_pass_index"][s]["beyond"] for k in ROBUSTNESS
                                      if data[n].get(k, {}).get("minus_pass_index"))] for n, b in beats.items()}
    return {"z_settings": f"{len(z_knows)} of {len(data)}", "z_range": f"{min(zs):.2f}-{max(zs):.2f}",
            "robust_beats": str(sum(len(r) for r in robust.values())),
            "robust_beats_where": "; ".join(f"{n}: {', '.join(r)}" for n, r in robust.items() if r),
            "z_measured_where_it_beats": "; ".join(
                f"{n}: {v['auroc']:.2f} ({v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})" for n, v in z_measured.items()),
            "cap_comparisons": str(len(caps)), "cap_above": str(sum(map(ci_above, caps))),
            "cap_below": str(sum(map(ci_below, caps))),
            "z_beats_pass_index": str(len(z_beats)),
            "z_beats_where": "; ".join(f"{n}: {v['diff']:+.2f}, CI {v['ci95'][0]:+.2f}..{v['ci95'][1]:+.2f}"
                                       for n, v in z_beats),
            "pass_index_comparisons": str(sum(len(an["auroc"].get("minus_pass_index", {})) for an in data.values())),
            # the energy is the lm_head gradient norm squared: it ranks the passes alike, one comparison twice
            "pass_index_comparisons_distinct": str(sum(
                len(m) - ({"energy", "head_grad_norm"} <= set(m)) for m in
                (an["auroc"].get("minus_pass_index", {}) for an in data.values()))),
            "pass_index_beaten": str(sum(len(b) for b in beats.values())),
            "stop_rules": str(rules), "stop_rule_runs": str(runs), "stop_rule_wins": str(above),
            "beats_pass_index": "; ".join(f"{n}: {', '.join(b)}" for n, b in beats.items() if b)}


def _mean_ci(p: dict) -> str:
    return f"{p['mean']:+.2f} (CI {p['ci95'][0]:+.2f}..{p['ci95'][1]:+.2f})"


def reuse_figures(results: str = RESULTS) -> dict[str, str]:
    """The numbers of the README's bullets on whether reuse harms, on the lm_head's weight change (DWD) and on the
    paper's rule against its cap, as written there: final accuracy differences paired by seed (mean, 95% CI),
    the fixed K=1 arm's final accuracy per seed, and the lm_head's relative weight change over the rest's."""
    data = load(results)
    out = {}
    for n in ("addition", "reverse", "reverse, tied"):
        out[f"{n}: K=8 minus K=1"] = _mean_ci(data[n]["reuse_vs_k1"]["fixed K=8"]["final"])
    llm = data["SmolLM2-135M"]
    for k in ("k2", "k4", "k8"):
        p = llm["reuse_vs_k1"][k]["final"]
        out[f"SmolLM2: K={k[1:]} minus K=1"] = _mean_ci(p)
        out[f"SmolLM2: K={k[1:]} seeds"] = str(len(p["seeds"]))
    for k in ("k1", "k8"):
        fin = llm["arms"][k]["final"]
        seeds = sorted(fin, key=int)
        out[f"SmolLM2: K={k[1:]} final by seed"] = ", ".join(f"{fin[s]:.2f}" for s in seeds)
        peaks = []
        for s in seeds:  # the unit's accuracy curve: the start, then after each batch
            with open(os.path.join(results, "llm_study", f"{k}_s{s}.json")) as f:
                curve = json.load(f)["curve"]
            best = max(range(len(curve)), key=curve.__getitem__)
            peaks.append(f"{curve[best]:.2f} after batch {best}")
        out[f"SmolLM2: K={k[1:]} peak by seed"] = ", ".join(peaks)
    by_pass = {int(k): v for k, v in llm["dwd_head_over_body_by_pass"].items()}

    def span(lo: int, hi: int) -> str:
        vs = [by_pass[i] for i in range(lo, hi + 1) if i in by_pass]
        lo, hi = f"{min(vs):.2f}", f"{max(vs):.2f}"
        return lo if lo == hi else f"{lo}-{hi}"
    out["SmolLM2: lm_head/rest per pass, passes 1-4"] = span(1, 4)
    out["SmolLM2: lm_head/rest per pass, passes 5-8"] = span(5, 8)
    a8 = llm["arms"]["k8"]
    ratios = [a8["head_rel_dw_total"][s] / a8["body_rel_dw_total"][s] for s in a8["head_rel_dw_total"]]
    out["SmolLM2: lm_head/rest over K=8's run"] = f"{sum(ratios) / len(ratios):.2f}"
    a1 = llm["arms"]["k1"]
    r1 = [a1["head_rel_dw_total"][s] / a1["body_rel_dw_total"][s] for s in a1["head_rel_dw_total"]]
    out["SmolLM2: lm_head/rest over K=1's run"] = f"{sum(r1) / len(r1):.2f}"
    prof = llm["pass_profile"]  # per fixed arm, per pass: medians (llm_analysis.pass_profile)
    later = [v for p in prof.values() for i, v in p["head_grad_norm"].items() if int(i) >= 2]
    out["SmolLM2: lm_head gradient norm / pass 1's, passes >= 2"] = f"{min(later):.2f}-{max(later):.2f}"
    hurt = [v for p in prof.values() for v in p["hurt"].values()]
    out["SmolLM2: share of passes that lowered the probe, per arm and pass"] = f"{min(hurt):.2f}-{max(hurt):.2f}"
    for arm in ("dgg4", "dgg8"):
        c = llm["adaptive"].get(arm, {}).get("minus_cap", {})
        if c.get("final"):
            out[f"SmolLM2: {arm} minus its cap, final"] = _mean_ci(c["final"]) if c["final"].get("ci95") \
                else f"{c['final']['mean']:+.3f}"
            out[f"SmolLM2: {arm} minus its cap, seeds"] = str(len(c["final"]["seeds"]))
            if c.get("auc"):
                out[f"SmolLM2: {arm} minus its cap, auc"] = f"{c['auc']['mean']:+.3f}"
    return out


if __name__ == "__main__":
    print(knowing_table())
    print(json.dumps(figures(), indent=1))
    print(json.dumps(reuse_figures(), indent=1))
