"""The device state of one gate: one layout, shared by every backend.

All tensors live on the gradients' device at fixed addresses for the gate's
lifetime (so a CUDA graph can capture a step), and every backend reads and
writes them in place.  The slot constants below are the single source of
truth for which entry means what; the Triton and CUDA kernels take them as
arguments from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import WINDOW_MODES

# ints: int64[N_INTS]
POS = 0           # next ring slot to write
COUNT = 1         # filled ring slots (<= window)
ACCEPTED = 2      # accepted (open) steps, ever
CLOSED_TOTAL = 3  # closed steps, ever
REUSE = 4         # reuse index (pass number) of the last step (0 right after new_batch())
STOP = 5          # 1 once the gate closed, or max_reuse passes ran, since new_batch()
HAS_PREV = 6      # 1 once an accepted step left an energy behind (for "increment")
POS2 = 7          # the second ring's POS (statistic "energy+increment": the increment test); else unused, 0
COUNT2 = 8        # the second ring's COUNT; else unused, 0
PASS_MODE = 9     # 1 once new_pass() was called since new_batch(): passes of several steps (see gate.new_pass)
PASS_NEW = 10     # 1 between new_pass() and the pass's first step, which advances the reuse index
BATCH_CLOSED = 11  # 1 once a step closed since new_batch() (in pass mode every later step of the batch closes)
BATCHES = 12      # new_batch() calls (from 0, or since an upgrade from version 5 or older): where it changes
                  # between two recorded steps a rollout batch starts (calibration.Recorder); no kernel reads it
N_INTS = 13

# stats: float32[N_STATS], the last step's report
ENERGY = 0     # sum of squared gradient entries
NORM = 1       # sqrt(ENERGY)
STATISTIC = 2  # the watched statistic s (energy+increment: of the reported test, see Z)
MEAN = 3       # mean of the filled window before this step (of the reported test)
STD = 4        # population std of the filled window before this step (of the reported test)
Z = 5          # (s - mean) / (std + eps) once the window is full, else 0
               # (energy+increment: the larger of Z_ENERGY and Z_INCREMENT; ties and NaN: the energy test's)
CLOSED = 6     # 1.0 closed / 0.0 open; float32 so it can serve as an optimizer's found_inf
Z_ENERGY = 7     # z of the magnitude test ("norm": of the norm; "energy", "energy+increment": of the energy);
                 # 0 for "increment", which runs no such test (as for a test whose window is filling)
Z_INCREMENT = 8  # z of the increment test ("increment", "energy+increment"); 0 for "norm" and "energy"
KL = 9           # the KL the step judged (observe_kl; the mean over the decision group's ranks), 0 if none given
N_STATS = 10

# hyper: float64[N_HYPER], settings the kernels read in float64
THRESHOLD = 0    # float("inf"): the observer mode
EPS = 1
WINDOW_MODE = 2  # GateConfig.window_mode_id: 0.0 "step", 1.0 "batch" (read at run time, like the threshold)
KL_LIMIT = 3     # GateConfig.kl_limit: kl_factor * target_kl, inf when there is no KL stop
N_HYPER = 4

# acc: float64[N_ACC], one step's inputs to the finalize (scratch, not saved)
ACC_ENERGY = 0   # the squared sum the reduce writes (a rank's partial until the combine)
ACC_KL = 1       # the KL observe_kl wrote (0 when none); the finalize reads it and writes 0 back
N_ACC = 2

_SAVED = ("ring", "prev", "ints", "stats", "decision")

# ----------------------------------------------------------------------------- the slot table
# Each group's slot names in index order: the constants above are the indices, this says which group each
# belongs to.  From it come csrc's StateSlots struct and group sizes (the generated header
# csrc/common/dgg_slots.h, `python -m dgg_kernels.csrc_header --write`; CI regenerates it and fails on a
# difference) and the slot list the CUDA extension takes (slot_order()).  A new slot: its constant, its
# name here, a new state version (below), then regenerate the header.
SLOT_GROUPS = {
    "ints": ("POS", "COUNT", "ACCEPTED", "CLOSED_TOTAL", "REUSE", "STOP", "HAS_PREV", "POS2", "COUNT2",
             "PASS_MODE", "PASS_NEW", "BATCH_CLOSED", "BATCHES"),
    "stats": ("ENERGY", "NORM", "STATISTIC", "MEAN", "STD", "Z", "CLOSED", "Z_ENERGY", "Z_INCREMENT", "KL"),
    "hyper": ("THRESHOLD", "EPS", "WINDOW_MODE", "KL_LIMIT"),
    "acc": ("ACC_ENERGY", "ACC_KL"),
}
_GROUP_SIZES = {"ints": N_INTS, "stats": N_STATS, "hyper": N_HYPER, "acc": N_ACC}
for _group, _names in SLOT_GROUPS.items():  # each group names its slots 0..n-1, once each
    assert [globals()[n] for n in _names] == list(range(_GROUP_SIZES[_group])), _group


def ints_problem(ints: torch.Tensor, window: int) -> str | None:
    """Why a saved ``ints`` (int64[N_INTS], today's layout) cannot be a gate's counters, or None.  The
    kernels index the ring with POS and POS2 and bound the filled slots by COUNT and COUNT2: out of range, a
    hand-made or damaged state would make them write outside the ring.  (A host read: for loading only.)"""
    v = [int(x) for x in ints.tolist()]  # host-read-ok: load_state_dict only, never step()
    for name in ("POS", "POS2"):
        if not 0 <= v[globals()[name]] < window:
            return f"{name} is {v[globals()[name]]}, outside [0, {window}) (the window)"
    for name in ("COUNT", "COUNT2"):
        if not 0 <= v[globals()[name]] <= window:
            return f"{name} is {v[globals()[name]]}, outside [0, {window}] (the window)"
    for name in ("STOP", "HAS_PREV", "PASS_MODE", "PASS_NEW", "BATCH_CLOSED"):
        if v[globals()[name]] not in (0, 1):
            return f"{name} is {v[globals()[name]]}, not 0 or 1"
    for name in ("ACCEPTED", "CLOSED_TOTAL", "REUSE", "BATCHES"):
        if v[globals()[name]] < 0:
            return f"{name} is {v[globals()[name]]}, negative"
    return None


def slot_order() -> list[int]:
    """Every slot's index, group by group in SLOT_GROUPS order: the order of csrc's StateSlots fields."""
    return [globals()[n] for names in SLOT_GROUPS.values() for n in names]


@dataclass
class GateState:
    """Device tensors of one gate.

    ring:     float64[n_rings * window]  the windows: ring buffers of statistics, one per Z-score
                               test.  [0, window): the first test's (slots < COUNT valid, next
                               write at POS); [window, 2 * window): statistic "energy+increment"
                               only, the increment test's (COUNT2, POS2)
    prev:     float64[1]       energy of the last accepted step (for "increment")
    ints:     int64[N_INTS]    counters, see the slot constants
    stats:    float32[N_STATS] the last step's report
    decision: bool[]           True when the last step closed the gate (step() returns a copy);
                               stats[CLOSED] holds the same bit as float32 for fused optimizers
    hyper:    float64[N_HYPER] threshold, eps, window mode and KL limit (from the config, not saved)
    acc:      float64[N_ACC]   scratch: the step's inputs, the squared sum the reduce writes and the KL
                               observe_kl writes, which the finalize reads (not saved)
    """

    ring: torch.Tensor
    prev: torch.Tensor
    ints: torch.Tensor
    stats: torch.Tensor
    decision: torch.Tensor
    hyper: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def new(
        cls, window: int, threshold: float, eps: float, device: torch.device, n_rings: int = 1,
        window_mode: str = "step", kl_limit: float = float("inf"),
    ) -> "GateState":
        """A fresh state; ``n_rings`` is GateConfig.n_rings (2 for statistic "energy+increment")."""
        f64 = dict(dtype=torch.float64, device=device)
        hyper = [0.0] * N_HYPER
        hyper[THRESHOLD], hyper[EPS], hyper[WINDOW_MODE] = float(threshold), float(eps), float(WINDOW_MODES.index(window_mode))
        hyper[KL_LIMIT] = float(kl_limit)
        return cls(
            ring=torch.zeros(n_rings * window, **f64),
            prev=torch.zeros(1, **f64),
            ints=torch.zeros(N_INTS, dtype=torch.int64, device=device),
            stats=torch.zeros(N_STATS, dtype=torch.float32, device=device),
            decision=torch.zeros((), dtype=torch.bool, device=device),
            hyper=torch.tensor(hyper, **f64),
            acc=torch.zeros(N_ACC, **f64),
        )

    def state_dict(self) -> dict:
        """Copies of the saved tensors (``_SAVED``), in today's layout (DynamicGradientGate.state_dict() adds
        the settings and the layout's version around them)."""
        return {name: getattr(self, name).detach().clone() for name in _SAVED}

    def load_state_dict(self, sd: dict) -> None:
        """Copy a saved state in (today's layout); validates everything first so a bad dict changes nothing.

        An older layout is upgraded by DynamicGradientGate.load_state_dict (``upgrade``), which
        needs the settings saved beside it.
        """
        if not isinstance(sd, dict):
            raise TypeError(f"gate state must be a dict of Tensors, got {type(sd).__name__}")
        missing = [k for k in _SAVED if k not in sd]
        if missing:
            raise KeyError(f"gate state_dict is missing {missing}")
        for name in _SAVED:
            mine, theirs = getattr(self, name), sd[name]
            if not isinstance(theirs, torch.Tensor):
                raise TypeError(f"gate state_dict[{name!r}] must be a Tensor, got {type(theirs).__name__}")
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(
                    f"gate state_dict[{name!r}] has shape {tuple(theirs.shape)} and dtype {theirs.dtype}, "
                    f"this gate needs {tuple(mine.shape)} and {mine.dtype} (version {STATE_VERSION} layout): "
                    "load a whole DynamicGradientGate.state_dict() with DynamicGradientGate.load_state_dict, "
                    "which upgrades older versions and checks the settings"
                )
        for name in _SAVED:
            getattr(self, name).copy_(sd[name])


