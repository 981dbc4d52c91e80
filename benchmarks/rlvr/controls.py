"""The controls design of the small-task study, with the SmolLM2 study's definitions (benchmarks/rlvr/llm_plan.md;
llm.py's control_caps, llm_analysis.py's AUROC, bootstrap and paired functions are imported, not copied):

- controls of every adaptive arm A (arms.py: ``rep:A``, ``cap:A``): A's own per-batch applied passes on the same
  seed, permuted over the batches (seed 40000 + seed), or A's mean applied passes rounded, run as fixed per-batch
  caps with observer gates (runner.Caps);
- a fresh validation set (``--probe N``): N prompts disjoint from the evaluation set, never drawn in training (the
  warm-up and the rollouts redraw them: ``Excluding``); every fixed arm records its greedy accuracy on it before and
  after each pass (runner.run_arm: ``val_before``/``val_after``), so "this pass lowered validation accuracy" is a
  label of the update;
- the analysis (``analyse``): per-signal AUROC for "the pass hurt" with batch-bootstrap CIs (passes >= 2 of the
  fixed arms, pooled over seeds; the pass index is the baseline), each adaptive arm minus its replay and cap
  controls (paired by seed, 95% CI), minus the best fixed K chosen leave-one-seed-out, final accuracy = mean of the
  last 3 evaluations, AUC = mean of the accuracy curve.  Written to ``<stem>_controls.{json,md}`` beside the
  results (cli.main; only for runs that have controls or the validation set, so older results are left as they are).
"""
from __future__ import annotations

import json
import math
import os
import statistics

import torch

from . import arms as A
from . import llm
from . import llm_analysis as LA

PROBE_SEED = 23456  # the validation set's generator (no run seed, warm-up seed or evaluation seed uses it)


# ----------------------------------------------------------------------------- controls' caps

def applied_per_batch(run: dict, batches: int) -> list[int]:
    """Updates applied (not discarded by a close, a KL stop, the coin or a 0 cap) in each rollout batch."""
    n = [0] * batches
    for u in run["updates"]:
        n[u["batch"]] += not u["closed"]
    return n


def control_caps(kind: str, source_run: dict, seed: int, batches: int) -> list[int]:
    """A rep:/cap: control's per-batch caps from its source unit on ``seed``: llm.control_caps, the SmolLM2
    study's rule (rep: the applied passes permuted with seed 40000 + seed; cap: their mean, rounded, >= 1)."""
    applied = applied_per_batch(source_run, batches)
    return llm.control_caps(kind, {"batches": [{"applied_passes": n} for n in applied]}, seed)


# ----------------------------------------------------------------------------- the fresh validation set

def prompt_keys(prompt: torch.Tensor) -> list[tuple]:
    return [tuple(r) for r in prompt.tolist()]


