"""The real-LLM study's path (benchmarks/rlvr/llm.py): SmolLM2-135M-Instruct loads, samples, trains a pass
through the gate and evaluates.  Skips, saying why, where the model's packages are not installed."""
from __future__ import annotations

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
