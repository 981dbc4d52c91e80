"""python -m dgg_kernels.demo: runs, prints what a newcomer needs, and reports honestly."""
import re

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
    for run in ("fixed K=1", "fixed K=8", "gated K=8", "coin K=8"):
        assert run in out
    # the window fills first (no z, cannot close), then every pass shows its index, z, the threshold and why
    assert "batch  1 pass 1:" in out and "window still filling" in out
    assert "pass 1 is never tested" in out
    decisions = re.findall(r"batch +\d+ pass (\d): .*-> (open|CLOSED)", out)
    assert decisions and all(d in ("open", "CLOSED") for _, d in decisions)
    closes = re.findall(r"z=[+-]\d+\.\d+ > 0 -> CLOSED: update discarded, stop reusing this batch", out)
    assert all(p != "1" for p, d in decisions if d == "CLOSED") and len(closes) == sum(d == "CLOSED" for _, d in decisions)
    # the verdict is computed from the numbers, and the demo ends by saying what to try next
    assert "summary (seed 0" in out and ("the gate helped" in out or "the gate did not help" in out)
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
                 "--window-mode", "--window", "--coin", "--show", "--target", "--threads"):
        assert flag in out
