"""benchmarks/rlvr_reuse.py and its package benchmarks/rlvr/: arm specs, flags, configurations, the KL estimators,
the sample-efficiency measure, a quick run of each task, the re-analysis from JSON (the addition smoke run is in
test_loop.py)."""
import json
import math
import os

import pytest
import torch

from contract import load_benchmark


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the benchmark pins one thread on CPU; leave the session as it was


def _kl_gate_or_skip(bench):
    if not bench.arms.has_kl_gate():
        pytest.skip("the installed dgg_kernels has no KL test (DynamicGradientGate(target_kl=...))")


def test_rlvr_reuse_arm_specs_and_flags():
    bench = load_benchmark()
    stat, mode = bench.default_rule()
    arms = bench.parse_arms("k1,k8,dgg8@0.3")
    assert [a.name for a in arms] == ["fixed K=1", "fixed K=8", f"dgg K=8 t=0.3 {bench.rule_name(stat, mode)}"]
    assert arms[2].threshold == 0.3 and arms[2].max_reuse == 8 and not arms[0].gated
    for bad in ("x3", "dgg8", "dgg8@0.3:nosuch", "cal8@1.5", "k1,k1"):
        with pytest.raises(ValueError):
            bench.parse_arms(bad)
    # every flag is documented, results go outside the source tree unless asked, presets fill what is not given
    ap = bench.build_parser()
    assert all(a.help for a in ap._actions)
    args = bench.parse_args([])
    assert args.out == bench.DEFAULT_OUT and not args.out.startswith(os.path.dirname(bench.__file__))
    assert args.vocab == 2048 and args.seeds >= 5 and args.task == "addition" and not args.tied and args.jobs == 2
    gpu = bench.parse_args(["--config", "gpu", "--seeds", "3", "--device", "cpu"])  # a flag given wins
    assert gpu.device == "cpu" and gpu.vocab == 32768 and gpu.lr == 1e-3 and gpu.seeds == 3
    if torch.cuda.is_available():
        assert bench.parse_args(["--config", "gpu"]).device == "cuda"
    quick = bench.parse_args(["--quick", "--lr=0.01"])
    assert quick.batches == 5 and quick.lr == 0.01
    rev = bench.parse_args(["--task", "reverse"])
    assert rev.vocab >= 8192 and rev.task == "reverse"
    assert bench.parse_args(["--task", "reverse", "--vocab", "9000"]).vocab == 9000


def test_rlvr_reuse_paper_calibrated_and_control_arms():
    bench = load_benchmark()
    arms = bench.parse_arms("dgg8@0.3:paper,dgg8@0.3:norm:batch,cal8@0.5:paper,rnd8@0.5")
    assert [a.name for a in arms] == ["dgg K=8 t=0.3 paper/step", "dgg K=8 t=0.3 norm/batch",
                                      "cal K=8 rate=0.5 paper/step", "random K=8 p=0.5"]
    assert arms[0].statistic == "energy+increment" and arms[1].window_mode == "batch"
    assert arms[2].kind == "cal" and arms[2].threshold is None and arms[2].close_rate == 0.5
    assert arms[3].kind == "rnd" and not arms[3].gated and arms[3].signal == "coin"
    for bad in ("rnd8@1.5", "cal8@0:paper"):
        with pytest.raises(ValueError):
            bench.parse_arms(bad)