# ----------------------------------------------------------------------------- saved layouts and their versions
# DynamicGradientGate.state_dict() is {"version": STATE_VERSION, "config": {...}, "state": GateState.state_dict()}.
# LAYOUTS lists every layout this package has ever written, oldest first (docs/semantics.md,
# "Saved state and its versions", has the same table).  Versions 1 and 2 were written without a
# "version" key, and so was version 3 before the key existed: a dict without one is recognized by
# its layout.  load_state_dict upgrades a saved dict one version at a time (_UPGRADES) to today's.
#
# To add version N+1 (a new slot or setting: whenever todays_layout() stops equalling LAYOUTS[-1],
# which tests/test_state_versions.py checks):
#   1. STATE_VERSION = N+1, and append its Layout to LAYOUTS (versioned=True: it always has the key);
#   2. write _upgrade_N(sd) -> the same dict in layout N+1 (new slots get the value a gate with that
#      history would hold) and register it in _UPGRADES;
#   3. a new slot also goes into SLOT_GROUPS; regenerate csrc's header (python -m dgg_kernels.csrc_header --write);
#   4. tests/data/gate_states/make_states.py: give the version N file written by "this checkout"
#      (commit None) the commit that last wrote version N, add a version N+1 entry with commit None,
#      run the script for it, and add a row to the table in docs/semantics.md.
# Never renumber a slot: a layout's slots keep their meaning in every later version.

