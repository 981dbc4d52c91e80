"""Analysis of a finished run: per-arm summaries, paired per-seed comparisons, sample efficiency (rollouts to
reach fixed K=1's final accuracy), the premise (does reuse harm?), Disproportionate Weight Divergence, whether
z or the lm_head energy warns of an accuracy drop (and how early), and the verdict lines."""
from __future__ import annotations

import math

import numpy as np

SMOOTH = 5  # evaluations in the trailing mean used for "rollouts to reach K=1's final accuracy"
Z_SPLIT = 0.3  # the z level the signal analysis splits batches at (the paper's range is 0.1-0.5)
SURGE_Z = 2.0  # a batch's lm_head energy (or increment) "surges" when its z against the 8 batches before is above
SURGE_WINDOW = 8
DROP = 0.1  # an accuracy drop: the 3-evaluation trailing mean falls this far below its running maximum
LEAD_MAX = 10  # a surge counts as a warning when it comes at most this many batches before the drop
LAGS = (0, 1, 2, 3, 5)


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    ry = np.argsort(np.argsort(y, kind="stable"), kind="stable")
    return float(np.corrcoef(rx, ry)[0, 1])


def smooth(acc: list[float], n: int = SMOOTH) -> list[float]:
    """Trailing mean over the last n evaluations (fewer at the start)."""
    return [float(np.mean(acc[max(0, i - n + 1):i + 1])) for i in range(len(acc))]


def first_reach(curve, target: float, n: int = SMOOTH) -> int | None:
    """The first evaluation index >= 1 where the trailing n-mean of accuracy is at least ``target``."""
    acc = smooth([c[2] for c in curve], n)
    return next((i for i in range(1, len(curve)) if acc[i] >= target - 1e-9), None)


def rollouts_to_reach(curve, base_curve, n: int = SMOOTH, frac: float = 1.0) -> dict | None:
    """The paper's sample-efficiency measure on one seed: rollouts until ``curve`` (smoothed) reaches the final
    smoothed accuracy of ``base_curve`` (fixed K=1), and the ratio to what the base needed.  None when the base
    did not end above its start (the target means nothing) ; {"reached": False} when the arm never got there.
    ``frac`` < 1: the target is that fraction of the base's gain over its start (0.5: half-way)."""
    final = smooth([c[2] for c in base_curve], n)[-1]
    start = base_curve[0][2]
    if not final > start:
        return None
    target = start + frac * (final - start)
    i1, i = first_reach(base_curve, target, n), first_reach(curve, target, n)
    if i is None:
        return {"reached": False, "target": target}
    return {"reached": True, "target": target, "rollouts": curve[i][0], "seconds": curve[i][1],
            "rollout_ratio": curve[i][0] / base_curve[i1][0],  # < 1: fewer rollouts than K=1 needed
            "speedup_rollouts": base_curve[i1][0] / curve[i][0],
            "speedup_seconds": base_curve[i1][1] / max(curve[i][1], 1e-9)}


def verdict(diffs) -> str:
    diffs = np.asarray(diffs, float)
    n = len(diffs)
    need = max(3, math.ceil(0.8 * n))
    if n < 3:
        return "too few seeds for a verdict"
    if (diffs > 0).all():
        return "helps"
    if (diffs < 0).all():
        return "hurts"
    if diffs.mean() > 0 and (diffs > 0).sum() >= need:
        return "leans better"
    if diffs.mean() < 0 and (diffs < 0).sum() >= need:
        return "leans worse"
    return "no consistent difference"


def k_of(name: str) -> int:
    return int(name.split("K=")[1].split()[0])


def _rate_at(rates: dict, threshold: float) -> float | None:
    near = [(abs(float(k) - threshold), v) for k, v in rates.items()]
    best = min(near, default=None, key=lambda kv: kv[0])
    return best[1] if best is not None and best[0] <= 1e-4 * max(abs(threshold), 1e-12) else None


def _blocks(groups) -> list[str]:
    return [k for k in groups if k.startswith("block")]


def _surges(x: np.ndarray) -> np.ndarray:
    """Per index: z of x[i] against x[i-W:i] (nan before W values)."""
    z = np.full(len(x), np.nan)
    for i in range(SURGE_WINDOW, len(x)):
        w = x[i - SURGE_WINDOW:i]
        if np.all(np.isfinite(w)) and np.isfinite(x[i]):
            z[i] = (x[i] - w.mean()) / (w.std() + 1e-12)
    return z


