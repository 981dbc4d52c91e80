"""The real-LLM study's path (benchmarks/rlvr/llm.py): SmolLM2-135M-Instruct loads, samples, trains a pass
through the gate and evaluates.  Skips, saying why, where the model's packages are not installed."""
from __future__ import annotations

import json

import pytest
import torch

from contract import load_module
from pathlib import Path

llm = load_module(Path(__file__).resolve().parents[1] / "benchmarks" / "rlvr" / "llm.py", "rlvr_llm")


def test_reward_reads_the_last_integer():
    task = llm.Addition(n_eval=4, n_probe=4)
    assert task.reward("37 + 70 = 107\n", 37, 70) == 1.0
    assert task.reward("107", 37, 70) == 1.0
    assert task.reward("The answer is 106.", 37, 70) == 0.0
    assert task.reward("To add these numbers", 37, 70) == 0.0


def test_splits_are_disjoint_and_fixed():
    a, b = llm.Addition(), llm.Addition()
    assert a.eval_pairs == b.eval_pairs and a.probe_pairs == b.probe_pairs
    sets = [set(a.eval_pairs), set(a.probe_pairs), set(a.train_pairs)]
    assert sum(map(len, sets)) == 90 * 90
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_arm_specs():
    assert llm.parse_arm("dgg4") == {"kind": "dgg", "K": 4}
    with pytest.raises(ValueError, match="unknown arm"):
        llm.parse_arm("rnd4@0.5")


SETTINGS_4 = llm.json.loads(llm.json.dumps(vars(llm.Settings(batches=4))))  # a unit's settings, as run by --batches 4


@pytest.fixture
def ran(monkeypatch):
    """llm.main with run_unit stubbed: the (spec, seed, caps) of each unit that would have run."""
    ran = []
    monkeypatch.setattr(llm, "available", lambda: None)
    monkeypatch.setattr(llm, "Addition", lambda: None)
    monkeypatch.setattr(llm, "run_unit", lambda spec, seed, st, task, caps=None: ran.append((spec, seed, caps))
                        or {"arm": spec, "caps": caps})
    monkeypatch.setattr(llm, "meta", lambda: {"commit": "x"})
    return ran


def test_a_cap_control_at_its_sources_k_is_the_fixed_k_unit_and_others_run(tmp_path, ran):
    """cap:A whose cap is A's K on every batch takes the fixed-K unit of its seed (marked same_as); a cap
    below K, or a missing fixed unit, runs (here: reaches run_unit, stubbed)."""
    src = {"batches": [{"applied_passes": p} for p in (4, 4, 3, 4)]}  # mean 3.75 -> cap 4 = K
    (tmp_path / "dgg4_s0.json").write_text(llm.json.dumps(src))
    (tmp_path / "k4_s0.json").write_text(llm.json.dumps({"arm": "k4", "curve": [0.1, 0.2], "meta": {"commit": "y"},
                                                          "settings": SETTINGS_4}))
    llm.main(["--arms", "cap:dgg4", "--seeds", "0", "--batches", "4", "--out", str(tmp_path)])
    twin = llm.json.loads((tmp_path / "cap-dgg4_s0.json").read_text())
    assert ran == [] and twin["curve"] == [0.1, 0.2] and twin["arm"] == "cap:dgg4" and twin["same_as"] == "k4_s0.json"
    assert twin["caps"] == [4, 4, 4, 4]
    src["batches"][0]["applied_passes"] = 1  # mean 3.0 -> cap 3 < K: it runs
    (tmp_path / "dgg4_s1.json").write_text(llm.json.dumps(src))
    llm.main(["--arms", "cap:dgg4", "--seeds", "1", "--batches", "4", "--out", str(tmp_path)])
    assert [(spec, seed) for spec, seed, _ in ran] == [("cap:dgg4", 1)] and ran[0][2] == [3, 3, 3, 3]