def fresh_probe(task, n: int, exclude: torch.Tensor, seed: int = PROBE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct problems whose prompts are not in ``exclude`` (the evaluation set's prompts), drawn from the
    task with their own generator.  Raises ValueError when the task has too few distinct prompts."""
    gen = torch.Generator().manual_seed(seed)
    seen = set(prompt_keys(exclude))
    ps, ans = [], []
    for _ in range(200):
        p, a = task.sample(max(n, 256), gen)
        for key, row_p, row_a in zip(prompt_keys(p), p, a):
            if key not in seen:
                seen.add(key)
                ps.append(row_p)
                ans.append(row_a)
                if len(ps) == n:
                    return torch.stack(ps), torch.stack(ans)
    raise ValueError(f"--probe {n}: the task has only {len(ps)} distinct prompts outside the evaluation set")


class Excluding:
    """The task, with the given prompts never drawn: ``sample`` (and ``pretrain_sample``, where the task has one)
    redraws the rows whose prompt is excluded, from the same generator.  Without a collision the draws are the
    task's own, so the streams change only where an excluded prompt came up."""

    def __init__(self, task, exclude: torch.Tensor) -> None:
        self.task = task
        self.excluded = set(prompt_keys(exclude))
        if hasattr(task, "pretrain_sample"):
            self.pretrain_sample = lambda n, gen: self._redraw(task.pretrain_sample, n, gen)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, n: int, gen: torch.Generator):
        return self._redraw(self.task.sample, n, gen)

    def _redraw(self, draw, n, gen):
        p, a = draw(n, gen)
        for _ in range(10_000):
            bad = torch.tensor([k in self.excluded for k in prompt_keys(p)], dtype=torch.bool)
            if not bool(bad.any()):
                return p, a
            p2, a2 = draw(int(bad.sum()), gen)
            p[bad], a[bad] = p2, a2
        raise RuntimeError("the task draws almost nothing but excluded prompts")


# ----------------------------------------------------------------------------- analysis

def applies(res: dict) -> bool:
    """A run of this design: it has rep:/cap: controls or the per-pass validation measurement."""
    return (any(s["kind"] in A.CONTROL_KINDS for s in res.get("arm_specs", []))
            or any("val_start" in r for r in res.get("runs", [])))


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def to_units(res: dict) -> list[dict]:
    """The runs as SmolLM2-study units (llm.run_unit's JSON shape), so llm_analysis's functions read them: curve =
    the accuracies, per batch the applied passes and per pass the signals under llm.py's names.  z, z_energy and
    z_increment are the paper rule's (the observer's for an ungated arm, the arm's own gate's otherwise)."""
    batches = res["args"]["batches"]
    out = []
    for r in res["runs"]:
        by_b: dict[int, list] = {b: [] for b in range(batches)}
        for u in r["updates"]:
            own = "paper_z" not in u or u.get("paper_z") is None
            row = {"pass_": u["pass"], "closed": bool(u["closed"]),
                   "z": _num(u["z"] if own else u["paper_z"]),
                   "z_energy": _num(u.get("z_energy") if own else u["paper_z_energy"]),
                   "z_increment": _num(u.get("z_increment") if own else u["paper_z_increment"]),
                   "energy": _num(u.get("energy")), "head_grad_norm": _num(u.get("grad_norm")),
                   "grad_norm": _num(u.get("global_grad_norm")), "head_share": _num(u.get("head_share")),
                   "kl_k3": _num(u.get("approx_kl")), "clipfrac": _num(u.get("clip_frac"))}
            row["zero_grad"] = row["energy"] == 0.0  # every group had equal rewards
            if u.get("val_after") is not None and u.get("val_before") is not None:
                row["probe_before"], row["probe_after"] = float(u["val_before"]), float(u["val_after"])
            by_b[u["batch"]].append(row)
        out.append({"arm": r["arm"], "seed": r["seed"], "curve": [c[2] for c in r["curve"]],
                    "batches": [{"batch": b, "applied_passes": sum(not p["closed"] for p in ps), "passes": ps}
                                for b, ps in by_b.items()]})
    return out


def auroc(units: list[dict], min_pass: int = 2, drop_zero_grad: bool = False, drop_z_placeholder: bool = False,
          baseline: bool = False) -> dict:
    """llm_analysis.auroc_table over llm_analysis.pass_rows of ``units`` (passes with a non-finite signal left
    out, counted in ``dropped_non_finite``); ``baseline``: also each signal minus the pass index (minus_pass_index).
    A signal that "knows" in the other direction (AUROC below 0.5) is as useful as one above: 1 - AUROC."""
    rows, dropped = LA.finite_rows(LA.pass_rows(units, min_pass=min_pass, drop_zero_grad=drop_zero_grad,
                                                drop_z_placeholder=drop_z_placeholder))
    t = LA.auroc_table(rows)
    t["dropped_non_finite"] = dropped
    if baseline:
        t["minus_pass_index"] = LA.minus_pass_index(rows)
    return t


def analyse(res: dict) -> dict:
    units = to_units(res)
    specs = {s["name"]: s for s in res["arm_specs"]}
    n_warm = int(res["args"].get("warmups", 1) or 1)
    by: dict[str, dict] = {}
    for u in units:
        by.setdefault(u["arm"], {})[u["seed"]] = u
    arms = {}
    for name in res["arm_names"]:
        seeds = by.get(name, {})
        arms[name] = {"kind": specs[name]["kind"], "source": specs[name].get("source"), "seeds": sorted(seeds),
                      "start": {s: u["curve"][0] for s, u in seeds.items()},
                      "final": {s: LA.final_acc(u) for s, u in seeds.items()},
                      "auc": {s: LA.auc(u) for s, u in seeds.items()},
                      "mean_applied_passes": {s: LA.mean_applied(u) for s, u in seeds.items()},
                      "warmup": {s: s % n_warm for s in seeds}}
    k = {a: int(a.split("K=")[1].split()[0]) for a in arms}
    fixed = sorted((a for a in arms if arms[a]["kind"] == "fixed"), key=lambda a: k[a])
    out = {"final_last": LA.LAST, "n_boot": LA.N_BOOT, "warmups": n_warm, "arms": arms, "fixed": fixed}
    if "fixed K=1" in arms:
        out["reuse_vs_k1"] = {a: {"final": LA.paired(arms[a]["final"], arms["fixed K=1"]["final"]),
                                  "auc": LA.paired(arms[a]["auc"], arms["fixed K=1"]["auc"])}
                              for a in fixed if a != "fixed K=1"}
    fixed_units = [u for u in units if u["arm"] in fixed]
    out["auroc"] = auroc(fixed_units, baseline=True)
    out["auroc_without_zero_grad"] = auroc(fixed_units, drop_zero_grad=True, baseline=True)
    out["auroc_z_measured"] = auroc(fixed_units, drop_z_placeholder=True, baseline=True)
    out["auroc_all_passes"] = auroc(fixed_units, min_pass=1)
    out["auroc_by_arm"] = {}  # point estimates only (the pooled tables carry the CIs)
    for a in fixed:
        rows, _ = LA.finite_rows(LA.pass_rows([u for u in fixed_units if u["arm"] == a]))
        if k[a] > 1:
            labels = [h for _, _, h in rows]
            out["auroc_by_arm"][a] = {"n_passes": len(rows), "n_hurt": sum(labels), "signals": {
                sig: {"auroc": LA.auroc([float(r[sig]) for _, r, _ in rows], labels)} for sig in LA.SIGNALS}}
    adaptive = {}
    for a, v in arms.items():
        if v["kind"] not in A.CONTROL_SOURCES:
            continue
        c = {"mean_applied_passes": v["mean_applied_passes"]}
        for kind, label in (("rep", "replay"), ("cap", "cap")):
            ctl = f"{label} of {a}"
            if ctl in arms:
                c[f"minus_{kind}"] = {m: LA.paired(v[m], arms[ctl][m]) for m in ("final", "auc")}
                c[f"{kind}_mean_applied_passes"] = arms[ctl]["mean_applied_passes"]
        if fixed:
            c["minus_best_fixed_loso"] = {m: LA.loso_best_fixed(v[m], {f: arms[f][m] for f in fixed})
                                          for m in ("final", "auc")}
        adaptive[a] = c
    out["adaptive"] = adaptive
    return out


# ----------------------------------------------------------------------------- markdown

def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{nd}f}" if x < 0 else f"{x:.{nd}f}"


