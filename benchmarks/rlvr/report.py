"""The results files: JSON (raw first, then with the analysis), Markdown with the verdicts, PNG plots."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from . import analysis as AN
from .arms import PAPER, default_rule, observer_threshold, rule_name


def _f(x, nd=3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------- plain statements

def verdict_lines(an: dict) -> list[str]:
    """Where each arm helps, does not, hurts: one line per verdict (paired by seed on final accuracy)."""
    order = (("helps", "Helps (higher on every seed)"), ("leans better", "Leans better (most seeds, not all)"),
             ("no consistent difference", "No consistent difference"),
             ("leans worse", "Leans worse (most seeds, not all)"), ("hurts", "Hurts (lower on every seed)"))
    by = {k: [] for k, _ in order}
    for v in an["versus"]:
        if v["verdict"] in by:
            by[v["verdict"]].append(f"`{v['dgg']}` vs `{v['vs']}` ({v['final_acc_diff_mean']:+.3f}, "
                                    f"{v['wins']}/{v['seeds']} seeds higher)")
    return [f"**{title}:** " + ("; ".join(by[k]) if by[k] else "none") for k, title in order]


def _vs(an, a, b):
    return next((v for v in an["versus"] if v["dgg"] == a and v["vs"] == b), None)


def _paired(an, a, b) -> tuple[float, int, int, str]:
    x = np.array(an["arms"][a]["final_acc_per_seed"]) - np.array(an["arms"][b]["final_acc_per_seed"])
    return float(x.mean()), int((x > 0).sum()), len(x), AN.verdict(x)


# ----------------------------------------------------------------------------- the re-analysis in the verdicts

def reanalysis_of(res: dict) -> dict | None:
    """benchmarks/rlvr/reanalysis.py's per-variant figures (reanalyse_variant) for a results JSON as json.load
    returns it (the dict is prepared in place, as reanalysis.load does): the one source of the amount-adjusted
    differences, the coin, where the gates close, the premise, the leave-one-seed-out best arms and the
    evaluation set's overlap with the warm-up.  None without a fixed arm (no reference to adjust against)."""
    from . import reanalysis as RA

    if not res.get("analysis") or not res["analysis"].get("best_fixed"):
        return None
    ra = RA.reanalyse_variant(RA.prepare(res))
    if len(res.get("sft_all", [])) > 1:  # --warmups: seed s starts from checkpoint s mod N
        ra["warmups"] = len(res["sft_all"])
    return ra


def eval_label(ra: dict | None) -> str:
    """"evaluation-set" where the evaluation items also occur in the warm-up data (not held out), else
    "held-out"."""
    o = (ra or {}).get("eval_overlap")
    return "evaluation-set" if o and o["eval_items_in_warmup"] else "held-out"


def eval_set_text(o: dict) -> str:
    """The evaluation set of a task whose evaluation items occur in the warm-up data (reanalysis.eval_overlap)."""
    k, n = o["eval_items_in_warmup"], o["eval_items"]
    among = f"all {n} evaluation items" if k == n else f"{k} of the {n} evaluation items"
    if o.get("problem_space"):
        return (f"{n} fixed problems drawn from the warm-up's distribution ({o['warmup_distinct_problems']:,} of its "
                f"{o['problem_space']:,} problems appear in the warm-up data, {among} among them)")
    return f"{n} fixed problems drawn from the warm-up's distribution ({among} appear in the warm-up data)"