def test_a_unit_that_never_reaches_a_lower_max_reuse_is_that_unit(tmp_path, ran):
    """kl8 whose kl4 twin closed every batch (before or at pass 4) is kl4's unit (same_as); its controls whose caps
    equal the kl4 controls' (all <= 4) are theirs; a twin with one batch that ran to pass 4 open runs."""

    def unit(arm, ends, caps=None, settings=SETTINGS_4):
        return {"arm": arm, "caps": caps, "curve": [0.1, 0.3], "settings": settings, "batches": [
            {"applied_passes": n - c, "passes": [{"closed": False}] * (n - 1) + [{"closed": bool(c)}]}
            for n, c in ends]}

    closed_all = [(2, 1), (4, 1), (3, 1), (2, 1)]  # every batch ends with a close, one at pass 4
    (tmp_path / "kl4_s0.json").write_text(llm.json.dumps(unit("kl4", closed_all)))
    src = llm.json.loads((tmp_path / "kl4_s0.json").read_text())
    for kind in ("rep", "cap"):
        caps = llm.control_caps(kind, src, 0)
        (tmp_path / f"{kind}-kl4_s0.json").write_text(llm.json.dumps(unit(f"{kind}:kl4", [(2, 0)] * 4, caps)))
    llm.main(["--arms", "kl8,rep:kl8,cap:kl8", "--seeds", "0", "--batches", "4", "--out", str(tmp_path)])
    assert ran == []
    for spec, twin in (("kl8", "kl4_s0.json"), ("rep:kl8", "rep-kl4_s0.json"), ("cap:kl8", "cap-kl4_s0.json")):
        got = llm.json.loads((tmp_path / f"{spec.replace(':', '-')}_s0.json").read_text())
        assert got["same_as"] == twin and got["arm"] == spec and got["curve"] == [0.1, 0.3]
    # seed 1: one batch ran its 4 passes open, so kl8 would go on to pass 5: it runs, and so do its controls
    (tmp_path / "kl4_s1.json").write_text(llm.json.dumps(unit("kl4", [(2, 1), (4, 0), (3, 1), (2, 1)])))
    llm.main(["--arms", "kl8", "--seeds", "1", "--batches", "4", "--out", str(tmp_path)])
    assert ran == [("kl8", 1, None)]
    st = llm.Settings(batches=4)
    assert llm.lower_k_twin("k8", 0, None, tmp_path, st) is None  # fixed K never repeats a lower K
    # the paper's rule alike, a close at exactly pass 4 included; but not a twin of other settings
    (tmp_path / "dgg4_s0.json").write_text(llm.json.dumps(unit("dgg4", closed_all)))
    assert llm.lower_k_twin("dgg8", 0, None, tmp_path, st) == tmp_path / "dgg4_s0.json"
    assert llm.lower_k_twin("dgg8", 0, None, tmp_path, llm.Settings(batches=5)) is None
    (tmp_path / "dgg4_s1.json").write_text(llm.json.dumps(unit("dgg4", closed_all, settings={**SETTINGS_4,
                                                                                            "lr": 1e-5})))
    llm.main(["--arms", "dgg8", "--seeds", "1", "--batches", "4", "--out", str(tmp_path)])
    assert ran[-1] == ("dgg8", 1, None)


@pytest.mark.skipif(llm.available() is not None, reason=str(llm.available()))
def test_one_smollm2_unit_runs_through_the_gate():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    task = llm.Addition(n_eval=2, n_probe=2)
    out = llm.run_unit("k2", 0, llm.Settings(prompts=2, group=2, max_new=4, batches=1, n_probe=2), task,
                       log=lambda *_: None)
    (batch,) = out["batches"]
    assert [p["pass_"] for p in batch["passes"]] == [1, 2]
    assert all(p["head_grad_norm"] >= 0 and p["head_rel_dw"] >= 0 for p in batch["passes"])
    assert "probe_after" in batch["passes"][1] and len(out["curve"]) == 2
    assert out["recorder_n_batches"] == 1


