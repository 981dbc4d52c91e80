"""The controls design of the small-task RLVR study (benchmarks/rlvr/controls.py, arms.py's rep:/cap:, runner's caps,
the per-pass validation set, several warm-up checkpoints, study.py's --design): quick runs of seconds and the
analysis on constructed inputs.  Definitions are the SmolLM2 study's (llm.py, llm_analysis.py)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rlvr import arms as A  # noqa: E402
from benchmarks.rlvr import cli, controls, llm, runner, study, tasks  # noqa: E402
from benchmarks.rlvr import llm_analysis as LA  # noqa: E402

SOURCE = "dgg4@0.3:paper"
ARMS = f"k1,k4,{SOURCE},sb34@0.01,rep:{SOURCE},cap:{SOURCE},rep:sb34@0.01,cap:sb34@0.01"
QUICK = ["--quick", "--no-plots", "--arms", ARMS, "--seeds", "2", "--warmups", "2", "--probe", "16"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the benchmark pins one thread on CPU


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run of the design (2 seeds over 2 warm-ups, 16 validation prompts), with the checkpoints handed to
    the runner kept for the warm-up test."""
    out = tmp_path_factory.mktemp("controls")
    seen = {}
    real = runner.run_all

    def run_all(arms, init_state, *a, **k):
        seen["init_state"] = init_state
        return real(arms, init_state, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "run_all", run_all)
        threads = torch.get_num_threads()
        try:
            res = cli.main([*QUICK, "--jobs", "1", "--out", str(out)])
        finally:
            torch.set_num_threads(threads)
    return res, out, seen


def _by(res):
    return {(r["arm"], r["seed"]): r for r in res["runs"]}


def _applied(run, batches):
    return controls.applied_per_batch(run, batches)


def test_control_arm_specs():
    arms = A.parse_arms("k1,dgg8@0.3:paper,rep:dgg8@0.3:paper,cap:dgg8@0.3:paper")
    rep, cap = arms[2], arms[3]
    assert (rep.name, rep.kind, rep.source, rep.max_reuse, rep.control, rep.gated, rep.signal) == (
        "replay of dgg K=8 t=0.3 paper/step", "rep", "dgg K=8 t=0.3 paper/step", 8, True, False, "replay")
    assert (cap.name, cap.kind, cap.signal) == ("cap of dgg K=8 t=0.3 paper/step", "cap", "cap")
    for bad, message in [("k1,rep:k1", "replays an adaptive arm"), ("rep:dgg8@0.3", "needs its source arm"),
                         ("dgg8@0.3,rep:rnd8@0.5", "replays an adaptive arm"),
                         ("dgg8@0.3,cap:rep:dgg8@0.3", "replays an adaptive arm")]:
        with pytest.raises(ValueError, match=message):
            A.parse_arms(bad)
    spec = A.with_controls("k1,dgg4@0.3:paper,sb38@0.01")
    assert spec == "k1,dgg4@0.3:paper,sb38@0.01,rep:dgg4@0.3:paper,cap:dgg4@0.3:paper,rep:sb38@0.01,cap:sb38@0.01"
    assert len(A.parse_arms(spec)) == 7


def test_control_caps_are_the_smollm2_studys():
    run = {"updates": [{"batch": b, "closed": c} for b, cs in enumerate([[False], [False, False, True],
                                                                          [False, False, False, False], [True]])
                       for c in cs]}
    assert controls.applied_per_batch(run, 4) == [1, 2, 4, 0]
    rep = controls.control_caps("rep", run, 3, 4)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(40003)).tolist()
    assert rep == [[1, 2, 4, 0][i] for i in perm] and sorted(rep) == [0, 1, 2, 4]
    assert controls.control_caps("cap", run, 3, 4) == [2] * 4  # mean 1.75, rounded
    assert llm.control_caps("cap", {"batches": [{"applied_passes": n} for n in (1, 2)]}, 0) == [2, 2]  # 1.5 -> 2
    low = {"updates": [{"batch": b, "closed": b > 0} for b in range(4)]}  # mean 0.25: at least 1
    assert controls.control_caps("cap", low, 0, 4) == [1] * 4
    # the controller: a cap of 0 runs pass 1 and discards it; else the batch ends at its cap, updates kept
    arm = A.parse_arms("dgg4@0.3,rep:dgg4@0.3")[1]
    c = runner.Caps(arm, None, [0, 2])
    c.new_batch()
    assert c.after_step(1, 0.0) == (True, True)
    c.new_batch()
    assert c.after_step(1, 0.0) == (False, False) and c.after_step(2, 0.0) == (False, True)


