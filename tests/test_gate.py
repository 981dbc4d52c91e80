"""The gate's semantics on the torch backend, against the plain-Python model."""
import math

import pytest
import torch

import dgg_kernels as dgg
from semantics_model import play
from sequences import GATE_CONFIGS, assert_stats_match, config_id, make_sequence, run_gate, same_records



@pytest.mark.parametrize("cfg", GATE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_backend_matches_model(cfg, dtype, seed):
    shapes = [(37, 11), (5,)]
    seq = make_sequence(seed * 100 + len(cfg), 300, shapes, dtype)
    monitor = [torch.nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes]
    gate = dgg.DynamicGradientGate(monitor, backend="torch", **cfg)
    got = run_gate(gate, seq)
    want = play(cfg, seq)
    assert len(got) == len(want) == 300
    n_closed = 0
    for i, (g, (w, stop)) in enumerate(zip(got, want)):
        assert g["closed"] == w["closed"], (i, g, w)
        assert_stats_match(g["stats"], w, i, w["err_scale"])
        assert g["should_stop"] == stop, i
        if g["closed"]:
            n_closed += 1
            assert g["zeroed"], i
        else:
            assert g["untouched"], i
    # the sequences must exercise both outcomes, or the comparison proves little
    assert 0 < n_closed < 300
    assert got[-1]["stats"]["closed_total"] == n_closed
    assert got[-1]["stats"]["accepted"] == 300 - n_closed


def test_nan_and_inf_close_even_in_warmup_and_at_first_reuse():
    w = torch.nn.Parameter(torch.empty(4, 3))
    gate = dgg.DynamicGradientGate(w, window=4, backend="torch")
    for bad in (math.nan, math.inf, -math.inf):
        gate.new_batch()
        g = torch.randn(4, 3)
        g[1, 2] = bad
        w.grad = g
        assert gate.step().item()
        assert torch.equal(w.grad, torch.zeros(4, 3))  # NaN replaced, not multiplied
        assert gate.should_stop()
    s = gate.stats()
    assert s["accepted"].item() == 0 and s["closed_total"].item() == 3


def test_z_is_zero_until_the_window_is_full():
    w = torch.nn.Parameter(torch.empty(10))
    gate = dgg.DynamicGradientGate(w, window=4, threshold=0.0, backend="torch")
    for i in range(4):
        w.grad = torch.randn(10) * (1 + i)
        assert not gate.step().item()  # warm-up never closes on a finite gradient
        assert gate.stats()["z"].item() == 0.0
    w.grad = torch.randn(10) * 100
    assert gate.step().item()
    assert gate.stats()["z"].item() > 0


def test_first_step_after_new_batch_never_closes_on_finite_grads():
    w = torch.nn.Parameter(torch.empty(10))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=0.0, max_reuse=10, backend="torch")
    for _ in range(3):
        w.grad = torch.randn(10)
        gate.step()
    gate.new_batch()
    w.grad = torch.randn(10) * 1000  # a huge spike at reuse index 1
    assert not gate.step().item()
    assert gate.stats()["reuse_index"].item() == 1
    assert gate.stats()["z"].item() > 0


def test_should_stop_after_max_reuse_and_new_batch_clears_it():
    w = torch.nn.Parameter(torch.empty(8))
    gate = dgg.DynamicGradientGate(w, window=100, max_reuse=3, backend="torch")
    gate.new_batch()
    stops = []
    for _ in range(3):
        w.grad = torch.randn(8)
        gate.step()
        stops.append(gate.should_stop())
    assert stops == [False, False, True]
    gate.new_batch()
    assert not gate.should_stop()


def test_params_grads_zeroed_and_none_skipped():
    lm = torch.nn.Parameter(torch.empty(6, 4))
    other = torch.nn.Parameter(torch.empty(3, dtype=torch.bfloat16))
    no_grad = torch.nn.Parameter(torch.empty(2))
    gate = dgg.DynamicGradientGate(lm, [lm, other, no_grad], backend="torch")
    lm.grad = torch.randn(6, 4)
    lm.grad[0, 0] = math.nan
    other.grad = torch.randn(3, dtype=torch.bfloat16)
    assert gate.step().item()
    assert torch.equal(lm.grad, torch.zeros(6, 4))
    assert torch.equal(other.grad, torch.zeros(3, dtype=torch.bfloat16))
    assert no_grad.grad is None


def test_step_returns_a_snapshot_bool_tensor():
    w = torch.nn.Parameter(torch.empty(5))
    gate = dgg.DynamicGradientGate(w, backend="torch")
    w.grad = torch.full((5,), math.nan)
    first = gate.step()
    w.grad = torch.randn(5)
    second = gate.step()
    assert first.dtype == torch.bool and first.dim() == 0
    assert first.item() and not second.item()


