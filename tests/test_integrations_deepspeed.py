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
