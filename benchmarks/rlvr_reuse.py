"""RLVR rollout-batch reuse with and without the gate: does DGG beat fixed reuse at equal rollouts?

    python benchmarks/rlvr_reuse.py                  # CPU configuration: ~13 min on one CPU thread
    python benchmarks/rlvr_reuse.py --quick          # smoke run, well under a minute
    python benchmarks/rlvr_reuse.py --config gpu     # GPU configuration (the 2026-11-23 H100 setting)
    python benchmarks/rlvr_reuse.py --out benchmarks/results   # where the committed results go

Results go to --out (default: a folder under the system temp dir, so a run
never overwrites the committed results by accident).

What it does, in one process:
1. Builds a small causal transformer whose vocabulary is large next to its
   width (CPU: 2048 x 64, 1 layer; GPU: 32768 x 256, 4 layers), as in an LLM
   whose lm_head weighs as much as the rest.
2. Supervised warm-up on 2-digit addition (the sum's digits written
   least-significant first; checked exactly) until greedy held-out accuracy
   reaches --sft-target: right sometimes, not always.  One checkpoint for
   every arm and seed.
3. GRPO-style RL from that checkpoint, once per arm and seed, with the same
   rollout budget (--batches rollout batches of --prompts x --group samples):
   reward 1/0 from the checker, group-normalized advantages, PPO-clip,
   AdamW(fused=True) with gate.attach(opt), passes over each batch driven by
   dgg_kernels.reuse_passes.  Arms (--arms):
     kN                fixed reuse: N passes over every batch;
     dggN@T[:S][:W]    the gate, max reuse N, threshold T, statistic S
                       ("paper" = "energy+increment", the paper's rule; "norm",
                       "energy", "increment") and window mode W ("step":
                       every accepted step, "batch": one statistic per batch);
                       S and W default to the package's defaults;
     calN@R[:S][:W]    calibrated: the threshold is the one that would have
                       closed a fraction R of the batches in an observer run
                       (fixed reuse N, gate never closing) on --calib-seed,
                       a seed no arm is evaluated on (dgg_kernels.calibration);
     rndN@P            a control with no gate: with chance P a batch ends at
                       pass 2 (that pass's update discarded, as a close at
                       pass 2 would), otherwise it gets all N passes.  Does
                       the gate's choice of batches beat chance?
   Fixed-reuse arms run observer gates (threshold inf: z computed, never
   closing) for several rules at once, so z is logged for every rule.
4. Per update it logs the relative weight change of lm_head, the embeddings
   and each block, the lm_head gradient norm, z and the decision, and the
   KL of the updated policy to the pre-update policy (and to the rollout
   policy) on the batch; after every rollout batch, greedy held-out accuracy.
5. Writes rlvr_reuse_results.{md,json} and, when matplotlib is installed,
   rlvr_reuse_{accuracy,weight_change,gate}.png into --out.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dgg_kernels as dgg  # noqa: E402
from benchmarks import common as C  # noqa: E402  (the flag checks every command line shares)

PLUS, EQ = 10, 11  # token ids; 0-9 are digits, ids >= 12 never occur in the data
PAPER = "energy+increment"  # the paper's rule: close when the energy or the increment z-test fires
STAT_ALIASES = {"paper": PAPER}
STAT_SHORT = {PAPER: "paper", "norm": "norm", "energy": "energy", "increment": "increment"}
WINDOW_MODES = ("step", "batch")
SMOOTH = 5  # evaluations in the trailing mean used for "rollouts to reach K=1's final accuracy"
Z_SPLIT = 0.3  # the z level the signal analysis splits batches at (the paper's range is 0.1-0.5)
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "dgg-kernels-bench")


# ----------------------------------------------------------------------------- what the installed gate supports

def _config_accepts(**kw) -> bool:
    try:
        dgg.GateConfig(**kw)
        return True
    except (TypeError, ValueError):
        return False


def has_statistic(stat: str) -> bool:
    return _config_accepts(statistic=stat)


def has_window_mode() -> bool:
    return "window_mode" in inspect.signature(dgg.DynamicGradientGate.__init__).parameters


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


def observer_rules(arms) -> list[tuple[str, str]]:
    """The rules the fixed arms observe: today's default and the paper's, per window mode, plus every arm's."""
    rules = [(s, m) for s in ("norm", PAPER) for m in WINDOW_MODES
             if has_statistic(s) and (m == "step" or has_window_mode())]
    for a in arms:
        if a.gated and (a.statistic, a.window_mode) not in rules:
            rules.append((a.statistic, a.window_mode))
    d = default_rule()
    return [d] + [r for r in rules if r != d] if d in rules else rules


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, pre-LN blocks, untied lm_head (vocab >> width)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        """Logits of the last ``last`` positions only: the lm_head is the expensive part."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x[:, -last:])).float()


def layer_groups(model: TinyLM) -> dict[str, list[torch.Tensor]]:
    groups = {"embed": [model.tok.weight, model.pos.weight]}
    for i, b in enumerate(model.blocks):
        groups[f"block{i}"] = list(b.parameters())
    groups["lm_head"] = [model.lm_head.weight]
    return groups


# ----------------------------------------------------------------------------- task

@dataclass
class Task:
    digits: int

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        return self.digits + 1  # the sum's digits, least significant first (what small transformers can learn)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        hi = 10 ** self.digits
        a = torch.randint(hi, (n,), generator=gen)
        b = torch.randint(hi, (n,), generator=gen)
        return self.encode(a, b)

    def encode(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.digits
        pw = 10 ** torch.arange(d - 1, -1, -1)
        da = (a[:, None] // pw) % 10
        db = (b[:, None] // pw) % 10
        n = a.shape[0]
        prompt = torch.cat([da, torch.full((n, 1), PLUS), db, torch.full((n, 1), EQ)], 1)
        answer = ((a + b)[:, None] // 10 ** torch.arange(d + 1)) % 10
        return prompt, answer


def sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits), by inverting the CDF (4x faster than torch.multinomial on CPU)."""
    cdf = torch.softmax(logits, -1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(1)


@torch.no_grad()
def generate(model: TinyLM, prompt: torch.Tensor, steps: int, gen: torch.Generator | None, temperature: float = 1.0):
    """Sample (or, with gen=None, greedy-decode) ``steps`` tokens; returns (tokens, their log-probs)."""
    seq = prompt
    toks, logps = [], []
    for _ in range(steps):
        logits = model(seq, 1)[:, 0]
        if gen is None:
            t = logits.argmax(-1)
        else:
            t = sample(logits / temperature, gen)
        logps.append(torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1))
        toks.append(t)
        seq = torch.cat([seq, t[:, None]], 1)
    return torch.stack(toks, 1), torch.stack(logps, 1)


@torch.no_grad()
def accuracy(model: TinyLM, prompt: torch.Tensor, answer: torch.Tensor, chunk: int = 1024) -> float:
    hits = 0
    for i in range(0, prompt.shape[0], chunk):
        out, _ = generate(model, prompt[i:i + chunk], answer.shape[1], None)
        hits += (out == answer[i:i + chunk]).all(1).sum().item()
    return hits / prompt.shape[0]


def sft(model: TinyLM, task: Task, heldout, args, dev) -> dict:
    """Teacher-forced warm-up until greedy held-out accuracy reaches args.sft_target (or the step cap)."""
    gen = torch.Generator().manual_seed(args.sft_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    acc, step, curve = accuracy(model, *heldout), 0, []
    while step < args.sft_max_steps and acc < args.sft_target:
        p, a = task.sample(args.sft_batch, gen)
        p, a = p.to(dev), a.to(dev)
        seq = torch.cat([p, a], 1)
        logits = model(seq[:, :-1], task.answer_len)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), a.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.sft_eval_every == 0:
            acc = accuracy(model, *heldout)
            curve.append((step, round(acc, 4), round(loss.item(), 4)))
    return {"steps": step, "heldout_acc": acc, "seconds": time.perf_counter() - t0, "curve": curve}


# ----------------------------------------------------------------------------- RL