@pytest.mark.skipif(llm.gpu_available() is not None, reason=str(llm.gpu_available()))
def test_the_gpu_configuration_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch, capsys):
    """--config gpu's whole path (carried tokenizer, model from a config, supervised warm-up saved once, units
    starting from it, the configuration recorded) with a tiny Llama on CPU; no GGUF package needed."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-5)
    monkeypatch.setattr(llm, "GPU_MODEL", tiny)
    monkeypatch.setattr(llm, "GPU_TASK", dict(n_eval=2, n_probe=2))
    monkeypatch.setattr(llm, "GPU_SETTINGS", llm.GpuSettings(prompts=2, group=2, max_new=4, batches=1, n_probe=2))
    monkeypatch.setattr(llm, "GPU_WARMUP", llm.Warmup(steps=3, batch=4, ramp=2))
    monkeypatch.setattr(llm, "meta", lambda model="": {"commit": "x", "model": model})
    monkeypatch.setattr(llm, "model_folder", lambda: None)  # no GGUF: the tokenizer comes from the carried files
    monkeypatch.setattr(llm, "load_model", lambda *a, **k: pytest.fail("the GPU configuration loaded SmolLM2"))
    llm.main(["--config", "gpu", "--arms", "k1", "--seeds", "0", "--out", str(tmp_path)])
    warm = tmp_path / "warmup.pt"
    made = warm.stat().st_mtime_ns
    unit = llm.json.loads((tmp_path / "k1_s0.json").read_text())
    assert len(unit["curve"]) == 2 and [p["pass_"] for p in unit["batches"][0]["passes"]] == [1]
    assert unit["config"] == "gpu" and unit["device"] == llm.device_name(llm.default_device())
    assert unit["settings"]["eval_chunk"] == 256 and unit["settings"]["prompts"] == 2
    model = unit["model"]
    assert model["hidden_size"] == 16 and model["vocab_size"] == 49152 and model["tied_lm_head"]
    assert model["params"] == 49152 * 16 + 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 32 + 3 * 16  # embedding tied
    w = unit["warmup"]
    assert w["settings"]["steps"] == 3 and w["path"] == str(warm) and len(w["losses"]) == 2
    assert 0.0 <= w["heldout_greedy_accuracy"] <= 1.0 and w["heldout_pairs"] == 2
    assert w["heldout_greedy_accuracy"] == unit["curve"][0]  # the unit starts from the warmed-up weights
    assert "LlamaForCausalLM" in unit["meta"]["model"]
    # a second run reads the saved warm-up (not trained again): its unit starts from the same weights
    capsys.readouterr()
    llm.main(["--config", "gpu", "--arms", "k2", "--seeds", "0", "--out", str(tmp_path)])
    assert "[warm-up] read" in capsys.readouterr().out and warm.stat().st_mtime_ns == made
    k2 = llm.json.loads((tmp_path / "k2_s0.json").read_text())
    assert k2["curve"][0] == unit["curve"][0] and len(k2["batches"][0]["passes"]) == 2
    # other warm-up settings refuse the saved file instead of reusing it
    with pytest.raises(RuntimeError, match="was made with"):
        llm.main(["--config", "gpu", "--arms", "k4", "--seeds", "0", "--warmup-steps", "4", "--out", str(tmp_path)])


def test_the_cpu_configurations_settings_are_unchanged():
    """The running CPU study's JSON records vars(Settings()): the GPU configuration adds no field to it."""
    assert vars(llm.Settings()) == dict(prompts=4, group=8, max_new=12, temperature=0.5, clip=0.2, lr=2e-5,
                                        window=4, threshold=0.3, target_kl=0.01, kl_factor=1.5, batches=12,
                                        probe=True, n_probe=64)


ana = load_module(Path(__file__).resolve().parents[1] / "benchmarks" / "rlvr" / "llm_analysis.py", "rlvr_llm_analysis")


def _unit(arm, seed, K, curve, hurt_when=lambda k, b: False, signal_when_hurt=5.0, closes=()):
    batches = []
    probe = 0.5
    for b in range(len(curve) - 1):
        passes = []
        for k in range(1, K + 1):
            closed = (b, k) in closes
            hurt = hurt_when(k, b)
            after = probe - 0.1 if hurt else probe + 0.01
            row = dict(pass_=k, closed=closed, loss=0.0, kl_k3=0.01 * k, clipfrac=0.1, grad_norm=1.0,
                       head_grad_norm=1.0, head_share=0.5, z=signal_when_hurt if hurt else 0.0, z_energy=0.0,
                       z_increment=0.0, energy=1.0, head_rel_dw=1e-3, body_rel_dw=2e-3, zero_grad=False)
            if not closed and arm.startswith("k"):
                row.update(probe_before=probe, probe_after=after)
                probe = after
            passes.append(row)
            if closed:
                break
        batches.append(dict(batch=b, applied_passes=sum(not p["closed"] for p in passes), passes=passes,
                            eval_acc=curve[b + 1]))
    return dict(arm=arm, seed=seed, curve=curve, batches=batches, seconds=1.0, head_rel_dw_total=0.1,
                body_rel_dw_total=0.2)


