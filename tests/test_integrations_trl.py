"""DGGGRPOTrainer on a tiny random-init Qwen2 and a locally built tokenizer (no downloads, CPU)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from trl import GRPOConfig  # noqa: E402

import dgg_kernels as dgg  # noqa: E402
from dgg_kernels.integrations.checkpoint import GATE_FILE, load_gate, save_gate  # noqa: E402
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


@pytest.mark.parametrize("poison", [3, 2], ids=["last-step-of-pass", "first-step-of-pass"])
def test_passes_of_several_optimizer_steps(tmp_path, poison):
    """steps_per_generation 2, no accumulation: every pass over a generated batch is 2 optimizer steps, both
    tested at the pass's reuse index. A NaN in pass 2 closes that step and every later step of the batch
    (on device: the fused AdamW skips them), and the next pass regenerates."""
    tr = _trainer(tmp_path, gate_threshold=1e9, poison_step=poison, steps_per_generation=2, max_steps=12)
    tr.train()
    assert [r for *_, r in tr.seen] == [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [s for s, _, _, c, _ in tr.seen if c] == list(range(poison, 4))
    assert all(torch.equal(a, b) for a, b in zip(tr.snapshots[poison], tr.snapshots[4]))  # nothing applied
    opt = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert float(opt.state[tr.model.get_output_embeddings().weight]["step"]) == 12 - (4 - poison)
    assert tr.dgg_early_stops == 1 and tr.generations == 2


def test_kl_stop_ends_every_batch_whose_kl_exceeds_the_target(tmp_path):
    """gate_config target_kl: the trainer gives the gate the k3 KL of each optimizer step's micro-batches (token
    mean); with a target far below any KL an update produces, every batch ends at pass 2 and that pass's
    update is skipped; pass 1 (the rollout policy itself) has no KL to speak of and is never judged."""
    tr = _trainer(tmp_path, gate_threshold=1e9, gate_config={"target_kl": 1e-7, "kl_factor": 1.5},
                  max_grad_norm=1.0, gradient_accumulation_steps=2, steps_per_generation=2, max_steps=6)
    kls = []
    orig = tr.gate.observe_kl

    def spy(kl):
        kls.append(float(kl))
        orig(kl)

    tr.gate.observe_kl = spy
    tr.train()
    reuse = [r for *_, r in tr.seen]
    closed = [c for _, _, _, c, _ in tr.seen]
    assert reuse == [1, 2, 1, 2, 1, 2] and closed == [False, True] * 3
    assert tr.dgg_early_stops == 2 and tr.generations == 3
    # two micro-batches per optimizer step: two observations each, the second the mean over both
    assert len(kls) == 12
    assert all(abs(k) < 1e-6 for k in kls[0::4] + kls[1::4])  # pass 1: the policy is the rollout policy
    assert all(k > 1.5e-7 for k in kls[3::4])
    logged = [h["dgg/kl"] for h in tr.state.log_history if "dgg/kl" in h]
    assert logged == pytest.approx(kls[1::2], rel=1e-5, abs=1e-12)
    for step in (1, 3, 5):
        if step + 1 in tr.snapshots:
            assert all(torch.equal(a, b) for a, b in zip(tr.snapshots[step], tr.snapshots[step + 1]))


def test_misconfiguration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="steps_per_generation .3. to be a multiple of gradient_accumulation"):
        _trainer(tmp_path, steps_per_generation=3, gradient_accumulation_steps=2)
    with pytest.warns(UserWarning, match="num_iterations is 1"):
        _trainer(tmp_path, num_iterations=1)


# -- the gate's state in checkpoints, and what a resumed run repeats ------------------------------------------------

class Surge(Probe):
    """Multiplies the lm_head gradient of optimizer step ``surge_step`` by 1000: a surge the z test closes on."""

    surge_step = 5

    def _clip_grad_norm(self, model):
        if self.state.global_step == self.surge_step:
            self.model.get_output_embeddings().weight.grad.mul_(1000.0)
        return super()._clip_grad_norm(model)


# num_iterations 4; window 3 is full from the 4th step on; z > 20 only for the surge; a checkpoint every 2 steps
RESUMED = dict(cls=Surge, gate_window=3, gate_threshold=20.0, max_steps=10, save_strategy="steps", save_steps=2)


def _gate_tensors(gate):
    return gate.state_dict()["state"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = _trainer(tmp_path_factory.mktemp("uninterrupted"), **RESUMED)
        tr.train()
    finally:
        torch.set_num_threads(n)
    # steps 0-3: the first batch's 4 passes; step 5 (pass 2 of the second batch) closes; 6-9: a fresh batch
    assert [(s, c, r) for s, _, _, c, r in tr.seen if c] == [(5, True, 2)]
    assert [r for *_, r in tr.seen] == [1, 2, 3, 4, 1, 2, 1, 2, 3, 4]
    return tr


def _resume(tmp_path, run, step):
    folder = os.path.join(run.args.output_dir, f"checkpoint-{step}")
    assert os.path.isfile(os.path.join(folder, GATE_FILE))
    tr = _trainer(tmp_path, **RESUMED)
    tr.train(resume_from_checkpoint=folder)
    return tr


@pytest.mark.parametrize("step", [4, 6])
def test_resume_on_a_batch_boundary_repeats_the_uninterrupted_run(tmp_path, uninterrupted, step):
    # checkpoint-4: the first batch ran its last pass; checkpoint-6: the gate had just closed. Either way the next
    # step starts a new batch in the uninterrupted run too, so the resumed run sees the same rollouts, and the
    # restored gate (its window full) closes on the surge of step 5 exactly as the uninterrupted run did.
    a = uninterrupted
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(middle of a generated batch|holds no gate state)")
        b = _resume(tmp_path, a, step)
    assert b.seen == a.seen[step:]  # step, raw norm, gate norm, closed, reuse index: bit for bit
    for k, v in _gate_tensors(a.gate).items():
        assert torch.equal(_gate_tensors(b.gate)[k], v), k
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_resume_mid_batch_starts_a_new_batch_with_the_gate_restored(tmp_path, uninterrupted):
    # checkpoint-8: pass 2 of the third batch had run. GRPOTrainer does not save its buffered batch: the resumed run
    # generates a fresh one (reuse index 1 where the uninterrupted run had 3), with the gate's window and counters
    a = uninterrupted
    saved = dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(2)), window=3, threshold=20.0, statistic="norm",
                                    max_reuse=4, backend="torch")  # the trainer's gate settings
    assert load_gate(saved, os.path.join(a.args.output_dir, "checkpoint-8"))
    at_8 = {k: int(v) for k, v in saved.stats().items() if k in ("accepted", "closed_total", "reuse_index")}
    assert at_8 == {"accepted": 7, "closed_total": 1, "reuse_index": 2}
    with pytest.warns(UserWarning, match="middle of a generated batch"):
        b = _resume(tmp_path, a, 8)
    assert [r for *_, r in b.seen] == [1, 2] and [r for *_, r in a.seen[8:]] == [3, 4]
    assert b.generations == 1  # the uninterrupted run generated nothing after step 7
    s = b.gate.stats()
    assert int(s["accepted"]) == at_8["accepted"] + sum(not c for _, _, _, c, _ in b.seen)
    assert int(s["closed_total"]) == at_8["closed_total"] + sum(c for _, _, _, c, _ in b.seen)


def test_checkpoint_without_gate_state_or_with_other_settings(tmp_path):
    tr = _trainer(tmp_path / "out", gate_window=3, gate_threshold=20.0)
    before = {k: v.clone() for k, v in _gate_tensors(tr.gate).items()}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.warns(UserWarning, match="holds no gate state"):
        tr._load_optimizer_and_scheduler(str(empty))
    other = dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(3)), window=5, threshold=20.0, statistic="norm",
                                    max_reuse=4, backend="torch")
    save_gate(other, tmp_path / "other")
    with pytest.raises(ValueError, match=f"{GATE_FILE}.*window=5"):
        tr._load_optimizer_and_scheduler(str(tmp_path / "other"))
    for k, v in _gate_tensors(tr.gate).items():
        assert torch.equal(v, before[k]), k  # nothing loaded


def test_save_gate_and_load_gate(tmp_path):
    w = torch.nn.Parameter(torch.zeros(4, 3))
    gate = dgg.DynamicGradientGate(w, window=2, threshold=0.0, backend="torch")
    for scale in (1.0, 1.0, 1.0, 9.0):
        w.grad = torch.full_like(w, scale)
        gate.step()
    assert bool(gate.stats()["closed"])
    assert save_gate(gate, tmp_path / "ck", write=False) is None and not (tmp_path / "ck").exists()
    path = save_gate(gate, tmp_path / "ck")
    assert path == str(tmp_path / "ck" / GATE_FILE) and os.listdir(tmp_path / "ck") == [GATE_FILE]
    fresh = dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(4, 3)), window=2, threshold=0.0, backend="torch")
    assert load_gate(fresh, tmp_path / "ck")
    for k, v in _gate_tensors(gate).items():
        assert torch.equal(_gate_tensors(fresh)[k], v), k
    assert fresh.should_stop()
    with pytest.raises(FileNotFoundError, match=GATE_FILE):
        load_gate(fresh, tmp_path / "nowhere")
    assert load_gate(fresh, tmp_path / "nowhere", missing_ok=True) is False
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / GATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_gate(fresh, tmp_path / "bad")
    with pytest.raises(TypeError, match="DynamicGradientGate"):
        save_gate({"config": {}}, tmp_path / "ck")