def _ci(p: dict | None) -> str:
    if not p or p.get("mean") is None:
        return "not measured"
    ci = f" (95% CI {_f(p['ci95'][0])}..{_f(p['ci95'][1])})" if p.get("ci95") else ""
    return f"{_f(p['mean'])}{ci}, {len(p['seeds'])} seeds"


def verdict(an: dict) -> list[str]:
    lines = [LA.knowing_line(an["auroc"], "validation", an), LA.stopping_line({
        a: (c.get("minus_rep", {}).get("final"), c.get("minus_best_fixed_loso", {}).get("final", {}).get("paired"))
        for a, c in an["adaptive"].items()})]
    for a, c in an["adaptive"].items():
        lo = c.get("minus_best_fixed_loso", {}).get("final", {}).get("paired")
        lines.append(f"`{a}`: final accuracy minus its replay control {_ci(c.get('minus_rep', {}).get('final'))}; "
                     f"minus its cap control {_ci(c.get('minus_cap', {}).get('final'))}; minus the best fixed K "
                     f"chosen leave-one-seed-out {_ci(lo)}.")
    return lines


def markdown(res: dict, an: dict) -> str:
    a = res["args"]
    L = ["# RLVR rollout reuse: replay and cap controls, per-pass validation, AUROCs", "",
         f"Task {a.get('task', 'addition')}{' (tied lm_head)' if a.get('tied') else ''}; command "
         f"`{res['env']['command']}`. Definitions as in the SmolLM2 study (benchmarks/rlvr/llm_plan.md; "
         "llm_analysis.py's functions): final accuracy = mean of the last "
         f"{an['final_last']} evaluations; AUC = mean of the accuracy curve (start included); \"a pass hurt\" = "
         f"greedy accuracy on the {a.get('probe', 0)} validation prompts (disjoint from the evaluation set, never "
         "drawn in training) strictly lower after the pass than before it; AUROC CIs resample rollout batches "
         f"({an['n_boot']} draws); paired differences: t-interval over seeds. Warm-up checkpoints: {an['warmups']} "
         "(seed s starts from checkpoint s mod that, each warm-up with its own seed).", ""]
    L += [f"- {x}" for x in verdict(an)] + [""]
    L += ["## Arms", "", "| arm | seeds | start | final (mean of last 3) | AUC | applied passes / batch |",
          "|---|---|---|---|---|---|"]

    def m(d):
        return statistics.fmean(d.values()) if d else None

    for name, v in an["arms"].items():
        L.append(f"| {name} | {len(v['seeds'])} | {_f(m(v['start']))} | {_f(m(v['final']))} | {_f(m(v['auc']))} | "
                 f"{_f(m(v['mean_applied_passes']), 2)} |")
    if an.get("reuse_vs_k1"):
        L += ["", "## Reuse against fixed K=1 (paired by seed)", "", "| arm | final minus K=1 | AUC minus K=1 |",
              "|---|---|---|"]
        for name, v in an["reuse_vs_k1"].items():
            L.append(f"| {name} | {_ci(v['final'])} | {_ci(v['auc'])} |")
    if an["adaptive"]:
        L += ["", "## Adaptive arms against their controls and the best fixed K (chosen leave-one-seed-out)", "",
              "| arm | applied passes / batch (arm; replay; cap) | final minus replay | final minus cap | final minus "
              "best fixed (LOSO) | AUC minus replay | AUC minus best fixed (LOSO) |", "|---|---|---|---|---|---|---|"]
        for name, c in an["adaptive"].items():
            passes = "; ".join(_f(m(c.get(key, {})), 2) for key in
                               ("mean_applied_passes", "rep_mean_applied_passes", "cap_mean_applied_passes"))
            lo = c.get("minus_best_fixed_loso", {})
            L.append(f"| {name} | {passes} | {_ci(c.get('minus_rep', {}).get('final'))} | "
                     f"{_ci(c.get('minus_cap', {}).get('final'))} | {_ci(lo.get('final', {}).get('paired'))} | "
                     f"{_ci(c.get('minus_rep', {}).get('auc'))} | {_ci(lo.get('auc', {}).get('paired'))} |")
    for key, title in (("auroc", "passes >= 2"), ("auroc_without_zero_grad", "passes >= 2, zero-gradient steps left "
                       "out"), ("auroc_z_measured", "passes >= 2, the observer's placeholder z (0 while its window "
                       "fills) left out"), ("auroc_all_passes", "every pass")):
        t = an[key]
        L += ["", f"## AUROC for \"this pass lowered the validation accuracy\" ({title}; fixed arms pooled)", "",
              f"{t['n_passes']} passes, {t['n_hurt']} hurt, {t['n_batches']} batches"
              + (f", {t['dropped_non_finite']} passes with a non-finite signal left out" if t["dropped_non_finite"]
                 else "") + ".", "", "| signal | AUROC | 95% CI | CI excludes 0.5 |", "|---|---|---|---|"]
        mp = t.get("minus_pass_index")
        if mp:
            L[-2:] = ["| signal | AUROC | 95% CI | CI excludes 0.5 | minus the pass index's AUROC (95% CI) |",
                      "|---|---|---|---|---|"]
        for s, v in t["signals"].items():
            ci = f"{v['ci95'][0]:.2f}..{v['ci95'][1]:.2f}" if v["ci95"] else "n/a"
            row = f"| {s} | {_f(v['auroc'], 2)} | {ci} | {'yes' if v['knows'] else 'no'} |"
            if mp:
                d = mp.get(s)
                row += (f" {_f(d['diff'], 2)} ({d['ci95'][0]:+.2f}..{d['ci95'][1]:+.2f}) |" if d and d["ci95"]
                        else " (baseline) |" if s == "pass_" else " n/a |")
            L.append(row)
    if an["auroc_by_arm"]:
        L += ["", "## AUROC per fixed arm (passes >= 2)", "",
              "| arm | passes | hurt | " + " | ".join(LA.SIGNALS) + " |", "|---|---|---|" + "---|" * len(LA.SIGNALS)]
        for name, t in an["auroc_by_arm"].items():
            L.append(f"| {name} | {t['n_passes']} | {t['n_hurt']} | "
                     + " | ".join(_f(t["signals"][s]["auroc"], 2) for s in LA.SIGNALS) + " |")
    return "\n".join(L) + "\n"


def write(res: dict, out: str, stem_name: str) -> list[str]:
    """<out>/<stem>_controls.json and .md from ``res`` (the results as their JSON keeps them: report.rows)."""
    from . import report

    an = analyse(res)
    stem = os.path.join(out, f"{stem_name}_controls")
    with open(stem + ".json", "w") as f:
        json.dump(report._round(an), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res, an))
    return [stem + ".md", stem + ".json"]


def write_from_json(path: str, out: str, stem_name: str) -> list[str]:
    """The same from a results JSON on disk (what a rerun of the analysis reads); nothing for an older design."""
    from . import report

    with open(path) as f:
        res = json.load(f)
    if not applies(res):
        return []
    res["runs"] = [dict(r, updates=report.rows(r["updates"])) for r in res["runs"]]
    return write(res, out, stem_name)