def test_replay_is_a_permutation_of_its_source_and_cap_runs_the_rounded_mean(quick):
    res, out, _ = quick
    by, B = _by(res), res["args"]["batches"]
    for src in ("dgg K=4 t=0.3 paper/step", "sb3 K=4 target_kl=0.01"):
        for seed in (0, 1):
            applied = _applied(by[(src, seed)], B)
            rep, cap = by[(f"replay of {src}", seed)], by[(f"cap of {src}", seed)]
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(40000 + seed)).tolist()
            assert rep["caps"] == [applied[i] for i in perm] == _applied(rep, B)
            assert sorted(_applied(rep, B)) == sorted(applied)
            mean = sum(applied) / B
            assert cap["caps"] == [max(1, math.floor(mean + 0.5))] * B == _applied(cap, B)
            for r in (rep, cap):  # every update a control runs stays applied (a 0 cap: pass 1, discarded)
                assert all(not u["closed"] or (u["pass"] == 1 and u["by"] == "cap") for u in r["updates"])
    assert any(len(set(_applied(by[("dgg K=4 t=0.3 paper/step", s)], B))) > 1 for s in (0, 1))  # not trivial
    an = json.loads((out / "rlvr_reuse_quick_controls.json").read_text())
    for src in ("dgg K=4 t=0.3 paper/step", "sb3 K=4 target_kl=0.01"):
        c = an["adaptive"][src]
        assert c["mean_applied_passes"] == c["rep_mean_applied_passes"]
        assert set(c) >= {"minus_rep", "minus_cap", "minus_best_fixed_loso"}
    md = (out / "rlvr_reuse_quick_controls.md").read_text()
    assert "minus its replay control" in md and "## AUROC for" in md


def test_controls_do_not_depend_on_jobs(quick, tmp_path):
    res, _, _ = quick
    two = cli.main([*QUICK, "--jobs", "2", "--out", str(tmp_path)])  # each control waits for its source unit
    assert [(r["arm"], r["seed"]) for r in two["runs"]] == [(r["arm"], r["seed"]) for r in res["runs"]]
    for r1, r2 in zip(res["runs"], two["runs"]):
        assert r1.get("caps") == r2.get("caps")
        assert [c[2] for c in r1["curve"]] == [c[2] for c in r2["curve"]]


def test_per_pass_validation_fields_chain(quick):
    res, _, _ = quick
    for r in res["runs"]:
        fixed = r["arm"].startswith("fixed")
        assert all(("val_after" in u) == fixed for u in r["updates"])
        for u in r["updates"]:  # the signals of llm.py's per-pass rows (an SB3 stop has no backward: none)
            if math.isnan(u["grad_norm"]):
                assert u["by"] == "kl" and r["arm"].startswith("sb3")
                continue
            assert {"energy", "global_grad_norm", "head_share", "approx_kl", "clip_frac"} <= set(u)
            assert u["head_share"] == pytest.approx(u["grad_norm"] / u["global_grad_norm"], rel=1e-6)
            assert u["energy"] == pytest.approx(u["grad_norm"] ** 2, rel=1e-4)
            # ungated arms log the paper rule's observer z per test; a gated arm's own gate is that rule here
            assert ({"paper_z", "paper_z_energy", "paper_z_increment"} <= set(u)) != r["arm"].startswith("dgg")
        if not fixed:
            continue
        prev = r["val_start"]
        for u in r["updates"]:
            assert u["val_before"] == prev and 0.0 <= u["val_after"] <= 1.0
            assert u["val_after"] * 16 == round(u["val_after"] * 16)  # a count of 16 prompts
            prev = u["val_after"]
    # the units llm_analysis reads: before/after as probe_before/probe_after, the hurt label is after < before
    units = controls.to_units(res)
    rows = LA.pass_rows([u for u in units if u["arm"].startswith("fixed")], min_pass=1)
    assert len(rows) == sum(len(r["updates"]) for r in res["runs"] if r["arm"].startswith("fixed"))


