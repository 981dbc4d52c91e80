"""The gate on DeepSpeed ZeRO-1/2/3 engines, on CPU (DS_ACCELERATOR=cpu, gloo), 1 and 2 ranks.

Each test launches ``tests/ds_worker.py`` once per rank with test_distributed.py's
launcher: a hard wall-clock limit per launch kills the ranks and fails the
test.  Every launch packs many checks (see ds_worker.py), because starting the
ranks (importing torch, DeepSpeed, transformers) is most of the cost.  No
DeepSpeed op is compiled (ds_worker.py says how).
"""
from __future__ import annotations

import importlib.util

import pytest

import test_distributed
from test_distributed import HERE

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason='needs deepspeed (pip install "dgg-kernels[deepspeed]")'),
    test_distributed.pytestmark,
]


@pytest.fixture
def launch(monkeypatch, tmp_path):
    monkeypatch.setattr(test_distributed, "WORKER", HERE / "ds_worker.py")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # before the ranks import deepspeed
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # never the user's cache

    def run(case, world, timeout):
        out = test_distributed._launch(case, world, tmp_path, timeout)
        assert not (tmp_path / "torch_extensions").exists(), "a DeepSpeed op was JIT-compiled"
        return out

    return run


@pytest.mark.parametrize("world", [1, 2])
def test_zero_engines(launch, world):
    """ZeRO-1/2/3, both discard routes, explicit and hooked steps, accumulation, bf16 (2 ranks), refusals."""
    launch("engines", world, timeout=300)


def test_round_robin_gradients_refused(launch):
    """ZeRO-1/2 with round_robin_gradients: DeepSpeed maps the fragments in another order than it lays them out,
    so the gate refuses the engine by name rather than judge another parameter's gradient."""
    launch("round_robin", 2, timeout=240)


def test_step_without_reduced_gradient_refused(launch):
    """gate.step() before any backward or after engine.step() raises at every stage (ZeRO-3 included), with the
    gate's state unchanged on every rank."""
    launch("pending", 2, timeout=240)


def test_checkpoint_carries_gate(launch):
    """A run resumed through engine.save_checkpoint / load_checkpoint decides, and ends, bit for bit as the
    uninterrupted run, at ZeRO-1/2/3."""
    launch("checkpoint", 2, timeout=300)


def test_refusal_and_docstring_texts(launch):
    """The BF16_Optimizer refusal names the configuration that causes it; the module docstring's all-gather size
    is what a step sends."""
    launch("messages", 2, timeout=240)


def test_trl_zero2_zero3_two_ranks(launch):
    """DGGGRPOTrainer under accelerate's DeepSpeed plugin on 2 ranks: ZeRO-2 (discard "overflow") and ZeRO-3
    ("found_inf")."""
    for mod in ("trl", "transformers", "accelerate", "datasets", "tokenizers"):
        pytest.importorskip(mod)
    launch("trl", 2, timeout=300)


def test_trl_gate_discard_needs_deepspeed(tmp_path):
    """gate_discard is DeepSpeed's option: without DeepSpeed the trainer refuses it."""
    for mod in ("trl", "transformers", "datasets", "tokenizers"):
        pytest.importorskip(mod)
    from test_integrations_trl import _trainer

    with pytest.raises(ValueError, match="gate_discard applies under DeepSpeed only"):
        _trainer(tmp_path, gate_discard="overflow")