STATE_VERSION = 6  # the layout state_dict() writes

_CONFIG_V1 = frozenset({"window", "threshold", "statistic", "eps", "max_reuse"})


@dataclass(frozen=True)
class Layout:
    """What a saved gate state_dict of one version holds (the checks applied before upgrading it)."""

    version: int
    written: str           # which code wrote it
    config_keys: frozenset  # the keys of sd["config"]
    n_ints: int            # sd["state"]["ints"]: int64[n_ints]
    n_stats: int           # sd["state"]["stats"]: float32[n_stats]
    decision: torch.dtype  # sd["state"]["decision"]: 0-dim, this dtype
    versioned: bool        # every dict of this version carries sd["version"] (False: some were saved without)
    ring_per_test: bool = False  # ring is float64[n_rings * window], one window per Z-score test (else [window])

    def describe(self) -> str:
        ring = "n_rings * window" if self.ring_per_test else "window"
        return (f"version {self.version} ({self.written}): config {sorted(self.config_keys)}, ring float64[{ring}], "
                f"ints int64[{self.n_ints}], stats float32[{self.n_stats}], decision {_dtype(self.decision)}")


LAYOUTS = (
    Layout(1, "the first release, commits 4d2ae8d to 344d949", _CONFIG_V1, 7, 7, torch.uint8, versioned=False),
    Layout(2, "commit 912531e: decision became bool", _CONFIG_V1, 7, 7, torch.bool, versioned=False),
    Layout(3, "commit 2abc23e on: window_mode, statistic energy+increment (two rings), per-test z; "
              "saved without \"version\" up to commit e7a07ae",
           _CONFIG_V1 | {"window_mode"}, 9, 9, torch.bool, versioned=False, ring_per_test=True),
    Layout(4, "passes of several steps: int slots PASS_MODE, PASS_NEW, BATCH_CLOSED; always with \"version\"",
           _CONFIG_V1 | {"window_mode"}, 12, 9, torch.bool, versioned=True, ring_per_test=True),
    Layout(5, "the KL stop: settings target_kl, kl_factor; stats slot KL",
           _CONFIG_V1 | {"window_mode", "target_kl", "kl_factor"}, 12, 10, torch.bool, versioned=True,
           ring_per_test=True),
    Layout(6, "int slot BATCHES (new_batch() calls); window_mode \"batch\" takes the first step after new_batch()",
           _CONFIG_V1 | {"window_mode", "target_kl", "kl_factor"}, 13, 10, torch.bool, versioned=True,
           ring_per_test=True),
)