def test_validation_set_is_fresh(tmp_path):
    args = cli.parse_args(["--quick", "--digits", "2", "--out", str(tmp_path)])
    task = tasks.get("addition")(args)
    held = task.sample(256, torch.Generator().manual_seed(cli.HELDOUT_SEED))
    probe = controls.fresh_probe(task, 256, held[0])
    keys = controls.prompt_keys(probe[0])
    assert len(set(keys)) == 256 and not set(keys) & set(controls.prompt_keys(held[0]))
    a, b = probe[0][:, 0] * 10 + probe[0][:, 1], probe[0][:, 3] * 10 + probe[0][:, 4]
    assert (probe[1] == task.encode(a, b)[1]).all()
    ex = controls.Excluding(task, probe[0])
    drawn = ex.sample(20000, torch.Generator().manual_seed(1))[0]
    assert not set(controls.prompt_keys(drawn)) & set(keys)
    # without a collision the draws are the task's own
    none = controls.Excluding(task, torch.full((1, task.prompt_len), 99))
    assert torch.equal(none.sample(64, torch.Generator().manual_seed(2))[0],
                       task.sample(64, torch.Generator().manual_seed(2))[0])
    rev = tasks.get("reverse")(cli.parse_args(["--quick", "--task", "reverse", "--out", str(tmp_path)]))
    exr = controls.Excluding(rev, rev.sample(4, torch.Generator().manual_seed(0))[0])
    assert hasattr(exr, "pretrain_sample") and not hasattr(controls.Excluding(task, probe[0]), "pretrain_sample")
    small = cli.parse_args(["--quick", "--out", str(tmp_path)])  # 1 digit: 100 prompts only
    with pytest.raises(ValueError, match="distinct prompts"):
        controls.fresh_probe(tasks.get("addition")(small), 256, held[0][:0])


def test_several_warmups_give_different_checkpoints(quick):
    res, _, seen = quick
    states = seen["init_state"]
    assert isinstance(states, list) and len(states) == 2
    assert [s["seed"] for s in res["sft_all"]] == [0, 1]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert runner.checkpoint_for(states, 3) is states[1] and runner.checkpoint_for(states, 2) is states[0]
    for r in res["runs"]:  # every seed starts at its own checkpoint's evaluation accuracy
        assert r["curve"][0][2] == pytest.approx(res["sft_all"][r["seed"] % 2]["heldout_acc"])


def _constructed(hurt_energy: float = 5.0):
    """A constructed run: fixed K=1, K=3 on 3 seeds (pass 3 of every other batch hurts, with a high energy), an
    adaptive arm and its controls with set curves."""
    B, runs = 6, []
    for s in range(3):
        for K in (1, 3):
            ups, v = [], 0.5
            for b in range(B):
                for k in range(1, K + 1):
                    hurt = k == 3 and b % 2 == 0
                    u = {"batch": b, "pass": k, "closed": False, "z": 0.0, "grad_norm": 1.0, "approx_kl": 0.01 * k,
                         "clip_frac": 0.0, "energy": hurt_energy if hurt else 1.0 + 0.1 * s, "global_grad_norm": 2.0,
                         "head_share": 0.5, "paper_z": 0.0, "paper_z_energy": 0.0, "paper_z_increment": 0.0,
                         "val_before": v}
                    v = v - 0.1 if hurt else v + 0.05
                    u["val_after"] = v
                    ups.append(u)
            curve = [(i, 0, 0.5 + (0.01 if K == 1 else 0.02) * i + 0.01 * s) for i in range(B + 1)]
            runs.append({"arm": f"fixed K={K}", "seed": s, "curve": curve, "updates": ups, "val_start": 0.5})
        for name, d in (("dgg K=3 t=0.3 paper/step", 0.1), ("replay of dgg K=3 t=0.3 paper/step", 0.0),
                        ("cap of dgg K=3 t=0.3 paper/step", 0.05)):
            ups = [{"batch": b, "pass": 1, "closed": False, "z": 0.0, "grad_norm": 1.0, "approx_kl": 0.0,
                    "clip_frac": 0.0, "energy": 1.0} for b in range(B)]
            curve = [(i, 0, 0.5 + 0.02 * i + 0.01 * s + (d + 0.01 * s if i > 0 else 0)) for i in range(B + 1)]
            runs.append({"arm": name, "seed": s, "curve": curve, "updates": ups})
    names = ["fixed K=1", "fixed K=3", "dgg K=3 t=0.3 paper/step", "replay of dgg K=3 t=0.3 paper/step",
             "cap of dgg K=3 t=0.3 paper/step"]
    kinds = ["fixed", "fixed", "dgg", "rep", "cap"]
    return {"args": {"batches": B, "warmups": 3, "probe": 16}, "arm_names": names, "env": {"command": "constructed"},
            "arm_specs": [{"name": n, "kind": k} for n, k in zip(names, kinds)], "runs": runs}


