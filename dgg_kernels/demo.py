"""The demo: a small large-vocabulary policy trained with rollout-batch reuse through the gate.

    python -m dgg_kernels.demo [--device cpu|cuda] [--batches 12] [--threshold 0.3]

A toy RLVR loop: each rollout batch samples one token per context from the
policy, rewards the tokens of a hidden "correct" set (a verifiable reward),
normalizes advantages per group, and then reuses the batch for up to
max_reuse importance-weighted policy-gradient updates.  Every update prints
the gate's statistic (the lm_head gradient norm), z and decision; a closed
gate zeroes the update, skips the fused AdamW step on device and ends reuse
of the batch.  Runs in well under two minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dgg_kernels as dgg


class TinyPolicy(nn.Module):
    """Embedding -> 2 residual MLP blocks -> lm_head; vocab much larger than width, like an LLM."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        h = self.embed(ctx).mean(1)
        for b in self.blocks:
            h = h + b(h)
        return self.lm_head(self.norm(h))


def _host(stats: dict) -> dict:
    """The stats as Python numbers, to print them: the demo's host read, outside the gate's step."""
    return {k: v.item() for k, v in stats.items()}  # host-read-ok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batches", type=int, default=12, help="rollout batches")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--max-reuse", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    model = TinyPolicy(args.vocab, args.width).to(dev)
    correct = torch.rand(args.vocab, generator=torch.Generator().manual_seed(1)) < 0.05  # the verifiable answers
    correct = correct.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    gate = dgg.DynamicGradientGate(
        model.lm_head.weight, list(model.parameters()),
        window=args.window, threshold=args.threshold, max_reuse=args.max_reuse,
    )
    gate.attach(opt)  # a closed gate skips the fused AdamW step on device
    print(f"demo: vocab {args.vocab}, width {args.width}, device {dev}, gate backend {gate.backend}, "
          f"window {args.window}, threshold {args.threshold}, max_reuse {args.max_reuse}")
    print(f"{'batch':>5} {'pass':>4} {'reward':>7} {'norm':>10} {'z':>8}  decision")
    t0 = time.perf_counter()
    updates = stops_by_gate = 0
    for b in range(args.batches):
        ctx = torch.randint(args.vocab, (args.prompts, 16), device=dev).repeat_interleave(args.group, 0)
        with torch.no_grad():
            old_logp_all = F.log_softmax(model(ctx).float(), -1)
            actions = torch.multinomial(old_logp_all.exp(), 1).squeeze(1)
            old_logp = old_logp_all.gather(1, actions[:, None]).squeeze(1)
            reward = correct[actions].float()
            r = reward.view(args.prompts, args.group)
            adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        for p in dgg.reuse_passes(gate):
            logp = F.log_softmax(model(ctx).float(), -1).gather(1, actions[:, None]).squeeze(1)
            ratio = (logp - old_logp).exp()
            loss = -(ratio * adv).mean()  # importance-weighted PG, unclipped so that reuse drift shows
            opt.zero_grad(set_to_none=False)
            loss.backward()
            gate.step()
            opt.step()
            updates += 1
            s = _host(gate.stats())
            print(f"{b:5d} {p:4d} {float(reward.mean()):7.3f} {s['statistic']:10.4f} {s['z']:8.2f}  "
                  f"{'CLOSED: update discarded, stop reusing this batch' if s['closed'] else 'open'}")
            stops_by_gate += s["closed"]
    dt = time.perf_counter() - t0
    print(f"done: {updates} updates over {args.batches} batches, {stops_by_gate} stopped by the gate, "
          f"{_host(gate.stats())['accepted']} accepted, {dt:.1f} s")


if __name__ == "__main__":
    main()