def _upgrade_1(sd: dict) -> dict:
    """1 -> 2: decision uint8 (1 closed) -> bool.  Nothing else changed."""
    return {**sd, "version": 2, "state": {**sd["state"], "decision": sd["state"]["decision"] != 0}}


def _upgrade_2(sd: dict) -> dict:
    """2 -> 3: window_mode (version 2 windows were "step" windows); int slots POS2, COUNT2 and stats Z_ENERGY,
    Z_INCREMENT appended.

    Version 2 had one ring (statistics "norm", "energy", "increment"), so the second ring's counters are 0
    (as a version 3 gate with one of those statistics keeps them).  The per-test z of the last step is the
    one z it ran: Z_ENERGY = Z for "norm" and "energy", Z_INCREMENT = Z for "increment", 0 for the test
    it did not run: what a version 3 gate reports after the same step.
    """
    config, state = sd["config"], sd["state"]
    ints, stats = state["ints"], state["stats"]
    new_stats = torch.cat([stats, stats.new_zeros(2)])
    per_test = Z_INCREMENT if config["statistic"] == "increment" else Z_ENERGY
    new_stats[per_test] = stats[Z]
    return {
        **sd,
        "version": 3,
        "config": {**config, "window_mode": "step"},
        "state": {**state, "ints": torch.cat([ints, ints.new_zeros(2)]), "stats": new_stats},
    }