def test_auroc_is_mann_whitney_with_ties():
    import itertools
    scores, labels = [0.1, 0.4, 0.4, 0.8, 0.2, 0.4], [False, True, False, True, False, True]
    pairs = [(p, n) for p, n in itertools.product([s for s, y in zip(scores, labels) if y],
                                                  [s for s, y in zip(scores, labels) if not y])]
    want = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert ana.auroc(scores, labels) == pytest.approx(want)
    assert ana.auroc([1.0, 2.0], [False, False]) is None


def test_a_signal_that_fires_exactly_on_hurt_passes_knows_and_the_pass_index_does_not():
    hurt = lambda k, b: (k + b) % 3 == 0  # noqa: E731 - hurt passes spread over pass indices
    units = [_unit("k4", s, 4, [0.2] * 11, hurt_when=hurt) for s in range(3)]
    res = ana.analyse(units)
    sig = res["auroc"]["signals"]
    assert sig["z"]["auroc"] == 1.0 and sig["z"]["knows"]
    assert not sig["energy"]["knows"]  # a constant cannot know
    assert res["auroc"]["n_passes"] == 3 * 10 * 3  # passes 2..4 of 10 batches, 3 seeds
    line = ana.verdict(res)[1]
    assert "z" in line and "beat it" in line and "none of them" not in line


def test_adaptive_arms_against_controls_and_leave_one_seed_out_best_fixed_k():
    units = []
    for s in range(3):
        units.append(_unit("k1", s, 1, [0.2, 0.3, 0.4]))
        # k4 is better on seeds 0 and 1, worse on seed 2: left out, seed 2's best fixed K is still k4
        units.append(_unit("k4", s, 4, [0.2, 0.5, 0.6] if s < 2 else [0.2, 0.3, 0.3]))
        units.append(_unit("dgg4", s, 4, [0.2, 0.4, 0.5], closes={(0, 2)}))
        units.append(_unit("rep:dgg4", s, 4, [0.2, 0.35, 0.45]))
        units.append(_unit("kl4", s, 4, [0.2, 0.3, 0.3], closes={(0, 3)}))  # adaptive, not a fixed K
    res = ana.analyse(units)
    d = res["adaptive"]["dgg4"]
    # final accuracy = mean of the last 3 evaluations: dgg4 0.3667, its replay 0.3333 on every seed
    assert d["minus_rep"]["final"]["diffs"] == pytest.approx([0.1 / 3] * 3)
    assert d["minus_rep"]["final"]["ci95"] is not None
    # seed 2 held out: k4 is best on seeds 0-1 (0.433 vs k1's 0.3), though worst on seed 2 itself
    assert d["minus_best_fixed_loso"]["per_seed"][2] == {"best_fixed": "k4", "chosen_on": [0, 1],
                                                        "diff": pytest.approx(1.1 / 3 - 0.8 / 3)}
    assert d["minus_best_fixed_loso"]["paired"]["ci95"] is not None
    assert res["arms"]["dgg4"]["closed_batches"] == {0: 1, 1: 1, 2: 1}
    assert res["fixed"] == ["k1", "k4"] and set(res["adaptive"]) == {"dgg4", "kl4"}
    assert res["arms"]["dgg4"]["mean_applied_passes"][0] == pytest.approx((1 + 4) / 2)
    md = ana.markdown(res)
    assert "dgg4: final accuracy minus its replay control" in md


