"""Saved gate states of every layout this package has written load into today's gate and continue correctly.

tests/data/gate_states/ keeps one file per past layout, each written by the commit that used it
(make_states.py there says how).  Each is loaded into a gate with the same settings: the saved values
come back unchanged, the state equals the one today's code reaches on the same gradients (counters and
decision exactly; floats within float32 rounding, since the order of the reduction's additions may
change between releases), and the next steps make the same decisions as that uninterrupted run.
Anything else is refused with an error that names the version found, and the gate is left as it was.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import dgg_kernels as dgg
from dgg_kernels import state as S
from contract import load_module

DATA = Path(__file__).resolve().parent / "data" / "gate_states"


M = load_module(DATA / "make_states.py", "gate_states_make")


def _saved(name: str) -> dict:
    return torch.load(DATA / name, weights_only=True)


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _close_state(a: dict, b: dict) -> bool:
    """Integers and the decision equal; floats within float32 rounding of the energies they derive from
    (an increment is a difference of two energies, so its error is the energies' size, not its own)."""
    if a.keys() != b.keys() or any(a[k].dtype != b[k].dtype or a[k].shape != b[k].shape for k in a):
        return False
    if not all(torch.equal(a[k], b[k]) for k in ("ints", "decision")):
        return False
    scale = max(1.0, b["prev"].abs().max().item(), b["ring"].abs().max().item(), b["stats"][:2].abs().max().item())
    return all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5 * scale)
               for k in ("ring", "prev", "stats"))


def _records_agree(ra: list[dict], rb: list[dict]) -> bool:
    """The same decisions and counters step for step; the reported floats within float32 rounding (as above)."""
    def agree(x, y, scale):
        if isinstance(x, float):
            return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5 * scale)
        return x == y

    return len(ra) == len(rb) and all(
        a.keys() == b.keys() and all(agree(a[k], b[k], max(1.0, abs(b["energy"]))) for k in a) for a, b in zip(ra, rb)
    )


def test_todays_layout_is_the_newest_recorded_version():
    """A slot or a setting added to the state needs a new version (dgg_kernels/state.py: 'To add version N+1')."""
    today, newest = S.todays_layout(), S.LAYOUTS[-1]
    assert (today.n_ints, today.n_stats, today.config_keys) == (newest.n_ints, newest.n_stats, newest.config_keys), (
        f"today's gate state has {today.n_ints} ints, {today.n_stats} stats and settings {sorted(today.config_keys)}; "
        f"version {S.STATE_VERSION}, the newest in LAYOUTS, has {newest.n_ints}, {newest.n_stats} and "
        f"{sorted(newest.config_keys)}: add version {S.STATE_VERSION + 1} (dgg_kernels/state.py, 'To add version N+1')"
    )
    _, gate = M.make_gate(dgg, {})
    assert gate.state.decision.dtype == newest.decision


def test_every_layout_ever_written_has_a_committed_file():
    assert [lay.version for lay in S.LAYOUTS] == list(range(1, S.STATE_VERSION + 1))
    assert {e.version for e in M.STATES} == set(range(1, S.STATE_VERSION + 1))
    for e in M.STATES:
        assert (DATA / e.name).is_file(), e.name
        assert e.name in (DATA / "README.md").read_text(), f"{e.name} is not described in README.md"
    # each layout once written without "version" has a file without it (recognized by its layout alone)
    unversioned = {e.version for e in M.STATES if "version" not in _saved(e.name)}
    assert unversioned == {lay.version for lay in S.LAYOUTS if not lay.versioned}


