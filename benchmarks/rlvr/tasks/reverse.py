"""Reverse a short sequence of symbols drawn from an alphabet of thousands of token ids.

Every answer token is one of ``vocab - 1`` symbol ids (id 0 is the separator), so the outputs spread over
the whole vocabulary: each lm_head row is a target of some answers, unlike addition, where 12 of the
ids occur.  The copy (which position) is shared; the lm_head must still single out each symbol.
"""
from __future__ import annotations

import torch

from . import register

SEP = 0


@register
class Reverse:
    name = "reverse"
    stem = "rlvr_vocab"
    min_vocab = 16
    presets = {
        # chosen on one seed (2026-12-01, before the final run) so that fixed K=1 learns and fixed K=8 does harm:
        # lr 1e-3 harmed little, 3e-3 collapsed K=8 (untied 0.59 -> 0.12); without the copy pretraining the
        # untied K=1 did not learn at all in 30 batches (each symbol's lm_head row must be learned one by one)
        "cpu": dict(vocab=8192, width=64, layers=2, heads=4, seq_len=3, pretrain_steps=1500, sft_lr=3e-3,
                    sft_target=0.3, sft_eval_every=5, sft_max_steps=2000, batches=30, prompts=16, lr=2e-3),
        # not run (no GPU in the session that wrote this): the addition GPU sizes, 4 symbols
        "gpu": dict(vocab=32768, width=256, layers=4, heads=4, seq_len=4, pretrain_steps=3000, sft_lr=3e-3,
                    sft_target=0.3, sft_eval_every=5, sft_max_steps=3000, batches=60, prompts=64, lr=1e-3),
        "quick": dict(vocab=8192, width=32, layers=1, seq_len=2, heldout=128, pretrain_steps=20, sft_target=0.2,
                      sft_max_steps=150, sft_batch=64, sft_lr=1e-2, sft_eval_every=20),
    }

    def __init__(self, args) -> None:
        self.length = args.seq_len
        self.vocab = args.vocab

    @property
    def prompt_len(self) -> int:
        return self.length + 1

    @property
    def answer_len(self) -> int:
        return self.length

    def describe(self, args) -> str:
        return (f"reverse a sequence of {self.length} symbols drawn uniformly from {self.vocab - 1} token ids "
                f"(every id but the separator: the answers spread over the whole vocabulary), reward 1 only for "
                f"the exact reversed sequence")

    def pretrain_sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretraining phase of the warm-up: copy the sequence (every symbol's lm_head row gets trained)."""
        x = torch.randint(1, self.vocab, (n, self.length), generator=gen)
        return torch.cat([x, torch.full((n, 1), SEP)], 1), x

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(1, self.vocab, (n, self.length), generator=gen)
        return torch.cat([x, torch.full((n, 1), SEP)], 1), x.flip(1)