def test_a_signal_lower_before_hurt_passes_is_named_so_and_never_beats_the_pass_index():
    """A signal that is smaller before the passes that hurt has an AUROC below 0.5: it "knows" by the plan's
    two-sided criterion, but the verdict says which side, and it cannot "beat" the pass index."""
    hurt = lambda k, b: (k + b) % 3 == 0  # noqa: E731
    units = [_unit("k4", s, 4, [0.2] * 11, hurt_when=hurt) for s in range(3)]
    for u in units:
        for b in u["batches"]:
            for p in b["passes"]:
                p["z"] = -p["z"]
    res = ana.analyse(units)
    sig = res["auroc"]["signals"]["z"]
    assert sig["auroc"] == 0.0 and sig["knows"] and sig["direction"] == "lower"
    assert not res["auroc"]["minus_pass_index"]["z"]["beyond"]
    line = ana.verdict(res)[1]
    assert "z (LOWER before a hurt pass)" in line and "none of them beats it" in line


def test_the_best_fixed_k_is_chosen_over_the_same_seeds():
    """Held out seed 1: k4 has seed 0 only and k1 seeds 0 and 2; both are compared on seed 0 alone, so k1's
    good seed 2 does not win it the choice."""
    fixed = {"k1": {0: 0.1, 1: 0.1, 2: 0.9}, "k4": {0: 0.3, 1: 0.2}}
    out = ana.loso_best_fixed({0: 0.5, 1: 0.5, 2: 0.5}, fixed)["per_seed"]
    assert out[1]["best_fixed"] == "k4" and out[1]["chosen_on"] == [0]
    assert out[2]["best_fixed"] == "k1" and out[2]["chosen_on"] == [0, 1]  # only k1 measured seed 2


def test_paired_t_interval_uses_students_t_for_every_seed_count():
    """The paired CI's half-width is t(0.975, n-1) * sd / sqrt(n): 2.571 at 6 seeds (a flat 2.0 beyond 5 seeds
    made the small tasks' 6-seed intervals 22% too narrow)."""
    import statistics
    for n, t in ((2, 12.706), (3, 4.303), (6, 2.571), (11, 2.228), (31, 2.042)):
        d = [0.01 * i * i for i in range(n)]
        p = ana.paired({i: x for i, x in enumerate(d)}, {i: 0.0 for i in range(n)})
        half = (p["ci95"][1] - p["ci95"][0]) / 2
        assert half == pytest.approx(t * statistics.stdev(d) / n ** 0.5, rel=1e-9), n
    assert 1.96 < ana.t975(1000) < ana.t975(100) < ana.t975(31) < ana.t975(30) == 2.042


def test_stopping_line_names_the_arms_that_beat_both_and_none_otherwise():
    up, flat, down = {"mean": 0.1, "ci95": [0.02, 0.2]}, {"mean": 0.0, "ci95": [-0.1, 0.1]}, \
        {"mean": -0.1, "ci95": [-0.2, -0.01]}
    line = ana.stopping_line({"a": (up, up), "b": (up, flat), "c": (flat, down)})
    assert line.startswith("Does any stop rule beat its replay control and the best fixed K? Yes: a (")
    assert "above its replay control: a, b" in line and "below the best fixed K: c" in line
    line = ana.stopping_line({"b": (up, flat), "c": (flat, None)})
    assert "? No:" in line and "above the best fixed K: none" in line


def test_a_fixed_k_measured_on_the_held_out_seed_alone_is_not_a_candidate():
    """k8 ran on seed 0 only: holding out seed 0, it cannot be chosen (nothing but seed 0 to choose it on), and
    seed 0 is not dropped for it."""
    fixed = {"k1": {0: 0.5, 1: 0.1, 2: 0.3}, "k2": {0: 0.4, 1: 0.5, 2: 0.4}, "k8": {0: 0.2}}
    out = ana.loso_best_fixed({0: 0.45, 1: 0.45, 2: 0.45}, fixed)
    assert sorted(out["per_seed"]) == [0, 1, 2]
    assert out["per_seed"][0] == {"best_fixed": "k2", "chosen_on": [1, 2], "diff": pytest.approx(0.05)}