def _and(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _batches_range(b: list[int]) -> str:
    return f"{min(b)}" if min(b) == max(b) else f"{min(b)}-{max(b)}"


def _coin(an: dict, ra: dict | None) -> tuple[str | None, str]:
    """The coin arm and the applied passes it gives a batch ("1 or 8"): measured (reanalysis.cal_vs_coin) where
    there is a calibrated arm beside it, else from the arm (it ends a batch at pass 2, discarding that update)."""
    coin = next((a for a, s in an["arms"].items() if s["kind"] == "rnd"), None)
    if coin is None:
        return None, ""
    c = (ra or {}).get("cal_vs_coin")
    ks = list(c["applied_passes_share"][coin]) if c and c["coin"] == coin else ["1", str(AN.k_of(coin))]
    return coin, " or ".join(ks) if len(ks) <= 2 else ", ".join(ks[:-1]) + " or " + ks[-1]


def _shown_above(ra: dict) -> list[str]:
    """Adaptive arms above fixed K at their own applied passes on every seed of at least 5 (a one-sided sign test
    at p = 0.03 each): the only case where these data would say a signal knows when a pass hurts."""
    return [a for a, x in ra["amount_adjusted"]["arms"].items() if x["seeds"] >= 5 and x["higher_seeds"] == x["seeds"]]


def _premise_measured(ra: dict) -> bool:
    p = ra["premise"]
    return "grad_norm_by_pass" in p and math.isfinite(p["grad_norm_fall_first_to_last"])


def premise_absent(ra: dict) -> bool:
    """The paper's premise, measured (reanalysis.premise): absent when over the passes of a batch the lm_head
    gradient norm falls, there is no DWD within a batch and the observer z at passes >= 2 has a median below
    the split the findings use."""
    p = ra["premise"]
    if not _premise_measured(ra):
        return False
    z = p["median_observer_z_pass2plus"].values()
    return p["grad_norm_fall_first_to_last"] > 1 and not p["dwd_within_batch"] and all(x < AN.Z_SPLIT for x in z)


def support_line(an: dict, ra: dict) -> str:
    """The first verdict line: what these data support, from the re-analysis (reanalysis.py's functions)."""
    from . import reanalysis as RA

    aa = ra["amount_adjusted"]
    arms_aa, sp = aa["arms"], aa["spread_of_arm_means"]
    fam_names = {"kl": "KL arms", "gradient": "gradient-rule arms"}
    fams = [f"{fam_names[f]} {RA._s(sp[f][0])} .. {RA._s(sp[f][1])}" for f in fam_names if f in sp]
    spread = (f"the {len(arms_aa)} adaptive arms land within {RA._s(sp['all'][0])} .. {RA._s(sp['all'][1])}"
              + (f" ({', '.join(fams)})" if fams else ""))
    head = ("Against the same seed's fixed-K accuracy curve at the arm's own applied passes per batch, " + spread)
    above = _shown_above(ra)
    if above:
        S = [head + "; above fixed K at their own amount on every seed: "
             + ", ".join(f"`{a}` ({RA._s(arms_aa[a]['diff_mean'])})" for a in above)
             + f" (a one-sided sign test at p = 0.03 each, before any correction for the {len(arms_aa)} arms)."]
    else:
        S = ["no stop rule here did better than the amount of reuse it applies. " + head
             + ": amount of reuse, not signal."]
    best_fixed = an["best_fixed"]
    kl = an.get("by_signal", {}).get("kl", {}).get("best")
    ident = ", ".join(f"`{x['arm']}` = `{x['fixed']}`" for x in ra["identical_curves"]
                      if x["seeds_identical"] == x["seeds"])
    if kl in arms_aa:
        p = arms_aa[kl]["applied_passes_mean"]
        ks = aa["fixed_k"]
        i = ks.index(AN.k_of(best_fixed))
        near = (ks[i - 1] if i else 0) <= p <= (ks[i + 1] if i + 1 < len(ks) else float("inf"))
        S.append(f"The best KL arm, `{kl}`, applies {p:.2f} passes per batch, "
                 + (f"next to the best fixed K (`{best_fixed}`)" if near
                    else f"while the best fixed K is `{best_fixed}`")
                 + (f"; accuracy curves identical to a fixed arm's on every seed and evaluation: {ident}." if ident
                    else "."))
    elif ident:
        S.append(f"Accuracy curves identical to a fixed arm's on every seed and evaluation: {ident}.")
    _, coin_passes = _coin(an, ra)
    c = ra["cal_vs_coin"]
    if c:
        S.append(f"The coin gives a batch {coin_passes} passes, not the spread a gate gives: not a matched control "
                 f"(`{c['cal']}` vs the coin {RA._s(c['diff_mean'])}, {c['higher_seeds']}/{c['seeds']} seeds higher).")
    p = ra["premise"]
    if _premise_measured(ra):
        g = p["grad_norm_fall_first_to_last"]
        z = [f"{v:.2f} (`{q.split('/')[0]}`)" for q, v in p["median_observer_z_pass2plus"].items()]
        S.append(("The premise is absent" if premise_absent(ra) else "The premise, measured")
                 + f": in `{p['dwd_arm']}` the lm_head gradient norm "
                 + (f"falls {g:.1f}x" if g > 1 else f"rises {1 / g:.1f}x")
                 + f" from pass 1 to pass {len(p['grad_norm_by_pass'])}, there is "
                 + ("no DWD" if not p["dwd_within_batch"] else "DWD") + " within a batch"
                 + (f", and the observer z at passes >= 2 has a median of {_and(z)}" if z else ""))
        cal = next((a for a in ra["closes"] if an["arms"][a]["kind"] == "cal"), None)
        if cal:
            x = ra["closes"][cal]
            S[-1] += f"; the calibrated arm ends {RA._p(x['ended_early_rate'])} of the batches"
            if "increment_only_share" in x:
                S[-1] += f", {RA._p(x['increment_only_share'])} of its closes through the increment test alone"
            if "median_z_at_close" in x:
                S[-1] += f" (median z at the close {x['median_z_at_close']:.2f}, threshold {x['threshold']:.3g})"
        S[-1] += "."
    fb = {f: x for f, x in ra["best_arm"]["families"].items() if math.isfinite(x["loso_recovered"])}
    if fb:
        names = {"kl": "the KL family", "gradient": "the gradient family"}
        S.append(f"The best-arm shares below were chosen on these same {len(ra['seeds'])} seeds; chosen "
                 "leave-one-seed-out " + _and([f"{names[f]}{' recovers' if i == 0 else ''} "
                                               f"{RA._p(x['loso_recovered'])} (in-sample "
                                               f"{RA._p(x['in_sample_recovered'])})"
                                               for i, (f, x) in enumerate(fb.items())]) + ".")
    S.append((f"Seed s starts from warm-up checkpoint s mod {ra['warmups']}" if ra.get("warmups", 1) > 1 else
              "All seeds start from one warm-up checkpoint")
             + f"; each final accuracy is one evaluation of {ra['eval_items']} items.")
    return ("**What these data support** (figures from [rlvr_reanalysis.md](rlvr_reanalysis.md)): " + " ".join(S))


def headline(an: dict, ra: dict | None) -> list[str]:
    """The study's verdicts in plain words: what the data support (the re-analysis ``ra``, reanalysis_of), then
    KL stop vs gradient rule vs fixed K at equal rollouts, each best arm with its applied passes per batch and its
    difference from fixed K at that amount."""
    L = []
    arms, bs = an["arms"], an.get("by_signal", {})
    best_fixed = an.get("best_fixed")
    if not best_fixed:
        return L
    from . import reanalysis as RA

    ra = ra or {}
    aa = ra.get("amount_adjusted", {}).get("arms", {})
    fb = ra.get("best_arm", {}).get("families", {})
    if aa:  # there are adaptive arms to say it of
        L.append(support_line(an, ra))
    L.append(f"Best fixed reuse: `{best_fixed}` (final accuracy {arms[best_fixed]['final_acc_mean']:.3f}); "
             + ", ".join(f"`{a}` {s['final_acc_mean']:.3f}" for a, s in arms.items() if s["kind"] == "fixed") + ".")
    rec = an.get("recovered", {})
    _, coin_passes = _coin(an, ra)
    names = {"kl": "KL stop (SB3, CleanRL, the gate's KL test)", "gradient": "gradient rule (the gate's z-test)",
             "gradient+kl": "gradient rule OR KL test", "coin": "coin"}
    after = {"coin": f" ({coin_passes} passes per batch: not a matched control)"}

    def amount(a):
        x = aa.get(a)
        return (f" It applies {x['applied_passes_mean']:.2f} passes per batch and ends {x['diff_mean']:+.3f} against "
                f"fixed K at that amount ({x['higher_seeds']}/{x['seeds']} seeds higher)." if x else "")

    for sig in ("kl", "gradient", "gradient+kl", "coin"):
        if sig not in bs:
            continue
        b = bs[sig]
        m, w, n, vd = _paired(an, b["best"], best_fixed)
        r = rec.get(b["best"], float("nan"))
        worst = an.get("recovered_ref", {}).get("worst")
        gap = ""
        if worst and worst != best_fixed and r == r:
            gap = f"it recovers {_f(100 * r, 0)}% of the gap between `{worst}` and `{best_fixed}`"
            f = fb.get(sig)
            gap = (f"; chosen as the best of {len(f['arms'])} arms on these same seeds, {gap} (chosen "
                   f"leave-one-seed-out: {RA._p(f['loso_recovered'])})" if f else f"; {gap}")
        L.append(f"**{names[sig]}**{after.get(sig, '')}: best arm `{b['best']}` ends at {b['best_final']:.3f}, "
                 f"{m:+.3f} vs `{best_fixed}` ({w}/{n} seeds higher: {vd}){gap}.{amount(b['best'])} Arms of this "
                 f"signal higher than the best fixed K on most seeds: "
                 f"{', '.join(f'`{x}`' for x in b['beats_best_fixed']) or 'none'}.")
    if "kl" in bs and "gradient" in bs:
        a, g = bs["kl"]["best"], bs["gradient"]["best"]
        m, w, n, vd = _paired(an, a, g)
        more = ""
        if a in aa and g in aa:
            pa, pg = aa[a]["applied_passes_mean"], aa[g]["applied_passes_mean"]
            more = (f"; {'but ' if abs(pa - pg) >= 0.5 else ''}they apply {pa:.2f} and {pg:.2f} passes per batch, and "
                    f"against fixed K at those amounts they end {aa[a]['diff_mean']:+.3f} and {aa[g]['diff_mean']:+.3f}"
                    + (": this compares amounts of reuse, not signals" if abs(pa - pg) >= 0.5 else ""))
        L.append(f"**KL stop vs gradient rule** (each signal's best arm, paired by seed): `{a}` vs `{g}` {m:+.3f} "
                 f"({w}/{n} seeds higher: {vd}){more}.")
    eff = an.get("efficiency", {})
    if eff:
        need = max(1, math.ceil(0.8 * max(e["seeds"] for e in eff.values())))
        fast = [f"`{n}` ({e['reached']}/{e['seeds']} seeds, ratio {e['rollout_ratio_median']:.2f})"
                for n, e in eff.items() if n != "fixed K=1" and e["reached"] >= need and e["rollout_ratio_median"] < 1]
        same = [n for n, e in eff.items() if n != "fixed K=1" and e["reached"] >= need]
        rt = ra.get("rollout_target")
        room = ""
        if rt and rt["k1_reach_batch_per_seed"]:
            b = rt["k1_reach_batch_per_seed"]
            room = (f" {'The target has little room: ' if min(b) >= 0.8 * rt['batches'] else ''}`fixed K=1` itself "
                    f"first reaches it at batch {_batches_range(b)} of {rt['batches']}.")
        L.append("**Sample efficiency** (rollouts to reach `fixed K=1`'s final accuracy, the paper's measure): arms "
                 f"reaching it on at least {need} seeds: " + (", ".join(f"`{x}`" for x in same) or "none")
                 + "; of those, with a median rollout ratio below 1 (fewer rollouts than K=1): "
                 + (", ".join(fast) or "none") + "." + room)
    beats = [x for s in bs.values() for x in s["beats_best_fixed"]]
    L.append("**Beats the best fixed K** (max reuse 8, higher than the best fixed arm on most seeds): "
             + (", ".join(f"`{x}`" for x in beats) if beats else "no signal does") + ".")
    return L


def comparisons_note(an: dict, ra: dict | None) -> str:
    """The paragraph above the per-arm verdicts: what they compare (equal rollouts, not equal passes)."""
    coin, coin_passes = _coin(an, ra)
    return ("Per arm and reference, paired by seed, on final " + eval_label(ra) + " accuracy at equal rollouts. "
            "With 5 seeds, \"every seed\" is a one-sided sign test at p = 0.03; \"most seeds\" (4 of 5) is p = 0.19, "
            "suggestive only. "
            + (f"Comparisons with `{coin}` are not matched for the amount of reuse (the coin gives a batch "
               f"{coin_passes} passes), and every" if coin else "Every")
            + " comparison here is at equal rollouts, not at equal passes: an adaptive arm against fixed K at its own "
            "applied passes per batch is in [rlvr_reanalysis.md](rlvr_reanalysis.md), section 1.")


def findings(an: dict, label: str = "held-out") -> list[str]:
    """Plain statements computed from the numbers (the same rules apply whatever the outcome); ``label`` names
    the evaluation set (eval_label)."""
    lines = []
    for ref, p in an["premise"].items():
        lines.append(f"**Does reuse do harm here?** `{p['arm']}` ends below `{ref}` on {p['below']} of {p['seeds']} "
                     f"seeds (final accuracy {p['diff_mean']:+.3f}, per-seed range {p['diff_min']:+.3f} .. "
                     f"{p['diff_max']:+.3f}).")
    bp = an["dwd"].get("by_pass", {})
    if bp:
        bp = {int(k): v for k, v in bp.items()}
        ks = sorted(bp)
        r1, rk = bp[ks[0]]["ratio"], bp[ks[-1]]["ratio"]
        h1, hk = bp[ks[0]]["lm_head"], bp[ks[-1]]["lm_head"]
        b1, bk = bp[ks[0]]["blocks"], bp[ks[-1]]["blocks"]
        grows = hk / h1 if h1 > 0 else float("nan")
        bgrows = bk / b1 if b1 > 0 else float("nan")
        dwd = grows > 1.5 and grows > 1.5 * bgrows
        lines.append(
            f"**DWD within a batch: {'yes' if dwd else 'no'}.** In `{an['dwd']['arm']}`, the lm_head's relative weight "
            f"change per update goes from {h1:.2e} at pass {ks[0]} to {hk:.2e} at pass {ks[-1]} (x{_f(grows, 2)}); the "
            f"blocks' from {b1:.2e} to {bk:.2e} (x{_f(bgrows, 2)}); lm_head/blocks ratio {_f(r1, 2)} -> {_f(rk, 2)}. "
            "(Counted as DWD when the lm_head change grows by more than 1.5x over the passes and 1.5x more than the "
            "blocks' change does.)")
        g1, gk = bp[ks[0]]["grad_norm"], bp[ks[-1]]["grad_norm"]
        lines.append(f"Per-update policy KL on the batch goes from {bp[ks[0]]['kl_step']:.2e} (pass {ks[0]}) to "
                     f"{bp[ks[-1]]['kl_step']:.2e} (pass {ks[-1]}), the KL to the rollout policy grows to "
                     f"{bp[ks[-1]]['kl_rollout']:.2e} (k3 estimate on the sampled tokens "
                     f"{bp[ks[-1]].get('approx_kl', float('nan')):.2e}); the lm_head gradient norm goes from {g1:.3g} "
                     f"to {gk:.3g} (x{_f(gk / g1 if g1 else float('nan'), 2)}): over the passes of a batch it "
                     f"{'falls' if gk < g1 else 'rises'}.")
    dr = an["dwd"].get("drift", {})
    fixed = [a for a, d in dr.items() if d["kind"] == "fixed"]
    if len(fixed) >= 2:
        lo, hi = min(fixed, key=AN.k_of), max(fixed, key=AN.k_of)
        a, b = dr[lo], dr[hi]
        grows = b["end"]["lm_head"] / a["end"]["lm_head"] if a["end"]["lm_head"] > 0 else float("nan")
        bgrows = b["blocks_end"] / a["blocks_end"] if a["blocks_end"] > 0 else float("nan")
        dwd = grows > 1.5 * bgrows
        lines.append(
            f"**DWD over the run: {'yes' if dwd else 'no'}.** Drift from the checkpoint at the end "
            f"(||W_end - W_0|| / ||W_0||): lm_head {a['end']['lm_head']:.3g} in `{lo}` vs {b['end']['lm_head']:.3g} in "
            f"`{hi}` (x{_f(grows, 2)}); blocks {a['blocks_end']:.3g} vs {b['blocks_end']:.3g} (x{_f(bgrows, 2)}); "
            f"lm_head/blocks {_f(a['ratio_end'], 2)} vs {_f(b['ratio_end'], 2)}. (Counted as DWD when more reuse "
            "grows the lm_head's drift 1.5x more than the blocks'.)")
    lead = an.get("lead", {})
    for arm, ld in lead.items():
        if AN.k_of(arm) < 2 and len(lead) > 1 and arm != max(lead, key=AN.k_of):
            continue
        parts = []
        for sig in ("energy", "increment"):
            ev = ld["events"][sig]
            lag = ld["lagged"][sig]
            best = min(lag, key=lambda k: lag[k]["rho"] if lag[k]["rho"] == lag[k]["rho"] else 9)
            parts.append(
                f"{sig}: {ev['warned']} of {ev['drops']} drops had a surge (z > {AN.SURGE_Z:g} vs the {AN.SURGE_WINDOW} "
                f"batches before) in the {AN.LEAD_MAX} batches before (lead median {_f(ev['lead_median'], 1)} batches; "
                f"surges come in {_f(100 * ev['surge_rate'], 0)}% of batches, so chance alone gives "
                f"{_f(100 * ev['chance_warned'], 0)}%); most negative lagged Spearman(signal at batch b, accuracy "
                f"change at b+lag) = {_f(lag[best]['rho'], 2)} at lag {best} (n {lag[best]['n']})")
        lines.append(f"**Does the lm_head energy surge before accuracy drops?** In `{arm}`: " + "; ".join(parts) + ".")
    sg = an["signal"]
    if sg.get("arms") and sg.get("rules"):
        parts = [f"`{q}` {_f(v['spearman_maxz_vs_batch_dacc'], 2)} (z > {AN.Z_SPLIT}: {v['over']} batches, mean "
                 f"change {_f(v['dacc_over'], 4)}; the others {v['at_most']}, {_f(v['dacc_at_most'], 4)})"
                 for q, v in sg["rules"].items()]
        lines.append(
            f"**Does z warn of harm?** Over the fixed-reuse arms {', '.join(sg['arms'])}: Spearman(max observer z over "
            f"passes >= 2, {label} accuracy change over that batch) = " + "; ".join(parts)
            + " (a useful warning would be clearly negative). "
            f"Spearman(lm_head grad norm, KL of the same update) = {_f(sg['spearman_norm_vs_kl_same_update'], 2)}, "
            f"(norm, KL of the next update on the same batch) = {_f(sg['spearman_norm_vs_kl_next_update'], 2)}.")
    for c in an["calibration"]:
        obs = c["observer_rate_eval_seeds"]
        gr = c["gated_rate_per_seed"]
        lines.append(
            f"**Calibration** (`{c['arm']}`): on calibration seed {c['seed']} the threshold {c['threshold']:.3g} "
            f"would have closed {c['target_rate']:.0%} of the batches of an observer run; on the evaluated seeds "
            + (f"the same threshold would have closed {np.mean(obs):.0%} of an observer's batches "
               f"(per seed {min(obs):.0%} .. {max(obs):.0%}); " if obs else "")
            + f"the gated arm closed {np.mean(gr):.0%} (per seed {min(gr):.0%} .. {max(gr):.0%}).")
    return lines


# ----------------------------------------------------------------------------- markdown

TIED_TEXT = ("lm_head tied to the token embedding (the gate monitors that shared tensor; its gradient sums the "
             "embedding and the output contributions)")


def checkpoints_text(res: dict) -> str:
    """The warm-up checkpoints the seeds start from (--warmups; a results JSON without sft_all had one)."""
    sft = res.get("sft_all", [])
    if len(sft) <= 1:
        return "one checkpoint for every arm and seed."
    accs = ", ".join(f"{x['heldout_acc']:.3f}" for x in sft)
    return (f"{len(sft)} checkpoints, warm-up seeds {', '.join(str(x['seed']) for x in sft)} (the figures above are "
            f"the first's; accuracies {accs}), RL seed s from checkpoint s mod {len(sft)}.")


def write_markdown(res: dict, an: dict, path: str, plots: list[str], ra: dict | None = None) -> None:
    """The results .md; ``ra`` is reanalysis_of(the JSON as written), the source of the verdict's re-analysed
    figures and of the evaluation set's description."""
    with open(path, "w") as f:
        f.write(markdown(res, an, plots, ra))


def markdown(res: dict, an: dict, plots: list[str], ra: dict | None = None) -> str:
    from .cli import GPU_COMMANDS, TIME_NOTE

    a = res["args"]
    env = res["env"]
    task = a.get("task", "addition")
    tied = bool(a.get("tied"))
    title = {"addition": "2-digit addition", "reverse": "reversing symbols over a large vocabulary"}.get(task, task)
    task_text = env.get("task_text") or (f"{a['digits']}-digit addition, sum digits least-significant first, reward "
                                         "1 only for an exact answer")
    L = [f"# RLVR rollout reuse: fixed K, KL stops and DGG ({title}, {'tied' if tied else 'untied'} lm_head)", "",
         f"Date {env['date']}; device {env['device']}; torch {env['torch']}; dgg_kernels {env['dgg_kernels']}; gate "
         f"backend {env['gate_backend']}; {env['threads']} CPU thread(s) per process, {env.get('jobs', 1)} worker "
         f"process(es). Wall time {res['total_seconds']:.0f} s ({res['total_seconds'] / 60:.1f} min).", "",
         f"Command: `{env['command']}` (configuration `{a['config']}`{', --quick' if a['quick'] else ''})"
         + (f"; analysis rewritten from its JSON by `{res['reanalysed_by']}`" if res.get("reanalysed_by") else ""),
         "", "## Verdict: KL stop vs gradient rule vs fixed K", ""]
    label = eval_label(ra)
    o = (ra or {}).get("eval_overlap")
    L += [f"- {x}" for x in headline(an, ra)]
    L += ["", comparisons_note(an, ra), ""]
    L += [f"- {x}" for x in verdict_lines(an)]
    L += ["", "## Setup", "",
          f"- Policy: causal transformer, vocab {a['vocab']}, width {a['width']}, {a['layers']} layer(s), "
          f"{a['heads']} heads, " + (TIED_TEXT if tied else "untied lm_head") + " "
          f"(the lm_head holds {env['lm_head_share']:.0%} of the weights).",
          f"- Task: {task_text}. "
          + (f"Evaluation set: {eval_set_text(o)}, greedy decoding." if label == "evaluation-set" else
             f"Held-out: {a['heldout']} fixed problems, greedy decoding."),
          (f"- Pretraining phase of the task (copying the symbol sequence, so every symbol's lm_head row is trained, "
           f"as a pretrained LM knows its tokens): {res['sft']['pretrain_steps']} steps, {label} accuracy on the "
           f"reverse task after it {res['sft']['heldout_acc_after_pretrain']:.3f}." if res["sft"].get("pretrain_steps")
           else "- No pretraining phase."),
          f"- Supervised warm-up to greedy {label} accuracy {res['sft']['heldout_acc']:.3f} "
          f"({res['sft']['steps']} steps, lr {a['sft_lr']}, batch {a['sft_batch']}); "
          + checkpoints_text(res),
          f"- RL: {a['batches']} rollout batches per arm and seed of {a['prompts']} prompts x {a['group']} samples "
          f"(= {a['batches'] * a['prompts'] * a['group']} rollouts), temperature {a['temperature']}, "
          f"group-normalized advantages, PPO-clip {a['clip']}, one full-batch update per pass, AdamW(fused=True) lr "
          f"{a['lr']}, weight decay {a['weight_decay']}, gate window {a['window']} on lm_head.weight, "
          f"`gate.attach(opt)`. Seeds {a['seeds']} (seed s: the same prompt stream for every arm).",
          f"- Gate rules: `norm` = the package default statistic (the lm_head gradient norm); `paper` = "
          f"statistic=\"{PAPER}\" (close when the energy z-test or the increment z-test fires). The package default "
          f"here is `{rule_name(*default_rule())}`.",
          "- KL stops: approximate KL of the current policy to the rollout policy on the sampled tokens, k3 = "
          "mean((r - 1) - log r), r = exp(logp - logp_rollout), from the pass's own forward (no extra forward). "
          "`sb3`: from pass 2 on, before backward, KL > 1.5 x target: no update, the batch ends (stable-baselines3). "
          "`cleanrl`: after a pass (its update applied), KL measured in that pass > target: the batch ends. Gate "
          "`kl=X x1.5`: the gate's KL test (`DynamicGradientGate(target_kl=X, kl_factor=1.5)`, `gate.observe_kl(k3)` "
          "each step): from reuse index 2 on, KL > 1.5 X closes (update discarded, batch ends), OR-ed with the z-test; "
          "without a t= the z-test only observes (threshold inf).",
          f"- Ungated arms run observer gates (threshold {observer_threshold():g}) for the rules "
          + ", ".join(f"`{q}`" for q in res.get("observer_rules", [])) + ", so z is logged for them too.",
          f"- Calibrated arms (`cal`): threshold from an observer run (fixed reuse, same rule) on seed "
          f"{a['calib_seed']}, which no arm is evaluated on" + _calibrated_text(an, ra) + ".",
          f"- Time: warm-up {res['sft']['seconds']:.0f} s, calibration {res.get('calib_seconds', 0):.0f} s, RL "
          f"{res['rl_seconds']:.0f} s, total {res['total_seconds']:.0f} s wall. Per (arm, seed) unit (training + "
          "evaluation, one thread): " + ", ".join(
              f"{n.split(' t=')[0] if n.startswith('fixed') else n} {s['unit_seconds_mean']:.0f} s"
              for n, s in an["arms"].items() if n in ("fixed K=1", "fixed K=8")) + ".",
          "", "## What was seen", ""]
    L += [f"- {x}" for x in findings(an, label)]
    L += ["", f"## Arms (accuracy is greedy {label} exact match; mean over seeds [min .. max])", "",
          "| arm | signal | final acc | final acc (trailing mean of 5) | mean acc over run | updates/seed (applied) "
          "| batches ended early | closing pass (mean; share at pass 2) | passes/batch | unit s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in an["arms"].items():
        cp = "" if math.isnan(s["mean_close_pass"]) else f"{s['mean_close_pass']:.1f}; {s['close_at_pass2']:.0%}"
        thr = f" (threshold {s['threshold']:.3g})" if s["kind"] == "cal" and s["threshold"] is not None else ""
        L.append(f"| {name}{thr} | {s['signal']} | {s['final_acc_mean']:.3f} [{s['final_acc_min']:.3f} .. "
                 f"{s['final_acc_max']:.3f}] | {s['final_smooth_mean']:.3f} | {s['mean_acc_mean']:.3f} | "
                 f"{s['updates_per_seed']:.1f} ({s['applied_updates_per_seed']:.1f}) | {s['ended_early_rate']:.0%} | "
                 f"{cp} | {s['passes_per_batch']:.2f} | {s['unit_seconds_mean']:.0f} |")
    if an["efficiency"]:
        L += ["", "## Sample efficiency: rollouts to reach fixed K=1's final accuracy", "",
              f"The paper's measure. Per seed, the target is `fixed K=1`'s final accuracy (trailing mean of its last "
              f"{AN.SMOOTH} evaluations); an arm reaches it at the first rollout batch where its own trailing "
              f"{AN.SMOOTH}-evaluation mean is at least that. Ratio = the arm's rollouts / what `fixed K=1` needed to "
              "first reach it (< 1: fewer rollouts), median [min .. max] over the seeds where the arm reached it. "
              "Train seconds exclude evaluation."
              + (f" Seeds where `fixed K=1` did not end above its start are left out: "
                 f"{', '.join(map(str, an['efficiency_excluded_seeds']))}." if an.get("efficiency_excluded_seeds")
                 else ""), "",
              "Last column: the same with half of `fixed K=1`'s gain over the start as the target (how fast an arm "
              "gets going, where K=1's own final level is out of reach).", "",
              "| arm | seeds reaching it | rollouts (median) | rollout ratio vs K=1 | per seed (rollouts; - = never) "
              "| train s (median) | half of K=1's gain: seeds, ratio vs K=1 |", "|---|---|---|---|---|---|---|"]
        half = an.get("efficiency_half", {})
        for name, e in an["efficiency"].items():
            per = ", ".join(f"{h['rollouts']:.0f}" if h["reached"] else "-" for h in e["per_seed"])
            h2 = half.get(name)
            hc = (f"{h2['reached']}/{h2['seeds']}, {h2['rollout_ratio_median']:.2f}" if h2 and h2["reached"]
                  else f"0/{h2['seeds']}" if h2 else "")
            if e["reached"]:
                L.append(f"| {name} | {e['reached']}/{e['seeds']} | {e['rollouts_median']:.0f} | "
                         f"{e['rollout_ratio_median']:.2f} [{e['rollout_ratio_min']:.2f} .. "
                         f"{e['rollout_ratio_max']:.2f}] | {per} | {e['seconds_median']:.1f} | {hc} |")
            else:
                L.append(f"| {name} | 0/{e['seeds']} | never | | {per} | | {hc} |")
    lead = an.get("lead", {})
    if lead:
        L += ["", "## The paper's observations: does the lm_head energy surge before accuracy drops?", "",
              f"Per batch: the lm_head gradient energy (mean over the batch's passes of ||g||^2), its pass-1 value, "
              f"and its increment over the previous batch. Lagged Spearman within each fixed arm (pooled over seeds) "
              f"of the signal at batch b against the {label} accuracy change over batch b+lag (a warning = clearly "
              f"negative; |rho| below about 2/sqrt(n) is noise). Drops: the 3-evaluation trailing mean falls "
              f"{AN.DROP} below its running maximum (first time per seed); a surge = z > {AN.SURGE_Z:g} against the "
              f"{AN.SURGE_WINDOW} batches before.", "",
              "| arm | signal | " + " | ".join(f"rho lag {k}" for k in AN.LAGS) + " | drops | with a surge before "
              "| lead (median batches) | surge rate | chance |", "|---|---|" + "---|" * len(AN.LAGS) + "---|---|---|---|---|"]
        for arm, ld in lead.items():
            for sig in ("energy", "energy_pass1", "increment"):
                lag = ld["lagged"][sig]
                ev = ld["events"].get(sig)
                tail = (f"{ev['drops']} | {ev['warned']} | {_f(ev['lead_median'], 1)} | {_f(ev['surge_rate'], 2)} | "
                        f"{_f(ev['chance_warned'], 2)}") if ev else " | | | | "
                L.append(f"| {arm} | {sig} | " + " | ".join(f"{_f(lag[str(k)]['rho'] if str(k) in lag else lag[k]['rho'], 2)}"
                                                             for k in AN.LAGS) + f" | {tail} |")
    dr = an["dwd"].get("drift", {})
    if dr:
        groups = list(next(iter(dr.values()))["end"])
        L += ["", "## Disproportionate Weight Divergence: drift from the checkpoint", "",
              "||W - W_0|| / ||W_0|| per layer group, mean over seeds, at the end of the run (and the lm_head/blocks "
              "ratio at the midpoint and the end).", "",
              "| arm | " + " | ".join(groups) + " | lm_head/blocks (mid) | lm_head/blocks (end) |",
              "|---|" + "---|" * len(groups) + "---|---|"]
        for arm, d in dr.items():
            L.append(f"| {arm} | " + " | ".join(f"{d['end'][g]:.3g}" for g in groups)
                     + f" | {_f(d['ratio_mid'], 2)} | {_f(d['ratio_end'], 2)} |")
    sg = an["signal"]
    if sg.get("rules"):
        L += ["", "## Does z warn of harm? (observer gates in the fixed-reuse arms)", "",
              f"Per batch: the largest z over passes >= 2 against the {label} accuracy change over that batch. "
              "Within each arm is the fair test (n batches in brackets).", "",
              "| rule | batches | Spearman pooled | within " + " / ".join(f"`{a}`" for a in sg["arms"])
              + f" | batches with z > {AN.Z_SPLIT} | their mean change | the others | their mean change |",
              "|---|---|---|---|---|---|---|---|"]
        for q, v in sg["rules"].items():
            L.append(f"| {q} | {v['batches']} | {_f(v['spearman_maxz_vs_batch_dacc'], 2)} | "
                     + " / ".join(f"{_f(v['within_arm'][a], 2)} [{v['within_arm_batches'][a]}]" for a in sg["arms"])
                     + f" | {v['over']} | {_f(v['dacc_over'], 4)} | {v['at_most']} | {_f(v['dacc_at_most'], 4)} |")
    if an["calibration"]:
        L += ["", "## Calibration", "",
              "| arm | rule | target rate | threshold | observer rate, eval seeds (mean [min .. max]) | "
              "gated arm's rate (mean [min .. max]) |", "|---|---|---|---|---|---|"]
        for c in an["calibration"]:
            obs, gr = c["observer_rate_eval_seeds"], c["gated_rate_per_seed"]
            o = f"{np.mean(obs):.2f} [{min(obs):.2f} .. {max(obs):.2f}]" if obs else "n/a"
            L.append(f"| {c['arm']} | {c['rule']} | {c['target_rate']:.2f} | {c['threshold']:.3g} | {o} | "
                     f"{np.mean(gr):.2f} [{min(gr):.2f} .. {max(gr):.2f}] |")
    bp = an["dwd"].get("by_pass", {})
    if bp:
        L += ["", f"## Per reuse pass in `{an['dwd']['arm']}` (mean over batches and seeds)", "",
              "| pass | rel. change lm_head | rel. change blocks (mean) | rel. change embed | lm_head/blocks | "
              "lm_head grad norm | KL to pre-update policy | KL to rollout policy | k3 KL (sampled tokens) | clipped |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in bp.items():
            L.append(f"| {k} | {v['lm_head']:.3e} | {v['blocks']:.3e} | {v['embed']:.3e} | {v['ratio']:.2f} | "
                     f"{v['grad_norm']:.4g} | {v['kl_step']:.3e} | {v['kl_rollout']:.3e} | "
                     f"{v.get('approx_kl', float('nan')):.3e} | {v['clip_frac']:.3f} |")
    L += ["", "## GPU configuration", "",
          "One command per task variant (a flag given next to `--config gpu` overrides its value; `--help` lists "
          "them all): " + "; ".join(f"`{c}`" for c in GPU_COMMANDS) + ". Addition there is the setting of the "
          "2026-11-23 H100 runs (vocab 32768, width 256, 4 layers, 64 prompts x 8, 60 batches, lr 1e-3); reverse: "
          "vocab 32768, width 256, 4 layers, 4 symbols. Expected time: " + TIME_NOTE["gpu"] + "."]
    L.append("This file is a run of it." if a["config"] == "gpu" else
             "This file is not a run of it (no GPU in the session that wrote this).")
    L += ["", "## Notes", "",
          "- Relative weight change is ||W_after - W_before|| / ||W_before|| per update over the layer group's "
          "tensors (tied: `lm_head` is the shared token table, `embed` the position table only); KL to pre-update / "
          "rollout policy: mean over answer tokens of the full-vocabulary KL on the rollout batch itself.",
          "- A closed gate (or a KL stop) discards that pass's update and ends the batch; the SB3 stop does so before "
          "the backward pass (its record has no gradient norm); CleanRL keeps the update and ends the batch.",
          "- Nothing was tuned per arm: thresholds and targets are the usual ones (paper 0.1-0.5; SB3/CleanRL "
          "target_kl 0.005-0.05), the window is the package default, and lr and sizes are the same for all arms.",
          "- Raw per-update records are in the JSON next to this file, column-wise (runs[i].updates is a dict of "
          "equal-length lists; numbers keep 5 significant digits); runs[i].drift has the per-batch drift per group."]
    if plots:
        L += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(L) + "\n"


def _calibrated_text(an: dict, ra: dict | None) -> str:
    """After the setup's calibrated-arms line: the target share and how many batches the gated arm ended."""
    cal = [c for c in an["calibration"] if c["arm"] in (ra or {}).get("closes", {})]
    if not cal:
        return ""
    share = lambda r: "half" if r == 0.5 else f"{r:.0%}"  # noqa: E731
    from . import reanalysis as RA

    if len(cal) == 1:
        return (f": the threshold that would have closed {share(cal[0]['target_rate'])} of that run's batches. Gated, "
                f"the arm ended {RA._p(ra['closes'][cal[0]['arm']]['ended_early_rate'])} of the batches"
                + (" (see the verdict)" if _premise_measured(ra) else ""))
    return (": per arm, the threshold that would have closed its target share of that run's batches ("
            + ", ".join(f"`{c['arm']}` {share(c['target_rate'])}" for c in cal) + "). Gated, "
            + ", ".join(f"`{c['arm']}` ended {RA._p(ra['closes'][c['arm']]['ended_early_rate'])}" for c in cal)
            + " of the batches")


# ----------------------------------------------------------------------------- plots

STYLE = {"fixed": "--", "dgg": "-", "cal": ":", "rnd": "-.", "sb3": (0, (1, 1)), "crl": (0, (3, 1, 1, 1)),
         "dkl": (0, (5, 1))}


def plot_files(res: dict, stem: str) -> list[str]:
    """The files make_plots writes for ``res`` (with matplotlib), in its order: what the md's Plots section lists."""
    specs = {s["name"]: s for s in res["arm_specs"]}
    fixed = any(specs[a]["kind"] == "fixed" for a in res["arm_names"])
    return [f"{stem}_accuracy.png"] + ([f"{stem}_weight_change.png"] if fixed else []) + [f"{stem}_gate.png"]


def make_plots(res: dict, an: dict, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    runs, arms, paths = res["runs"], res["arm_names"], []
    specs = {s["name"]: s for s in res["arm_specs"]}
    seed0 = min(r["seed"] for r in runs)
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
    for i, name in enumerate(arms):
        rs = [r for r in runs if r["arm"] == name]
        x = np.array([c[0] for c in rs[0]["curve"]])
        y = np.array([AN.smooth([c[2] for c in r["curve"]], 3) for r in rs])
        ls = STYLE.get(specs[name]["kind"], "-")
        (ln,) = axes[0].plot(x, y.mean(0), linestyle=ls, label=name, color=cmap(i % 20), lw=1.2)
        fin = np.array(an["arms"][name]["final_acc_per_seed"])
        axes[1].errorbar([fin.mean()], [i], xerr=[[fin.mean() - fin.min()], [fin.max() - fin.mean()]], fmt="o",
                         color=ln.get_color())
    axes[0].set(xlabel="rollouts consumed", ylabel="held-out accuracy (greedy; trailing mean of 3)",
                title="accuracy vs rollouts (mean over seeds)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_yticks(range(len(arms)), arms, fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set(xlabel="final held-out accuracy (mean, min-max over seeds)", title="final accuracy per arm")
    fig.tight_layout()
    paths.append(f"{stem}_accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    dr = an["dwd"].get("drift", {})
    fixed = [a for a in arms if specs[a]["kind"] == "fixed"]
    if fixed:
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
        big = max(fixed, key=AN.k_of)
        r = next(r for r in runs if r["arm"] == big and r["seed"] == seed0)
        ups = r["updates"]
        for g in ups[0]["rel_change"]:
            axes[0].plot([u["rel_change"][g] for u in ups], label=g, lw=0.8)
        axes[0].set(yscale="log", xlabel="update", ylabel="||dW||/||W|| per update",
                    title=f"{big}, seed {seed0}: relative change per update")
        axes[0].legend(fontsize=7, ncol=4)
        for i, a in enumerate(fixed):
            rs = [r for r in runs if r["arm"] == a and r.get("drift")]
            if not rs:
                continue
            blocks = [g for g in rs[0]["drift"][0] if g.startswith("block")]
            ratio = np.array([[d["lm_head"] / max(np.mean([d[b] for b in blocks]), 1e-12) for d in r["drift"][1:]]
                              for r in rs]).mean(0)
            axes[1].plot(np.arange(1, len(ratio) + 1), ratio, color=f"C{i}", label=a)
        axes[1].set(xlabel="rollout batch", ylabel="drift lm_head / drift blocks (mean)",
                    title="Disproportionate Weight Divergence: lm_head vs blocks drift from the checkpoint")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{stem}_weight_change.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    del dr

    kmax = max(AN.k_of(a) for a in arms)
    ctrl = [a for a in arms if specs[a]["kind"] not in ("fixed",) and AN.k_of(a) == kmax]
    show = [a for a in arms if specs[a]["kind"] == "fixed" and AN.k_of(a) == kmax][:1] + ctrl[:0]
    shows = show + [a for a in ctrl if specs[a]["kind"] in ("dgg", "dkl", "sb3")][:3]
    fig, axes = plt.subplots(len(shows), 1, figsize=(12, 3.0 * max(len(shows), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], shows):
        r = next(r for r in runs if r["arm"] == name and r["seed"] == seed0)
        ups = r["updates"][: 20 * kmax]
        ax.plot([u.get("approx_kl", np.nan) for u in ups], lw=1, color="C2", label="k3 KL to rollout policy")
        ax2 = ax.twinx()
        ax2.plot([u["z"] if u["z"] is not None else np.nan for u in ups], lw=0.8, color="C0", label="z (main rule)")
        closed = [i for i, u in enumerate(ups) if u["closed"]]
        ax.scatter(closed, [ups[i].get("approx_kl", np.nan) for i in closed], color="C3", marker="x", zorder=3,
                   label="batch ended: update discarded")
        for i, u in enumerate(ups):
            if u["pass"] == 1 and i:
                ax.axvline(i - 0.5, color="0.88", lw=0.5, zorder=0)
        ax2.set_ylim(-3, 6)
        ax.set(yscale="symlog", xlabel="update (grey lines: new rollout batch; first 20 batches)", ylabel="k3 KL",
               title=f"{name}, seed {seed0}")
        ax2.set_ylabel("z (clipped to [-3, 6])")
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    paths.append(f"{stem}_gate.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- JSON

def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.5g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    if isinstance(obj, (np.floating,)):
        return _round(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def columns(updates: list[dict]) -> dict:
    """Per-update records as columns (a much smaller JSON); nested dicts become one column per key.  A key some
    records lack (e.g. gate_kl) is None there."""
    keys: list[str] = []
    for u in updates:
        for k, v in u.items():
            for kk in ([f"{k}.{x}" for x in v] if isinstance(v, dict) else [k]):
                if kk not in keys:
                    keys.append(kk)
    cols = {k: [] for k in keys}
    for u in updates:
        for key in keys:
            outer, _, inner = key.partition(".")
            v = u.get(outer)
            cols[key].append(v.get(inner) if inner and isinstance(v, dict) else (None if inner else v))
    return cols


def rows(cols: dict) -> list[dict]:
    """The inverse of columns (a None from a missing key stays None); JSON nulls of floats come back as nan."""
    n = len(next(iter(cols.values())))
    out = [{} for _ in range(n)]
    for key, values in cols.items():
        outer, _, inner = key.partition(".")
        for row, v in zip(out, values):
            if v is None and outer in ("grad_norm", "z", "approx_kl", "kl_step", "kl_rollout"):
                v = float("nan")
            if inner:
                row.setdefault(outer, {})[inner] = v
            else:
                row[outer] = v
    return out


def _write_json(res: dict, path: str) -> None:
    dump = dict(res, runs=[dict(r, updates=columns(r["updates"])) for r in res["runs"]])
    with open(path, "w") as f:
        json.dump(_round(dump), f, separators=(",", ":"))


def write_results(res: dict, out: str, stem_name: str, plots_on: bool) -> str:
    """Write the raw JSON of ``res`` into ``out`` first, then analyse it and write the JSON with the analysis,
    the plots and the md; returns the file stem.  When the analysis or a plot fails, the JSON stays (rerun
    the rest with --from-json) and the error propagates."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, stem_name)
    path = f"{stem}_results.json"
    res.pop("analysis", None)
    _write_json(res, path)  # the raw results first: nothing below can lose the run
    try:
        an = AN.analyse(res)
        res["analysis"] = an
        _write_json(res, path)
        with open(path) as f:  # the md reads what the JSON keeps (as a rerun from it would)
            kept = json.load(f)
        ra = reanalysis_of(kept)  # reanalysis.py's figures for the verdict, from the JSON as written
        an = kept["analysis"]
        _nan(an)
        plots = make_plots(res, an, stem) if plots_on else []
        write_markdown(res, an, f"{stem}_results.md", plots, ra)
    except Exception:
        print(f"writing the results failed after the run; its results are kept in {path}: rerun the analysis with "
              f"python benchmarks/rlvr_reuse.py --from-json {path} --out {out}", file=sys.stderr, flush=True)
        raise
    print("\n".join(["", "Verdict:"] + [f"- {x}" for x in headline(an, ra)] + [f"- {x}" for x in verdict_lines(an)]
                    + ["", "What was seen:"] + [f"- {x}" for x in findings(an, eval_label(ra))]))
    print(f"wrote {stem}_results.md, {path}" + (", " + ", ".join(plots) if plots else ""))
    return stem


def _nan(obj):
    """JSON nulls back to nan inside the analysis (in place)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if v is None and k not in ("threshold", "drop_batch", "lead", "best_fixed", "worst", "best"):
                obj[k] = float("nan")
            else:
                _nan(v)
    elif isinstance(obj, list):
        for v in obj:
            _nan(v)


def reanalyse(path: str, out: str, plots_on: bool) -> dict:
    """Rewrite the md, JSON and plots of a finished run from its JSON (no training)."""
    from .cli import stem_name

    with open(path) as f:
        res = json.load(f)
    res["runs"] = [dict(r, updates=rows(r["updates"])) for r in res["runs"]]
    for s in res["arm_specs"]:  # a JSON written before the KL arms
        s.setdefault("signal", {"fixed": "none", "rnd": "coin"}.get(s["kind"], "gradient"))
    res["reanalysed_by"] = f"python benchmarks/rlvr_reuse.py --from-json {path} --out {out}"
    write_results(res, out, stem_name(res["args"]), plots_on)
    return res