@pytest.mark.parametrize("entry", M.STATES, ids=lambda e: e.name)
def test_saved_state_loads_and_continues_like_todays_gate(entry):
    sd = _saved(entry.name)
    assert S.saved_version(sd) == entry.version
    if "version" not in sd:  # written before the key existed: recognized by its layout
        assert not S.LAYOUTS[entry.version - 1].versioned
    originals = {k: v.clone() for k, v in sd["state"].items()}
    w, gate = M.make_gate(dgg, entry.kwargs)
    gate.load_state_dict(sd)
    loaded = gate.state_dict()["state"]
    # every saved value comes back unchanged (an older layout's slots keep their place; uint8 -> bool)
    for name in ("ring", "prev"):
        assert torch.equal(loaded[name], originals[name]), name
    for name in ("ints", "stats"):
        assert torch.equal(loaded[name][: originals[name].numel()], originals[name]), name
    assert loaded["decision"].dtype == torch.bool and bool(loaded["decision"]) == bool(originals["decision"])
    assert bool(gate.state.decision) and gate.should_stop()  # saved right after a close: kept
    assert _equal_state(sd["state"], originals) and S.saved_version(sd) == entry.version  # the input is untouched
    # today's code on the same gradients: the state the loaded one must equal, new slots included
    w_ref, ref = M.make_gate(dgg, entry.kwargs)
    M.run(w_ref, ref, range(M.PREFIX))
    if entry.version < 6:
        # BATCHES (version 6) counts new_batch() calls from the upgrade on: an older gate did not count them
        assert loaded["ints"][S.BATCHES] == 0
        ref.state.ints[S.BATCHES] = 0
    assert _close_state(loaded, ref.state_dict()["state"])
    # the next steps: the same decisions and reports as the uninterrupted run
    steps = range(M.PREFIX, M.PREFIX + M.CONTINUE)
    rec, rec_ref = M.run(w, gate, steps), M.run(w_ref, ref, steps)
    assert _records_agree(rec, rec_ref)
    assert any(r["closed"] for r in rec) and not all(r["closed"] for r in rec)
    assert _close_state(gate.state_dict()["state"], ref.state_dict()["state"])
    # saved again, it is today's layout with its version
    again = gate.state_dict()
    assert again["version"] == S.STATE_VERSION and S.saved_version(again) == S.STATE_VERSION


def test_first_release_uint8_decision_loads_closed_and_open():
    """The first release stored the decision as uint8; both values come back as today's bool."""
    sd = _saved("v1_first_release_norm.pt")
    assert sd["state"]["decision"].dtype == torch.uint8 and sd["state"]["ints"].numel() == 7
    kw = M.STATES[0].kwargs
    for value in (0, 1):
        old = {**sd, "state": {**sd["state"], "decision": torch.tensor(value, dtype=torch.uint8)}}
        _, gate = M.make_gate(dgg, kw)
        gate.load_state_dict(old)
        assert gate.state.decision.dtype == torch.bool and bool(gate.state.decision) == bool(value)
    up = S.upgrade(sd)
    assert up["version"] == S.STATE_VERSION and up["config"]["window_mode"] == "step"
    stats = up["state"]["stats"]
    assert stats[S.Z_ENERGY] == stats[S.Z] and stats[S.Z_INCREMENT] == 0  # "norm": the one test it ran
    assert up["state"]["ints"][S.POS2] == 0 and up["state"]["ints"][S.COUNT2] == 0


def test_state_dict_carries_the_version_and_round_trips(tmp_path):
    w, gate = M.make_gate(dgg, dict(window=3, statistic="energy+increment"))
    M.run(w, gate, range(9))
    sd = gate.state_dict()
    assert sd["version"] == S.STATE_VERSION and set(sd) == {"version", "config", "state"}
    torch.save(sd, tmp_path / "g.pt")
    _, fresh = M.make_gate(dgg, dict(window=3, statistic="energy+increment"))
    fresh.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert _equal_state(fresh.state_dict()["state"], sd["state"])


def test_checkout_file_is_what_todays_code_writes(tmp_path):
    """make_states.py rewrites the file of this checkout's layout (and would refuse a stale one)."""
    (entry,) = [e for e in M.STATES if e.commit is None]
    out = M.write(entry, tmp_path)
    new, committed = torch.load(out, weights_only=True), _saved(entry.name)
    assert new["version"] == committed["version"] == S.STATE_VERSION and new["config"] == committed["config"]
    assert _close_state(new["state"], committed["state"])  # floats: the reduction order may change


def _ran_gate(**kw):
    w, gate = M.make_gate(dgg, dict(window=4, threshold=0.3, statistic="norm", **kw))
    M.run(w, gate, range(10))
    return gate


def _refused(gate, sd, exc, pattern):
    before = gate.state_dict()
    with pytest.raises(exc, match=pattern):
        gate.load_state_dict(sd)
    assert _equal_state(gate.state_dict()["state"], before["state"]), "a refused state_dict changed the gate"


def test_newer_version_is_refused_saying_which_and_what_to_do():
    gate = _ran_gate()
    sd = {**gate.state_dict(), "version": S.STATE_VERSION + 1}
    _refused(gate, sd, ValueError, rf"version {S.STATE_VERSION + 1}.*reads versions 1 to {S.STATE_VERSION}.*newer "
                                   r"dgg-kernels.*Install")


