"""The policy: a tiny causal transformer whose vocabulary is large next to its width (as in an LLM, where the
lm_head weighs as much as the rest), with an untied or a tied lm_head; sampling, greedy accuracy, warm-up."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """Token + position embeddings, pre-LN blocks, lm_head; ``tied``: lm_head.weight IS the token embedding."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.tied = tied
        if tied:
            self.lm_head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor, last: int) -> torch.Tensor:
        """Logits of the last ``last`` positions only: the lm_head is the expensive part."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x[:, -last:])).float()


def make_model(args, task) -> TinyLM:
    return TinyLM(args.vocab, args.width, args.layers, args.heads, task.prompt_len + task.answer_len,
                  tied=bool(getattr(args, "tied", False)))


def layer_groups(model: TinyLM) -> dict[str, list[torch.Tensor]]:
    """Weights by group for the relative-change logs.  Tied: "lm_head" is the shared tensor, "embed" only the
    position table (the token table is the lm_head)."""
    groups = {"embed": [model.pos.weight] if model.tied else [model.tok.weight, model.pos.weight]}
    for i, b in enumerate(model.blocks):
        groups[f"block{i}"] = list(b.parameters())
    groups["lm_head"] = [model.lm_head.weight]
    return groups


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
        t = logits.argmax(-1) if gen is None else sample(logits / temperature, gen)
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


def sft(model: TinyLM, task, heldout, args, dev, seed: int | None = None) -> dict:
    """Teacher-forced warm-up until greedy held-out accuracy reaches args.sft_target (or the step cap); the data
    generator's seed is ``seed`` (None: args.sft_seed)."""
    gen = torch.Generator().manual_seed(args.sft_seed if seed is None else seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    t0 = time.perf_counter()

    def train_step(draw) -> torch.Tensor:
        p, a = draw(args.sft_batch, gen)
        p, a = p.to(dev), a.to(dev)
        seq = torch.cat([p, a], 1)
        logits = model(seq[:, :-1], task.answer_len)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), a.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    # a task may have a pretraining phase (reverse: copying, so the model knows every symbol, as a pretrained LM
    # knows its tokens, before it learns the skill RL then sharpens)
    pre = getattr(args, "pretrain_steps", 0) if hasattr(task, "pretrain_sample") else 0
    for _ in range(pre):
        train_step(task.pretrain_sample)
    pre_acc = accuracy(model, *heldout) if pre else None
    acc, step, curve = accuracy(model, *heldout), 0, []
    while step < args.sft_max_steps and acc < args.sft_target:
        loss = train_step(task.sample)
        step += 1
        if step % args.sft_eval_every == 0:
            acc = accuracy(model, *heldout)
            curve.append((step, round(acc, 4), round(loss.item(), 4)))
    return {"steps": step, "heldout_acc": acc, "seconds": time.perf_counter() - t0, "curve": curve,
            "pretrain_steps": pre, "heldout_acc_after_pretrain": pre_acc}
