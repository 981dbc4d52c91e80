"""python -m dgg_kernels.demo: runs, prints what a newcomer needs, and reports honestly."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgg_kernels import demo


def test_demo_runs_and_explains_each_decision(capsys):
    threads = torch.get_num_threads()
    try:
        demo.main(["--target", "0", "--batches", "3", "--show", "3", "--window", "2", "--threshold", "0"])
    finally:
        torch.set_num_threads(threads)  # the demo pins one thread; leave the session as it was
    out = capsys.readouterr().out
    assert "warm-up: 0 supervised steps" in out
    for run in ("fixed K=1", "fixed K=8", "gated K=8", "KL stop K=8", "coin K=8"):
        assert run in out
    # the KL stop's run shows the KL the gate judged and its limit (1.5 x 0.01) on every pass
    kl_lines = re.findall(r"pass (\d): KL to the rollout policy (\d+\.\d+)(;| <= 0\.015| > 0\.015)", out)
    assert len(kl_lines) >= 3 and all((p == "1") == (how == ";") for p, _, how in kl_lines)
    # the window fills first (no z, cannot close), then every pass shows its index, z, the threshold and why
    assert "batch  1 pass 1:" in out and "window still filling" in out
    assert "pass 1 is never tested" in out
    decisions = re.findall(r"batch +\d+ pass (\d): .*-> (open|CLOSED)", out)
    assert decisions and all(d in ("open", "CLOSED") for _, d in decisions)
    closes = re.findall(r"z=[+-]\d+\.\d+ > 0 -> CLOSED: update discarded, stop reusing this batch", out)
    assert all(p != "1" for p, d in decisions if d == "CLOSED") and len(closes) == sum(d == "CLOSED" for _, d in decisions)
    # the verdict is computed from the numbers, and the demo ends by saying what to try next
    assert "summary (seed 0" in out
    for what in ("the gate's gradient test", "the gate's KL stop"):
        assert f"{what} helped" in out or f"{what} did not help" in out
    assert out.rstrip().splitlines()[-1].startswith("next:")
    assert "calibration:" not in out  # a threshold was given


def test_demo_calibrates_the_threshold_from_an_observer_run(capsys):
    threads = torch.get_num_threads()
    try:
        demo.main(["--target", "0", "--batches", "2", "--show", "0", "--window", "2", "--coin", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "calibration: fixed K=8 on seed 1000 (2 batches)" in out and "Recorder" in out
    thr = float(re.search(r"threshold (\S+) \(at most 50%\) from here on", out).group(1))
    assert thr >= 0 and f"threshold {thr:.3g}." in out  # the gated run uses it
    assert "coin K=8" not in out


def test_demo_help_documents_every_flag(capsys):
    try:
        demo.main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for flag in ("--seed", "--batches", "--lr", "--threshold", "--close-rate", "--calib-batches", "--statistic",
                 "--window-mode", "--window", "--coin", "--show", "--target", "--threads", "--target-kl",
                 "--kl-factor"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "-1"], "argument --threshold: must be a number >= 0, got '-1'"),
    (["--threshold", "nan"], "argument --threshold: must be a number >= 0"),
    (["--close-rate", "1.5"], "argument --close-rate: must be a finite number >= 0 and <= 1, got '1.5'"),
    (["--coin", "-0.1"], "argument --coin"),
    (["--target", "2"], "argument --target"),
    (["--window", "1"], "argument --window: must be an int >= 2"),
    (["--batches", "0"], "argument --batches: must be an int >= 1"),
    (["--calib-batches", "0"], "argument --calib-batches"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0"),
    (["--threads", "0"], "argument --threads"),
    (["--target-kl", "0"], "argument --target-kl: must be a finite number > 0"),
    (["--kl-factor", "-1"], "argument --kl-factor"),
    (["--statistic", "paper"], "argument --statistic: invalid choice: 'paper'"),
    (["--window-mode", "epoch"], "argument --window-mode: invalid choice: 'epoch'"),
    (["--thresh", "0.3"], "unrecognized arguments: --thresh"),  # no abbreviations
])
def test_demo_refuses_a_bad_flag_before_the_warm_up(argv, message, monkeypatch, capsys):
    def warm_up(*a, **k):
        raise AssertionError("the demo started its warm-up before refusing the flag")

    monkeypatch.setattr(demo, "warm_up", warm_up)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_exit_status_is_2_on_a_bad_flag():
    proc = subprocess.run([sys.executable, "-m", "dgg_kernels.demo", "--close-rate", "1.5"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "--close-rate" in proc.stderr and "warm-up" not in proc.stdout