@dataclass
class Arm:
    name: str
    max_reuse: int
    kind: str = "fixed"  # "fixed", "dgg" (threshold given), "cal" (threshold from an observer run), "rnd" (control)
    threshold: float | None = None  # cal: set by calibrate()
    statistic: str = "norm"
    window_mode: str = "step"
    close_rate: float | None = None  # cal: the target fraction of batches closed; rnd: the chance of closing

    @property
    def gated(self) -> bool:
        return self.kind in ("dgg", "cal")

    @property
    def rule(self) -> str:
        return rule_name(self.statistic, self.window_mode)


def parse_arms(spec: str) -> list[Arm]:
    """"k1,k8,dgg8@0.3,dgg8@0.3:paper:batch,cal8@0.25:paper" -> arms (see the module docstring)."""
    stat0, mode0 = default_rule()
    arms = []
    for item in spec.split(","):
        item = item.strip()
        kind = item[:3]
        if kind in ("dgg", "cal"):
            head, *opts = item[3:].split(":")
            try:
                k, v = head.split("@")
                k, v = int(k), float(v)
            except ValueError:
                raise ValueError(f"bad arm {item!r}: use dggN@T[:statistic][:window mode] or calN@RATE[...]") from None
            stat, mode = stat0, mode0
            for o in opts:
                if o in WINDOW_MODES:
                    mode = o
                else:
                    stat = STAT_ALIASES.get(o, o)
            if not has_statistic(stat):
                raise ValueError(f"bad arm {item!r}: the installed dgg_kernels has no statistic {stat!r}")
            if mode != "step" and not has_window_mode():
                raise ValueError(f"bad arm {item!r}: the installed dgg_kernels has no window_mode")
            if k < 1:
                raise ValueError(f"bad arm {item!r}: the max reuse N must be >= 1")
            rule = rule_name(stat, mode)
            if kind == "dgg":
                if not v >= 0:  # NaN too
                    raise ValueError(f"bad arm {item!r}: the threshold must be a number >= 0 (inf: never closes)")
                arms.append(Arm(f"dgg K={k} t={v:g} {rule}", k, "dgg", v, stat, mode))
            else:
                if not 0.0 < v < 1.0:
                    raise ValueError(f"bad arm {item!r}: the close rate must lie in (0, 1)")
                arms.append(Arm(f"cal K={k} rate={v:g} {rule}", k, "cal", None, stat, mode, v))
        elif kind == "rnd":
            try:
                k, v = item[3:].split("@")
                k, v = int(k), float(v)
            except ValueError:
                raise ValueError(f"bad arm {item!r}: use rndN@P") from None
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"bad arm {item!r}: the chance must lie in [0, 1]")
            if k < 2:
                raise ValueError(f"bad arm {item!r}: the coin ends a batch at pass 2, so N must be >= 2")
            arms.append(Arm(f"random K={k} p={v:g}", k, "rnd", close_rate=v))
        elif item.startswith("k") and item[1:].isdigit():
            if int(item[1:]) < 1:
                raise ValueError(f"bad arm {item!r}: the reuse N must be >= 1")
            arms.append(Arm(f"fixed K={int(item[1:])}", int(item[1:])))
        else:
            raise ValueError(f"bad arm {item!r}: use kN, dggN@T[:statistic][:window mode], calN@RATE[:...] or rndN@P")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"an arm is listed twice in {spec!r}")
    return arms


def _rel_changes(groups, before) -> dict[str, float]:
    out = {}
    for name, ps in groups.items():
        num = sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[name]))
        den = sum((b ** 2).sum() for b in before[name])
        out[name] = math.sqrt(float(num) / float(den))
    return out


