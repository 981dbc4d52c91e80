"""The demo: what the gate is for, shown on a run where reusing rollouts does harm (about two minutes on a CPU).

    python -m dgg_kernels.demo [--seed 0] [--threshold 0.3] [--statistic ...] [--window-mode ...]

1. Warm-up: a tiny transformer (vocab 2048, width 64, 1 layer) learns 2-digit
   addition by supervised training until it gets about a third of held-out
   problems right.
2. RL from that checkpoint (GRPO-style: 32 prompts x 8 samples per rollout
   batch, reward 1 for an exact answer, PPO-clip, AdamW), on the same stream
   of prompts each time:
     fixed K=1   every rollout batch is used for one update;
     fixed K=8   every batch is reused for 8 updates (8x the updates for the
                 same rollouts; at this learning rate that does harm);
     calibration fixed K=8 on another seed with the gate as an observer
                 (threshold inf) and a dgg_kernels.calibration.Recorder:
                 the threshold that would have closed half the batches;
     gated K=8   up to 8 updates per batch; the gate (by default the
                 paper's rule, statistic="energy+increment") watches the
                 lm_head gradient and, when z exceeds the threshold,
                 discards that update and ends reuse of the batch;
     KL stop K=8 up to 8 updates per batch; the gate's KL stop (the KL of
                 the policy to the rollout policy on the sampled tokens,
                 given each pass with observe_kl) ends reuse when it
                 exceeds 1.5 x target_kl: stable-baselines3's rule;
     coin K=8    a batch ends at pass 2 with chance 0.5, blind to the
                 gradient (1 or 8 passes, not the gate's spread of stopping
                 passes: not a matched control for the gate's choice).
3. Prints every pass of the gated run's first batches (window warm-up, pass
   index, z, threshold, decision and its reason), then one line per batch,
   and at the end what happened, in numbers, and what to try next.

The gate's step() never reads the device; the demo reads the stats after each
step only to print them (lines marked host-read-ok).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dgg_kernels as dgg
from dgg_kernels import _cli
from dgg_kernels.calibration import Recorder
from dgg_kernels.config import STATISTICS, WINDOW_MODES

PLUS, EQ = 10, 11  # token ids; 0-9 are digits


# ----------------------------------------------------------------------------- a tiny policy and a checkable task

class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, one pre-LN block, untied lm_head (vocab 2048 >> width 64, like an LLM)."""

    def __init__(self, vocab: int = 2048, width: int = 64, max_len: int = 9) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.block = Block(width, 4)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        x = self.block(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        return self.lm_head(self.norm(x[:, -last:])).float()


def problems(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random a+b with 2-digit a, b: prompt "a a + b b =", answer the sum's 3 digits least significant first."""
    a, b = torch.randint(100, (n,), generator=gen), torch.randint(100, (n,), generator=gen)
    prompt = torch.stack([a // 10, a % 10, torch.full_like(a, PLUS), b // 10, b % 10, torch.full_like(a, EQ)], 1)
    return prompt, ((a + b)[:, None] // torch.tensor([1, 10, 100])) % 10


@torch.no_grad()
def generate(model: TinyLM, prompt: torch.Tensor, gen: torch.Generator | None):
    """Sample 3 answer tokens (greedy when gen is None); returns them and their log-probs."""
    seq, toks, logps = prompt, [], []
    for _ in range(3):
        logits = model(seq, 1)[:, 0]
        if gen is None:
            t = logits.argmax(-1)
        else:  # inverse-CDF sampling: torch.multinomial is 4x slower on CPU here
            cdf = logits.softmax(-1).cumsum(-1)
            u = torch.rand(cdf.shape[0], 1, generator=gen) * cdf[:, -1:]
            t = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(1)
        logps.append(logits.log_softmax(-1).gather(1, t[:, None]).squeeze(1))
        toks.append(t)
        seq = torch.cat([seq, t[:, None]], 1)
    return torch.stack(toks, 1), torch.stack(logps, 1)


def accuracy(model: TinyLM, heldout) -> float:
    out, _ = generate(model, heldout[0], None)
    return (out == heldout[1]).all(1).float().mean().item()  # host-read-ok: evaluation, between batches


def warm_up(model: TinyLM, heldout, target: float) -> tuple[int, float]:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    step, acc = 0, 0.0
    while acc < target and step < 3000:
        p, a = problems(64, gen)
        logits = model(torch.cat([p, a], 1)[:, :-1], 3)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), a.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            acc = accuracy(model, heldout)
    return step, acc


# ----------------------------------------------------------------------------- RL with rollout reuse

def _host(stats: dict) -> dict:
    """The stats as Python numbers, to print them: the demo's host read, after the gate's step."""
    return {k: v.item() for k, v in stats.items()}  # host-read-ok


def rl(init_state, heldout, args, kind: str, log, seed: int | None = None, batches: int | None = None) -> dict:
    """One RL run from the warm-up checkpoint.

    kind: "K=1" / "K=8" fixed reuse; "observe": fixed K=8 with the gate as an observer (threshold inf: z
    computed, never closing) and a calibration.Recorder; "gated": the gate's gradient test decides, up to 8
    passes; "kl": the gate's KL stop alone decides (threshold inf, target_kl), up to 8 passes; "coin": a
    batch ends at pass 2 with chance args.coin, whatever the gradient says (the control for the gate).
    """
    seed = args.seed if seed is None else seed
    batches = args.batches if batches is None else batches
    torch.manual_seed(seed)
    model = TinyLM()
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    max_reuse = 1 if kind == "K=1" else 8
    kw = dict(window=args.window, max_reuse=max_reuse, statistic=args.statistic,
              threshold=args.threshold if kind == "gated" else float("inf"))
    if kind == "kl":
        kw.update(target_kl=args.target_kl, kl_factor=args.kl_factor)
    decides = kind in ("gated", "kl")
    if args.window_mode is not None:
        kw["window_mode"] = args.window_mode
    gate = dgg.DynamicGradientGate(model.lm_head.weight, list(model.parameters()), **kw)
    gate.attach(opt)  # a closed gate skips the fused AdamW step on device
    recorder = Recorder() if kind == "observe" else None
    prompts = torch.Generator().manual_seed(10_000 + seed)  # the same prompts for every run of a seed
    samples = torch.Generator().manual_seed(20_000 + seed)
    coins = torch.Generator().manual_seed(30_000 + seed)
    curve, applied, passes, closed_batches = [accuracy(model, heldout)], 0, 0, 0
    entries = -1 if args.statistic == "increment" else 0  # statistics in the window (the first increment has none)
    for b in range(1, batches + 1):
        p, a = problems(32, prompts)
        p, a = p.repeat_interleave(8, 0), a.repeat_interleave(8, 0)
        out, old_logp = generate(model, p, samples)
        r = (out == a).all(1).float().view(32, 8)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        seq = torch.cat([p, out], 1)
        coin = kind == "coin" and torch.rand(1, generator=coins).item() < args.coin  # host-read-ok: a CPU draw
        verbose, how = decides and b <= args.show, f"all {max_reuse} passes"
        for k in dgg.reuse_passes(gate):
            logp = model(seq[:, :-1], 3).log_softmax(-1).gather(2, out[:, :, None]).squeeze(2)
            ratio = (logp - old_logp).exp()
            loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
            opt.zero_grad(set_to_none=False)
            loss.backward()
            # the KL of this policy to the rollout policy on the sampled tokens (k3), from the loss's own forward
            log_ratio = (logp - old_logp).detach()
            gate.observe_kl((torch.expm1(log_ratio) - log_ratio).mean())  # a device tensor: no host read
            gate.step()  # no host read in here
            passes += 1
            if recorder is not None:
                recorder.record(gate)  # device copies only, read after the run
            if coin and k == 2:  # the control discards this update and ends the batch, as a close would
                closed_batches += 1
                break
            opt.step()  # skipped on device when the gate closed
            if not decides:
                applied += 1
                continue
            s = _host(gate.stats())  # host-read-ok: read after the step, to print it
            closed = bool(s["closed"])
            applied += not closed
            if kind == "kl":
                limit = gate.config.kl_limit
                kl = f"KL to the rollout policy {s['kl']:.4f}"
                if closed:
                    closed_batches += 1
                    how = f"closed at pass {k} ({kl} > {limit:.3g})"
                    line = f"{kl} > {limit:.3g} -> CLOSED: update discarded, stop reusing this batch"
                elif k == 1:
                    line = f"{kl}; pass 1 is never tested (the batch is fresh) -> open: update applied"
                else:
                    line = f"{kl} <= {limit:.3g} -> open: update applied"
                if k == max_reuse and not closed:
                    line += f"; max_reuse {max_reuse} reached, next batch"
                if verbose:
                    log(f"  batch {b:2d} pass {k}: {line}")
                continue
            z = f"z={s['z']:+.2f}" + (f" (energy z {s['z_energy']:+.2f}, increment z {s['z_increment']:+.2f})"
                                      if args.statistic == "energy+increment" else "")
            if closed:
                closed_batches += 1
                how = f"closed at pass {k} ({z} > {args.threshold:.3g})"
                line = f"{z} > {args.threshold:.3g} -> CLOSED: update discarded, stop reusing this batch"
            elif entries < args.window:
                line = (f"window still filling ({max(entries, 0)}/{args.window}): no z yet, the gate cannot close "
                        "-> open: update applied")
            elif k == 1:
                line = f"{z}; pass 1 is never tested (the batch is fresh) -> open: update applied"
            else:
                line = f"{z} <= {args.threshold:.3g} -> open: update applied"
            if not closed and (gate.config.window_mode == "step" or k == 1):  # what enters the window
                entries += 1
            if k == max_reuse and not closed:
                line += f"; max_reuse {max_reuse} reached, next batch"
            if verbose:
                log(f"  batch {b:2d} pass {k}: |grad lm_head| {s['norm']:.3f}  {line}")
        curve.append(accuracy(model, heldout))
        if decides:
            log(f"  batch {b:2d}{' done' if verbose else ''}: {'' if verbose else how + '; '}"
                f"held-out accuracy {curve[-1]:.3f}")
    return {"curve": curve, "applied": applied, "passes": passes, "closed": closed_batches, "recorder": recorder}


def build_parser():
    """The command line: every flag is checked here, before the warm-up starts (dgg_kernels._cli)."""
    ap = _cli.parser(__doc__)
    ap.add_argument("--seed", type=_cli.integer(0), default=0,
                    help="RL seed: the prompts, samples and coin flips (default 0)")
    ap.add_argument("--batches", type=_cli.integer(1), default=40, help="rollout batches per run (default 40)")
    ap.add_argument("--lr", type=_cli.number(0, lo_open=True), default=1.5e-3,
                    help="RL learning rate (default 1.5e-3: reuse K=8 does harm)")
    ap.add_argument("--statistic", default="energy+increment", choices=STATISTICS,
                    help="the gate's statistic (default energy+increment, the paper's rule; the package's default "
                         f"is {dgg.GateConfig().statistic})")
    ap.add_argument("--window-mode", default=None, choices=WINDOW_MODES,
                    help="the gate's window mode, step or batch (default: the package's)")
    ap.add_argument("--window", type=_cli.integer(2), default=8, help="gate window (default 8)")
    ap.add_argument("--threshold", type=_cli.number(0, inf=True), default=None,
                    help="gate threshold on z, >= 0 (default: calibrated, see --close-rate; the paper uses 0.1-0.5; "
                         "inf: an observer that never closes)")
    ap.add_argument("--close-rate", type=_cli.fraction(), default=0.5,
                    help="without --threshold: the threshold is the smallest that would have closed at most this "
                         "fraction (0 to 1) of the batches of an observer run on another seed (default 0.5)")
    ap.add_argument("--calib-batches", type=_cli.integer(1), default=None,
                    help="rollout batches of that observer run (default: as many as --batches)")
    ap.add_argument("--target-kl", type=_cli.number(0, lo_open=True), default=0.01,
                    help="the KL stop's target, > 0 (default 0.01, stable-baselines3's documented value)")
    ap.add_argument("--kl-factor", type=_cli.number(0, lo_open=True), default=1.5,
                    help="the KL stop closes when the KL exceeds kl-factor x target (default 1.5, stable-baselines3's "
                         "rule)")
    ap.add_argument("--coin", type=_cli.fraction(), default=0.5,
                    help="the control's chance (0 to 1) of ending a batch at pass 2 (default 0.5; 0 skips the control)")
    ap.add_argument("--show", type=_cli.integer(0), default=6,
                    help="batches of the gated run printed pass by pass (default 6)")
    ap.add_argument("--target", type=_cli.fraction(), default=0.3,
                    help="held-out accuracy (0 to 1) the warm-up stops at (default 0.3)")
    ap.add_argument("--threads", type=_cli.integer(1), default=1, help="torch CPU threads (default 1)")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    heldout = problems(256, torch.Generator().manual_seed(12345))
    torch.manual_seed(0)
    model = TinyLM()
    steps, acc0 = warm_up(model, heldout, args.target)
    print(f"warm-up: {steps} supervised steps; the policy now gets {acc0:.0%} of 256 held-out 2-digit additions "
          f"right ({time.perf_counter() - t0:.0f} s). RL from here, {args.batches} rollout batches of 32 prompts x 8 "
          f"samples, lr {args.lr:g}, the same prompts in every run:")
    init = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for kind, title in (("K=1", "fixed K=1: each rollout batch used once"),
                        ("K=8", "fixed K=8: each rollout batch reused for 8 updates")):
        print(f"\n{title}")
        runs[kind] = _summary(rl(init, heldout, args, kind, print), args, kind)
    if args.threshold is None:
        cseed = args.seed + 1000
        args.calib_batches = args.calib_batches or args.batches
        print(f"\ncalibration: fixed K=8 on seed {cseed} ({args.calib_batches} batches) with the gate as an "
              "observer (threshold inf: it computes z and never closes), every step recorded by "
              "dgg_kernels.calibration.Recorder")
        rec = rl(init, heldout, args, "observe", print, seed=cseed, batches=args.calib_batches)["recorder"]
        rec_batches = rec.n_batches
        args.threshold = rec.threshold_for_close_rate(args.close_rate)
        rates = rec.close_rates([0.1, 0.3, 1.0, args.threshold])
        print("  it would have closed " + ", ".join(f"{v:.0%} of the batches at threshold {t:.3g}"
                                                    for t, v in rates.items())
              + f" (of {rec_batches}): threshold {args.threshold:.3g} (at most {args.close_rate:.0%}) from here on. "
              "A first-order estimate: a gate that closes changes what follows, so its own close rate differs.")
    print("\ngated K=8: up to 8 updates per batch, the gate decides")
    print(f"  gate on lm_head.weight: statistic {args.statistic}, window {args.window}"
          + (f" ({args.window_mode} mode)" if args.window_mode else "") + f", threshold {args.threshold:.3g}. "
          "z compares this pass's statistic with the window; the gate never tests pass 1 of a batch and cannot "
          "close before its window is full.")
    runs["gated"] = _summary(rl(init, heldout, args, "gated", print), args, "gated")
    limit = args.target_kl * args.kl_factor
    print(f"\nKL stop K=8: up to 8 updates per batch; the gate's KL stop decides (threshold inf: the gradient "
          f"test never closes). Each pass gives the gate the KL of the policy to the rollout policy on the sampled "
          f"tokens (k3, from the loss's own forward); the gate closes from pass 2 on when it exceeds "
          f"{args.kl_factor:g} x target {args.target_kl:g} = {limit:.3g}, the rule PPO users know from "
          "stable-baselines3's target_kl.")
    runs["KL stop"] = _summary(rl(init, heldout, args, "kl", print), args, "kl")
    if args.coin > 0:
        print(f"\ncoin K=8: a batch ends at pass 2 with chance {args.coin:g}, blind to the gradient")
        runs["coin"] = _summary(rl(init, heldout, args, "coin", print), args, "coin")
    fin = {k: r["curve"][-1] for k, r in runs.items()}
    per = {k: r["applied"] / args.batches for k, r in runs.items()}  # updates applied per rollout batch
    print(f"\nsummary (seed {args.seed}, {time.perf_counter() - t0:.0f} s): final accuracy on the 256 evaluation "
          "problems (drawn from the warm-up's distribution) " + ", ".join(f"{k} {v:.3f}" for k, v in fin.items())
          + "; updates applied per rollout batch " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + ".")
    print("- reuse " + ("did harm: fixed K=8 ended below single use." if fin["K=8"] < fin["K=1"] else
                        "did not do harm on this seed: fixed K=8 did not end below single use."))
    for name, what in (("gated", "the gate's gradient test"), ("KL stop", "the gate's KL stop")):
        d8 = fin[name] - fin["K=8"]
        d1 = fin[name] - fin["K=1"]
        print(f"- {what} {'helped' if d8 > 0 else 'did not help'} against fixed K=8 ({d8:+.3f}) and ended "
              f"{'above' if d1 > 0 else 'level with' if d1 == 0 else 'below'} single use ({d1:+.3f}), "
              + (f"applying {per[name]:.2f} updates per batch against K=8's 8 and K=1's 1: a comparison at unequal "
                 "amounts of reuse, not evidence that it knew which passes hurt." if per[name] < 8 else
                 "applying all 8 updates of every batch, as K=8 does."))
    if "coin" in fin:
        dc = fin["gated"] - fin["coin"]
        print(f"- against the coin ({dc:+.3f}; it ended {runs['coin']['closed']} batches early, the gate "
              f"{runs['gated']['closed']}): the coin gives a batch 1 or 8 passes, the gate a spread of stopping "
              "passes, so this is not a matched control and says nothing on its own about the gate's choice.")
    print("- one seed is an anecdote. " + STUDY)
    print("\nnext: --seed 1..4; --target-kl 0.005 / 0.02; --threshold 0.3 (the paper's range, no calibration); "
          "--statistic norm (the package default); --window-mode batch; python benchmarks/rlvr/study.py (the "
          "study); docs/semantics.md (one step).")


# What the studies support, said after every run of the demo; its figures are the committed JSONs'
# (benchmarks/rlvr/claims.py; tests/test_claims.py checks them)
STUDY = ("With controls fixed before the runs, on three small from-scratch tasks (6 seeds over 3 warm-ups, "
         "benchmarks/results/controls/rlvr_study.md) and on a real pretrained LLM (SmolLM2-135M, GRPO on CPU, 3 "
         "seeds, benchmarks/results/llm_study.md), none of the 25 stop-rule arms tested (19 distinct runs: the "
         "paper's rule, calibrated or not, and KL stops, ours, stable-baselines3's and CleanRL's, at max reuse 4 "
         "and 8) beat its own replay control (its stopping passes on "
         "random batches) or the best fixed K. The paper's z ranked harmful passes above chance in 3 of 4 settings "
         "(AUROC 0.57-0.59) and beats the pass index alone in 1 (SmolLM2-135M: +0.07, CI +0.01..+0.12; not "
         "robust to leaving out the observer's placeholder z); the KL and the PPO clip fraction beat it on some of "
         "the small tasks. Those are 4 of 40 signal-setting "
         "comparisons with the pass index (36 distinct); with 95% intervals, about 1 would beat it by chance, and 1 "
         "still beats it both with the zero-gradient steps left out and with the placeholder z left out (addition: "
         "clipfrac; checks added after the results were read).")


def _summary(r: dict, args, kind: str) -> dict:
    c = r["curve"]
    print(f"  held-out accuracy {c[0]:.3f} -> " + " ".join(f"{x:.2f}" for x in c[10::10]) + f"; final "
          f"{c[-1]:.3f} ({r['applied']} updates applied, {r['passes']} backward passes"
          + (f", {r['closed']} of {args.batches} batches ended early)" if kind in ("gated", "kl", "coin") else ")"))
    return r


if __name__ == "__main__":
    main()
