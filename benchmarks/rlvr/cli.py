"""The command line of benchmarks/rlvr_reuse.py: configurations, flags (all checked before any work), main()."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict

import torch

import dgg_kernels as dgg
from benchmarks import common as C  # the flag checks every command line shares

from . import arms as A
from . import policy, runner, tasks

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "dgg-kernels-bench")
HELDOUT_SEED = 12345  # the evaluation set's generator

# The study's arm set.  Kept from the 2026-11-23 set: fixed K, the paper's rule at K=8 (t 0.1/0.3/0.5 and
# calibrated), the default rule at t=0.3, the coin.  Dropped for time: the K=4 gate variants and the batch
# window (norm/batch never closed there).  New: the KL stops (stable-baselines3, CleanRL) and the gate's KL
# test alone and OR-ed with the paper's rule.
DEFAULT_ARMS = ("k1,k2,k4,k8,dgg8@0.1:paper,dgg8@0.3:paper,dgg8@0.5:paper,cal8@0.5:paper,dgg8@0.3:norm,rnd8@0.5,"
                "sb38@0.005,sb38@0.01,sb38@0.02,sb38@0.05,crl8@0.01,crl8@0.02,crl8@0.05,"
                "dkl8@0.01,dkl8@0.02,dgg8@0.3:paper:kl=0.01")
# what --config fills in for every task; the task's own presets (benchmarks/rlvr/tasks/*.py) go on top
CONFIGS = {"cpu": dict(seeds=5, jobs=2), "gpu": dict(device="cuda", seeds=5, jobs=1)}
QUICK = dict(arms="k2,dgg4@0.3", seeds=1, batches=5, prompts=8, group=8, window=2, jobs=1)
GPU_COMMANDS = ["python benchmarks/rlvr_reuse.py --config gpu --out benchmarks/results/gpu",
                "python benchmarks/rlvr_reuse.py --config gpu --task reverse --out benchmarks/results/gpu",
                "python benchmarks/rlvr_reuse.py --config gpu --task reverse --tied --out benchmarks/results/gpu"]
GPU_COMMAND = GPU_COMMANDS[0]
# measured here (2-core shared CPU, --jobs 2, 2026-12-01) and estimated for a GPU (not run: no GPU in the session
# that wrote this)
TIME_NOTE = {"cpu": "measured 2026-12-01 on a 2-core CPU shared with other work, --jobs 2: addition 1403 s, reverse "
             "1001 s, reverse tied 1198 s, the study 61 min",
             "gpu": "not run (no GPU in the session that wrote this); estimate 20-30 min per variant on one H100 at "
             "--jobs 1, about 1.5 h for the three (the 2026-11-23 H100 runs took 6 min for 35 addition units of an "
             "older arm set, about 10 s a unit; this set has 100 units per variant, most of them at max reuse 8)"}

DOC = """RLVR rollout-batch reuse with and without the gate: does DGG beat fixed reuse at equal rollouts?

    python benchmarks/rlvr_reuse.py                          # addition, CPU configuration, --jobs 2 (23 min here)
    python benchmarks/rlvr_reuse.py --task reverse           # the large-vocabulary task, untied lm_head (17 min)
    python benchmarks/rlvr_reuse.py --task reverse --tied    # ... lm_head tied to the token embedding (20 min)
    python benchmarks/rlvr_reuse.py --quick                  # smoke run, well under a minute
    python benchmarks/rlvr_reuse.py --config gpu [--task ...]  # GPU configuration (not run yet; ~20-30 min each)
    python benchmarks/rlvr/study.py --out benchmarks/results  # all three variants + rlvr_study.md (61 min here)
    python benchmarks/rlvr_reuse.py --out benchmarks/results # where the committed results go

A tiny causal transformer, supervised warm-up to a held-out accuracy that is right sometimes, then GRPO-style RL
from that one checkpoint, per arm and seed, with the same rollout budget; reward 1/0 from the task's checker,
group-normalized advantages, PPO-clip, AdamW(fused=True) with gate.attach(opt), passes over each batch driven
by dgg_kernels.reuse_passes.  Arms (--arms; benchmarks/rlvr/arms.py has the grammar):
  kN                 fixed reuse, N passes per batch
  dggN@T[:S][:W]     the gate, threshold T, statistic S (paper = energy+increment, norm, ...), window mode W
  dggN@T[:S]:kl=X    ... OR-ed with the gate's KL test (kl > 1.5 X from pass 2 on closes)
  dklN@X             the gate's KL test alone
  calN@R[:S][:W]     the gate, threshold calibrated to close a fraction R of batches (observer run, other seed)
  rndN@P             control: a coin ends a batch at pass 2 with chance P
  sb3N@X             stable-baselines3 target_kl (k3 KL before backward, > 1.5 X: no update, batch ends)
  crlN@X             CleanRL target_kl (after a pass, k3 KL measured in it > X: batch ends, update kept)
  rep:A, cap:A       controls of an adaptive arm A in the same list: A's per-batch applied passes on the seed,
                     permuted over batches (seed 40000+seed), or their rounded mean, as fixed per-batch caps