def _kl(p: torch.Tensor, logp_p: torch.Tensor, logp_q: torch.Tensor) -> float:
    """Mean over answer tokens of KL(p || q), full vocabulary (p = logp_p.exp(), computed once by the caller)."""
    return float(torch.dot(p.reshape(-1), (logp_p - logp_q).reshape(-1))) / (p.numel() // p.shape[-1])


def make_gate(model, args, threshold: float, max_reuse: int, stat: str, mode: str, params):
    kw = dict(window=args.window, threshold=threshold, max_reuse=max_reuse, statistic=stat)
    if has_window_mode():
        kw["window_mode"] = mode
    elif mode != "step":
        raise ValueError("the installed dgg_kernels has no window_mode")
    return dgg.DynamicGradientGate(model.lm_head.weight, params, **kw)


def run_arm(arm: Arm, seed: int, init_state, task: Task, heldout, args, dev, rules=(), record: bool = False) -> dict:
    """One arm on one seed.  Fixed arms run one observer gate per rule in ``rules`` (the first one drives
    reuse_passes and is attached to the optimizer; none ever closes on a finite gradient)."""
    torch.manual_seed(seed)
    model = make_model(args, task).to(dev)
    model.load_state_dict(init_state)
    groups = layer_groups(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if arm.gated:
        gates = {arm.rule: make_gate(model, args, arm.threshold, arm.max_reuse, arm.statistic, arm.window_mode, params)}
    else:
        rules = list(rules) or [default_rule()]
        gates = {rule_name(s, m): make_gate(model, args, observer_threshold(), arm.max_reuse, s, m,
                                            params if i == 0 else [model.lm_head.weight])
                 for i, (s, m) in enumerate(rules)}
    main_rule, gate = next(iter(gates.items()))
    others = [g for r, g in gates.items() if r != main_rule]
    gate.attach(opt)
    cal = calibration_module() if record else None
    recorders = {r: cal.Recorder() for r in gates} if cal is not None else {}
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)  # the same prompt stream for every arm of a seed
    coin_gen = torch.Generator().manual_seed(30_000 + seed)  # rnd arms: which batches end at pass 2
    sample_gen = torch.Generator(device=dev).manual_seed(20_000 + seed)
    n_per_batch = args.prompts * args.group
    updates, curve = [], [(0, 0.0, accuracy(model, *heldout))]
    train_s = 0.0
    for b in range(args.batches):
        t0 = time.perf_counter()
        p, a = task.sample(args.prompts, prompt_gen)
        p, a = p.to(dev).repeat_interleave(args.group, 0), a.to(dev).repeat_interleave(args.group, 0)
        out, old_logp = generate(model, p, task.answer_len, sample_gen, args.temperature)
        reward = (out == a).all(1).float()
        r = reward.view(args.prompts, args.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        seq = torch.cat([p, out], 1)
        rollout = prev = None  # (probs, log-probs) on the batch: at rollout time, before the last update
        for g in others:
            g.new_batch()
        coin = arm.kind == "rnd" and float(torch.rand(1, generator=coin_gen)) < arm.close_rate
        for k in dgg.reuse_passes(gate):
            before = {n: [t.detach().clone() for t in ps] for n, ps in groups.items()}
            logp_all = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            cur = (logp_all.detach().exp(), logp_all.detach())
            if prev is not None:  # this forward sees the weights the previous update produced
                updates[-1]["kl_step"] = _kl(*prev, cur[1])
                updates[-1]["kl_rollout"] = _kl(*rollout, cur[1])
            if rollout is None:
                rollout = cur
            logp = logp_all.gather(2, out[:, :, None]).squeeze(2)
            ratio = (logp - old_logp).exp()
            obj = torch.minimum(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv)
            loss = -obj.mean()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            gate.step()
            for g in others:  # observers: they read the gradient the main gate left untouched (it never closes)
                g.step()
            stop = coin and k == 2  # the control: discard this update and end the batch, as a close would
            if not stop:
                opt.step()
            for rname, rec in recorders.items():
                rec.record(gates[rname])
            s = gate.stats()  # the benchmark's own host reads, outside gate.step()
            u = {
                "batch": b, "pass": k, "reward": round(float(reward.mean()), 4),
                "grad_norm": float(s["norm"]), "z": float(s["z"]), "closed": bool(s["closed"]) or stop,
                "clip_frac": round(float(((ratio - 1).abs() > args.clip).float().mean()), 4),
                "kl_step": 0.0, "kl_rollout": 0.0,
                "rel_change": _rel_changes(groups, before),
            }
            if "z_energy" in s:
                u["z_energy"], u["z_increment"] = float(s["z_energy"]), float(s["z_increment"])
            if not arm.gated:
                u["obs_z"] = {rname: float(g.stats()["z"]) for rname, g in gates.items()}
            updates.append(u)
            prev = cur
            if stop:
                break
        last = updates[-1]
        if last["closed"]:  # a skipped update leaves the weights, so the policy, as they were
            last["kl_rollout"] = _kl(*rollout, prev[1])
        else:
            with torch.no_grad():
                logp_now = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            last["kl_step"] = _kl(*prev, logp_now)
            last["kl_rollout"] = _kl(*rollout, logp_now)
        train_s += time.perf_counter() - t0
        curve.append(((b + 1) * n_per_batch, round(train_s, 3), accuracy(model, *heldout)))
    res = {"arm": arm.name, "seed": seed, "curve": curve, "updates": updates, "train_seconds": train_s,
           "main_rule": main_rule, "backend": gate.backend}
    if recorders:
        res["recorders"] = recorders
    return res


def make_model(args, task: Task) -> TinyLM:
    return TinyLM(args.vocab, args.width, args.layers, args.heads, task.prompt_len + task.answer_len)


CAL_GRID = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0)


def _rates(rec, thresholds) -> dict[str, float]:
    return {f"{t:g}": float(v) for t, v in rec.close_rates([float(t) for t in thresholds]).items()}


def calibrate(arms: list[Arm], init_state, task: Task, heldout, args, dev) -> list[dict]:
    """Set each cal arm's threshold from an observer run (fixed reuse K, gate never closing) on args.calib_seed."""
    cal_arms = [a for a in arms if a.kind == "cal"]
    if not cal_arms:
        return []
    if calibration_module() is None:
        raise SystemExit("cal arms need dgg_kernels.calibration, which the installed package lacks")
    out = []
    for k in sorted({a.max_reuse for a in cal_arms}):
        group = [a for a in cal_arms if a.max_reuse == k]
        rules = list(dict.fromkeys((a.statistic, a.window_mode) for a in group))
        r = run_arm(Arm(f"fixed K={k}", k), args.calib_seed, init_state, task, heldout, args, dev, rules, record=True)
        recs = r["recorders"]
        for a in group:
            rec = recs[a.rule]
            a.threshold = float(rec.threshold_for_close_rate(a.close_rate))
            out.append({"arm": a.name, "seed": args.calib_seed, "rule": a.rule, "max_reuse": k,
                        "target_rate": a.close_rate, "threshold": a.threshold,
                        "observer_rates": _rates(rec, CAL_GRID + (a.threshold,)),
                        "observer_acc": [r["curve"][0][2], r["curve"][-1][2]], "seconds": r["train_seconds"]})
        print(f"  calibration seed {args.calib_seed} fixed K={k}: "
              + ", ".join(f"{c['arm']} -> threshold {c['threshold']:.3g}" for c in out if c["max_reuse"] == k),
              flush=True)
    return out


# ----------------------------------------------------------------------------- configurations

# fixed reuse; the paper's rule and today's default (norm, step window) at K=4 and 8; the default statistic with a
# batch window; the paper's rule calibrated to close half the batches; a coin closing half the batches at pass 2
# (0.5: about the close rate of the norm rule at t=0.3, so the three differ only in which batches they close)
DEFAULT_ARMS = ("k1,k2,k4,k8,dgg4@0.3:paper,dgg8@0.3:paper,dgg4@0.3:norm,dgg8@0.3:norm,dgg8@0.3:norm:batch,"
                "cal8@0.5:paper,rnd8@0.5")
CONFIGS = {
    # 776 s for the committed run on one thread of a shared 2-core machine; chosen (on 2 seeds, before the
    # final run) so that fixed K=1 learns and fixed K=8 does harm; see the results md
    "cpu": dict(vocab=2048, width=64, layers=1, heads=4, digits=2, sft_lr=1e-3, sft_target=0.3, sft_max_steps=3000,
                batches=50, prompts=32, lr=1.5e-3, seeds=5),
    # the 2026-11-23 H100 runs d/e (../shared/gpu-runs/2026-11-23-h100): lr 1e-3 is where fixed K=8 collapsed there;
    # 6 min for 7 arms x 5 seeds of the old arm set on the H100, so about 12 min for the arm set above (estimate)
    "gpu": dict(device="cuda", vocab=32768, width=256, layers=4, heads=4, digits=2, sft_lr=3e-3, sft_target=0.3,
                sft_max_steps=1500, batches=60, prompts=64, lr=1e-3, seeds=5),
}
QUICK = dict(vocab=2048, width=64, layers=2, digits=1, heldout=128, sft_target=0.3, sft_max_steps=300,
             sft_batch=64, sft_lr=3e-3, sft_eval_every=10, arms="k2,dgg4@0.3", seeds=1, batches=5, prompts=8,
             group=8, window=2)
GPU_COMMAND = "python benchmarks/rlvr_reuse.py --config gpu --out benchmarks/results/gpu"


def build_parser() -> argparse.ArgumentParser:
    """The command line.  No abbreviations: a preset (--config, --quick) fills only the flags not given, so an
    abbreviated flag would otherwise lose to it without a word.  Every value is checked here, before any work."""
    c = CONFIGS["cpu"]
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    I, N, frac = C.integer, C.number, C.fraction
    ap = C.new_parser(__doc__, formatter_class=Formatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu",
                    help="a named configuration: every flag below that is not given takes its value from it "
                         "(the defaults shown are the cpu configuration's; gpu = the 2026-11-23 H100 setting: "
                         "vocab 32768, width 256, 4 layers, 64 prompts, lr 1e-3, SFT lr 3e-3, 60 batches, cuda); "
                         "a flag given always wins over it")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny sizes, 2 arms, 1 seed, well under a minute (flags given still win)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (the gpu config uses cuda)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for the results, created and test-written before any work (outside the source "
                         "tree unless given); pass benchmarks/results for the committed ones")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="no training: rewrite the md, JSON and plots of a finished run from its results JSON "
                         "(after a change to the analysis, or after an analysis that failed), into --out")
    ap.add_argument("--threads", type=I(1), default=None,
                    help="torch CPU threads (None: 1 on CPU, where several threads on a shared machine ran up to "
                         "40x slower from thread contention; torch's default on CUDA)")
    g = ap.add_argument_group("model and task")
    g.add_argument("--vocab", type=I(12), default=c["vocab"], help="vocabulary size, >= 12; ids >= 12 never occur "
                   "in the data (they make the lm_head large, as in an LLM)")
    g.add_argument("--width", type=I(1), default=c["width"], help="model width (a multiple of --heads)")
    g.add_argument("--layers", type=I(1), default=c["layers"], help="transformer blocks")
    g.add_argument("--heads", type=I(1), default=c["heads"], help="attention heads")
    g.add_argument("--digits", type=I(1), default=c["digits"], help="digits per addend")
    g.add_argument("--heldout", type=I(1), default=256, help="held-out problems (fixed, greedy decoding)")
    g = ap.add_argument_group("supervised warm-up (one checkpoint for every arm and seed)")
    g.add_argument("--sft-target", type=frac(), default=c["sft_target"],
                   help="stop once greedy held-out accuracy (0 to 1) reaches this")
    g.add_argument("--sft-max-steps", type=I(0), default=c["sft_max_steps"], help="step cap of the warm-up")
    g.add_argument("--sft-batch", type=I(1), default=64, help="warm-up batch size")
    g.add_argument("--sft-lr", type=N(0, lo_open=True), default=c["sft_lr"], help="warm-up AdamW learning rate")
    g.add_argument("--sft-eval-every", type=I(1), default=25, help="warm-up steps between held-out evaluations")
    g.add_argument("--sft-seed", type=I(0), default=0, help="seed of the model init and the warm-up data")
    g = ap.add_argument_group("RL")
    g.add_argument("--arms", default=DEFAULT_ARMS,
                   help="comma-separated arms: kN, dggN@T[:statistic][:window mode], calN@RATE[:statistic][:window "
                        "mode], rndN@P (see above; statistic paper = energy+increment)")
    g.add_argument("--seeds", type=I(1), default=c["seeds"], help="RL seeds per arm (0 .. seeds-1)")
    g.add_argument("--calib-seed", type=I(0), default=1000,
                   help="seed of the observer run that calibrates the cal arms' thresholds (not an evaluated seed)")
    g.add_argument("--batches", type=I(1), default=c["batches"], help="rollout batches per arm (the rollout budget)")
    g.add_argument("--prompts", type=I(1), default=c["prompts"], help="prompts per rollout batch")
    g.add_argument("--group", type=I(2), default=8, help="samples per prompt (the GRPO group, >= 2)")
    g.add_argument("--lr", type=N(0, lo_open=True), default=c["lr"], help="RL AdamW learning rate")
    g.add_argument("--weight-decay", type=N(0), default=0.0, help="RL AdamW weight decay")
    g.add_argument("--clip", type=N(0, lo_open=True), default=0.2, help="PPO clip range")
    g.add_argument("--temperature", type=N(0, lo_open=True), default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--window", type=I(2), default=8, help="gate window (statistics in the Z-score)")
    return ap


def _given(argv: list[str]) -> set[str]:
    """The flags given on the command line: what a parse with every default suppressed returns."""
    ap = build_parser()
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, with the preset (--config, then --quick) filling only those not given, all checked before any
    work: each value by its type, then what spans several flags, the device, and the --out folder (created and
    test-written).  A problem exits with status 2 and a message naming the flag."""
    ap = build_parser()
    args = ap.parse_args(argv)
    given = _given(argv)
    preset = dict(CONFIGS[args.config])
    if args.quick:
        preset.update(QUICK)
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    if args.from_json:
        C.readable_file(ap, args.from_json, "--from-json")
        try:
            with open(args.from_json) as f:
                res = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            ap.error(f"--from-json {args.from_json}: not a JSON file ({e})")
        if not isinstance(res, dict) or not {"runs", "args"} <= set(res):
            ap.error(f"--from-json {args.from_json}: not a rlvr_reuse results JSON (no 'runs' and 'args')")
    else:
        try:
            arms = parse_arms(args.arms)
        except ValueError as e:
            ap.error(f"--arms: {e}")
        if any(a.kind == "cal" for a in arms) and calibration_module() is None:
            ap.error("--arms: cal arms need dgg_kernels.calibration, which the installed package lacks")
        if args.width % args.heads:
            ap.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
        if args.calib_seed < args.seeds:
            ap.error(f"--calib-seed {args.calib_seed} is one of the evaluated seeds 0..{args.seeds - 1}: "
                     "calibrate on another seed")
        C.check_device(ap, args.device, source="" if "device" in given else f"from --config {args.config}")
    args.out = str(C.writable_dir(ap, args.out))
    return args


# ----------------------------------------------------------------------------- analysis

def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _block_names(run) -> list[str]:
    return [k for k in run["updates"][0]["rel_change"] if k.startswith("block")]


def _smooth(acc: list[float], n: int = SMOOTH) -> list[float]:
    """Trailing mean over the last n evaluations (fewer at the start)."""
    return [float(np.mean(acc[max(0, i - n + 1):i + 1])) for i in range(len(acc))]


def _first_reach(curve, target: float) -> int | None:
    acc = _smooth([c[2] for c in curve])
    return next((i for i in range(1, len(curve)) if acc[i] >= target - 1e-9), None)


def _verdict(diffs: np.ndarray) -> str:
    """"helps"/"hurts": higher/lower on every seed (5 of 5: a one-sided sign test's p = 0.03); "leans ..." when
    at least 80% of the seeds and the mean agree; otherwise no consistent difference."""
    n, need = len(diffs), math.ceil(0.8 * len(diffs))
    if n < 3:
        return "too few seeds for a verdict"
    if (diffs > 0).all():
        return "helps"
    if (diffs < 0).all():
        return "hurts"
    if diffs.mean() > 0 and (diffs > 0).sum() >= need:
        return "leans better"
    if diffs.mean() < 0 and (diffs < 0).sum() >= need:
        return "leans worse"
    return "no consistent difference"


def _k(name: str) -> int:
    return int(name.split("K=")[1].split()[0])


def _rate_at(rates: dict, threshold: float) -> float | None:
    """The recorded close rate at ``threshold`` (keys are thresholds as text, possibly rounded in the JSON)."""
    near = [(abs(float(k) - threshold), v) for k, v in rates.items()]
    best = min(near, default=None, key=lambda kv: kv[0])
    return best[1] if best is not None and best[0] <= 1e-4 * max(abs(threshold), 1e-12) else None


def analyse(res: dict) -> dict:
    runs, arms = res["runs"], res["arm_names"]
    specs = {s["name"]: s for s in res["arm_specs"]}
    batches = res["args"]["batches"]
    out = {"arms": {}, "dwd": {}, "signal": {}, "versus": [], "efficiency": {}, "premise": {}, "calibration": []}
    for name in arms:
        rs = sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"])
        final = np.array([r["curve"][-1][2] for r in rs])
        mean_acc = np.array([np.mean([c[2] for c in r["curve"][1:]]) for r in rs])
        ups = [u for r in rs for u in r["updates"]]
        closes = [u["pass"] for u in ups if u["closed"]]
        out["arms"][name] = {
            "seeds": len(rs), "rule": specs[name]["rule"] if specs[name]["kind"] in ("dgg", "cal") else "",
            "threshold": specs[name]["threshold"],
            "start_acc": float(np.mean([r["curve"][0][2] for r in rs])),
            "final_acc_mean": float(final.mean()), "final_acc_sd": float(final.std()),
            "final_acc_min": float(final.min()), "final_acc_max": float(final.max()),
            "mean_acc_mean": float(mean_acc.mean()), "mean_acc_sd": float(mean_acc.std()),
            "mean_acc_min": float(mean_acc.min()), "mean_acc_max": float(mean_acc.max()),
            "best_acc_mean": float(np.mean([max(c[2] for c in r["curve"]) for r in rs])),
            "updates_per_seed": len(ups) / len(rs),
            "applied_updates_per_seed": (len(ups) - len(closes)) / len(rs),
            "closed_per_seed": len(closes) / len(rs),
            "close_rate": len(closes) / (len(rs) * batches),
            "close_rate_per_seed": [sum(u["closed"] for u in r["updates"]) / batches for r in rs],
            "mean_close_pass": float(np.mean(closes)) if closes else float("nan"),
            "close_at_pass2": (sum(p == 2 for p in closes) / len(closes)) if closes else float("nan"),
            "passes_per_batch": len(ups) / len(rs) / batches,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "final_acc_per_seed": final.tolist(),
        }
    fixed = [a for a in arms if specs[a]["kind"] == "fixed"]
    gated = [a for a in arms if specs[a]["kind"] != "fixed"]
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    # sample efficiency: rollouts and train seconds until the (trailing-mean) accuracy reaches K=1's final level,
    # on the seeds where K=1 ended above its start (elsewhere "reaching K=1's final accuracy" means nothing)
    if "fixed K=1" in arms:
        base_final = {s: _smooth([c[2] for c in by_seed[("fixed K=1", s)]["curve"]])[-1] for s in seeds}
        valid = [s for s in seeds if base_final[s] > by_seed[("fixed K=1", s)]["curve"][0][2]]
        out["efficiency_excluded_seeds"] = [s for s in seeds if s not in valid]
        for name in arms:
            hits = []
            for s in valid:
                base, r = by_seed[("fixed K=1", s)], by_seed[(name, s)]
                target = base_final[s]
                i1, i = _first_reach(base["curve"], target), _first_reach(r["curve"], target)
                if i is None:
                    hits.append(None)
                    continue
                hits.append({"seed": s, "target": target, "rollouts": r["curve"][i][0], "seconds": r["curve"][i][1],
                             "speedup_rollouts": base["curve"][i1][0] / r["curve"][i][0],
                             "speedup_seconds": base["curve"][i1][1] / max(r["curve"][i][1], 1e-9)})
            got = [h for h in hits if h]
            e = {"reached": len(got), "seeds": len(valid), "per_seed": hits}
            if got:
                for key in ("rollouts", "seconds", "speedup_rollouts", "speedup_seconds"):
                    v = np.array([h[key] for h in got], float)
                    e[key + "_median"], e[key + "_min"], e[key + "_max"] = (float(np.median(v)), float(v.min()),
                                                                          float(v.max()))
            out["efficiency"][name] = e
    fixed_k = {a: _k(a) for a in fixed}
    # the premise: does the most reuse do harm?
    if fixed:
        big = max(fixed, key=lambda a: fixed_k[a])
        for ref in ("fixed K=1", "fixed K=2"):
            if ref in arms and ref != big:
                d = np.array(out["arms"][big]["final_acc_per_seed"]) - np.array(out["arms"][ref]["final_acc_per_seed"])
                out["premise"][ref] = {"arm": big, "below": int((d < 0).sum()), "seeds": len(d),
                                       "diff_mean": float(d.mean()), "diff_min": float(d.min()),
                                       "diff_max": float(d.max())}
    # DWD: relative weight change per layer by reuse pass, in the fixed arm with the most reuse
    if fixed:
        ups = [u for r in runs if r["arm"] == big for u in r["updates"]]
        blocks = _block_names(runs[0])
        by_pass = {}
        for k in range(1, fixed_k[big] + 1):
            us = [u for u in ups if u["pass"] == k]
            if not us:
                continue
            head = float(np.mean([u["rel_change"]["lm_head"] for u in us]))
            blk = float(np.mean([np.mean([u["rel_change"][b] for b in blocks]) for u in us]))
            by_pass[k] = {
                "lm_head": head, "blocks": blk, "embed": float(np.mean([u["rel_change"]["embed"] for u in us])),
                "ratio": head / blk if blk > 0 else float("nan"),
                "grad_norm": float(np.mean([u["grad_norm"] for u in us])),
                "kl_step": float(np.mean([u["kl_step"] for u in us])),
                "kl_rollout": float(np.mean([u["kl_rollout"] for u in us])),
                "clip_frac": float(np.mean([u["clip_frac"] for u in us])),
            }
        out["dwd"] = {"arm": big, "by_pass": by_pass}
    # Does z warn of harm?  Fixed arms with reuse, each observer rule: max z over passes >= 2 vs the batch's
    # held-out accuracy change (a useful warning would be clearly negative).
    reuse_arms = [a for a in fixed if fixed_k[a] > 1]
    ups = [u for r in runs if r["arm"] in reuse_arms for u in r["updates"]]
    pairs_same = [(u["grad_norm"], u["kl_step"]) for u in ups]
    pairs_next = []
    rules = list(ups[0]["obs_z"]) if ups and "obs_z" in ups[0] else []
    per_rule = {q: ([], []) for q in rules}
    per_rule_arm = {(q, a): ([], []) for q in rules for a in reuse_arms}
    for r in runs:
        if r["arm"] not in reuse_arms:
            continue
        for b in range(batches):
            us = [u for u in r["updates"] if u["batch"] == b]
            pairs_next += [(x["grad_norm"], y["kl_step"]) for x, y in zip(us, us[1:])]
            dacc = r["curve"][b + 1][2] - r["curve"][b][2]
            for q in rules:
                zs = [u["obs_z"][q] for u in us if u["pass"] > 1]
                if zs and any(z != 0.0 for z in zs):  # z is 0 until the window is full
                    for lists in (per_rule[q], per_rule_arm[(q, r["arm"])]):
                        lists[0].append(max(zs))
                        lists[1].append(dacc)
    out["signal"] = {
        "arms": reuse_arms,
        "spearman_norm_vs_kl_same_update": _spearman(*zip(*pairs_same)) if pairs_same else float("nan"),
        "spearman_norm_vs_kl_next_update": _spearman(*zip(*pairs_next)) if pairs_next else float("nan"),
        "rules": {},
    }
    for q, (maxz, dacc) in per_rule.items():
        fired = [d for d, z in zip(dacc, maxz) if z > Z_SPLIT]
        quiet = [d for d, z in zip(dacc, maxz) if z <= Z_SPLIT]
        out["signal"]["rules"][q] = {
            "spearman_maxz_vs_batch_dacc": _spearman(maxz, dacc), "batches": len(dacc),
            # pooled over arms, a larger K gives both more passes to take the max over and more harm: within each
            # arm is the fairer test
            "within_arm": {a: _spearman(*per_rule_arm[(q, a)]) for a in reuse_arms},
            "within_arm_batches": {a: len(per_rule_arm[(q, a)][0]) for a in reuse_arms},
            "over": len(fired), "dacc_over": float(np.mean(fired)) if fired else float("nan"),
            "at_most": len(quiet), "dacc_at_most": float(np.mean(quiet)) if quiet else float("nan"),
        }
    # calibration: the threshold from the calibration seed, the close rate it gives observers on the evaluated
    # seeds (does a target rate transfer across seeds?) and the close rate the gated arm really had
    for c in res.get("calibration", []):
        obs = [_rate_at(by_seed[(f"fixed K={c['max_reuse']}", s)].get("close_rates", {}).get(c["rule"], {}),
                        c["threshold"]) for s in seeds if (f"fixed K={c['max_reuse']}", s) in by_seed]
        obs = [o for o in obs if o is not None]
        out["calibration"].append({**c, "observer_rate_eval_seeds": obs,
                                   "gated_rate_per_seed": out["arms"][c["arm"]]["close_rate_per_seed"]})
    # gated arms against fixed reuse at the same max reuse, against single use and against the best fixed arm
    best_fixed = max(fixed, key=lambda a: out["arms"][a]["final_acc_mean"]) if fixed else None
    controls = [a for a in arms if specs[a]["kind"] == "rnd"]
    for name in gated:
        refs = [f"fixed K={_k(name)}", "fixed K=1", best_fixed]
        if specs[name]["kind"] != "rnd":  # does the gate's choice of batches beat chance?
            refs += [c for c in controls if _k(c) == _k(name)]
        for other in dict.fromkeys(x for x in refs if x in out["arms"]):
            a, b = out["arms"][name], out["arms"][other]
            d_final = np.array(a["final_acc_per_seed"]) - np.array(b["final_acc_per_seed"])
            out["versus"].append({
                "dgg": name, "vs": other, "best_fixed": other == best_fixed,
                "final_acc_diff_mean": float(d_final.mean()), "final_acc_diff_min": float(d_final.min()),
                "final_acc_diff_max": float(d_final.max()), "wins": int((d_final > 0).sum()),
                "losses": int((d_final < 0).sum()), "seeds": len(d_final),
                "mean_acc_diff": a["mean_acc_mean"] - b["mean_acc_mean"],
                "updates_ratio": a["applied_updates_per_seed"] / b["applied_updates_per_seed"],
                "verdict": _verdict(d_final),
            })
    out["best_fixed"] = best_fixed
    return out


# ----------------------------------------------------------------------------- report

def _f(x, nd=3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def findings(an: dict) -> list[str]:
    """Plain statements computed from the numbers (the same rules apply whatever the outcome)."""
    lines = []
    for ref, p in an["premise"].items():
        lines.append(f"**Does reuse do harm here?** `{p['arm']}` ends below `{ref}` on {p['below']} of {p['seeds']} "
                     f"seeds (final accuracy {p['diff_mean']:+.3f}, per-seed range {p['diff_min']:+.3f} .. "
                     f"{p['diff_max']:+.3f}).")
    bp = an["dwd"].get("by_pass", {})
    if bp:
        ks = sorted(bp)
        r1, rk = bp[ks[0]]["ratio"], bp[ks[-1]]["ratio"]
        h1, hk = bp[ks[0]]["lm_head"], bp[ks[-1]]["lm_head"]
        b1, bk = bp[ks[0]]["blocks"], bp[ks[-1]]["blocks"]
        grows = hk / h1 if h1 > 0 else float("nan")
        bgrows = bk / b1 if b1 > 0 else float("nan")
        dwd = grows > 1.5 and grows > 1.5 * bgrows
        lines.append(
            f"**DWD at this scale: {'yes' if dwd else 'no'}.** In `{an['dwd']['arm']}`, the lm_head's relative weight "
            f"change per update goes from {h1:.2e} at pass {ks[0]} to {hk:.2e} at pass {ks[-1]} (x{_f(grows, 2)}); the "
            f"blocks' from {b1:.2e} to {bk:.2e} (x{_f(bgrows, 2)}); lm_head/blocks ratio {_f(r1, 2)} -> {_f(rk, 2)}. "
            "(Counted as DWD when the lm_head change grows by more than 1.5x over the passes and 1.5x more than the "
            "blocks' change does.)")
        g1, gk = bp[ks[0]]["grad_norm"], bp[ks[-1]]["grad_norm"]
        lines.append(f"Per-update policy KL on the batch goes from {bp[ks[0]]['kl_step']:.2e} (pass {ks[0]}) to "
                     f"{bp[ks[-1]]['kl_step']:.2e} (pass {ks[-1]}), the KL to the rollout policy grows to "
                     f"{bp[ks[-1]]['kl_rollout']:.2e}; the lm_head gradient norm goes from {g1:.3g} to {gk:.3g} "
                     f"(x{_f(gk / g1 if g1 else float('nan'), 2)}): over the passes of a batch it "
                     f"{'falls' if gk < g1 else 'rises'}.")
    sg = an["signal"]
    if sg.get("arms"):
        parts = [f"`{q}` {_f(v['spearman_maxz_vs_batch_dacc'], 2)} (z > {Z_SPLIT}: {v['over']} batches, mean "
                 f"change {_f(v['dacc_over'], 4)}; the others {v['at_most']}, {_f(v['dacc_at_most'], 4)})"
                 for q, v in sg["rules"].items()]
        lines.append(
            f"**Does z warn of harm?** Over the fixed-reuse arms {', '.join(sg['arms'])}: Spearman(max observer z over "
            f"passes >= 2, held-out accuracy change over that batch) = " + "; ".join(parts)
            + " (a useful warning would be clearly negative). "
            f"Spearman(lm_head grad norm, KL of the same update) = {_f(sg['spearman_norm_vs_kl_same_update'], 2)}, "
            f"(norm, KL of the next update on the same batch) = {_f(sg['spearman_norm_vs_kl_next_update'], 2)}.")
    for c in an["calibration"]:
        obs = c["observer_rate_eval_seeds"]
        gr = c["gated_rate_per_seed"]
        lines.append(
            f"**Calibration** (`{c['arm']}`): on calibration seed {c['seed']} the threshold {c['threshold']:.3g} "
            f"would have closed {c['target_rate']:.0%} of the batches of an observer run; on the evaluated seeds the "
            + (f"same threshold would have closed {np.mean(obs):.0%} of an observer's batches "
               f"(per seed {min(obs):.0%} .. {max(obs):.0%}); " if obs else "")
            + f"the gated arm closed {np.mean(gr):.0%} (per seed {min(gr):.0%} .. {max(gr):.0%}).")
    for v in an["versus"]:
        lines.append(
            f"`{v['dgg']}` vs `{v['vs']}`{' (the best fixed arm)' if v['best_fixed'] else ''} at equal rollouts: "
            f"final accuracy {v['final_acc_diff_mean']:+.3f} (per-seed range {v['final_acc_diff_min']:+.3f} .. "
            f"{v['final_acc_diff_max']:+.3f}; higher on {v['wins']} of {v['seeds']} seeds), mean accuracy over the run "
            f"{v['mean_acc_diff']:+.3f}, with {v['updates_ratio']:.2f}x the applied updates: {v['verdict']}.")
    return lines


def verdict_lines(an: dict) -> list[str]:
    """Where the gate helps, where it does not, where it hurts: one line per verdict."""
    order = (("helps", "Helps (higher on every seed)"), ("leans better", "Leans better (most seeds, not all)"),
             ("no consistent difference", "No consistent difference"),
             ("leans worse", "Leans worse (most seeds, not all)"), ("hurts", "Hurts (lower on every seed)"))
    by = {k: [] for k, _ in order}
    for v in an["versus"]:
        if v["verdict"] in by:
            by[v["verdict"]].append(f"`{v['dgg']}` vs `{v['vs']}` ({v['final_acc_diff_mean']:+.3f}, "
                                    f"{v['wins']}/{v['seeds']} seeds higher)")
    return [f"**{title}:** " + ("; ".join(by[k]) if by[k] else "none") for k, title in order]


def write_markdown(res: dict, an: dict, path: str, plots: list[str]) -> None:
    a = res["args"]
    L = ["# RLVR rollout reuse: fixed K against DGG", "",
         f"Date {res['env']['date']}; device {res['env']['device']}; torch {res['env']['torch']}; "
         f"dgg_kernels {res['env']['dgg_kernels']}; gate backend {res['env']['gate_backend']}; "
         f"{res['env']['threads']} CPU threads.", "",
         f"Command: `{res['env']['command']}` (configuration `{a['config']}`{', --quick' if a['quick'] else ''})"
         + (f"; analysis rewritten from its JSON by `{res['reanalysed_by']}`" if res.get("reanalysed_by") else ""),
         "",
         "## Setup", "",
         f"- Policy: causal transformer, vocab {a['vocab']}, width {a['width']}, {a['layers']} layers, "
         f"{a['heads']} heads, untied lm_head (the lm_head holds {res['env']['lm_head_share']:.0%} of the weights).",
         f"- Task: {a['digits']}-digit addition, sum digits least-significant first, reward 1 only for an exact "
         f"answer. Held-out: {a['heldout']} fixed problems, greedy decoding.",
         f"- Supervised warm-up to greedy held-out accuracy {res['sft']['heldout_acc']:.3f} "
         f"({res['sft']['steps']} steps, lr {a['sft_lr']}, batch {a['sft_batch']}); one checkpoint for every arm and seed.",
         f"- RL: {a['batches']} rollout batches per arm and seed of {a['prompts']} prompts x {a['group']} samples "
         f"(= {a['batches'] * a['prompts'] * a['group']} rollouts), temperature {a['temperature']}, "
         f"group-normalized advantages, PPO-clip {a['clip']}, AdamW(fused=True) lr {a['lr']}, weight decay "
         f"{a['weight_decay']}, gate window {a['window']} on lm_head.weight, `gate.attach(opt)`. "
         f"Seeds {a['seeds']} (seed s: the same prompt stream for every arm).",
         f"- Gate rules: `norm` = today's default statistic (the lm_head gradient norm); `paper` = "
         f"statistic=\"{PAPER}\", the paper's rule (close when the energy z-test or the increment z-test fires). "
         "Window `step` = the window holds every accepted step's statistic; `batch` = one per rollout batch. "
         f"The package default here is `{rule_name(*default_rule())}`.",
         f"- Fixed-reuse arms run observer gates (threshold {observer_threshold():g}, never closing on a finite "
         "gradient) for the rules " + ", ".join(f"`{q}`" for q in res.get("observer_rules", [])) + ", so z is "
         "logged for them too; `z` of a fixed arm in the JSON is the first rule's.",
         f"- Calibrated arms (`cal`): threshold from an observer run (fixed reuse, same rule) on seed "
         f"{a['calib_seed']}, which no arm is evaluated on; see Calibration below.",
         f"- Time: warm-up {res['sft']['seconds']:.0f} s, calibration {res.get('calib_seconds', 0):.0f} s, "
         f"RL {res['rl_seconds']:.0f} s, total {res['total_seconds']:.0f} s.",
         "", "## Verdict: where the gate helps, where it does not, where it hurts", "",
         "Per gated arm (and control) and reference, paired by seed, on final held-out accuracy at equal rollouts. "
         "With 5 seeds, \"every seed\" is a one-sided sign test at p = 0.03; \"most seeds\" (4 of 5) is p = 0.19, "
         "suggestive only.", ""]
    L += [f"- {x}" for x in verdict_lines(an)]
    L += ["", "## What was seen", ""]
    L += [f"- {x}" for x in findings(an)]
    L += ["", "## Arms (accuracy is greedy held-out exact match; mean over seeds [min .. max])", "",
          "| arm | threshold | final acc | mean acc over run | best acc | updates/seed (applied) | batches closed "
          "| closing pass (mean; share at pass 2) | passes/batch | train s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in an["arms"].items():
        thr = "" if s["threshold"] is None else f"{s['threshold']:.3g}"
        cp = "" if math.isnan(s["mean_close_pass"]) else f"{s['mean_close_pass']:.1f}; {s['close_at_pass2']:.0%}"
        L.append(f"| {name} | {thr} | {s['final_acc_mean']:.3f} [{s['final_acc_min']:.3f} .. {s['final_acc_max']:.3f}] "
                 f"| {s['mean_acc_mean']:.3f} [{s['mean_acc_min']:.3f} .. {s['mean_acc_max']:.3f}] | "
                 f"{s['best_acc_mean']:.3f} | {s['updates_per_seed']:.1f} ({s['applied_updates_per_seed']:.1f}) | "
                 f"{s['close_rate']:.0%} | {cp} | {s['passes_per_batch']:.2f} | {s['train_seconds_mean']:.1f} |")
    if an["efficiency"]:
        L += ["", "## Sample efficiency: rollouts and time to reach the single-use arm's final accuracy", "",
              f"Per seed, the target is `fixed K=1`'s final accuracy (trailing mean of its last {SMOOTH} evaluations); "
              f"an arm reaches it at the first rollout batch where its own trailing {SMOOTH}-evaluation mean is at "
              "least that. Speedup = what `fixed K=1` needed to first reach it / what the arm needed, over the seeds "
              "where the arm reached it (median [min .. max]). Train seconds exclude evaluation; they include rollout "
              "generation, which in this toy is cheap next to the training passes (in LLM RLVR it dominates, and "
              "the rollout speedup is the one that matters)."
              + (f" Seeds where `fixed K=1` did not end above its start are left out: "
                 f"{', '.join(map(str, an['efficiency_excluded_seeds']))}." if an.get("efficiency_excluded_seeds")
                 else ""), "",
              "| arm | seeds reaching it | rollouts (median) | train s (median) | speedup in rollouts | "
              "speedup in wall-clock |", "|---|---|---|---|---|---|"]
        for name, e in an["efficiency"].items():
            if e["reached"]:
                L.append(f"| {name} | {e['reached']}/{e['seeds']} | {e['rollouts_median']:.0f} | "
                         f"{e['seconds_median']:.1f} | {e['speedup_rollouts_median']:.2f}x "
                         f"[{e['speedup_rollouts_min']:.2f} .. {e['speedup_rollouts_max']:.2f}] | "
                         f"{e['speedup_seconds_median']:.2f}x [{e['speedup_seconds_min']:.2f} .. "
                         f"{e['speedup_seconds_max']:.2f}] |")
            else:
                L.append(f"| {name} | 0/{e['seeds']} | never | never | | |")
    sg = an["signal"]
    if sg.get("rules"):
        L += ["", "## Does z warn of harm? (observer gates in the fixed-reuse arms)", "",
              "Per batch: the largest z over passes >= 2 against the held-out accuracy change over that batch.", "",
              "Pooled over the arms, a larger K brings both more passes to take the maximum over and more harm, so the "
              "within-arm correlations are the fairer test. With n batches, |Spearman| below about 2/sqrt(n) is "
              "indistinguishable from none (n in brackets).", "",
              "| rule | batches | Spearman(max z, accuracy change), pooled | within "
              + " / ".join(f"`{a}`" for a in sg["arms"]) + f" | batches with z > {Z_SPLIT} | their mean change | "
              "the others | their mean change |", "|---|---|---|---|---|---|---|---|"]
        for q, v in sg["rules"].items():
            L.append(f"| {q} | {v['batches']} | {_f(v['spearman_maxz_vs_batch_dacc'], 2)} | "
                     + " / ".join(f"{_f(v['within_arm'][a], 2)} [{v['within_arm_batches'][a]}]" for a in sg["arms"])
                     + f" | {v['over']} | "
                     f"{_f(v['dacc_over'], 4)} | {v['at_most']} | {_f(v['dacc_at_most'], 4)} |")
    if an["calibration"]:
        L += ["", "## Calibration", "",
              "`dgg_kernels.calibration.Recorder` on an observer gate in a fixed-reuse run of the calibration seed; "
              "`threshold_for_close_rate(rate)` picks the threshold. Close rate = fraction of rollout batches closed.",
              "", "| arm | rule | target rate | threshold | observer rate, eval seeds (mean [min .. max]) | "
              "gated arm's rate (mean [min .. max]) | observer rates on the calibration seed by threshold |",
              "|---|---|---|---|---|---|---|"]
        for c in an["calibration"]:
            obs, gr = c["observer_rate_eval_seeds"], c["gated_rate_per_seed"]
            o = f"{np.mean(obs):.2f} [{min(obs):.2f} .. {max(obs):.2f}]" if obs else "n/a"
            rates = ", ".join(f"{t}: {v:.2f}" for t, v in c["observer_rates"].items())
            L.append(f"| {c['arm']} | {c['rule']} | {c['target_rate']:.2f} | {c['threshold']:.3g} | {o} | "
                     f"{np.mean(gr):.2f} [{min(gr):.2f} .. {max(gr):.2f}] | {rates} |")
    bp = an["dwd"].get("by_pass", {})
    if bp:
        L += ["", f"## Per reuse pass in `{an['dwd']['arm']}` (mean over batches and seeds)", "",
              "| pass | rel. change lm_head | rel. change blocks (mean) | rel. change embed | lm_head/blocks | "
              "lm_head grad norm | KL to pre-update policy | KL to rollout policy | clipped tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
        for k, v in bp.items():
            L.append(f"| {k} | {v['lm_head']:.3e} | {v['blocks']:.3e} | {v['embed']:.3e} | {v['ratio']:.2f} | "
                     f"{v['grad_norm']:.4g} | {v['kl_step']:.3e} | {v['kl_rollout']:.3e} | {v['clip_frac']:.3f} |")
    L += ["", "## GPU configuration", "",
          f"`{GPU_COMMAND}` (a flag given next to `--config gpu` overrides its value; `--help` lists them all). It is the setting of the "
          "2026-11-23 H100 runs (../shared/gpu-runs/2026-11-23-h100, runs d/e: vocab 32768, width 256, 4 layers, "
          "64 prompts x 8, 60 batches, lr 1e-3, SFT lr 3e-3 to accuracy 0.3) with this script's arm set and 5 seeds."]
    if a["config"] == "gpu":
        L.append("This file is a run of it.")
    else:
        L.append("This file is not a run of it: it has not been run with this version of the script (the session "
                 "that wrote this had no GPU). The 2026-11-23 runs used the previous version (norm rule with a "
                 "step window only, no paper rule, no calibration).")
    L += ["", "## Notes", "",
          "- Relative weight change is ||W_after - W_before|| / ||W_before|| per update, over all tensors of the "
          "layer group; KL is the mean over answer tokens of KL(before || after) over the full vocabulary, on the "
          "rollout batch itself.",
          "- A closed gate discards that pass's update (no optimizer step) and ends the batch, so a gated arm spends "
          "one backward pass per closed batch that changes nothing; 'applied' updates exclude those.",
          "- Train seconds exclude held-out evaluation; on a CPU shared with other jobs they are noisy.",
          "- Nothing here was tuned for DGG: thresholds are the paper's range (0.3), the window is the package "
          "default, and the RL learning rate and sizes are the same for all arms (chosen so that fixed K=1 learns "
          "and fixed K=8 does harm).",
          "- Raw per-update records (every arm, seed and pass) are in the JSON next to this file, column-wise: "
          "runs[i].updates is a dict of equal-length lists; numbers keep 5 significant digits."]
    if plots:
        L += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def make_plots(res: dict, an: dict, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return []
    runs, arms, paths = res["runs"], res["arm_names"], []
    specs = {s["name"]: s for s in res["arm_specs"]}
    seed0 = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    for i, name in enumerate(arms):
        rs = [r for r in runs if r["arm"] == name]
        x = np.array([c[0] for c in rs[0]["curve"]])
        y = np.array([_smooth([c[2] for c in r["curve"]], 3) for r in rs])
        t = np.array([[c[1] for c in r["curve"]] for r in rs]).mean(0)
        style = {"fixed": "--", "dgg": "-", "cal": ":", "rnd": "-."}[specs[name]["kind"]]
        (ln,) = axes[0].plot(x, y.mean(0), style, label=name, color=f"C{i}" if i < 10 else "black")
        axes[0].fill_between(x, y.min(0), y.max(0), color=ln.get_color(), alpha=0.08)
        axes[1].plot(t, y.mean(0), style, color=ln.get_color(), label=name)
    axes[0].set(xlabel="rollouts consumed", ylabel="held-out accuracy (greedy; trailing mean of 3)",
                title="accuracy vs rollouts (mean, min-max over seeds)")
    axes[1].set(xlabel="train seconds (excl. eval)", ylabel="held-out accuracy",
                title="accuracy vs wall-clock (mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{stem}_accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    gated = [a for a in arms if specs[a]["kind"] in ("dgg", "cal")]
    show = [a for a in arms if a == an["dwd"].get("arm")] + gated[:1]
    fig, axes = plt.subplots(len(show), 1, figsize=(12, 3.6 * len(show)), squeeze=False)
    for ax, name in zip(axes[:, 0], show):
        r = next(r for r in runs if r["arm"] == name and r["seed"] == seed0)
        ups = r["updates"]
        for g in ups[0]["rel_change"]:
            ax.plot([u["rel_change"][g] for u in ups], label=g, lw=1)
        for i, u in enumerate(ups):
            if u["pass"] == 1 and i:
                ax.axvline(i - 0.5, color="0.85", lw=0.6, zorder=0)
        ax.set(yscale="log", xlabel="update (grey lines: new rollout batch)", ylabel="relative weight change",
               title=f"{name}, seed {seed0}: ||dW||/||W|| per update")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    paths.append(f"{stem}_weight_change.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    kmax = max(_k(a) for a in arms)
    show = [a for a in gated if _k(a) == kmax][:3] + [a for a in arms if a == an["dwd"].get("arm")]
    fig, axes = plt.subplots(len(show), 1, figsize=(12, 3.2 * len(show)), squeeze=False)
    for ax, name in zip(axes[:, 0], show):
        r = next(r for r in runs if r["arm"] == name and r["seed"] == seed0)
        ups = r["updates"][: 20 * kmax]
        if "obs_z" in ups[0]:
            for q in ups[0]["obs_z"]:
                ax.plot([u["obs_z"][q] for u in ups], lw=1, label=f"observer z, {q}")
        else:
            ax.plot([u["z"] for u in ups], lw=1, color="C0", label=f"z ({specs[name]['rule']})")
            z = np.array([u["z"] for u in ups])
            closed = np.array([u["closed"] for u in ups])
            ax.scatter(np.nonzero(closed)[0], z[closed], color="C3", marker="x", zorder=3,
                       label="closed: update discarded, batch dropped")
            ax.axhline(specs[name]["threshold"], color="C3", lw=0.8, ls=":",
                       label=f"threshold {specs[name]['threshold']:.3g}")
        for i, u in enumerate(ups):
            if u["pass"] == 1 and i:
                ax.axvline(i - 0.5, color="0.88", lw=0.5, zorder=0)
        ax.set_ylim(-3, 6)
        ax.set(xlabel="update (grey lines: new rollout batch; first 20 batches)", ylabel="z (clipped to [-3, 6])",
               title=f"{name}, seed {seed0}" + ("" if specs[name]["kind"] in ("dgg", "cal") else " (gates observing only)"))
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    paths.append(f"{stem}_gate.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.5g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def _columns(updates: list[dict]) -> dict:
    """Per-update records as columns (a much smaller JSON); nested dicts become one column per key."""
    cols: dict = {}
    for u in updates:
        for k, v in u.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    cols.setdefault(f"{k}.{kk}", []).append(vv)
            else:
                cols.setdefault(k, []).append(v)
    return cols


def _rows(cols: dict) -> list[dict]:
    """The inverse of _columns."""
    n = len(next(iter(cols.values())))
    rows = [{} for _ in range(n)]
    for key, values in cols.items():
        outer, _, inner = key.partition(".")
        for row, v in zip(rows, values):
            if inner:
                row.setdefault(outer, {})[inner] = v
            else:
                row[outer] = v
    return rows


def _write_json(res: dict, path: str) -> None:
    dump = dict(res, runs=[dict(r, updates=_columns(r["updates"])) for r in res["runs"]])
    with open(path, "w") as f:
        json.dump(_round(dump), f, separators=(",", ":"))


def write_results(res: dict, out: str, quick: bool, plots_on: bool) -> str:
    """Write the raw JSON of ``res`` into ``out`` first, then analyse it and write the JSON with the analysis,
    the plots and the md; returns the file stem.  When the analysis or a plot fails, the JSON stays (rerun
    the rest with --from-json) and the error propagates."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "rlvr_reuse_quick" if quick else "rlvr_reuse")
    path = f"{stem}_results.json"
    res.pop("analysis", None)
    _write_json(res, path)  # the raw results first: nothing below can lose the run
    try:
        an = analyse(res)
        res["analysis"] = an
        _write_json(res, path)
        plots = make_plots(res, an, stem) if plots_on else []
        write_markdown(res, an, f"{stem}_results.md", plots)
    except Exception:
        print(f"writing the results failed after the run; its results are kept in {path}: rerun the analysis with "
              f"python benchmarks/rlvr_reuse.py --from-json {path} --out {out}", file=sys.stderr, flush=True)
        raise
    print("\n".join(["", "Verdict:"] + [f"- {x}" for x in verdict_lines(an)]
                    + ["", "What was seen:"] + [f"- {x}" for x in findings(an)]))
    print(f"wrote {stem}_results.md, {path}" + (", " + ", ".join(plots) if plots else ""))
    return stem


def reanalyse(path: str, out: str, plots_on: bool) -> dict:
    """Rewrite the md, JSON and plots of a finished run from its JSON (no training)."""
    with open(path) as f:
        res = json.load(f)
    res["runs"] = [dict(r, updates=_rows(r["updates"])) for r in res["runs"]]
    res["reanalysed_by"] = f"python benchmarks/rlvr_reuse.py --from-json {path} --out {out}"
    write_results(res, out, bool(res["args"].get("quick")), plots_on)
    return res


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    t_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json:
        return reanalyse(args.from_json, args.out, not args.no_plots)
    dev = torch.device(args.device)  # checked by parse_args
    if args.threads is None and dev.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Task(args.digits)
    arms = parse_arms(args.arms)
    rules = observer_rules(arms)
    print(f"rlvr_reuse ({args.config}{' quick' if args.quick else ''}): {args.digits}-digit addition, vocab "
          f"{args.vocab}, width {args.width}, {args.layers} layers, device {dev}, torch {torch.__version__}, "
          f"{len(arms)} arms x {args.seeds} seeds x {args.batches} batches of {args.prompts}x{args.group} rollouts, "
          f"lr {args.lr}", flush=True)
    heldout = tuple(t.to(dev) for t in task.sample(args.heldout, torch.Generator().manual_seed(12345)))

    torch.manual_seed(args.sft_seed)
    model = make_model(args, task).to(dev)
    sft_info = sft(model, task, heldout, args, dev)
    print(f"sft: {sft_info['steps']} steps, held-out greedy accuracy {sft_info['heldout_acc']:.3f}, "
          f"{sft_info['seconds']:.1f} s", flush=True)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())

    t_cal = time.perf_counter()
    calib = calibrate(arms, init_state, task, heldout, args, dev)
    calib_s = time.perf_counter() - t_cal
    cal_thresholds = [a.threshold for a in arms if a.kind == "cal"]
    record = calibration_module() is not None
    runs, backend = [], None
    t_rl = time.perf_counter()
    for seed in range(args.seeds):
        for arm in arms:
            r = run_arm(arm, seed, init_state, task, heldout, args, dev, rules, record=record and arm.kind == "fixed")
            backend = r.pop("backend")
            recs = r.pop("recorders", {})
            if recs:
                r["close_rates"] = {q: _rates(rec, CAL_GRID + tuple(cal_thresholds)) for q, rec in recs.items()}
            runs.append(r)
            closed = sum(u["closed"] for u in r["updates"])
            print(f"  seed {seed} {arm.name:<26} acc {r['curve'][0][2]:.3f} -> {r['curve'][-1][2]:.3f}  "
                  f"updates {len(r['updates']):3d} (closed {closed:2d})  {r['train_seconds']:6.1f} s", flush=True)
    res = {
        "env": {
            "date": datetime.date.today().isoformat(), "device": _device_name(dev), "torch": torch.__version__,
            "dgg_kernels": dgg.__version__, "gate_backend": backend, "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "command": "python benchmarks/rlvr_reuse.py" + ("" if not argv else " " + " ".join(argv)),
            "lm_head_share": model.lm_head.weight.numel() / n_params,
        },
        "args": vars(args), "arm_names": [a.name for a in arms],
        "arm_specs": [{**asdict(a), "rule": a.rule} for a in arms],
        "observer_rules": [rule_name(*q) for q in rules],
        "sft": sft_info, "calibration": calib, "calib_seconds": calib_s, "runs": runs,
        "rl_seconds": time.perf_counter() - t_rl,
    }
    res["total_seconds"] = time.perf_counter() - t_start
    write_results(res, args.out, args.quick, not args.no_plots)
    print(f"total {res['total_seconds']:.0f} s")
    return res


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores visible)"


if __name__ == "__main__":
    main()