def batch_signals(run, batches: int) -> dict[str, np.ndarray]:
    """Per rollout batch: the lm_head gradient energy (mean over the batch's passes of norm^2), its pass-1 value,
    and the increment (energy minus the previous batch's)."""
    e = np.full(batches, np.nan)
    e1 = np.full(batches, np.nan)
    by_b: dict[int, list] = {}
    for u in run["updates"]:
        g = u["grad_norm"]
        if g is not None and np.isfinite(g):
            by_b.setdefault(u["batch"], []).append((u["pass"], g * g))
    for b, xs in by_b.items():
        e[b] = np.mean([x for _, x in xs])
        e1[b] = next((x for p, x in xs if p == 1), np.nan)
    inc = np.concatenate([[np.nan], np.diff(e)])
    return {"energy": e, "energy_pass1": e1, "increment": inc}


def lead_time(runs_of_arm: list[dict], batches: int) -> dict:
    """Does the lm_head energy (or its increment) surge before held-out accuracy drops?  Lagged Spearman within
    the arm (signal at batch b vs the accuracy change over batch b+lag), and, per seed, the first drop of the
    smoothed accuracy by DROP below its running max and the surges (z > SURGE_Z) in the LEAD_MAX batches before."""
    out = {"lagged": {}, "events": {}}
    for sig in ("energy", "energy_pass1", "increment"):
        lag_rho = {}
        for lag in LAGS:
            xs, ys = [], []
            for r in runs_of_arm:
                s = batch_signals(r, batches)[sig]
                acc = np.array([c[2] for c in r["curve"]])
                dacc = acc[1:] - acc[:-1]  # dacc[b]: change over batch b
                for b in range(batches - lag):
                    xs.append(s[b])
                    ys.append(dacc[b + lag])
            lag_rho[lag] = {"rho": spearman(xs, ys), "n": int(np.isfinite(np.asarray(xs, float)).sum())}
        out["lagged"][sig] = lag_rho
    for sig in ("energy", "increment"):
        drops, warned, leads, surge_batches, all_batches = 0, 0, [], 0, 0
        per_seed = []
        for r in runs_of_arm:
            s = batch_signals(r, batches)[sig]
            z = _surges(s)
            surge = np.nan_to_num(z, nan=-np.inf) > SURGE_Z
            surge_batches += int(surge.sum())
            all_batches += int(np.isfinite(z).sum())
            acc = smooth([c[2] for c in r["curve"]], 3)
            run_max, drop = -1.0, None
            for i in range(1, len(acc)):
                run_max = max(run_max, acc[i - 1])
                if acc[i] <= run_max - DROP:
                    drop = i - 1  # the batch whose update led to the evaluation that shows the drop
                    break
            rec = {"seed": r["seed"], "drop_batch": drop, "surges": [int(b) for b in np.nonzero(surge)[0]]}
            if drop is not None:
                drops += 1
                before = [b for b in rec["surges"] if drop - LEAD_MAX <= b <= drop]
                if before:
                    warned += 1
                    leads.append(drop - before[0])
                rec["lead"] = (drop - before[0]) if before else None
            per_seed.append(rec)
        p = surge_batches / all_batches if all_batches else float("nan")
        out["events"][sig] = {
            "drops": drops, "warned": warned, "lead_median": float(np.median(leads)) if leads else float("nan"),
            "surge_rate": p, "chance_warned": 1 - (1 - p) ** (LEAD_MAX + 1) if p == p else float("nan"),
            "per_seed": per_seed}
    return out