@pytest.mark.parametrize("statistic", ["norm", "energy", "increment"])
def test_state_dict_round_trip_continues_identically(statistic):
    seq = make_sequence(7, 120, [(13, 3)])
    first, rest = seq.events[:60], seq.events[60:]
    a_w = torch.nn.Parameter(torch.empty(13, 3))
    a = dgg.DynamicGradientGate(a_w, window=6, statistic=statistic, backend="torch")
    seq.events = first
    run_gate(a, seq)
    sd = a.state_dict()
    b_w = torch.nn.Parameter(torch.empty(13, 3))
    b = dgg.DynamicGradientGate(b_w, window=6, statistic=statistic, backend="torch")
    b.load_state_dict(sd)
    seq.events = rest
    ra, rb = run_gate(a, seq), run_gate(b, seq)
    assert same_records(ra, rb)
    assert any(r["closed"] for r in ra) and not all(r["closed"] for r in ra)
    # the saved copy is detached from the live state
    assert not torch.equal(sd["state"]["ints"], a.state.ints)


def test_load_state_dict_with_other_settings_changes_nothing():
    w = torch.nn.Parameter(torch.empty(5))
    a = dgg.DynamicGradientGate(w, window=4, backend="torch")
    b = dgg.DynamicGradientGate(w, window=5, backend="torch")
    w.grad = torch.randn(5)
    b.step()
    before = b.state_dict()
    with pytest.raises(ValueError, match="window"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(KeyError):
        b.load_state_dict({"state": {}})
    after = b.state_dict()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(window=1), "window"),
        (dict(window=2.5), "window"),
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=math.nan), "threshold"),
        (dict(threshold=-math.inf), "threshold"),
        (dict(threshold="0.3"), "threshold"),
        (dict(window_mode="epoch"), "window_mode"),
        (dict(window_mode=None), "window_mode"),
        (dict(statistic="energy+norm"), "statistic"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
        (dict(max_reuse=0), "max_reuse"),
        (dict(statistic="l1"), "statistic"),
        (dict(backend="jax"), "backend"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_argument(kwargs, name):
    w = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(ValueError, match=name):
        dgg.DynamicGradientGate(w, **kwargs)
    with pytest.raises(ValueError, match=name):
        dgg.GateConfig(**kwargs)


def test_missing_monitor_grad_raises_and_modifies_nothing():
    a = torch.nn.Parameter(torch.empty(4))
    b = torch.nn.Parameter(torch.empty(3))
    gate = dgg.DynamicGradientGate([a, b], backend="torch")
    a.grad = torch.full((4,), math.nan)  # would close the gate if anything ran
    before = gate.state_dict()["state"]
    with pytest.raises(RuntimeError, match="backward has not reached"):
        gate.step()
    assert torch.isnan(a.grad).all()
    after = gate.state_dict()["state"]
    for k in before:
        assert torch.equal(before[k], after[k])


def test_devices_must_match():
    with pytest.raises(ValueError, match="one device"):
        dgg.DynamicGradientGate(torch.empty(3), [torch.empty(3, device="meta")])


def test_empty_or_non_tensor_monitor():
    with pytest.raises(ValueError, match="empty"):
        dgg.DynamicGradientGate([])
    with pytest.raises(TypeError, match="not a Tensor"):
        dgg.DynamicGradientGate([torch.empty(2), 3.0])


def test_auto_on_cpu_is_torch_and_says_so():
    gate = dgg.DynamicGradientGate(torch.nn.Parameter(torch.empty(3)))
    assert gate.backend == "torch"


def test_unavailable_backends_raise_clear_errors(monkeypatch):
    w = torch.nn.Parameter(torch.empty(3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        dgg.DynamicGradientGate(w, backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        dgg.DynamicGradientGate(w, backend="cuda")


def test_public_names():
    assert dgg.__version__
    assert set(dgg.__all__) >= {"DynamicGradientGate", "GateConfig", "__version__"}
    with pytest.raises(Exception):
        dgg.GateConfig().window = 3  # frozen


def test_a_gate_and_a_model_holding_a_gated_linear_can_be_copied_and_saved(tmp_path):
    """copy.deepcopy and torch.save of a gate and of a model holding a GatedLinear (a reference policy copied
    from the trained one is common in RL); the copy steps on its own state."""
    import copy

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    gate = dgg.DynamicGradientGate(m[1].weight, window=2, backend="torch")
    m[1] = dgg.GatedLinear(m[1], gate)
    m2 = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    g2 = copy.deepcopy(gate)
    assert g2._kernels.backend is g2._backend and g2._kernels.backend is not gate._backend
    gate.monitor[0].grad = torch.ones(3, 4)
    gate.step()
    assert int(gate.stats()["accepted"]) == 1 and int(g2.stats()["accepted"]) == 0
    assert m2 is not m
    # a saved gate loads with its handle on its own backend
    torch.save(gate, tmp_path / "g.pt")
    g3 = torch.load(tmp_path / "g.pt", weights_only=False)
    assert g3._kernels.backend is g3._backend and g3._kernels.backend is not gate._backend
    g3.monitor[0].grad = torch.ones(3, 4)
    g3.step()
    assert int(g3.stats()["accepted"]) == 2 and int(gate.stats()["accepted"]) == 1