Tasks (--task): addition (2-digit, 12 of the ids occur) and reverse (a sequence of symbols from ~8k ids).
Writes <stem>_results.{md,json} and, with matplotlib, <stem>_{accuracy,weight_change,gate}.png into --out
(stem: rlvr_reuse for addition, rlvr_vocab[_tied] for reverse; _quick with --quick).
Each (arm, seed) unit runs in one of --jobs forked workers with one thread; results do not depend on --jobs.
With controls (rep:/cap:) or --probe, <stem>_controls.{md,json} holds the controls design's analysis
(benchmarks/rlvr/controls.py, with the SmolLM2 study's definitions).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line.  No abbreviations: a preset (--config, --quick, the task's) fills only the flags not
    given, so an abbreviated flag would otherwise lose to it without a word.  Every value is checked here."""
    c = {**CONFIGS["cpu"], **tasks.get("addition").presets["cpu"]}

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    I, N, frac = C.integer, C.number, C.fraction
    ap = C.new_parser(DOC, formatter_class=Formatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu",
                    help="a named configuration: every flag below that is not given takes its value from it and "
                         "from the task's presets (the defaults shown are the cpu configuration's for addition; "
                         "gpu = the 2026-11-23 H100 setting for addition: vocab 32768, width 256, 4 layers, 64 "
                         "prompts, lr 1e-3, SFT lr 3e-3, 60 batches, cuda); a flag given always wins")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny sizes, 2 arms, 1 seed, well under a minute (flags given still win)")
    ap.add_argument("--task", choices=sorted(tasks.TASKS), default="addition",
                    help="the task (benchmarks/rlvr/tasks/): addition, or reverse (symbols over the whole vocabulary)")
    ap.add_argument("--tied", action="store_true",
                    help="tie lm_head.weight to the token embedding (the gate then monitors that shared tensor)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (the gpu config uses cuda)")
    ap.add_argument("--jobs", type=I(1), default=c["jobs"],
                    help="worker processes for the (arm, seed) units on CPU, one thread each (results do not "
                         "depend on it); ignored on CUDA")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for the results, created and test-written before any work (outside the source "
                         "tree unless given); pass benchmarks/results for the committed ones")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="no training: rewrite the md, JSON and plots of a finished run from its results JSON "
                         "(after a change to the analysis, or after an analysis that failed), into --out")
    ap.add_argument("--threads", type=I(1), default=None,
                    help="torch CPU threads of the main process (None: 1 on CPU, where several threads on a shared "
                         "machine ran up to 40x slower from thread contention; torch's default on CUDA)")
    g = ap.add_argument_group("model and task")
    g.add_argument("--vocab", type=I(12), default=c["vocab"], help="vocabulary size, >= 12 (addition) or 16 "
                   "(reverse); in addition ids >= 12 never occur (they make the lm_head large, as in an LLM)")
    g.add_argument("--width", type=I(1), default=c["width"], help="model width (a multiple of --heads)")
    g.add_argument("--layers", type=I(1), default=c["layers"], help="transformer blocks")
    g.add_argument("--heads", type=I(1), default=c["heads"], help="attention heads")
    g.add_argument("--digits", type=I(1), default=c["digits"], help="addition: digits per addend")
    g.add_argument("--seq-len", type=I(1), default=3, help="reverse: symbols per sequence")
    g.add_argument("--heldout", type=I(1), default=256, help="held-out problems (fixed, greedy decoding)")
    g = ap.add_argument_group("supervised warm-up (one checkpoint for every arm and seed, or --warmups of them)")
    g.add_argument("--sft-target", type=frac(), default=c["sft_target"],
                   help="stop once greedy held-out accuracy (0 to 1) reaches this")
    g.add_argument("--pretrain-steps", type=I(0), default=0,
                   help="steps of the task's pretraining phase before the warm-up, where it has one (reverse: "
                        "copying the sequence, so every symbol's lm_head row is trained first); the task's preset")
    g.add_argument("--sft-max-steps", type=I(0), default=c["sft_max_steps"], help="step cap of the warm-up")
    g.add_argument("--sft-batch", type=I(1), default=64, help="warm-up batch size")
    g.add_argument("--sft-lr", type=N(0, lo_open=True), default=c["sft_lr"], help="warm-up AdamW learning rate")
    g.add_argument("--sft-eval-every", type=I(1), default=25, help="warm-up steps between held-out evaluations")
    g.add_argument("--sft-seed", type=I(0), default=0, help="seed of the model init and the warm-up data")
    g.add_argument("--warmups", type=I(1), default=1,
                   help="warm-up checkpoints: checkpoint j is trained with warm-up seed --sft-seed + j, and RL seed s "
                        "starts from checkpoint s mod this (1: one checkpoint for every seed)")
    g = ap.add_argument_group("RL")
    g.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated arms (see above)")
    g.add_argument("--seeds", type=I(1), default=c["seeds"], help="RL seeds per arm (0 .. seeds-1)")
    g.add_argument("--calib-seed", type=I(0), default=1000,
                   help="seed of the observer run that calibrates the cal arms' thresholds (not an evaluated seed)")
    g.add_argument("--batches", type=I(1), default=c["batches"], help="rollout batches per arm (the rollout budget)")
    g.add_argument("--prompts", type=I(1), default=c["prompts"], help="prompts per rollout batch")
    g.add_argument("--group", type=I(2), default=8, help="samples per prompt (the GRPO group, >= 2)")
    g.add_argument("--lr", type=N(0, lo_open=True), default=c["lr"], help="RL AdamW learning rate")
    g.add_argument("--weight-decay", type=N(0), default=0.0, help="RL AdamW weight decay")
    g.add_argument("--clip", type=N(0, lo_open=True), default=0.2, help="PPO clip range")
    g.add_argument("--temperature", type=N(0, lo_open=True), default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--window", type=I(2), default=8, help="gate window (statistics in the Z-score)")
    g.add_argument("--probe", type=I(0), default=0,
                   help="fresh validation prompts (disjoint from the evaluation set and never drawn in the warm-up or "
                        "the rollouts): every fixed arm records its greedy accuracy on them before and after each "
                        "pass, and <stem>_controls.{md,json} gets the per-signal AUROCs for 'the pass hurt' (0: off)")
    return ap


def _given(argv: list[str]) -> set[str]:
    """The flags given on the command line: what a parse with every default suppressed returns."""
    ap = build_parser()
    for action in ap._actions:
        action.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


def preset(config: str, task: str, quick: bool) -> dict:
    """What --config, the task and --quick fill in (in that order, later wins)."""
    t = tasks.get(task).presets
    p = {**CONFIGS[config], **t[config]}
    if quick:
        p.update(QUICK)
        p.update(t["quick"])
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, with the presets filling only those not given, all checked before any work: each value by its
    type, then what spans several flags, the device, and the --out folder (created and test-written).  A
    problem exits with status 2 and a message naming the flag."""
    ap = build_parser()
    args = ap.parse_args(argv)
    given = _given(argv)
    for k, v in preset(args.config, args.task, args.quick).items():
        if k not in given:
            setattr(args, k, v)
    if args.from_json:
        C.readable_file(ap, args.from_json, "--from-json")
        try:
            with open(args.from_json) as f:
                res = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            ap.error(f"--from-json {args.from_json}: not a JSON file ({e})")
        if not isinstance(res, dict) or not {"runs", "args"} <= set(res):
            ap.error(f"--from-json {args.from_json}: not a rlvr_reuse results JSON (no 'runs' and 'args')")
    else:
        try:
            arms = A.parse_arms(args.arms)
        except ValueError as e:
            ap.error(f"--arms: {e}")
        if any(a.kind == "cal" for a in arms) and A.calibration_module() is None:
            ap.error("--arms: cal arms need dgg_kernels.calibration, which the installed package lacks")
        if args.width % args.heads:
            ap.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
        need = tasks.get(args.task).min_vocab
        if args.vocab < need:
            ap.error(f"--vocab {args.vocab}: the {args.task} task needs >= {need}")
        if args.probe:
            task = tasks.get(args.task)(args)
            held = task.sample(args.heldout, torch.Generator().manual_seed(HELDOUT_SEED))[0]
            from . import controls
            try:
                controls.fresh_probe(task, args.probe, held)
            except ValueError as e:
                ap.error(str(e))
        if args.calib_seed < args.seeds:
            ap.error(f"--calib-seed {args.calib_seed} is one of the evaluated seeds 0..{args.seeds - 1}: "
                     "calibrate on another seed")
        C.check_device(ap, args.device, source="" if "device" in given else f"from --config {args.config}")
    args.out = str(C.writable_dir(ap, args.out))
    return args


