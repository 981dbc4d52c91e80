"""RLVR rollout-batch reuse with and without the gate: does DGG beat fixed reuse at equal rollouts?

    python benchmarks/rlvr_reuse.py            # default size: about 10-15 minutes on one CPU thread
    python benchmarks/rlvr_reuse.py --quick    # smoke run, well under a minute
    python benchmarks/rlvr_reuse.py --device cuda --vocab 32768 --width 256 --layers 4 \
        --prompts 64 --batches 80 --seeds 5   # larger, on a GPU

What it does, in one process:
1. Builds a small causal transformer whose vocabulary is large next to its
   width (default 8192 x 128, 2 layers), as in an LLM whose lm_head dominates.
2. Supervised warm-up on multi-digit addition (the sum's digits written
   least-significant first; checked exactly) until greedy held-out accuracy
   reaches --sft-target or --sft-max-steps run out: right sometimes, not
   always.  This checkpoint is shared by every arm and seed.
3. GRPO-style RL from that checkpoint, once per arm and seed, with the same
   rollout budget (--batches rollout batches of --prompts x --group samples):
   reward 1/0 from the checker, group-normalized advantages, PPO-clip,
   AdamW(fused=True) with gate.attach(opt), passes over each batch driven by
   dgg_kernels.reuse_passes.  Fixed-reuse arms run the same gate as a pure
   observer (a threshold no finite z reaches), so every arm logs z.
4. Per update it logs the relative weight change of lm_head, the embeddings
   and each block, the lm_head gradient norm, z and the decision, and the
   KL of the updated policy to the pre-update policy (and to the rollout
   policy) on the batch; after every rollout batch, greedy held-out accuracy.
5. Writes benchmarks/results/rlvr_reuse_results.{md,json} and, when
   matplotlib is installed, rlvr_reuse_{accuracy,weight_change,gate}.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dgg_kernels as dgg  # noqa: E402

RUN_DATE = "2026-11-22"
PLUS, EQ = 10, 11  # token ids; 0-9 are digits, ids >= 12 never occur in the data
OBSERVER_THRESHOLD = 1e30  # no finite z exceeds it: the gate only measures


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
            probs = torch.softmax(logits / temperature, -1)
            t = torch.multinomial(probs, 1, generator=gen).squeeze(1)
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
    threshold: float | None  # None: fixed reuse (the gate only observes)

    @property
    def gated(self) -> bool:
        return self.threshold is not None


def parse_arms(spec: str) -> list[Arm]:
    """"k1,k2,k4,k8,dgg4@0.1,dgg8@0.3" -> arms."""
    arms = []
    for item in spec.split(","):
        item = item.strip()
        if item.startswith("dgg"):
            k, t = item[3:].split("@")
            arms.append(Arm(f"dgg K={int(k)} t={float(t):g}", int(k), float(t)))
        elif item.startswith("k"):
            arms.append(Arm(f"fixed K={int(item[1:])}", int(item[1:]), None))
        else:
            raise ValueError(f"bad arm {item!r}: use kN (fixed reuse N) or dggN@T (gate, max reuse N, threshold T)")
    return arms


def _rel_changes(groups, before) -> dict[str, float]:
    out = {}
    for name, ps in groups.items():
        num = sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[name]))
        den = sum((b ** 2).sum() for b in before[name])
        out[name] = math.sqrt(float(num) / float(den))
    return out


def _kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> float:
    """Mean over answer tokens of KL(p || q), full vocabulary."""
    return float((logp_p.exp() * (logp_p - logp_q)).sum(-1).mean())


def run_arm(arm: Arm, seed: int, init_state, task: Task, heldout, args, dev) -> dict:
    torch.manual_seed(seed)
    model = make_model(args, task).to(dev)
    model.load_state_dict(init_state)
    groups = layer_groups(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    gate = dgg.DynamicGradientGate(
        model.lm_head.weight, list(model.parameters()), window=args.window,
        threshold=arm.threshold if arm.gated else OBSERVER_THRESHOLD, max_reuse=arm.max_reuse,
    )
    gate.attach(opt)
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)  # the same prompt stream for every arm of a seed
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
        rollout_logp = prev_logp = None
        for k in dgg.reuse_passes(gate):
            before = {n: [t.detach().clone() for t in ps] for n, ps in groups.items()}
            logp_all = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            if prev_logp is not None:  # this forward sees the weights the previous update produced
                updates[-1]["kl_step"] = _kl(prev_logp, logp_all.detach())
                updates[-1]["kl_rollout"] = _kl(rollout_logp, logp_all.detach())
            if rollout_logp is None:
                rollout_logp = logp_all.detach()
            logp = logp_all.gather(2, out[:, :, None]).squeeze(2)
            ratio = (logp - old_logp).exp()
            obj = torch.minimum(ratio * adv, ratio.clamp(1 - args.clip, 1 + args.clip) * adv)
            loss = -obj.mean()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            gate.step()
            opt.step()
            s = gate.stats()  # the benchmark's own host reads, outside gate.step()
            rec = {
                "batch": b, "pass": k, "reward": round(float(reward.mean()), 4),
                "grad_norm": float(s["norm"]), "z": float(s["z"]), "closed": bool(s["closed"]),
                "clip_frac": round(float(((ratio - 1).abs() > args.clip).float().mean()), 4),
                "kl_step": 0.0, "kl_rollout": 0.0,
                "rel_change": _rel_changes(groups, before),
            }
            updates.append(rec)
            prev_logp = logp_all.detach()
        last = updates[-1]
        if last["closed"]:  # a skipped update leaves the weights, so the policy, as they were
            last["kl_rollout"] = _kl(rollout_logp, prev_logp)
        else:
            with torch.no_grad():
                logp_now = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            last["kl_step"] = _kl(prev_logp, logp_now)
            last["kl_rollout"] = _kl(rollout_logp, logp_now)
        train_s += time.perf_counter() - t0
        curve.append(((b + 1) * n_per_batch, round(train_s, 3), accuracy(model, *heldout)))
    return {"arm": arm.name, "seed": seed, "curve": curve, "updates": updates,
            "train_seconds": train_s, "gate": {k: float(v) for k, v in gate.stats().items()}, "backend": gate.backend}


def make_model(args, task: Task) -> TinyLM:
    return TinyLM(args.vocab, args.width, args.layers, args.heads, task.prompt_len + task.answer_len)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 arms, 1 seed, well under a minute")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on CPU, where several threads on a shared machine ran up to "
                         "40x slower from thread contention; torch's default on CUDA)")
    # model and task
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=256)
    # supervised warm-up
    ap.add_argument("--sft-target", type=float, default=0.3)
    ap.add_argument("--sft-max-steps", type=int, default=1500)
    ap.add_argument("--sft-batch", type=int, default=64)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-eval-every", type=int, default=25)
    ap.add_argument("--sft-seed", type=int, default=0)
    # RL
    ap.add_argument("--arms", default="k1,k2,k4,k8,dgg4@0.1,dgg4@0.3,dgg4@0.5,dgg8@0.3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=20, help="rollout batches per arm (the rollout budget)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=8)
    return ap


QUICK = dict(vocab=2048, width=64, layers=2, digits=1, heldout=128, sft_target=0.3, sft_max_steps=300,
             sft_batch=64, sft_lr=3e-3, sft_eval_every=10, arms="k2,dgg4@0.3", seeds=1, batches=5, prompts=8,
             group=8, window=2)


# ----------------------------------------------------------------------------- analysis

def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _block_names(run) -> list[str]:
    return [k for k in run["updates"][0]["rel_change"] if k.startswith("block")]


def analyse(res: dict) -> dict:
    runs, arms = res["runs"], res["arm_names"]
    out = {"arms": {}, "dwd": {}, "signal": {}, "versus": []}
    for name in arms:
        rs = [r for r in runs if r["arm"] == name]
        final = np.array([r["curve"][-1][2] for r in rs])
        mean_acc = np.array([np.mean([c[2] for c in r["curve"][1:]]) for r in rs])
        ups = [u for r in rs for u in r["updates"]]
        out["arms"][name] = {
            "seeds": len(rs),
            "start_acc": float(np.mean([r["curve"][0][2] for r in rs])),
            "final_acc_mean": float(final.mean()), "final_acc_sd": float(final.std()),
            "mean_acc_mean": float(mean_acc.mean()), "mean_acc_sd": float(mean_acc.std()),
            "best_acc_mean": float(np.mean([max(c[2] for c in r["curve"]) for r in rs])),
            "updates_per_seed": len(ups) / len(rs),
            "closed_per_seed": sum(u["closed"] for u in ups) / len(rs),
            "passes_per_batch": len(ups) / len(rs) / res["args"]["batches"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs])),
            "final_acc_per_seed": final.tolist(),
        }
    fixed = [a for a in arms if a.startswith("fixed")]
    fixed_k = {a: int(a.split("=")[1]) for a in fixed}
    # DWD: relative weight change per layer by reuse pass, in the fixed arm with the most reuse
    if fixed:
        big = max(fixed, key=lambda a: fixed_k[a])
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
    # Does the lm_head signal go with (or precede) harm?  Fixed arms with reuse, observer gate.
    reuse_arms = [a for a in fixed if fixed_k[a] > 1]
    ups = [u for r in runs if r["arm"] in reuse_arms for u in r["updates"]]
    pairs_same = [(u["grad_norm"], u["kl_step"]) for u in ups]
    pairs_next, dacc, maxz = [], [], []
    for r in runs:
        if r["arm"] not in reuse_arms:
            continue
        for b in range(res["args"]["batches"]):
            us = [u for u in r["updates"] if u["batch"] == b]
            pairs_next += [(x["grad_norm"], y["kl_step"]) for x, y in zip(us, us[1:])]
            zs = [u["z"] for u in us if u["pass"] > 1]
            if zs and any(z != 0.0 for z in zs):  # z is 0 until the window is full
                maxz.append(max(zs))
                dacc.append(r["curve"][b + 1][2] - r["curve"][b][2])
    fired = [d for d, z in zip(dacc, maxz) if z > 0.3]
    quiet = [d for d, z in zip(dacc, maxz) if z <= 0.3]
    out["signal"] = {
        "arms": reuse_arms,
        "spearman_norm_vs_kl_same_update": _spearman(*zip(*pairs_same)) if pairs_same else float("nan"),
        "spearman_norm_vs_kl_next_update": _spearman(*zip(*pairs_next)) if pairs_next else float("nan"),
        "spearman_maxz_vs_batch_dacc": _spearman(maxz, dacc),
        "batches": len(dacc),
        "batches_z_over_0.3": len(fired), "dacc_mean_z_over_0.3": float(np.mean(fired)) if fired else float("nan"),
        "batches_z_at_most_0.3": len(quiet), "dacc_mean_z_at_most_0.3": float(np.mean(quiet)) if quiet else float("nan"),
    }
    # DGG against fixed reuse at the same max reuse, paired by seed
    for name in arms:
        if not name.startswith("dgg"):
            continue
        k = int(name.split("K=")[1].split()[0])
        ref = f"fixed K={k}"
        if ref not in out["arms"]:
            continue
        for other in [ref] + ([f"fixed K=1"] if "fixed K=1" in out["arms"] else []):
            a, b = out["arms"][name], out["arms"][other]
            d_final = np.array(a["final_acc_per_seed"]) - np.array(b["final_acc_per_seed"])
            out["versus"].append({
                "dgg": name, "vs": other,
                "final_acc_diff_mean": float(d_final.mean()), "final_acc_diff_min": float(d_final.min()),
                "final_acc_diff_max": float(d_final.max()),
                "mean_acc_diff": a["mean_acc_mean"] - b["mean_acc_mean"],
                "updates_ratio": a["updates_per_seed"] / b["updates_per_seed"],
            })
    return out


def _f(x, nd=3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def findings(an: dict) -> list[str]:
    """Plain statements computed from the numbers (the same rules apply whatever the outcome)."""
    lines = []
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
        kl1, klk = bp[ks[0]]["kl_step"], bp[ks[-1]]["kl_step"]
        lines.append(f"Per-update policy KL on the batch goes from {kl1:.2e} (pass {ks[0]}) to {klk:.2e} "
                     f"(pass {ks[-1]}); the lm_head gradient norm from {bp[ks[0]]['grad_norm']:.3g} to "
                     f"{bp[ks[-1]]['grad_norm']:.3g}.")
    sg = an["signal"]
    if sg.get("arms"):
        lines.append(
            f"**Does the lm_head signal precede degradation?** Over the fixed-reuse arms {', '.join(sg['arms'])}: "
            f"Spearman(lm_head grad norm, KL of the same update) = {_f(sg['spearman_norm_vs_kl_same_update'], 2)}, "
            f"(norm, KL of the next update on the same batch) = {_f(sg['spearman_norm_vs_kl_next_update'], 2)}; "
            f"Spearman(max observer z over passes >= 2, held-out accuracy change over that batch) = "
            f"{_f(sg['spearman_maxz_vs_batch_dacc'], 2)} over {sg['batches']} batches (a useful warning would be "
            f"clearly negative). Batches where z exceeded 0.3: {sg['batches_z_over_0.3']}, mean accuracy change "
            f"{_f(sg['dacc_mean_z_over_0.3'], 4)}; the others: {sg['batches_z_at_most_0.3']}, "
            f"{_f(sg['dacc_mean_z_at_most_0.3'], 4)}.")
    for v in an["versus"]:
        better = v["final_acc_diff_mean"] > 0 and v["final_acc_diff_min"] > 0
        worse = v["final_acc_diff_mean"] < 0 and v["final_acc_diff_max"] < 0
        verdict = ("better on every seed" if better else "worse on every seed" if worse else "no consistent difference")
        lines.append(
            f"`{v['dgg']}` vs `{v['vs']}` at equal rollouts: final accuracy {v['final_acc_diff_mean']:+.3f} "
            f"(per-seed range {v['final_acc_diff_min']:+.3f} .. {v['final_acc_diff_max']:+.3f}), mean accuracy over "
            f"the run {v['mean_acc_diff']:+.3f}, with {v['updates_ratio']:.2f}x the updates: {verdict}.")
    return lines


def write_markdown(res: dict, an: dict, path: str, plots: list[str]) -> None:
    a = res["args"]
    L = ["# RLVR rollout reuse: fixed K against DGG", "",
         f"Date {res['env']['date']}; device {res['env']['device']}; torch {res['env']['torch']}; "
         f"dgg_kernels {res['env']['dgg_kernels']}; gate backend {res['env']['gate_backend']}; "
         f"{res['env']['threads']} CPU threads.", "",
         f"Command: `{res['env']['command']}`", "",
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
         "- Fixed-reuse arms run the gate as an observer (threshold 1e30) so that z is logged for them too.",
         f"- Time: warm-up {res['sft']['seconds']:.0f} s, RL {res['rl_seconds']:.0f} s, total {res['total_seconds']:.0f} s.",
         "", "## What was seen", ""]
    L += [f"- {x}" for x in findings(an)]
    L += ["", "## Arms (mean over seeds; accuracy is greedy held-out exact match)", "",
          "| arm | start acc | final acc (sd) | mean acc over run (sd) | best acc | updates/seed | closed/seed | passes/batch | train s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, s in an["arms"].items():
        L.append(f"| {name} | {s['start_acc']:.3f} | {s['final_acc_mean']:.3f} ({s['final_acc_sd']:.3f}) | "
                 f"{s['mean_acc_mean']:.3f} ({s['mean_acc_sd']:.3f}) | {s['best_acc_mean']:.3f} | "
                 f"{s['updates_per_seed']:.1f} | {s['closed_per_seed']:.1f} | {s['passes_per_batch']:.2f} | "
                 f"{s['train_seconds_mean']:.1f} |")
    bp = an["dwd"].get("by_pass", {})
    if bp:
        L += ["", f"## Per reuse pass in `{an['dwd']['arm']}` (mean over batches and seeds)", "",
              "| pass | rel. change lm_head | rel. change blocks (mean) | rel. change embed | lm_head/blocks | "
              "lm_head grad norm | KL to pre-update policy | KL to rollout policy | clipped tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
        for k, v in bp.items():
            L.append(f"| {k} | {v['lm_head']:.3e} | {v['blocks']:.3e} | {v['embed']:.3e} | {v['ratio']:.2f} | "
                     f"{v['grad_norm']:.4g} | {v['kl_step']:.3e} | {v['kl_rollout']:.3e} | {v['clip_frac']:.3f} |")
    L += ["", "## Notes", "",
          "- Relative weight change is ||W_after - W_before|| / ||W_before|| per update, over all tensors of the "
          "layer group; KL is the mean over answer tokens of KL(before || after) over the full vocabulary, on the "
          "rollout batch itself.",
          "- Train seconds exclude held-out evaluation; on a CPU shared with other jobs they are noisy.",
          "- Nothing here was tuned for DGG: thresholds are the paper's range, the window is the package default, "
          "and the RL learning rate and sizes are fixed for all arms.",
          "- Raw per-update records (every arm, seed and pass) are in the JSON next to this file."]
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
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in arms:
        rs = [r for r in runs if r["arm"] == name]
        x = np.array([c[0] for c in rs[0]["curve"]])
        y = np.array([[c[2] for c in r["curve"]] for r in rs])
        t = np.array([[c[1] for c in r["curve"]] for r in rs]).mean(0)
        style = "-" if name.startswith("dgg") else "--"
        (ln,) = axes[0].plot(x, y.mean(0), style, label=name)
        axes[0].fill_between(x, y.min(0), y.max(0), color=ln.get_color(), alpha=0.12)
        axes[1].plot(t, y.mean(0), style, color=ln.get_color(), label=name)
    axes[0].set(xlabel="rollouts consumed", ylabel="held-out accuracy (greedy)", title="accuracy vs rollouts (mean, min-max over seeds)")
    axes[1].set(xlabel="train seconds (excl. eval)", ylabel="held-out accuracy", title="accuracy vs wall-clock (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{stem}_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    show = [a for a in arms if a == an["dwd"].get("arm")] + [a for a in arms if a.startswith("dgg")][:1]
    fig, axes = plt.subplots(len(show), 1, figsize=(12, 3.6 * len(show)), squeeze=False)
    for ax, name in zip(axes[:, 0], show):
        r = next(r for r in runs if r["arm"] == name and r["seed"] == 0)
        ups = r["updates"]
        for g in ups[0]["rel_change"]:
            ax.plot([u["rel_change"][g] for u in ups], label=g, lw=1)
        for i, u in enumerate(ups):
            if u["pass"] == 1 and i:
                ax.axvline(i - 0.5, color="0.85", lw=0.6, zorder=0)
        ax.set(yscale="log", xlabel="update (grey lines: new rollout batch)", ylabel="relative weight change",
               title=f"{name}, seed 0: ||dW||/||W|| per update")
        ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    paths.append(f"{stem}_weight_change.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    show = [a for a in arms if a.startswith("dgg")][:2] + [a for a in arms if a == an["dwd"].get("arm")]
    fig, axes = plt.subplots(len(show), 1, figsize=(12, 3.2 * len(show)), squeeze=False)
    for ax, name in zip(axes[:, 0], show):
        r = next(r for r in runs if r["arm"] == name and r["seed"] == 0)
        ups = r["updates"]
        z = np.array([u["z"] for u in ups])
        closed = np.array([u["closed"] for u in ups])
        ax.plot(z, lw=1, color="C0", label="z (lm_head grad norm)")
        ax.scatter(np.nonzero(closed)[0], z[closed], color="C3", marker="x", zorder=3, label="closed: update discarded, batch dropped")
        thr = name.split("t=")[1] if "t=" in name else None
        if thr:
            ax.axhline(float(thr), color="C3", lw=0.8, ls=":", label=f"threshold {thr}")
        ax2 = ax.twinx()
        ax2.plot([u["kl_step"] for u in ups], color="C2", lw=0.8, alpha=0.7)
        ax2.set_ylabel("KL to pre-update policy", color="C2")
        ax.set(xlabel="update", ylabel="z", title=f"{name}, seed 0" + ("" if thr else " (gate observing only)"))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(f"{stem}_gate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.dest for a in ap._actions if any(o in argv for o in a.option_strings)}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    dev = torch.device(args.device)
    if args.threads is None and dev.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Task(args.digits)
    arms = parse_arms(args.arms)
    print(f"rlvr_reuse: {args.digits}-digit addition, vocab {args.vocab}, width {args.width}, {args.layers} layers, "
          f"device {dev}, torch {torch.__version__}, {len(arms)} arms x {args.seeds} seeds x {args.batches} batches "
          f"of {args.prompts}x{args.group} rollouts", flush=True)
    heldout = tuple(t.to(dev) for t in task.sample(args.heldout, torch.Generator().manual_seed(12345)))

    torch.manual_seed(args.sft_seed)
    model = make_model(args, task).to(dev)
    sft_info = sft(model, task, heldout, args, dev)
    print(f"sft: {sft_info['steps']} steps, held-out greedy accuracy {sft_info['heldout_acc']:.3f}, "
          f"{sft_info['seconds']:.1f} s", flush=True)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())

    runs, backend = [], None
    t_rl = time.perf_counter()
    for seed in range(args.seeds):
        for arm in arms:
            r = run_arm(arm, seed, init_state, task, heldout, args, dev)
            backend = r.pop("backend")
            runs.append(r)
            closed = sum(u["closed"] for u in r["updates"])
            print(f"  seed {seed} {arm.name:<16} acc {r['curve'][0][2]:.3f} -> {r['curve'][-1][2]:.3f}  "
                  f"updates {len(r['updates']):3d} (closed {closed:2d})  {r['train_seconds']:6.1f} s", flush=True)
    res = {
        "env": {
            "date": RUN_DATE, "device": _device_name(dev), "torch": torch.__version__,
            "dgg_kernels": dgg.__version__, "gate_backend": backend, "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "command": "python benchmarks/rlvr_reuse.py" + ("" if not argv else " " + " ".join(argv)),
            "lm_head_share": model.lm_head.weight.numel() / n_params,
        },
        "args": vars(args), "arm_names": [a.name for a in arms], "sft": sft_info, "runs": runs,
        "rl_seconds": time.perf_counter() - t_rl,
    }
    res["total_seconds"] = time.perf_counter() - t_start
    an = analyse(res)
    res["analysis"] = an
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "rlvr_reuse_quick" if args.quick else "rlvr_reuse")
    plots = [] if args.no_plots else make_plots(res, an, stem)
    with open(f"{stem}_results.json", "w") as f:
        json.dump(_round(res), f, indent=1)
    write_markdown(res, an, f"{stem}_results.md", plots)
    print("\n".join(["", "What was seen:"] + [f"- {x}" for x in findings(an)]))
    print(f"wrote {stem}_results.md, {stem}_results.json" + (", " + ", ".join(plots) if plots else "")
          + f"; total {res['total_seconds']:.0f} s")
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
