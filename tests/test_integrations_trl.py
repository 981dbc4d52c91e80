"""DGGGRPOTrainer on a tiny random-init Qwen2 and a locally built tokenizer (no downloads, CPU)."""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from trl import GRPOConfig  # noqa: E402

from dgg_kernels.integrations.trl import DGGGRPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    return fast


def _model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return transformers.Qwen2ForCausalLM(cfg)


def _dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist()) for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": prompts})


def _reward(completions, **kwargs):
    # how many low-numbered words a completion has: varies within a group, so advantages are not all zero
    return [float(sum(w in WORDS[:10] for w in c.split())) for c in completions]


def _config(tmp_path, **over):
    kw = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        num_iterations=4, max_steps=8, learning_rate=1e-3, logging_steps=1, report_to="none",
        optim="adamw_torch_fused", use_cpu=True, save_strategy="no", seed=0, beta=0.0, max_grad_norm=1e-3,
        temperature=1.0, disable_tqdm=True, dataloader_num_workers=0,
    )
    kw.update(over)
    return GRPOConfig(**kw)


class Probe(DGGGRPOTrainer):
    """Records what the gate saw, can poison one optimizer step's gradient, counts generations."""

    def __init__(self, *a, poison_step=None, **kw):
        super().__init__(*a, **kw)
        self.poison_step = poison_step
        self.generations = 0
        self.seen = []  # (global_step, raw lm_head grad norm, gate norm, closed, reuse index)
        self.snapshots = {}

    def _generate_and_score_completions(self, inputs):
        self.generations += 1
        return super()._generate_and_score_completions(inputs)

    def _clip_grad_norm(self, model):
        step = self.state.global_step
        head = self.model.get_output_embeddings().weight
        self.snapshots[step] = [p.detach().clone() for p in self.model.parameters()]
        if step == self.poison_step:
            head.grad[1, 2] = float("nan")
        raw = float(head.grad.norm())
        out = super()._clip_grad_norm(model)
        s = self.gate.stats()
        self.seen.append((step, raw, float(s["norm"]), bool(s["closed"]), int(s["reuse_index"])))
        return out


def _trainer(tmp_path, cls=Probe, seed=0, **kw):
    tok = _tokenizer()
    gate_kw = {k: kw.pop(k) for k in list(kw) if k.startswith("gate_") or k == "poison_step"}
    return cls(
        model=_model(len(tok), seed), reward_funcs=_reward, args=_config(tmp_path, **kw),
        train_dataset=_dataset(), processing_class=tok, **gate_kw,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gate_sees_the_raw_gradient_before_clipping(tmp_path):
    tr = _trainer(tmp_path, gate_threshold=1e9)
    tr.train()
    assert len(tr.seen) == 8
    for step, raw, gate_norm, closed, _ in tr.seen:
        assert not closed
        assert gate_norm == pytest.approx(raw, rel=1e-5)
    # clipping to max_grad_norm would have shrunk what the gate saw (a step may clip every token: raw 0)
    assert sum(raw > 100 * tr.args.max_grad_norm for _, raw, *_ in tr.seen) >= 6
    logged = [h["dgg/lm_head_grad_norm"] for h in tr.state.log_history if "dgg/lm_head_grad_norm" in h]
    assert logged == pytest.approx([g for _, _, g, _, _ in tr.seen], rel=1e-3)  # each step logs its own gate
    assert int(tr.gate.stats()["accepted"]) == 8
    assert tr.generations == 2 and tr.dgg_regenerations == 2 and tr.dgg_early_stops == 0


def test_closed_gate_skips_the_step_and_regenerates(tmp_path):
    # poison the gradient of global step 1 (pass 2 of the first generated batch): the gate closes
    tr = _trainer(tmp_path, gate_threshold=1e9, poison_step=1)
    tr.train()
    closed = [s for s, _, _, c, _ in tr.seen if c]
    assert [r for *_, r in tr.seen] == [1, 2, 1, 2, 3, 4, 1, 2]
    assert closed == [1]
    before, after = tr.snapshots[1], tr.snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # step 1 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(tr.snapshots[0], tr.snapshots[1]))  # step 0 did
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    # batch 1 served steps 0-1, then a fresh one steps 2-5, then one more steps 6-7
    assert tr.dgg_early_stops == 1 and tr.generations == 3 and tr.dgg_regenerations == 3
    opt = getattr(tr.optimizer, "optimizer", tr.optimizer)
    head = tr.model.get_output_embeddings().weight
    assert float(opt.state[head]["step"]) == 7  # the fused AdamW skipped the closed step entirely
    assert int(tr.gate.stats()["closed_total"]) == 1


def test_without_clipping_the_optimizer_hook_steps_the_gate(tmp_path):
    tr = _trainer(tmp_path, gate_threshold=1e9, max_grad_norm=0.0, max_steps=4)
    tr.train()
    assert tr.seen == []  # the Trainer never called _clip_grad_norm
    assert int(tr.gate.stats()["accepted"]) == 4 and float(tr.gate.stats()["norm"]) > 0
    logs = [h for h in tr.state.log_history if "dgg/lm_head_grad_norm" in h]
    assert logs and all(h["dgg/lm_head_grad_norm"] > 0 and h["dgg/closed"] == 0.0 for h in logs)


def test_z_threshold_cuts_reuse_short(tmp_path):
    # window 2 fills after two accepted steps; threshold 0 closes whenever the norm exceeds the window mean
    tr = _trainer(tmp_path, gate_threshold=0.0, gate_window=2, max_steps=12)
    tr.train()
    reuse = [r for *_, r in tr.seen]
    closed = [c for _, _, _, c, _ in tr.seen]
    assert any(closed)
    for i in range(1, len(reuse)):
        # a new batch follows a close or a full batch of num_iterations passes, and nothing else
        expect_new = closed[i - 1] or reuse[i - 1] == 4
        assert reuse[i] == (1 if expect_new else reuse[i - 1] + 1)
    early = sum(c and r < 4 for c, r in zip(closed[:-1], reuse[:-1]))
    assert tr.dgg_early_stops == early >= 1
    assert tr.generations == tr.dgg_regenerations == 1 + sum(reuse[i] == 1 for i in range(1, len(reuse)))


def test_misconfiguration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="steps_per_generation"):
        _trainer(tmp_path, steps_per_generation=2, gradient_accumulation_steps=1)
    with pytest.warns(UserWarning, match="num_iterations is 1"):
        _trainer(tmp_path, num_iterations=1)