def dwd(runs, arms, specs, fixed) -> dict:
    """Disproportionate Weight Divergence: per reuse pass in the fixed arm with the most reuse (relative change
    per update), and per fixed arm the drift from the checkpoint at the end (||W_end - W_0|| / ||W_0||)."""
    out = {}
    if not fixed:
        return out
    big = max(fixed, key=k_of)
    ups = [u for r in runs if r["arm"] == big for u in r["updates"]]
    groups = list(runs[0]["updates"][0]["rel_change"])
    blocks = _blocks(groups)
    by_pass = {}
    for k in range(1, k_of(big) + 1):
        us = [u for u in ups if u["pass"] == k]
        if not us:
            continue
        head = float(np.mean([u["rel_change"]["lm_head"] for u in us]))
        blk = float(np.mean([np.mean([u["rel_change"][b] for b in blocks]) for u in us]))
        by_pass[k] = {
            "lm_head": head, "blocks": blk, "embed": float(np.mean([u["rel_change"]["embed"] for u in us])),
            "ratio": head / blk if blk > 0 else float("nan"),
            "grad_norm": float(np.mean([u["grad_norm"] for u in us])),
            "kl_step": float(np.mean([u["kl_step"] for u in us])),
            "kl_rollout": float(np.mean([u["kl_rollout"] for u in us])),
            "approx_kl": float(np.mean([u.get("approx_kl", float("nan")) for u in us])),
            "clip_frac": float(np.mean([u["clip_frac"] for u in us])),
        }
    out = {"arm": big, "by_pass": by_pass, "drift": {}}
    for a in arms:
        rs = [r for r in runs if r["arm"] == a and r.get("drift")]
        if not rs:
            continue
        end = {g: float(np.mean([r["drift"][-1][g] for r in rs])) for g in groups}
        blk = float(np.mean([end[b] for b in blocks]))
        half = len(rs[0]["drift"]) // 2
        mid = {g: float(np.mean([r["drift"][half][g] for r in rs])) for g in groups}
        mblk = float(np.mean([mid[b] for b in blocks]))
        out["drift"][a] = {"end": end, "blocks_end": blk, "ratio_end": end["lm_head"] / blk if blk > 0 else float("nan"),
                           "ratio_mid": mid["lm_head"] / mblk if mblk > 0 else float("nan"), "kind": specs[a]["kind"]}
    return out