def test_rlvr_reuse_kl_arm_specs(monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench.arms, "has_kl_gate", lambda: True)  # parsing only: no gate is built here
    sb3, crl, dkl, both, sb3f = bench.parse_arms("sb38@0.01,crl8@0.02,dkl8@0.01,dgg8@0.3:paper:kl=0.01,sb38@0.01:f=2")
    assert (sb3.name, sb3.kind, sb3.target_kl, sb3.kl_factor, sb3.gated, sb3.signal) == (
        "sb3 K=8 target_kl=0.01", "sb3", 0.01, 1.5, False, "kl")
    assert (crl.name, crl.target_kl, crl.kl_factor, crl.signal) == ("cleanrl K=8 target_kl=0.02", 0.02, 1.0, "kl")
    assert (dkl.name, dkl.kind, dkl.gated, dkl.target_kl, dkl.kl_factor, dkl.signal) == (
        "dgg K=8 kl=0.01x1.5", "dkl", True, 0.01, 1.5, "kl")
    assert (both.name, both.statistic, both.threshold, both.target_kl, both.signal) == (
        "dgg K=8 t=0.3 paper/step kl=0.01x1.5", "energy+increment", 0.3, 0.01, "gradient+kl")
    assert sb3f.kl_factor == 2.0 and sb3f.name == "sb3 K=8 target_kl=0.01x2"
    for bad, message in [
        ("sb38", "use sb3N@TARGET"), ("sb31@0.01", "max reuse N must be >= 2"), ("sb38@0", "target KL must be"),
        ("sb38@-0.1", "target KL must be"), ("sb38@inf", "target KL must be"), ("sb38@abc", "must be a number"),
        ("crl8@0.01:f=2", "option 'f=2' is not one"), ("dkl8@0.01:paper", "option 'paper' is not one"),
        ("dgg8@0.3:f=2", "f= goes with kl="), ("dgg8@0.3:kl=0", "target KL must be"),
        ("dgg8@0.3:kl=0.01:f=0", "KL factor f must be"), ("k8@0.1", "use kN"), ("nope8@1", "use one of"),
        ("sb38@0.01,sb38@0.01", "listed twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench.parse_arms(bad)
    monkeypatch.setattr(bench.arms, "has_kl_gate", lambda: False)
    with pytest.raises(ValueError, match="has no KL test"):
        bench.parse_arms("dkl8@0.01")
    assert bench.parse_arms("sb38@0.01")[0].kind == "sb3"  # the loop's own KL stops need no gate support


def test_rlvr_reuse_kl_estimators_against_a_hand_computation():
    bench = load_benchmark()
    g = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(64, 3, generator=g) * 0.9 + 0.05)
    old = logp + torch.randn(64, 3, generator=g) * 0.3
    k3, k1 = bench.approx_kl_k3(logp, old), bench.approx_kl_k1(logp, old)
    want3 = want1 = 0.0
    for x, y in zip(logp.flatten().tolist(), old.flatten().tolist()):
        r = math.exp(x - y)
        want3 += (r - 1) - math.log(r)
        want1 += y - x
    assert k3.dim() == 0 and not k3.requires_grad
    assert float(k3) == pytest.approx(want3 / logp.numel(), rel=1e-5) and float(k3) >= 0
    assert float(k1) == pytest.approx(want1 / logp.numel(), rel=1e-4, abs=1e-6)
    assert float(bench.approx_kl_k3(logp, logp)) == 0.0
    # full-vocabulary KL(p || q) by hand on a 2 x 1 x 3 case
    lp = torch.log_softmax(torch.tensor([[[1.0, 2.0, 0.5]], [[0.0, 0.0, 3.0]]]), -1)
    lq = torch.log_softmax(torch.tensor([[[0.5, 2.0, 1.0]], [[1.0, 0.0, 2.0]]]), -1)
    want = sum(math.exp(a) * (a - b) for a, b in zip(lp.flatten().tolist(), lq.flatten().tolist())) / 2
    assert bench.rollout_mod.full_kl(lp.exp(), lp, lq) == pytest.approx(want, rel=1e-5)


def test_rlvr_reuse_sample_efficiency_on_a_synthetic_curve():
    bench = load_benchmark()
    an = bench.analysis
    n = an.SMOOTH
    # K=1 climbs linearly 0.3 -> 0.5 over 20 batches of 100 rollouts; the arm climbs twice as fast, then holds
    base = [(100 * i, float(i), 0.3 + 0.01 * i) for i in range(21)]
    fast = [(100 * i, float(i), min(0.3 + 0.02 * i, 0.5)) for i in range(21)]
    target = sum(c[2] for c in base[-n:]) / n  # 0.48: K=1's final trailing mean
    i1 = next(i for i in range(1, 21) if sum(c[2] for c in base[max(0, i - n + 1):i + 1]) / min(i + 1, n) >= target - 1e-9)
    e = an.rollouts_to_reach(fast, base)
    assert e["reached"] and e["target"] == pytest.approx(target)
    smooth = an.smooth([c[2] for c in fast])
    i = next(j for j in range(1, 21) if smooth[j] >= target - 1e-9)
    assert e["rollouts"] == 100 * i and e["rollout_ratio"] == pytest.approx(i / i1) and i < i1
    assert an.rollouts_to_reach(base, base)["rollout_ratio"] == 1.0
    flat = [(100 * i, float(i), 0.3) for i in range(21)]
    assert an.rollouts_to_reach(flat, base) == {"reached": False, "target": pytest.approx(target)}
    assert an.rollouts_to_reach(base, flat) is None  # K=1 did not end above its start: no target
    assert an.verdict([0.1, 0.2, 0.1, 0.3, 0.1]) == "helps" and an.verdict([0.1, -0.2, 0.1, 0.3, 0.1]) == "leans better"


def _quick(bench, tmp_path, *extra):
    return bench.main(["--quick", "--no-plots", "--out", str(tmp_path), *extra])


def _check_records(res, batches):
    for r in res["runs"]:
        assert len(r["curve"]) == batches + 1 and len(r["drift"]) == batches + 1
        for b in range(batches):
            us = [u for u in r["updates"] if u["batch"] == b]
            assert [u["pass"] for u in us] == list(range(1, len(us) + 1))
            assert all(not u["closed"] for u in us[:-1])
            for u in us:
                assert u["approx_kl"] >= 0 and (u["pass"] > 1 or u["approx_kl"] < 1e-3)  # pass 1 is on-policy
                if u["closed"]:
                    assert all(v == 0.0 for v in u["rel_change"].values())


def test_rlvr_reuse_kl_stop_arms_quick(tmp_path):
    bench = load_benchmark()
    res = _quick(bench, tmp_path, "--arms", "k1,k4,sb34@0.001,crl4@0.001", "--batches", "3", "--sft-max-steps", "40")
    batches = res["args"]["batches"]
    _check_records(res, batches)
    by = {r["arm"]: r for r in res["runs"]}
    sb3, crl = by["sb3 K=4 target_kl=0.001"]["updates"], by["cleanrl K=4 target_kl=0.001"]["updates"]
    for u in sb3:  # SB3: tested before backward from pass 2 on; a stop has no gradient and discards the update
        stop = u["pass"] > 1 and u["approx_kl"] > 1.5 * 0.001
        assert u["closed"] == stop and (not stop or math.isnan(u["grad_norm"]))
    assert any(u["closed"] for u in sb3)
    for u in crl:  # CleanRL: the update stays applied, the batch ends after the pass whose KL is over target
        assert not u["closed"] and (u["by"] == "kl-after") == (u["approx_kl"] > 0.001)
        assert u["rel_change"]["lm_head"] > 0
    assert any(u["by"] == "kl-after" for u in crl)
    an = res["analysis"]
    assert an["arms"]["sb3 K=4 target_kl=0.001"]["signal"] == "kl" and "kl" in an["by_signal"]
    assert {e for e in an["efficiency"]} == set(by)
    md = (tmp_path / "rlvr_reuse_quick_results.md").read_text()
    assert "## Verdict: KL stop vs gradient rule vs fixed K" in md and "Wall time" in md


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rlvr_reuse_vocab_task_quick(tmp_path, tied):
    bench = load_benchmark()
    arms = "k2,dgg2@0.3:paper"
    res = _quick(bench, tmp_path, "--task", "reverse", "--arms", arms, "--batches", "3", "--sft-max-steps", "40",
                 *(["--tied"] if tied else []))
    assert res["args"]["vocab"] >= 8192
    _check_records(res, 3)
    stem = "rlvr_vocab_tied_quick" if tied else "rlvr_vocab_quick"
    md = (tmp_path / f"{stem}_results.md").read_text()
    assert ("lm_head tied to the token embedding" in md) == tied and "reverse a sequence" in md
    args = bench.parse_args(["--quick", "--task", "reverse", "--out", str(tmp_path)] + (["--tied"] if tied else []))
    task = bench.tasks.get("reverse")(args)
    model = bench.make_model(args, task)
    assert (model.lm_head.weight is model.tok.weight) == tied
    groups = bench.policy.layer_groups(model)
    assert any(t is model.tok.weight for t in groups["embed"]) != tied
    p, a = task.sample(512, torch.Generator().manual_seed(0))
    assert (a == p[:, :-1].flip(1)).all() and int(a.min()) >= 1 and int(a.max()) < res["args"]["vocab"]
    assert len(torch.unique(a)) > 500  # the answers spread over many ids


def test_rlvr_reuse_kl_gate_arms_quick(tmp_path):
    bench = load_benchmark()
    _kl_gate_or_skip(bench)
    res = _quick(bench, tmp_path, "--arms", "dkl4@0.001,dgg4@0.3:paper:kl=0.001", "--batches", "3",
                 "--sft-max-steps", "40")
    _check_records(res, 3)
    by = {r["arm"]: r for r in res["runs"]}
    for u in by["dgg K=4 kl=0.001x1.5"]["updates"]:  # KL alone: the z-test observes, the KL test closes
        assert u["closed"] == (u["pass"] > 1 and u["approx_kl"] > 1.5 * 0.001)
        assert u["gate_kl"] == pytest.approx(u["approx_kl"], rel=1e-4)
    assert any(u["closed"] for u in by["dgg K=4 kl=0.001x1.5"]["updates"])
    both = by["dgg K=4 t=0.3 paper/step kl=0.001x1.5"]["updates"]
    assert all(u["closed"] for u in both if u["pass"] > 1 and u["approx_kl"] > 1.5 * 0.001)


def test_rlvr_reuse_results_do_not_depend_on_jobs(tmp_path):
    bench = load_benchmark()
    common = ["--quick", "--no-plots", "--arms", "k1,k2,rnd2@0.5", "--seeds", "2", "--batches", "2",
              "--sft-max-steps", "0", "--heldout", "32"]
    one = bench.main([*common, "--jobs", "1", "--out", str(tmp_path / "a")])
    two = bench.main([*common, "--jobs", "2", "--out", str(tmp_path / "b")])
    assert [(r["arm"], r["seed"]) for r in one["runs"]] == [(r["arm"], r["seed"]) for r in two["runs"]]
    for r1, r2 in zip(one["runs"], two["runs"]):
        assert [c[2] for c in r1["curve"]] == [c[2] for c in r2["curve"]]
        assert [u["grad_norm"] for u in r1["updates"]] == [u["grad_norm"] for u in r2["updates"]]


def test_rlvr_reuse_rerun_of_the_analysis_from_the_json(tmp_path):
    bench = load_benchmark()
    res = bench.main(["--quick", "--no-plots", "--arms", "k1,k2,dgg2@0.3:paper,cal2@0.5,rnd2@0.5,sb32@0.01",
                      "--seeds", "2", "--jobs", "2", "--out", str(tmp_path / "a")])  # calibration in a worker too
    cal = res["analysis"]["calibration"]
    assert len(cal) == 1 and cal[0]["threshold"] >= 0 and len(cal[0]["observer_rate_eval_seeds"]) == 2
    coin = [r for r in res["runs"] if r["arm"] == "random K=2 p=0.5"]
    assert all(u["pass"] == 2 for r in coin for u in r["updates"] if u["closed"])  # the coin ends batches at pass 2
    again = bench.main(["--from-json", str(tmp_path / "a" / "rlvr_reuse_quick_results.json"), "--no-plots",
                        "--out", str(tmp_path / "b")])
    assert again["analysis"]["arms"].keys() == res["analysis"]["arms"].keys()
    for name, s in res["analysis"]["arms"].items():
        # the JSON keeps 5 significant digits
        assert again["analysis"]["arms"][name]["final_acc_per_seed"] == pytest.approx(s["final_acc_per_seed"], abs=1e-4)
        e1, e2 = res["analysis"]["efficiency"][name], again["analysis"]["efficiency"][name]
        assert (e1["reached"], e1["seeds"]) == (e2["reached"], e2["seeds"])
    md = (tmp_path / "b" / "rlvr_reuse_quick_results.md").read_text()
    assert "analysis rewritten from its JSON" in md and "## Calibration" in md and "## Sample efficiency" in md
    data = json.loads((tmp_path / "b" / "rlvr_reuse_quick_results.json").read_text())
    assert "analysis" in data and data["env"]["date"] == res["env"]["date"]


@pytest.fixture
def bench_no_work(monkeypatch):
    """The benchmark module, with the first piece of work (building the model) raising: a refused flag must stop
    the script before it."""
    bench = load_benchmark()

    def make_model(*a, **k):
        raise AssertionError("rlvr_reuse started working before refusing the flag")

    monkeypatch.setattr(bench.policy, "make_model", make_model)
    return bench


@pytest.mark.parametrize("argv, message", [
    # abbreviations are refused: a preset must never win over a flag the user meant to give
    (["--seed", "2"], "unrecognized arguments: --seed 2"),
    (["--batch", "3"], "unrecognized arguments: --batch 3"),
    (["--config", "gpu", "--dev", "cpu"], "unrecognized arguments: --dev cpu"),
    (["--seeds", "0"], "argument --seeds: must be an int >= 1, got '0'"),
    (["--quick", "--seeds", "0"], "argument --seeds: must be an int >= 1"),
    (["--batches", "0"], "argument --batches"),
    (["--group", "1"], "argument --group: must be an int >= 2"),
    (["--vocab", "11"], "argument --vocab: must be an int >= 12"),
    (["--task", "reverse", "--vocab", "12"], "--vocab 12: the reverse task needs >= 16"),
    (["--task", "nosuch"], "argument --task: invalid choice"),
    (["--jobs", "0"], "argument --jobs: must be an int >= 1"),
    (["--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
    (["--sft-target", "1.5"], "argument --sft-target"),
    (["--window", "1"], "argument --window"),
    (["--arms", "bogus"], "--arms: bad arm 'bogus'"),
    (["--arms", "k0"], "--arms: bad arm 'k0'"),
    (["--arms", "sb38@-1"], "--arms: bad arm 'sb38@-1': the target KL must be a finite number > 0"),
    (["--arms", "dgg8@-1"], "--arms: bad arm 'dgg8@-1': the threshold must be a number >= 0"),
    (["--width", "64", "--heads", "5"], "--width 64 is not a multiple of --heads 5"),
    (["--calib-seed", "1", "--seeds", "3"], "--calib-seed 1 is one of the evaluated seeds 0..2"),
    (["--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
    (["--from-json", "no-such-results.json"], "--from-json no-such-results.json: no such file"),
])
def test_rlvr_reuse_refuses_a_bad_flag_before_any_work(argv, message, bench_no_work, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_no_work.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_rlvr_reuse_gpu_config_without_cuda_is_refused(bench_no_work, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit) as e:
        bench_no_work.main(["--config", "gpu", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--device 'cuda' (from --config gpu): torch sees no CUDA device" in capsys.readouterr().err


def test_rlvr_reuse_explicit_flags_win_over_presets(tmp_path):
    bench = load_benchmark()
    out = str(tmp_path / "o")
    args = bench.parse_args(["--quick", "--seeds", "2", "--batches", "3", "--arms", "k1", "--out", out])
    assert (args.seeds, args.batches, args.arms) == (2, 3, "k1") and args.vocab == bench.preset("cpu", "addition",
                                                                                                 True)["vocab"]
    args = bench.parse_args(["--config", "gpu", "--device=cpu", "--lr", "0.01", "--out", out])
    assert (args.device, args.lr, args.vocab) == ("cpu", 0.01, 32768)
    args = bench.parse_args(["--task", "reverse", "--config", "gpu", "--device=cpu", "--out", out])
    assert args.vocab == 32768 and args.seq_len == bench.tasks.get("reverse").presets["gpu"]["seq_len"]


def test_rlvr_reuse_out_is_checked_before_any_work(bench_no_work, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        bench_no_work.main(["--quick", "--out", str(blocker / "results")])
    assert e.value.code == 2 and "cannot write there" in capsys.readouterr().err
    out = tmp_path / "new" / "results"
    bench_no_work.parse_args(["--quick", "--out", str(out)])
    assert out.is_dir()  # created when the flags are read, before any work


def test_rlvr_reuse_raw_json_survives_a_failing_analysis(tmp_path, monkeypatch):
    bench = load_benchmark()

    def broken(res):
        raise RuntimeError("analysis broke")

    monkeypatch.setattr(bench.analysis, "analyse", broken)
    with pytest.raises(RuntimeError, match="analysis broke"):
        bench.main(["--quick", "--no-plots", "--arms", "k1", "--batches", "1", "--sft-max-steps", "0",
                    "--heldout", "16", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "rlvr_reuse_quick_results.json").read_text())
    assert [r["arm"] for r in data["runs"]] == ["fixed K=1"] and "analysis" not in data
    assert not (tmp_path / "rlvr_reuse_quick_results.md").exists()