def _upgrade_3(sd: dict) -> dict:
    """3 -> 4: int slots PASS_MODE, PASS_NEW (0: a version 3 gate had no pass mode) and BATCH_CLOSED appended.

    BATCH_CLOSED says a step closed since new_batch(); it only acts once new_pass() turns pass mode on.  A
    version 3 state knows it when the last step closed, or when the stop flag is up before max_reuse steps
    ran (only a close sets it then); a stop at max_reuse after an earlier close in the batch reads 0.
    """
    config, state = sd["config"], sd["state"]
    ints = state["ints"]
    reuse, stop = ints[REUSE], ints[STOP]
    closed = (reuse > 0) & ((state["decision"] != 0) | ((stop > 0) & (reuse < config["max_reuse"])))
    extra = torch.stack([ints.new_zeros(()), ints.new_zeros(()), closed.to(ints.dtype)])
    return {**sd, "version": 4, "state": {**state, "ints": torch.cat([ints, extra])}}


def _upgrade_4(sd: dict) -> dict:
    """4 -> 5: settings target_kl (None: version 4 had no KL stop) and kl_factor (1.0); stats slot KL appended
    (0: no KL was given to a version 4 gate)."""
    state = sd["state"]
    return {
        **sd,
        "version": 5,
        "config": {**sd["config"], "target_kl": None, "kl_factor": 1.0},
        "state": {**state, "stats": torch.cat([state["stats"], state["stats"].new_zeros(1)])},
    }


def _upgrade_5(sd: dict) -> dict:
    """5 -> 6: int slot BATCHES appended, 0 (a version 5 gate did not count its new_batch() calls; only the
    count's changes mean anything, so counting from the upgrade is enough).

    Changed with version 6 (no slot; the rule itself came in at commit fafcd88, still version 5): with
    window_mode "batch" only the first step after new_batch() enters a window.  Before fafcd88 a gate that
    stepped several mini-batches per pass (new_pass()) let every step of pass 1 in; its window keeps those
    entries until ``window`` new rollout batches have replaced them.
    """
    state = sd["state"]
    ints = state["ints"]
    return {**sd, "version": 6, "state": {**state, "ints": torch.cat([ints, ints.new_zeros(1)])}}


# _UPGRADES[n]: a version n dict -> the same dict in version n + 1
_UPGRADES = {1: _upgrade_1, 2: _upgrade_2, 3: _upgrade_3, 4: _upgrade_4, 5: _upgrade_5}
assert [lay.version for lay in LAYOUTS] == list(range(1, STATE_VERSION + 1))
assert sorted(_UPGRADES) == list(range(1, STATE_VERSION))


def _dtype(d) -> str:
    return str(d).replace("torch.", "")


def _what_to_do() -> str:
    return ("load it with the dgg-kernels release that saved it and save it again, or start from a fresh gate "
            "(it refills its window within `window` accepted steps)")


def _found(sd: dict) -> str:
    """The layout-relevant facts of a saved dict, for an error message."""
    config, state = sd.get("config"), sd.get("state")
    parts = [f"config keys {sorted(config) if isinstance(config, dict) else type(config).__name__}"]
    if isinstance(state, dict):
        for name, what in (("ints", "numel"), ("stats", "numel"), ("decision", "dtype")):
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                parts.append(f"{name} {'missing' if t is None else type(t).__name__}")
            elif what == "numel":
                parts.append(f"{name} {_dtype(t.dtype)}[{t.numel()}]")
            else:
                parts.append(f"decision {_dtype(t.dtype)}")
    else:
        parts.append(f"state {type(state).__name__}")
    return ", ".join(parts)


def _mismatch(sd: dict, layout: Layout) -> str | None:
    """Why ``sd`` is not in ``layout`` (None when it is)."""
    config, state = sd.get("config"), sd.get("state")
    if not isinstance(config, dict):
        return f"config is a {type(config).__name__}, not a dict"
    if set(config) != set(layout.config_keys):
        return f"config keys are {sorted(config)}, version {layout.version} has {sorted(layout.config_keys)}"
    if not isinstance(state, dict):
        return f"state is a {type(state).__name__}, not a dict"
    missing = [k for k in _SAVED if k not in state]
    if missing:
        return f"state is missing {missing}"
    # name: dtype, shape (None: any length; the caller checks the ring against its gate's window)
    want = {
        "ring": (torch.float64, [None]),
        "prev": (torch.float64, [1]),
        "ints": (torch.int64, [layout.n_ints]),
        "stats": (torch.float32, [layout.n_stats]),
        "decision": (layout.decision, []),
    }
    for name, (dtype, shape) in want.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            return f"state[{name!r}] is a {type(t).__name__}, not a Tensor"
        if t.dtype != dtype or t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
            want_shape = "[n]" if shape == [None] else str(shape)
            return (f"state[{name!r}] is {_dtype(t.dtype)}{list(t.shape)}, version {layout.version} stores "
                    f"{_dtype(dtype)}{want_shape}")
    return None