def analyse(res: dict) -> dict:
    runs, arms = res["runs"], res["arm_names"]
    specs = {s["name"]: s for s in res["arm_specs"]}
    batches = res["args"]["batches"]
    out = {"arms": {}, "dwd": {}, "signal": {}, "versus": [], "efficiency": {}, "premise": {}, "calibration": [],
           "lead": {}}
    for name in arms:
        rs = sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"])
        final = np.array([r["curve"][-1][2] for r in rs])
        final_s = np.array([smooth([c[2] for c in r["curve"]])[-1] for r in rs])
        mean_acc = np.array([np.mean([c[2] for c in r["curve"][1:]]) for r in rs])
        ups = [u for r in rs for u in r["updates"]]
        closes = [u["pass"] for u in ups if u["closed"]]
        ended = [u for u in ups if u["closed"] or u.get("by") == "kl-after"]
        nobwd = sum(1 for u in ups if u["closed"] and (u["grad_norm"] is None or not np.isfinite(u["grad_norm"])))
        out["arms"][name] = {
            "seeds": len(rs), "kind": specs[name]["kind"], "signal": specs[name].get("signal", ""),
            "rule": specs[name]["rule"] if specs[name]["kind"] in ("dgg", "cal") else "",
            "threshold": specs[name]["threshold"],
            "start_acc": float(np.mean([r["curve"][0][2] for r in rs])),
            "final_acc_mean": float(final.mean()), "final_acc_sd": float(final.std()),
            "final_acc_min": float(final.min()), "final_acc_max": float(final.max()),
            "final_smooth_mean": float(final_s.mean()),
            "mean_acc_mean": float(mean_acc.mean()), "mean_acc_sd": float(mean_acc.std()),
            "mean_acc_min": float(mean_acc.min()), "mean_acc_max": float(mean_acc.max()),
            "best_acc_mean": float(np.mean([max(c[2] for c in r["curve"]) for r in rs])),
            "updates_per_seed": len(ups) / len(rs),
            "applied_updates_per_seed": (len(ups) - len(closes)) / len(rs),
            "backward_per_seed": (len(ups) - nobwd) / len(rs),
            "closed_per_seed": len(closes) / len(rs),
            "close_rate": len(closes) / (len(rs) * batches),
            "ended_early_rate": len(ended) / (len(rs) * batches),
            "close_rate_per_seed": [sum(u["closed"] for u in r["updates"]) / batches for r in rs],
            "mean_close_pass": float(np.mean(closes)) if closes else float("nan"),
            "close_at_pass2": (sum(p == 2 for p in closes) / len(closes)) if closes else float("nan"),
            "passes_per_batch": len(ups) / len(rs) / batches,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "unit_seconds_mean": float(np.mean([r.get("unit_seconds", float("nan")) for r in rs])),
            "final_acc_per_seed": final.tolist(),
            "final_smooth_per_seed": final_s.tolist(),
        }
    fixed = [a for a in arms if specs[a]["kind"] == "fixed"]
    others = [a for a in arms if specs[a]["kind"] != "fixed"]
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    # sample efficiency (the paper's way): rollouts until the smoothed accuracy reaches K=1's final smoothed level
    if "fixed K=1" in arms:
        out["efficiency"], out["efficiency_excluded_seeds"] = _efficiency(arms, seeds, by_seed, 1.0)
        out["efficiency_half"], _ = _efficiency(arms, seeds, by_seed, 0.5)
    # the premise: does the most reuse do harm?
    if fixed:
        big = max(fixed, key=k_of)
        for ref in ("fixed K=1", "fixed K=2"):
            if ref in arms and ref != big:
                d = np.array(out["arms"][big]["final_acc_per_seed"]) - np.array(out["arms"][ref]["final_acc_per_seed"])
                out["premise"][ref] = {"arm": big, "below": int((d < 0).sum()), "seeds": len(d),
                                       "diff_mean": float(d.mean()), "diff_min": float(d.min()),
                                       "diff_max": float(d.max())}
    out["dwd"] = dwd(runs, arms, specs, fixed)
    # does z warn of harm?  Fixed arms with reuse, each observer rule: max z over passes >= 2 vs the batch's
    # held-out accuracy change (a useful warning would be clearly negative)
    reuse_arms = [a for a in fixed if k_of(a) > 1]
    ups = [u for r in runs if r["arm"] in reuse_arms for u in r["updates"]]
    pairs_same = [(u["grad_norm"], u["kl_step"]) for u in ups]
    pairs_next = []
    rules = list(ups[0]["obs_z"]) if ups and "obs_z" in ups[0] else []
    per_rule = {q: ([], []) for q in rules}
    per_rule_arm = {(q, a): ([], []) for q in rules for a in reuse_arms}
    for r in runs:
        if r["arm"] not in reuse_arms:
            continue
        for b in range(batches):
            us = [u for u in r["updates"] if u["batch"] == b]
            pairs_next += [(x["grad_norm"], y["kl_step"]) for x, y in zip(us, us[1:])]
            dacc = r["curve"][b + 1][2] - r["curve"][b][2]
            for q in rules:
                zs = [u["obs_z"][q] for u in us if u["pass"] > 1]
                if zs and any(z != 0.0 for z in zs):  # z is 0 until the window is full
                    for lists in (per_rule[q], per_rule_arm[(q, r["arm"])]):
                        lists[0].append(max(zs))
                        lists[1].append(dacc)
    out["signal"] = {
        "arms": reuse_arms,
        "spearman_norm_vs_kl_same_update": spearman(*zip(*pairs_same)) if pairs_same else float("nan"),
        "spearman_norm_vs_kl_next_update": spearman(*zip(*pairs_next)) if pairs_next else float("nan"),
        "rules": {},
    }
    for q, (maxz, dacc) in per_rule.items():
        fired = [d for d, z in zip(dacc, maxz) if z > Z_SPLIT]
        quiet = [d for d, z in zip(dacc, maxz) if z <= Z_SPLIT]
        out["signal"]["rules"][q] = {
            "spearman_maxz_vs_batch_dacc": spearman(maxz, dacc), "batches": len(dacc),
            "within_arm": {a: spearman(*per_rule_arm[(q, a)]) for a in reuse_arms},
            "within_arm_batches": {a: len(per_rule_arm[(q, a)][0]) for a in reuse_arms},
            "over": len(fired), "dacc_over": float(np.mean(fired)) if fired else float("nan"),
            "at_most": len(quiet), "dacc_at_most": float(np.mean(quiet)) if quiet else float("nan"),
        }
    # the paper's observation: does the lm_head energy (or its increment) surge before accuracy drops?
    for a in fixed:
        out["lead"][a] = lead_time([by_seed[(a, s)] for s in seeds if (a, s) in by_seed], batches)
    for c in res.get("calibration", []):
        obs = [_rate_at(by_seed[(f"fixed K={c['max_reuse']}", s)].get("close_rates", {}).get(c["rule"], {}),
                        c["threshold"]) for s in seeds if (f"fixed K={c['max_reuse']}", s) in by_seed]
        obs = [o for o in obs if o is not None]
        out["calibration"].append({**c, "observer_rate_eval_seeds": obs,
                                   "gated_rate_per_seed": out["arms"][c["arm"]]["close_rate_per_seed"]})
    # every non-fixed arm against fixed reuse at its max reuse, single use, the best fixed arm and the coin
    best_fixed = max(fixed, key=lambda a: out["arms"][a]["final_acc_mean"]) if fixed else None
    controls = [a for a in arms if specs[a]["kind"] == "rnd"]
    for name in others:
        refs = [f"fixed K={k_of(name)}", "fixed K=1", best_fixed]
        if specs[name]["kind"] != "rnd":
            refs += [c for c in controls if k_of(c) == k_of(name)]
        for other in dict.fromkeys(x for x in refs if x in out["arms"]):
            a, b = out["arms"][name], out["arms"][other]
            d_final = np.array(a["final_acc_per_seed"]) - np.array(b["final_acc_per_seed"])
            out["versus"].append({
                "dgg": name, "vs": other, "best_fixed": other == best_fixed,
                "final_acc_diff_mean": float(d_final.mean()), "final_acc_diff_min": float(d_final.min()),
                "final_acc_diff_max": float(d_final.max()), "wins": int((d_final > 0).sum()),
                "losses": int((d_final < 0).sum()), "seeds": len(d_final),
                "mean_acc_diff": a["mean_acc_mean"] - b["mean_acc_mean"],
                "updates_ratio": a["applied_updates_per_seed"] / max(b["applied_updates_per_seed"], 1e-9),
                "verdict": verdict(d_final),
            })
    out["best_fixed"] = best_fixed
    # how much of the most reuse's harm each arm at that reuse recovers
    if fixed:
        big = max(fixed, key=k_of)
        lo, hi = out["arms"][big]["final_acc_mean"], out["arms"][best_fixed]["final_acc_mean"]
        out["recovered"] = {n: ((out["arms"][n]["final_acc_mean"] - lo) / (hi - lo) if hi - lo > 1e-9 else float("nan"))
                            for n in others if k_of(n) == k_of(big)}
        out["recovered_ref"] = {"worst": big, "best": best_fixed}
    out["by_signal"] = _by_signal(out, specs, others)
    return out


