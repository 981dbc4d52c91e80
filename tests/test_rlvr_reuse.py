"""benchmarks/rlvr_reuse.py: arm specs, flags and configurations (its smoke run is in test_loop.py)."""
import os

import pytest

from contract import load_benchmark




def test_rlvr_reuse_arm_specs_and_flags():
    import torch

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
    assert args.vocab == 2048 and args.seeds >= 5
    gpu = bench.parse_args(["--config", "gpu", "--seeds", "3", "--device", "cpu"])  # a flag given wins
    assert gpu.device == "cpu" and gpu.vocab == 32768 and gpu.lr == 1e-3 and gpu.seeds == 3
    if torch.cuda.is_available():
        assert bench.parse_args(["--config", "gpu"]).device == "cuda"
    quick = bench.parse_args(["--quick", "--lr=0.01"])
    assert quick.batches == 5 and quick.lr == 0.01


def test_rlvr_reuse_paper_calibrated_and_control_arms():
    bench = load_benchmark()
    arms = bench.parse_arms("dgg8@0.3:paper,dgg8@0.3:norm:batch,cal8@0.5:paper,rnd8@0.5")
    assert [a.name for a in arms] == ["dgg K=8 t=0.3 paper/step", "dgg K=8 t=0.3 norm/batch",
                                      "cal K=8 rate=0.5 paper/step", "random K=8 p=0.5"]
    assert arms[0].statistic == "energy+increment" and arms[1].window_mode == "batch"
    assert arms[2].kind == "cal" and arms[2].threshold is None and arms[2].close_rate == 0.5
    assert arms[3].kind == "rnd" and not arms[3].gated
    for bad in ("rnd8@1.5", "cal8@0:paper"):
        with pytest.raises(ValueError):
            bench.parse_arms(bad)


def test_rlvr_reuse_rerun_of_the_analysis_from_the_json(tmp_path):
    import torch

    bench = load_benchmark()
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--quick", "--no-plots", "--arms", "k1,k2,dgg2@0.3:paper,cal2@0.5,rnd2@0.5", "--seeds", "2",
                          "--out", str(tmp_path / "a")])
    finally:
        torch.set_num_threads(threads)
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
    md = (tmp_path / "b" / "rlvr_reuse_quick_results.md").read_text()
    assert "analysis rewritten from its JSON" in md and "## Calibration" in md


@pytest.fixture
def bench_no_work(monkeypatch):
    """The benchmark module, with the first piece of work (building the model) raising: a refused flag must stop
    the script before it."""
    bench = load_benchmark()

    def make_model(*a, **k):
        raise AssertionError("rlvr_reuse started working before refusing the flag")

    monkeypatch.setattr(bench, "make_model", make_model)
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
    (["--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
    (["--sft-target", "1.5"], "argument --sft-target"),
    (["--window", "1"], "argument --window"),
    (["--arms", "bogus"], "--arms: bad arm 'bogus'"),
    (["--arms", "k0"], "--arms: bad arm 'k0'"),
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
    import torch

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
    assert (args.seeds, args.batches, args.arms) == (2, 3, "k1") and args.vocab == bench.QUICK["vocab"]
    args = bench.parse_args(["--config", "gpu", "--device=cpu", "--lr", "0.01", "--out", out])
    assert (args.device, args.lr, args.vocab) == ("cpu", 0.01, 32768)


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
    import json

    import torch

    bench = load_benchmark()

    def broken(res):
        raise RuntimeError("analysis broke")

    monkeypatch.setattr(bench, "analyse", broken)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="analysis broke"):
            bench.main(["--quick", "--no-plots", "--arms", "k1", "--batches", "1", "--sft-max-steps", "0",
                        "--heldout", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "rlvr_reuse_quick_results.json").read_text())
    assert [r["arm"] for r in data["runs"]] == ["fixed K=1"] and "analysis" not in data
    assert not (tmp_path / "rlvr_reuse_quick_results.md").exists()