def stem_name(args) -> str:
    a = args if isinstance(args, dict) else vars(args)
    t = tasks.get(a.get("task", "addition"))
    return t.stem + ("_tied" if a.get("tied") else "") + ("_quick" if a.get("quick") else "")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores visible)"


def main(argv=None) -> dict:
    from . import report

    t_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.from_json:
        res = report.reanalyse(args.from_json, args.out, not args.no_plots)
        _write_controls(os.path.join(args.out, f"{stem_name(res['args'])}_results.json"), args.out,
                        stem_name(res["args"]))
        return res
    dev = torch.device(args.device)  # checked by parse_args
    if args.threads is None and dev.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    task = tasks.get(args.task)(args)
    arms = A.parse_arms(args.arms)
    rules = A.observer_rules(arms)
    print(f"rlvr_reuse ({args.config}{' quick' if args.quick else ''}): task {args.task}"
          f"{' tied' if args.tied else ''}, vocab {args.vocab}, width {args.width}, {args.layers} layers, device "
          f"{dev}, torch {torch.__version__}, {len(arms)} arms x {args.seeds} seeds x {args.batches} batches of "
          f"{args.prompts}x{args.group} rollouts, lr {args.lr}, jobs {args.jobs}", flush=True)
    heldout_cpu = task.sample(args.heldout, torch.Generator().manual_seed(HELDOUT_SEED))
    heldout = tuple(t.to(dev) for t in heldout_cpu)
    probe = None
    if args.probe:  # fresh validation prompts: not in the evaluation set, never drawn in training
        from . import controls
        probe_cpu = controls.fresh_probe(task, args.probe, heldout_cpu[0])
        probe = tuple(t.to(dev) for t in probe_cpu)
        task = controls.Excluding(task, probe_cpu[0])
        print(f"validation set: {args.probe} fresh prompts (seed {controls.PROBE_SEED}), excluded from training",
              flush=True)

    init_states, sft_all = [], []
    for j in range(args.warmups):  # checkpoint j: warm-up seed sft_seed + j (model init and warm-up data)
        torch.manual_seed(args.sft_seed + j)
        model = policy.make_model(args, task).to(dev)
        sft_info = policy.sft(model, task, heldout, args, dev, seed=args.sft_seed + j)
        print(f"sft{f' {j} (seed {args.sft_seed + j})' if args.warmups > 1 else ''}: {sft_info['steps']} steps, "
              f"held-out greedy accuracy {sft_info['heldout_acc']:.3f}, {sft_info['seconds']:.1f} s", flush=True)
        init_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        sft_all.append(dict(sft_info, seed=args.sft_seed + j))
    sft_info = sft_all[0]
    n_params = sum(p.numel() for p in model.parameters())

    t_rl = time.perf_counter()
    runs, calib, calib_s = runner.run_all(arms, init_states if args.warmups > 1 else init_states[0], task, heldout,
                                          args, dev, rules, log=lambda s: print(s, flush=True), probe=probe)
    backend = runs[0].pop("backend", None)
    for r in runs:
        r.pop("backend", None)
    res = {
        "env": {
            "date": datetime.date.today().isoformat(), "device": device_name(dev), "torch": torch.__version__,
            "dgg_kernels": dgg.__version__, "gate_backend": backend, "threads": torch.get_num_threads(),
            "jobs": args.jobs if dev.type == "cpu" else 1, "python": platform.python_version(),
            "command": "python benchmarks/rlvr_reuse.py" + ("" if not argv else " " + " ".join(argv)),
            "lm_head_share": model.lm_head.weight.numel() / n_params,
            "task_text": task.describe(args),
        },
        "args": vars(args), "arm_names": [a.name for a in arms],
        "arm_specs": [{**asdict(a), "rule": a.rule, "signal": a.signal, "gated": a.gated} for a in arms],
        "observer_rules": [A.rule_name(*q) for q in rules],
        "sft": sft_info, **({"sft_all": sft_all} if args.warmups > 1 else {}),
        "calibration": calib, "calib_seconds": calib_s, "runs": runs,
        "rl_seconds": time.perf_counter() - t_rl - calib_s,
    }
    res["total_seconds"] = time.perf_counter() - t_start
    stem = report.write_results(res, args.out, stem_name(args), not args.no_plots)
    _write_controls(f"{stem}_results.json", args.out, stem_name(args))
    print(f"total {res['total_seconds']:.0f} s")
    return res


def _write_controls(path: str, out: str, stem: str) -> None:
    """The controls design's analysis (controls.py) from the results JSON as written; nothing for other runs."""
    from . import controls

    written = controls.write_from_json(path, out, stem)
    if written:
        print("wrote " + ", ".join(written))
