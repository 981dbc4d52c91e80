"""The README's and the demo's figures about the studies, computed from the committed JSONs, so that a test can
check the text against them (tests/test_claims.py) and nothing is typed by hand:

- ``knowing_table()``: the README's table of both questions across the four settings (the small tasks' controls
  design, benchmarks/results/controls/, and the SmolLM2 study, benchmarks/results/llm_study.json);
- ``figures()``: the few numbers the README's introduction and the demo's closing lines quote.

    python benchmarks/rlvr/claims.py        # prints the table and the figures
"""
from __future__ import annotations

import json
import os

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
    """An adaptive arm's final accuracy minus its replay control ("minus_rep") or minus the best fixed K chosen
    leave-one-seed-out ("loso"), in either analysis's layout (controls.py nests by measure, llm_analysis not)."""
    if key == "minus_rep":
        return c.get("minus_rep", {}).get("final")
    lo = c.get("minus_best_fixed_loso", {})
    return (lo.get("final") or lo).get("paired")


def _above(p: dict | None) -> bool:
    return bool(p and p.get("ci95") and p["ci95"][0] > 0)


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
            above = [a for a, p in ds if _above(p)]
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
    above = sum(_above(_final_vs(c, k)) for an in data.values() for c in an["adaptive"].values()
                for k in ("minus_rep", "loso"))
    return {"z_settings": f"{len(z_knows)} of {len(data)}", "z_range": f"{min(zs):.2f}-{max(zs):.2f}",
            "z_beats_pass_index": str(sum("z" in b for b in beats.values())),
            "stop_rules": str(rules), "stop_rule_runs": str(runs), "stop_rule_wins": str(above),
            "beats_pass_index": "; ".join(f"{n}: {', '.join(b)}" for n, b in beats.items() if b)}


if __name__ == "__main__":
    print(knowing_table())
    print(json.dumps(figures(), indent=1))