def test_the_no_signal_line_still_names_the_pass_index():
    t = {"n_passes": 10, "n_hurt": 3, "signals": {
        "z": {"auroc": 0.5, "knows": False, "direction": None, "ci95": [0.4, 0.6]},
        "pass_": {"auroc": 0.7, "knows": True, "direction": "higher", "ci95": [0.6, 0.8]}}}
    line = ana.knowing_line(t, "probe")
    assert line.startswith("Does any signal know when a pass hurts? No:") and "pass index alone: 0.700, CI" in line


def test_a_signal_that_beats_the_pass_index_is_checked_on_the_robustness_subsets():
    """The verdict names, for a signal that beats the pass index, its difference on each robustness subset
    (zero-gradient steps left out, the placeholder z left out) and whether it still lies above 0."""
    sig = {"auroc": 0.6, "knows": True, "direction": "higher", "ci95": [0.55, 0.65]}
    t = {"n_passes": 10, "n_hurt": 3, "signals": {"z": sig, "pass_": dict(sig, auroc=0.5, knows=False)},
         "minus_pass_index": {"z": {"diff": 0.1, "ci95": [0.02, 0.18], "beyond": True}}}
    an = {"auroc": t,
          "auroc_without_zero_grad": {"minus_pass_index": {"z": {"diff": 0.09, "ci95": [0.01, 0.17], "beyond": True}}},
          "auroc_z_measured": {"minus_pass_index": {"z": {"diff": 0.05, "ci95": [-0.01, 0.11], "beyond": False}}}}
    line = ana.knowing_line(t, "probe", an)
    assert "z beat it" in line
    assert "with the zero-gradient steps left out, z minus the pass index is +0.090 (CI +0.010..+0.170), still " \
           "above 0" in line
    assert "placeholder z (0 while its window fills) left out, z minus the pass index is +0.050 (CI -0.010..+0.110), " \
           "no longer above 0" in line
    assert "Robustness" not in ana.knowing_line(t, "probe")  # without the analysis, no subsets to check


def test_the_pass_profile_is_per_fixed_arm_and_pass_and_is_drawn(tmp_path):
    """Per fixed arm and pass index: the lm_head gradient norm relative to its batch's pass 1, the medians of
    the signals, the share of passes that lowered the probe; an adaptive arm is not in it; both figures draw."""
    hurt = lambda k, b: k == 3  # noqa: E731 - every batch's third pass lowers the probe
    units = [_unit("k4", s, 4, [0.2] * 5, hurt_when=hurt) for s in range(2)] + [_unit("dgg4", 0, 4, [0.2] * 5)]
    for u in units[:2]:
        for b in u["batches"]:
            for p in b["passes"]:
                p["head_grad_norm"] = 2.0 / p["pass_"]
    prof = ana.pass_profile(units)
    assert set(prof) == {"k4"}
    p = prof["k4"]
    assert p["head_grad_norm"] == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3), 4: 0.25}
    assert p["kl_k3"] == {k: pytest.approx(0.01 * k) for k in range(1, 5)}
    assert p["hurt"] == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0} and p["dwd"][2] == pytest.approx(0.5)
    assert ana.analyse(units)["pass_profile"] == prof
    pytest.importorskip("matplotlib")
    assert ana.plot(units, tmp_path / "a.png") and ana.plot_passes(units, tmp_path / "p.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0


def test_the_committed_smollm2_analysis_is_its_units():
    """benchmarks/results/llm_study.{json,md} are what llm_analysis.py writes from the committed unit JSONs, byte
    for byte (a new unit, or a change to the analysis, fails here until they are regenerated)."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    res = ana.analyse(ana.load_units(results / "llm_study"))
    assert json.dumps(res, indent=1, default=str) == (results / "llm_study.json").read_text()
    assert ana.markdown(res) == (results / "llm_study.md").read_text()


def test_the_verdict_lists_the_plans_units_not_yet_measured():
    units = [_unit("k1", 0, 1, [0.2] * 3), _unit("k2", 0, 2, [0.2] * 3)]
    head = ana.verdict(ana.analyse(units))[0]
    assert "not yet measured: k1 s1, k1 s2, k2 s1" in head and "cap:kl8 s2." in head and "all present" not in head
