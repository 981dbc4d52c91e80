"""One rollout batch, the PPO-clip loss, and the divergence estimates the arms and the logs use."""
from __future__ import annotations

import math

import torch

from .policy import generate


def rollout(model, task, args, prompt_gen: torch.Generator, sample_gen: torch.Generator, dev) -> dict:
    """args.prompts prompts x args.group samples: tokens, their rollout log-probs, reward (exact answer: 1/0)
    and group-normalized advantages."""
    p, a = task.sample(args.prompts, prompt_gen)
    p, a = p.to(dev).repeat_interleave(args.group, 0), a.to(dev).repeat_interleave(args.group, 0)
    out, old_logp = generate(model, p, task.answer_len, sample_gen, args.temperature)
    reward = (out == a).all(1).float()
    r = reward.view(args.prompts, args.group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
    return {"seq": torch.cat([p, out], 1), "out": out, "old_logp": old_logp, "reward": reward, "adv": adv}


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float):
    """-mean(min(r A, clip(r) A)) over sampled tokens; returns (loss, ratio)."""
    ratio = (logp - old_logp).exp()
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -obj.mean(), ratio


def approx_kl_k3(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(rollout policy || current policy) on the sampled tokens: mean((r - 1) - log r),
    r = exp(logp - old_logp), as stable-baselines3 and CleanRL compute it; detached, 0-dim, >= 0."""
    log_r = (logp - old_logp).detach()
    return ((log_r.exp() - 1) - log_r).mean()


def approx_kl_k1(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """The k1 estimate mean(old_logp - logp) (unbiased, can be negative; CleanRL logs it as old_approx_kl)."""
    return (old_logp - logp).detach().mean()


def full_kl(p: torch.Tensor, logp_p: torch.Tensor, logp_q: torch.Tensor) -> float:
    """Mean over answer tokens of KL(p || q), full vocabulary (p = logp_p.exp(), computed once by the caller)."""
    return float(torch.dot(p.reshape(-1), (logp_p - logp_q).reshape(-1))) / (p.numel() // p.shape[-1])


def rel_changes(groups, before) -> dict[str, float]:
    """||W - W_before|| / ||W_before|| per layer group."""
    out = {}
    for name, ps in groups.items():
        num = sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[name]))
        den = sum((b ** 2).sum() for b in before[name])
        out[name] = math.sqrt(float(num) / float(den))
    return out


def snapshot(groups) -> dict[str, list[torch.Tensor]]:
    return {n: [t.detach().clone() for t in ps] for n, ps in groups.items()}
