"""benchmarks/rlvr_reuse.py: arm specs, flags and configurations (its smoke run is in test_loop.py)."""
import importlib.util
import os
import sys

import pytest


def _load_benchmark():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "rlvr_reuse.py")
    spec = importlib.util.spec_from_file_location("rlvr_reuse_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_rlvr_reuse_arm_specs_and_flags():
    bench = _load_benchmark()
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
    gpu = bench.parse_args(["--config", "gpu", "--seeds", "3"])
    assert gpu.device == "cuda" and gpu.vocab == 32768 and gpu.lr == 1e-3 and gpu.seeds == 3
    quick = bench.parse_args(["--quick", "--lr=0.01"])
    assert quick.batches == 5 and quick.lr == 0.01