def saved_version(sd: dict) -> int:
    """The layout version of a saved DynamicGradientGate.state_dict(): its "version", or for a dict saved
    without one, the unversioned layout it matches.  Raises ValueError (saying what was found and what to do)
    for anything this package never wrote."""
    if "version" in sd:
        v = sd["version"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"gate state_dict['version'] is {v!r}: this package writes an int from 1 to {STATE_VERSION}; "
                "was the dict made by DynamicGradientGate.state_dict()?"
            )
        if v > STATE_VERSION:
            from . import __version__

            raise ValueError(
                f"gate state_dict has version {v}, but this dgg-kernels ({__version__}) reads versions 1 to "
                f"{STATE_VERSION}: it was saved by a newer dgg-kernels. Install that release (or a newer one) to "
                "load it."
            )
        return v
    matches = [lay.version for lay in LAYOUTS if not lay.versioned and _mismatch(sd, lay) is None]
    if len(matches) != 1:
        known = "; ".join(lay.describe() for lay in LAYOUTS)
        raise ValueError(
            f"gate state_dict has no 'version' and matches no layout this package ever wrote (found {_found(sd)}). "
            f"Known layouts: {known}. It was not made by DynamicGradientGate.state_dict(), or was changed since; "
            + _what_to_do() + "."
        )
    return matches[0]


def todays_layout() -> Layout:
    """The layout this code writes, read off the slot constants and GateConfig's fields.

    Equal to LAYOUTS[-1] (the newest recorded version) unless a slot or a setting was added without a
    new version; tests/test_state_versions.py checks that they are equal.
    """
    from .config import GateConfig

    keys = frozenset(f.name for f in dataclasses.fields(GateConfig)) - {"backend"}
    return dataclasses.replace(LAYOUTS[-1], written="this code", config_keys=keys, n_ints=N_INTS, n_stats=N_STATS)


def upgrade(sd: dict) -> dict:
    """A saved DynamicGradientGate.state_dict() of any version in today's layout (version STATE_VERSION).

    Checks the dict against its version's layout first, then applies the upgrades one version at a time.
    Returns a new dict (tensors may be shared with ``sd``; ``sd`` itself is never modified).  Raises
    ValueError naming the version found and what to do when the dict is not a layout this package wrote.
    The ring's length (window, rings) and the settings are checked by the caller against its gate.
    """
    version = saved_version(sd)
    # a dict that says today's version was written by this code: today's slot counts (todays_layout)
    current = version == STATE_VERSION and "version" in sd
    layout = todays_layout() if current else LAYOUTS[version - 1]
    problem = _mismatch(sd, layout)
    if problem is not None:
        raise ValueError(
            f"gate state_dict says version {version}, but {problem}: it does not hold the layout of "
            f"{layout.describe()}. It was changed after saving, or made by hand; " + _what_to_do() + "."
        )
    found, sd = version, {**sd, "version": version}
    while version < STATE_VERSION:
        sd = _UPGRADES[version](sd)
        version += 1
    if not current and (stale := _mismatch(sd, todays_layout())) is not None:
        raise ValueError(
            f"this dgg-kernels cannot read a version {found} gate state: no upgrade reaches its own state, which is "
            f"not the layout recorded for version {STATE_VERSION} (upgraded as recorded, {stale} in this code). A "
            "slot or setting was added without a new version; add one "
            "(dgg_kernels/state.py, 'To add version N+1')."
        )
    return sd