def test_analysis_on_constructed_runs():
    res = _constructed()
    an = controls.analyse(res)
    arms = an["arms"]
    # final = mean of the last 3 evaluations, AUC = mean of the curve (llm_analysis's)
    assert arms["fixed K=3"]["final"][0] == pytest.approx(0.5 + 0.02 * 5)
    assert arms["fixed K=3"]["auc"][1] == pytest.approx(0.5 + 0.02 * 3 + 0.01)
    assert arms["fixed K=1"]["warmup"] == {0: 0, 1: 1, 2: 2}
    # the hurting passes have the highest energy: AUROC 1 (CI excluding 0.5); pass 3 also marks them partly
    t = an["auroc"]
    assert (t["n_passes"], t["n_hurt"], t["n_batches"]) == (3 * 6 * 2, 9, 18)
    assert t["signals"]["energy"]["auroc"] == 1.0 and t["signals"]["energy"]["knows"]
    # 9 of the 18 pass-3 rows hurt, none of the 18 pass-2 rows: P(hurt ranks above) = (18 + 9 / 2) / 27
    assert t["signals"]["pass_"]["auroc"] == pytest.approx(22.5 / 27)
    assert t["minus_pass_index"]["energy"]["diff"] == pytest.approx(1 - 22.5 / 27)
    assert t["minus_pass_index"]["energy"]["beyond"]
    assert an["auroc_all_passes"]["n_passes"] == 3 * 6 * 4
    assert an["auroc_by_arm"]["fixed K=3"]["signals"]["energy"]["auroc"] == 1.0
    # each adaptive arm minus its controls, paired by seed; the best fixed K chosen leave-one-seed-out
    c = an["adaptive"]["dgg K=3 t=0.3 paper/step"]
    assert c["minus_rep"]["final"]["mean"] == pytest.approx(0.1) and c["minus_rep"]["final"]["seeds"] == [0, 1, 2]
    assert c["minus_cap"]["final"]["mean"] == pytest.approx(0.05)
    loso = c["minus_best_fixed_loso"]["final"]
    assert {v["best_fixed"] for v in loso["per_seed"].values()} == {"fixed K=3"}
    assert loso["paired"]["mean"] == pytest.approx(0.1 + 0.01)  # the arm adds 0.1 + 0.01 s to K=3's curve
    assert an["reuse_vs_k1"]["fixed K=3"]["final"]["mean"] == pytest.approx(0.05)
    md = controls.markdown(res, an)
    assert "energy" in md and "minus its replay control +0.100" not in md and "0.100 (95% CI" in md
    # the analysis reads rows as the results JSON keeps them (report.rows: absent keys come back as None)
    from benchmarks.rlvr import report

    res2 = dict(res, runs=[dict(r, updates=report.rows(report.columns(r["updates"]))) for r in res["runs"]])
    assert controls.analyse(res2)["auroc"]["signals"]["energy"]["auroc"] == 1.0


def test_old_results_are_not_of_this_design():
    data = json.loads((REPO / "benchmarks" / "results" / "rlvr_vocab_results.json").read_text())
    assert not controls.applies(data)


def test_study_design_preset_assembles_the_runs(tmp_path, monkeypatch):
    arms = A.parse_arms(study.DESIGNS["controls"]["arms"])
    adaptive = [a for a in arms if a.kind in A.CONTROL_SOURCES]
    assert {a.max_reuse for a in adaptive if a.kind in ("dgg", "dkl")} == {4, 8}  # the K=4 arms are back in
    assert "dgg K=4 t=0.3 paper/step" in [a.name for a in adaptive]
    assert sorted(a.source for a in arms if a.control) == sorted([a.name for a in adaptive] * 2)
    calls = []
    monkeypatch.setattr(study.cli, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(study, "summarize", lambda *a, **k: "summary")
    study.main(["--design", "controls", "--out", str(tmp_path), "--seeds", "2"])
    assert len(calls) == 3 and all(c[c.index("--out") + 1] == str(tmp_path / "controls") for c in calls)
    for c in calls:
        assert c[c.index("--probe") + 1] == "256" and c[c.index("--warmups") + 1] == "3"
        args = cli.parse_args(c)
        assert args.seeds == 2 and args.probe == 256 and args.warmups == 3  # a flag given after the design wins
        assert args.arms == study.DESIGNS["controls"]["arms"]
