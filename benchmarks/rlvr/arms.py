"""The arms, declared as data: ``KINDS`` maps a spec prefix to an ArmKind (its syntax, what ``@V`` means, which
``:options`` it takes, its display name) and a controller class (what it does around each pass).  Adding a
signal = one ArmKind entry (and, where it acts differently, one small Controller subclass).

Spec grammar: ``<prefix><N>[@V][:opt]...`` with N the max reuse (passes over one rollout batch); an option
is a statistic (norm, energy, increment, paper = energy+increment), a window mode (step, batch), or
``kl=TARGET`` / ``f=FACTOR``.

    kN                 fixed reuse: N passes over every batch
    dggN@T[:S][:W][:kl=X[:f=F]]  the gate, threshold T, statistic S, window mode W; with kl=X the gate's KL
                       test too (closes when kl > F*X from pass 2 on; F default 1.5), OR-ed with the z-test
    dklN@X[:f=F]       the gate with the KL test only (threshold inf: the z-test observes), F default 1.5
    calN@R[:S][:W]     the gate, threshold calibrated to close a fraction R of batches in an observer run
    rndN@P             control: with chance P a batch ends at pass 2 (that update discarded), else N passes
    sb3N@X[:f=F]       stable-baselines3 target_kl: from pass 2 on, k3 KL to the rollout policy from the pass's
                       forward, before backward; if > F*X (F default 1.5) no update and the batch ends
    crlN@X             CleanRL target_kl: after each pass (its update applied), stop if that pass's k3 KL > X

Controls of an adaptive arm A (a dgg, dkl, cal, sb3 or crl spec listed in the same --arms), as in the SmolLM2
study (benchmarks/rlvr/llm.py: rep:A, cap:A): they run after A's unit on the same seed and apply every pass
they run (observer gates, no stop rule), at A's max reuse:

    rep:A              replay: A's own per-batch numbers of applied passes on this seed, permuted over the
                       batches (seed 40000 + seed), run as fixed per-batch caps (a batch where A applied 0:
                       pass 1 runs and its update is discarded)
    cap:A              fixed cap: every batch runs A's mean applied passes on this seed, rounded (at least 1)
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import dgg_kernels as dgg

PAPER = "energy+increment"  # the paper's rule: close when the energy or the increment z-test fires
STAT_ALIASES = {"paper": PAPER}
STAT_SHORT = {PAPER: "paper", "norm": "norm", "energy": "energy", "increment": "increment"}
WINDOW_MODES = ("step", "batch")
SB3_FACTOR = 1.5  # stable-baselines3 stops when approx_kl > 1.5 * target_kl


# ----------------------------------------------------------------------------- what the installed gate supports

def _config_accepts(**kw) -> bool:
    try:
        dgg.GateConfig(**kw)
        return True
    except (TypeError, ValueError):
        return False


def has_statistic(stat: str) -> bool:
    return _config_accepts(statistic=stat)


def _gate_params() -> set[str]:
    return set(inspect.signature(dgg.DynamicGradientGate.__init__).parameters)


def has_window_mode() -> bool:
    return "window_mode" in _gate_params()


def has_kl_gate() -> bool:
    """The installed gate takes target_kl/kl_factor and has observe_kl (the KL test)."""
    return {"target_kl", "kl_factor"} <= _gate_params() and hasattr(dgg.DynamicGradientGate, "observe_kl")


def observer_threshold() -> float:
    """inf (the observer mode) where the gate takes it; else a threshold no finite z reaches."""
    return float("inf") if _config_accepts(threshold=float("inf")) else 1e30


def calibration_module():
    try:
        from dgg_kernels import calibration
    except ImportError:
        return None
    return calibration


def default_rule() -> tuple[str, str]:
    cfg = dgg.GateConfig()
    return cfg.statistic, getattr(cfg, "window_mode", "step")


def rule_name(stat: str, mode: str) -> str:
    return f"{STAT_SHORT.get(stat, stat)}/{mode}"


# ----------------------------------------------------------------------------- arms

@dataclass
class Arm:
    name: str
    max_reuse: int
    kind: str = "fixed"  # a key of KINDS' values' .kind
    threshold: float | None = None  # dgg: given; cal: set by calibration; None elsewhere
    statistic: str = "norm"
    window_mode: str = "step"
    close_rate: float | None = None  # cal: the target fraction of batches closed; rnd: the chance of closing
    target_kl: float | None = None  # dkl, dgg with kl=, sb3, crl
    kl_factor: float = 1.0
    source: str | None = None  # rep/cap: the name of the adaptive arm whose applied passes they take

    @property
    def control(self) -> bool:
        """A rep:/cap: control: its per-batch passes come from its source unit on the same seed."""
        return self.kind in CONTROL_KINDS

    @property
    def gated(self) -> bool:
        """A closing DGG gate drives the passes (else observers only)."""
        return KIND_BY_NAME[self.kind].gated

    @property
    def rule(self) -> str:
        return rule_name(self.statistic, self.window_mode)

    @property
    def signal(self) -> str:
        """What ends reuse early: 'none', 'gradient', 'kl', 'gradient+kl', 'coin'."""
        return KIND_BY_NAME[self.kind].signal(self)


@dataclass(frozen=True)
class ArmKind:
    prefix: str
    kind: str
    syntax: str
    value: str | None  # what @V is: None (no @), "threshold", "rate", "chance", "target"
    options: tuple[str, ...] = ()  # "rule" (statistic / window words), "kl", "f"
    gated: bool = False
    default_factor: float = 1.0
    min_reuse: int = 1
    needs_kl_gate: bool = False

    def name(self, a: Arm) -> str:
        kl = f" kl={a.target_kl:g}x{a.kl_factor:g}" if a.target_kl is not None else ""
        k = f"K={a.max_reuse}"
        names = {
            "fixed": lambda: f"fixed {k}",
            "dgg": lambda: f"dgg {k} t={a.threshold:g} {a.rule}{kl}",
            "dkl": lambda: f"dgg {k}{kl}",
            "cal": lambda: f"cal {k} rate={a.close_rate:g} {a.rule}",
            "rnd": lambda: f"random {k} p={a.close_rate:g}",
            "sb3": lambda: f"sb3 {k} target_kl={a.target_kl:g}" + (f"x{a.kl_factor:g}" if a.kl_factor != SB3_FACTOR
                                                                  else ""),
            "crl": lambda: f"cleanrl {k} target_kl={a.target_kl:g}",
            "rep": lambda: f"replay of {a.source}",
            "cap": lambda: f"cap of {a.source}",
        }
        return names[self.kind]()

    def signal(self, a: Arm) -> str:
        if self.kind in ("dgg", "cal"):
            return "gradient+kl" if a.target_kl is not None else "gradient"
        return {"fixed": "none", "rnd": "coin", "dkl": "kl", "sb3": "kl", "crl": "kl", "rep": "replay",
                "cap": "cap"}[self.kind]


KINDS = [  # longest prefix first (the spec regex tries them in this order)
    ArmKind("sb3", "sb3", "sb3N@TARGET[:f=F]", "target", ("f",), default_factor=SB3_FACTOR, min_reuse=2),
    ArmKind("crl", "crl", "crlN@TARGET", "target", (), min_reuse=2),
    ArmKind("dkl", "dkl", "dklN@TARGET[:f=F]", "target", ("f",), gated=True, default_factor=SB3_FACTOR,
            min_reuse=2, needs_kl_gate=True),
    ArmKind("dgg", "dgg", "dggN@T[:statistic][:window mode][:kl=TARGET[:f=F]]", "threshold", ("rule", "kl", "f"),
            gated=True, default_factor=SB3_FACTOR),
    ArmKind("cal", "cal", "calN@RATE[:statistic][:window mode]", "rate", ("rule",), gated=True),
    ArmKind("rnd", "rnd", "rndN@P", "chance", (), min_reuse=2),
    ArmKind("k", "fixed", "kN", None, ()),
]
# the controls (rep:A, cap:A): parsed apart from the regex below (their A is a whole spec)
CONTROL_KINDS = {"rep": ArmKind("rep:", "rep", "rep:A", None), "cap": ArmKind("cap:", "cap", "cap:A", None)}
CONTROL_SOURCES = ("dgg", "dkl", "cal", "sb3", "crl")  # the adaptive kinds a control may replay
KIND_BY_NAME = {k.kind: k for k in KINDS} | CONTROL_KINDS
_SPEC = re.compile(r"^(" + "|".join(k.prefix for k in KINDS) + r")(\d+)(?:@([^:]*))?((?::[^:]*)*)$")
SYNTAX = ", ".join([k.syntax for k in KINDS[::-1]] + [k.syntax for k in CONTROL_KINDS.values()])


def _number(item: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"bad arm {item!r}: {what} must be a number, got {text!r}") from None


def parse_arm(item: str) -> Arm:
    ctl, colon, rest = item.partition(":")
    if colon and ctl in CONTROL_KINDS:
        src = parse_arm(rest)
        if src.kind not in CONTROL_SOURCES:
            raise ValueError(f"bad arm {item!r}: a {ctl}: control replays an adaptive arm "
                             f"({', '.join(CONTROL_SOURCES)}), not {rest!r}")
        arm = Arm("", src.max_reuse, ctl, source=src.name)
        arm.name = CONTROL_KINDS[ctl].name(arm)
        return arm
    m = _SPEC.match(item)
    if not m:
        raise ValueError(f"bad arm {item!r}: use one of {SYNTAX}")
    prefix, n, v, opts = m.group(1), int(m.group(2)), m.group(3), [o for o in m.group(4).split(":") if o != ""]
    kind = next(k for k in KINDS if k.prefix == prefix)
    if n < kind.min_reuse:
        raise ValueError(f"bad arm {item!r}: the max reuse N must be >= {kind.min_reuse} for {kind.syntax}"
                         + (" (the coin ends a batch at pass 2)" if kind.kind == "rnd" else ""))
    if (v is None) != (kind.value is None):
        raise ValueError(f"bad arm {item!r}: use {kind.syntax}")
    stat, mode = default_rule()
    arm = Arm("", n, kind.kind, statistic=stat, window_mode=mode, kl_factor=kind.default_factor)
    if kind.value == "threshold":
        arm.threshold = _number(item, v, "the threshold")
        if not arm.threshold >= 0:
            raise ValueError(f"bad arm {item!r}: the threshold must be a number >= 0 (inf: never closes)")
    elif kind.value == "rate":
        arm.close_rate = _number(item, v, "the close rate")
        if not 0.0 < arm.close_rate < 1.0:
            raise ValueError(f"bad arm {item!r}: the close rate must lie in (0, 1)")
    elif kind.value == "chance":
        arm.close_rate = _number(item, v, "the chance")
        if not 0.0 <= arm.close_rate <= 1.0:
            raise ValueError(f"bad arm {item!r}: the chance must lie in [0, 1]")
    elif kind.value == "target":
        arm.target_kl = _number(item, v, "the target KL")
    for o in opts:
        key, eq, val = o.partition("=")
        if eq and key in ("kl", "f") and key in kind.options:
            x = _number(item, val, f"{key}=")
            if key == "kl":
                arm.target_kl = x
            else:
                arm.kl_factor = x
        elif not eq and "rule" in kind.options and o in WINDOW_MODES:
            arm.window_mode = o
        elif not eq and "rule" in kind.options and (STAT_ALIASES.get(o, o) in STAT_SHORT or has_statistic(o)):
            arm.statistic = STAT_ALIASES.get(o, o)
        else:
            raise ValueError(f"bad arm {item!r}: option {o!r} is not one {kind.syntax} takes")
    if arm.target_kl is not None and not (arm.target_kl > 0 and arm.target_kl < float("inf")):
        raise ValueError(f"bad arm {item!r}: the target KL must be a finite number > 0")
    if not (arm.kl_factor > 0 and arm.kl_factor < float("inf")):
        raise ValueError(f"bad arm {item!r}: the KL factor f must be a finite number > 0")
    if "f" in kind.options and "rule" in kind.options and arm.target_kl is None and any(
            o.startswith("f=") for o in opts):
        raise ValueError(f"bad arm {item!r}: f= goes with kl=")
    if kind.gated and not has_statistic(arm.statistic):
        raise ValueError(f"bad arm {item!r}: the installed dgg_kernels has no statistic {arm.statistic!r}")
    if kind.gated and arm.window_mode != "step" and not has_window_mode():
        raise ValueError(f"bad arm {item!r}: the installed dgg_kernels has no window_mode")
    if kind.gated and arm.target_kl is not None and not has_kl_gate():
        raise ValueError(f"bad arm {item!r}: the installed dgg_kernels has no KL test "
                         "(DynamicGradientGate(target_kl=...) and observe_kl)")
    arm.name = kind.name(arm)
    return arm


def parse_arms(spec: str) -> list[Arm]:
    """"k1,k8,dgg8@0.3:paper,sb38@0.01" -> arms (see the module docstring); a bad spec raises ValueError."""
    arms = [parse_arm(item.strip()) for item in spec.split(",")]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"an arm is listed twice in {spec!r}")
    for a in arms:
        if a.control and a.source not in names:
            raise ValueError(f"bad arm: {a.name!r} needs its source arm {a.source!r} in the same list")
    return arms


def with_controls(spec: str) -> str:
    """``spec`` with rep:A and cap:A appended for every adaptive arm A in it (dgg, dkl, cal, sb3, crl)."""
    items = [i.strip() for i in spec.split(",") if i.strip()]
    adaptive = [i for i in items if parse_arm(i).kind in CONTROL_SOURCES]
    return ",".join(items + [f"{c}:{i}" for i in adaptive for c in ("rep", "cap")])


def observer_rules(arms) -> list[tuple[str, str]]:
    """The rules the ungated arms observe: today's default and the paper's (step window), plus every gated arm's."""
    rules = [(s, "step") for s in ("norm", PAPER) if has_statistic(s)]
    for a in arms:
        if a.gated and (a.statistic, a.window_mode) not in rules:
            rules.append((a.statistic, a.window_mode))
    d = default_rule()
    return [d] + [r for r in rules if r != d] if d in rules else rules