def _efficiency(arms, seeds, by_seed, frac: float) -> tuple[dict, list]:
    eff, excluded = {}, []
    for name in arms:
        per = []
        for s in seeds:
            e = rollouts_to_reach(by_seed[(name, s)]["curve"], by_seed[("fixed K=1", s)]["curve"], frac=frac)
            if e is None:
                if s not in excluded:
                    excluded.append(s)
                continue
            per.append(dict(e, seed=s))
        got = [h for h in per if h["reached"]]
        e = {"reached": len(got), "seeds": len(per), "per_seed": per}
        if got:
            for key in ("rollouts", "seconds", "rollout_ratio", "speedup_rollouts", "speedup_seconds"):
                v = np.array([h[key] for h in got], float)
                e[key + "_median"], e[key + "_min"], e[key + "_max"] = (float(np.median(v)), float(v.min()),
                                                                      float(v.max()))
        eff[name] = e
    return eff, excluded


def _by_signal(an, specs, others) -> dict:
    """Per signal (kl, gradient, gradient+kl, coin): its best arm by mean final accuracy, and whether any arm of
    it is higher than the best fixed arm on most seeds (without tuning K: every such arm runs at max reuse 8)."""
    out = {}
    for n in others:
        if specs[n]["kind"] in ("rep", "cap"):  # a control of an adaptive arm is no signal of its own
            continue
        sig = specs[n].get("signal") or specs[n]["kind"]
        out.setdefault(sig, []).append(n)
    res = {}
    best_fixed = an["best_fixed"]
    for sig, names in out.items():
        best = max(names, key=lambda n: an["arms"][n]["final_acc_mean"])
        beats = [v["dgg"] for v in an["versus"] if v["dgg"] in names and v["vs"] == best_fixed
                 and v["verdict"] in ("helps", "leans better")]
        res[sig] = {"arms": names, "best": best, "best_final": an["arms"][best]["final_acc_mean"], "beats_best_fixed": beats}
    return res