@pytest.mark.parametrize("bad", [0, -1, "3", 2.0, True, None])
def test_malformed_version_is_refused(bad):
    gate = _ran_gate()
    _refused(gate, {**gate.state_dict(), "version": bad}, ValueError,
             re.escape(f"gate state_dict['version'] is {bad!r}") + ".*an int from 1 to")


def test_unknown_unversioned_layout_is_refused_naming_what_was_found():
    gate = _ran_gate()
    sd = gate.state_dict()
    del sd["version"]
    hybrid = {**sd, "state": {**sd["state"], "ints": sd["state"]["ints"][:8].clone()}}  # 8 ints: never written
    _refused(gate, hybrid, ValueError, r"no 'version' and matches no layout this package ever wrote \(found "
                                       r".*ints int64\[8\].*Known layouts: version 1 .*fresh gate")
    # 7 ints and 7 stats with window_mode in the config: no release wrote that either
    old = _saved("v2_energy.pt")
    mixed = {**old, "config": {**old["config"], "window_mode": "step"}}
    _refused(gate, mixed, ValueError, "matches no layout")


def test_declared_version_must_hold_its_layout():
    gate = _ran_gate()
    v1 = _saved("v1_first_release_norm.pt")
    _refused(gate, {**v1, "version": 2}, ValueError,
             r"says version 2, but state\['decision'\] is uint8\[\], version 2 stores bool\[\]")
    _refused(gate, {**v1, "version": 3}, ValueError, r"says version 3, but config keys are")
    today = gate.state_dict()
    _refused(gate, {**today, "version": 1}, ValueError, r"says version 1, but config keys are")
    n = S.N_STATS
    _refused(gate, {**today, "state": {**today["state"], "stats": today["state"]["stats"].double()}}, ValueError,
             rf"says version {S.STATE_VERSION}, but state\['stats'\] is float64\[{n}\], version {S.STATE_VERSION} "
             rf"stores float32\[{n}\]")
    _refused(gate, {**today, "state": {**today["state"], "ring": [0.0] * 4}}, ValueError, r"is a list, not a Tensor")
    partial = {**today, "state": {k: v for k, v in today["state"].items() if k != "prev"}}
    _refused(gate, partial, ValueError, r"state is missing \['prev'\]")


def test_old_state_with_other_settings_is_refused_by_name():
    v1 = _saved("v1_first_release_norm.pt")  # window 4, a "step" window (version 1 knew no other)
    _refused(_ran_gate(window_mode="batch"), v1, ValueError, r"window_mode='step' \(this gate: 'batch'\)")
    w, other = M.make_gate(dgg, dict(window=5, threshold=0.3, statistic="norm"))
    M.run(w, other, range(10))
    _refused(other, v1, ValueError, r"window=4 \(this gate: 5\)")


def test_gate_state_alone_takes_only_todays_layout():
    gate = _ran_gate()
    v1 = _saved("v1_first_release_norm.pt")["state"]
    before = gate.state.state_dict()
    with pytest.raises(ValueError, match=r"\['ints'\] has shape \(7,\).*DynamicGradientGate.load_state_dict, which upgrades"):
        gate.state.load_state_dict(v1)
    assert _equal_state(gate.state.state_dict(), before)


@pytest.mark.parametrize("slot, value, what", [("POS", 1000, "POS is 1000, outside"), ("POS", -2, "POS is -2"),
                                               ("COUNT2", 5, "COUNT2 is 5, outside"), ("STOP", 3, "STOP is 3"),
                                               ("REUSE", -1, "REUSE is -1, negative")])
def test_counters_out_of_range_are_refused_before_anything_loads(slot, value, what):
    """A damaged or hand-made state whose ring index or fill count lies outside the window would make the
    Triton and CUDA kernels write outside the ring: refused, naming the slot, with the gate unchanged."""
    gate = _ran_gate()
    sd = gate.state_dict()
    bad = {**sd, "state": {**sd["state"], "ints": sd["state"]["ints"].clone()}}
    bad["state"]["ints"][getattr(S, slot)] = value
    before = gate.state_dict()
    with pytest.raises(ValueError, match=what):
        gate.load_state_dict(bad)
    assert _equal_state(gate.state_dict()["state"], before["state"])
