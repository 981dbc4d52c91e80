"""One arm on one seed (``run_arm``), the calibration runs, and the (arm, seed) units over worker processes.

Every unit seeds its own generators (prompts: 10000+seed, samples: 20000+seed, coin: 30000+seed) and starts
from the same checkpoint (with --warmups N: seed s from checkpoint s mod N), so a unit's result does not depend
on which worker ran it or on --jobs.  A rep:/cap: control runs after its source unit on the same seed (its
per-batch caps come from the source's applied passes: controls.control_caps)."""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import dgg_kernels as dgg

from . import arms as A
from . import policy
from .rollout import approx_kl_k3, full_kl, ppo_loss, rel_changes, rollout, snapshot

CAL_GRID = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0)


# ----------------------------------------------------------------------------- controllers: what an arm does per pass

class Controller:
    """Around each pass: ``before_backward`` may end the batch with no update (stable-baselines3);
    ``after_step`` says whether to discard this pass's update and whether to end the batch."""

    by = "coin"  # what a discard is put down to in the records
    stop_by = "kl-after"  # what an end of the batch with the update kept is put down to (CleanRL)

    def __init__(self, arm: A.Arm, coin_gen: torch.Generator, caps=None) -> None:
        self.arm, self.coin_gen, self.caps = arm, coin_gen, caps

    def new_batch(self) -> None:
        pass

    def before_backward(self, k: int, kl: torch.Tensor) -> bool:
        return False

    def after_step(self, k: int, kl: torch.Tensor) -> tuple[bool, bool]:
        return False, False


class Coin(Controller):
    def new_batch(self) -> None:
        self.coin = float(torch.rand(1, generator=self.coin_gen)) < self.arm.close_rate

    def after_step(self, k, kl):
        stop = self.coin and k == 2  # discard this update and end the batch, as a close at pass 2 would
        return stop, stop


class SB3(Controller):
    def before_backward(self, k, kl):
        return k > 1 and float(kl) > self.arm.kl_factor * self.arm.target_kl


class CleanRL(Controller):
    def after_step(self, k, kl):
        return False, float(kl) > self.arm.target_kl  # the pass's update stays applied


class Caps(Controller):
    """A rep:/cap: control: batch b applies caps[b] passes (every update it runs stays applied), then ends; a cap
    of 0 (its source applied nothing in that batch) runs pass 1 and discards its update, as a close would."""

    by = stop_by = "cap"

    def __init__(self, arm, coin_gen, caps=None) -> None:
        if not caps:
            raise ValueError(f"{arm.name}: a control needs its per-batch caps (from its source unit)")
        super().__init__(arm, coin_gen, list(caps))
        self.b = -1

    def new_batch(self) -> None:
        self.b += 1

    def after_step(self, k, kl):
        cap = self.caps[self.b]
        return cap == 0, k >= cap


# every other kind: the gate (or nothing) decides
CONTROLLERS = {"rnd": Coin, "sb3": SB3, "crl": CleanRL, "rep": Caps, "cap": Caps}


def make_gate(model, args, threshold: float, max_reuse: int, stat: str, mode: str, params, target_kl=None,
              kl_factor: float = 1.0):
    kw = dict(window=args.window, threshold=threshold, max_reuse=max_reuse, statistic=stat)
    if A.has_window_mode():
        kw["window_mode"] = mode
    elif mode != "step":
        raise ValueError("the installed dgg_kernels has no window_mode")
    if target_kl is not None:
        kw.update(target_kl=target_kl, kl_factor=kl_factor)
    return dgg.DynamicGradientGate(model.lm_head.weight, params, **kw)


def _drift(groups, init) -> dict[str, float]:
    return rel_changes(groups, init)


def run_arm(arm: A.Arm, seed: int, init_state, task, heldout, args, dev, rules=(), record: bool = False,
            caps=None, probe=None) -> dict:
    """One arm on one seed.  Ungated arms run one observer gate per rule in ``rules`` (the first drives
    reuse_passes and is attached to the optimizer; none ever closes on a finite gradient).  ``caps``: a control's
    per-batch passes.  ``probe``: (prompts, answers) of the fresh validation set; a fixed arm then records its
    greedy accuracy before and after every pass (``val_before``, ``val_after``: the "this pass hurt" label)."""
    torch.manual_seed(seed)
    model = policy.make_model(args, task).to(dev)
    model.load_state_dict(init_state)
    groups = policy.layer_groups(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if arm.gated:
        thr = A.observer_threshold() if arm.kind == "dkl" else arm.threshold
        gates = {arm.rule: make_gate(model, args, thr, arm.max_reuse, arm.statistic, arm.window_mode, params,
                                     arm.target_kl, arm.kl_factor)}
    else:
        rules = list(rules) or [A.default_rule()]
        gates = {A.rule_name(s, m): make_gate(model, args, A.observer_threshold(), arm.max_reuse, s, m,
                                              params if i == 0 else [model.lm_head.weight])
                 for i, (s, m) in enumerate(rules)}
    main_rule, gate = next(iter(gates.items()))
    others = [g for r, g in gates.items() if r != main_rule]
    kl_gate = arm.gated and arm.target_kl is not None
    gate.attach(opt)
    cal = A.calibration_module() if record else None
    recorders = {r: cal.Recorder() for r in gates} if cal is not None else {}
    prompt_gen = torch.Generator().manual_seed(10_000 + seed)  # the same prompt stream for every arm of a seed
    coin_gen = torch.Generator().manual_seed(30_000 + seed)
    sample_gen = torch.Generator(device=dev).manual_seed(20_000 + seed)
    ctrl = CONTROLLERS.get(arm.kind, Controller)(arm, coin_gen, caps)
    paper = A.rule_name(A.PAPER, "step")  # the paper rule's observer: its z per test is logged for every pass
    val = probe is not None and arm.kind == "fixed"
    val_prev = policy.accuracy(model, *probe) if val else None
    val_start = val_prev
    init = snapshot(groups)
    n_per_batch = args.prompts * args.group
    updates, curve = [], [(0, 0.0, policy.accuracy(model, *heldout))]
    drift = [{g: 0.0 for g in groups}]
    train_s = 0.0
    for b in range(args.batches):
        t0 = time.perf_counter()
        ro = rollout(model, task, args, prompt_gen, sample_gen, dev)
        seq, out, old_logp, adv = ro["seq"], ro["out"], ro["old_logp"], ro["adv"]
        rollout_d = prev = None  # (probs, log-probs) on the batch: at rollout time, before the last update
        for g in others:
            g.new_batch()
        ctrl.new_batch()
        for k in dgg.reuse_passes(gate):
            before = snapshot(groups)
            logp_all = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            cur = (logp_all.detach().exp(), logp_all.detach())
            if prev is not None:  # this forward sees the weights the previous update produced
                updates[-1]["kl_step"] = full_kl(*prev, cur[1])
                updates[-1]["kl_rollout"] = full_kl(*rollout_d, cur[1])
            if rollout_d is None:
                rollout_d = cur
            logp = logp_all.gather(2, out[:, :, None]).squeeze(2)
            loss, ratio = ppo_loss(logp, old_logp, adv, args.clip)
            akl = approx_kl_k3(logp, old_logp)
            u = {"batch": b, "pass": k, "reward": round(float(ro["reward"].mean()), 4), "approx_kl": float(akl),
                 "clip_frac": round(float(((ratio.detach() - 1).abs() > args.clip).float().mean()), 4),
                 "kl_step": 0.0, "kl_rollout": 0.0}
            if ctrl.before_backward(k, akl):  # no backward, no update: the batch ends here
                u.update(grad_norm=float("nan"), z=float("nan"), closed=True, by="kl",
                         rel_change={g: 0.0 for g in groups})
                updates.append(u)
                prev = cur
                break
            opt.zero_grad(set_to_none=False)
            loss.backward()
            gnorm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])))
            if kl_gate:
                gate.observe_kl(akl)
            gate.step()
            for g in others:  # observers: they read the gradient the main gate left untouched (it never closes)
                g.step()
            discard, stop = ctrl.after_step(k, akl)
            if not discard:
                opt.step()  # a closed gate turns this into a skip (gate.attach)
            for rname, rec in recorders.items():
                rec.record(gates[rname])
            s = gate.stats()  # the benchmark's own host reads, outside gate.step()
            gate_closed = bool(s["closed"])
            u.update(grad_norm=float(s["norm"]), z=float(s["z"]), closed=gate_closed or discard,
                     by=("gate" if gate_closed else ctrl.by if discard else ""), rel_change=rel_changes(groups, before))
            # the per-pass signals of the SmolLM2 study (llm.py): lm_head energy, global gradient norm, lm_head share
            u.update(energy=float(s["energy"]), global_grad_norm=gnorm,
                     head_share=float(s["norm"]) / max(gnorm, 1e-30))
            if "z_energy" in s:
                u["z_energy"], u["z_increment"] = float(s["z_energy"]), float(s["z_increment"])
            if kl_gate and "kl" in s:
                u["gate_kl"] = float(s["kl"])
            if stop and not discard:
                u["by"] = ctrl.stop_by  # CleanRL (or a control's cap): the update stays, the batch ends
            if not arm.gated:
                u["obs_z"] = {rname: float(g.stats()["z"]) for rname, g in gates.items()}
                if paper in gates:
                    ps = gates[paper].stats()
                    u["paper_z"], u["paper_z_energy"], u["paper_z_increment"] = (
                        float(ps["z"]), float(ps["z_energy"]), float(ps["z_increment"]))
            if val:  # greedy decoding on fixed prompts: no generator is drawn from, the run is unchanged
                u["val_before"] = val_prev
                u["val_after"] = val_prev = policy.accuracy(model, *probe)
            updates.append(u)
            prev = cur
            if stop:
                break
        last = updates[-1]
        if last["closed"]:  # a skipped update leaves the weights, so the policy, as they were
            last["kl_rollout"] = full_kl(*rollout_d, prev[1])
        else:
            with torch.no_grad():
                logp_now = torch.log_softmax(model(seq[:, :-1], task.answer_len), -1)
            last["kl_step"] = full_kl(*prev, logp_now)
            last["kl_rollout"] = full_kl(*rollout_d, logp_now)
        train_s += time.perf_counter() - t0
        curve.append(((b + 1) * n_per_batch, round(train_s, 3), policy.accuracy(model, *heldout)))
        drift.append(_drift(groups, init))
    res = {"arm": arm.name, "seed": seed, "curve": curve, "updates": updates, "train_seconds": train_s,
           "drift": drift, "main_rule": main_rule, "backend": gate.backend}
    if recorders:
        res["recorders"] = recorders
    if caps is not None:
        res["caps"] = list(caps)
    if val:
        res["val_start"] = val_start
    return res


def _rates(rec, thresholds) -> dict[str, float]:
    return {f"{t:g}": float(v) for t, v in rec.close_rates([float(t) for t in thresholds]).items()}


# ----------------------------------------------------------------------------- units over worker processes

_CTX: dict = {}  # what every unit shares (checkpoints, task, held-out set, flags): set before the workers fork


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def checkpoint_for(init_states: list, seed: int):
    """Seed s starts from warm-up checkpoint s mod N (N = len(init_states); one checkpoint: every seed)."""
    return init_states[seed % len(init_states)]


def _calib_unit(k: int, rules) -> dict:
    c = _CTX
    t0 = time.perf_counter()
    seed = c["args"].calib_seed
    r = run_arm(A.Arm(f"fixed K={k}", k), seed, checkpoint_for(c["init_states"], seed), c["task"], c["heldout"],
                c["args"], c["dev"], rules, record=True)
    return {"k": k, "recorders": r["recorders"], "acc": [r["curve"][0][2], r["curve"][-1][2]],
            "seconds": time.perf_counter() - t0}


def _arm_unit(arm: A.Arm, seed: int, cal_thresholds: tuple = (), caps=None) -> dict:
    c = _CTX
    t0 = time.perf_counter()
    r = run_arm(arm, seed, checkpoint_for(c["init_states"], seed), c["task"], c["heldout"], c["args"], c["dev"],
                c["rules"], record=c["record"] and arm.kind == "fixed", caps=caps, probe=c.get("probe"))
    recs = r.pop("recorders", {})
    if recs:
        r["close_rates"] = {q: _rates(rec, CAL_GRID + tuple(cal_thresholds)) for q, rec in recs.items()}
    r["unit_seconds"] = time.perf_counter() - t0
    return r


def run_all(arms: list[A.Arm], init_state, task, heldout, args, dev, rules, log=print,
            probe=None) -> tuple[list, list, float]:
    """Calibrate the cal arms, then every (arm, seed) unit; returns (runs in (seed, arm) order, calibration
    records, calibration seconds).  ``init_state``: one checkpoint, or a list of them (seed s starts from
    checkpoint s mod N).  A rep:/cap: control runs once its source unit on the same seed has finished (its
    caps come from that unit).  With args.jobs > 1 the units run in that many forked workers, one thread
    each; the order they finish in does not change the results."""
    from . import controls

    init_states = list(init_state) if isinstance(init_state, (list, tuple)) else [init_state]
    _CTX.clear()
    _CTX.update(init_states=init_states, task=task, heldout=heldout, args=args, dev=dev, rules=rules,
                record=A.calibration_module() is not None, probe=probe)
    jobs = max(1, int(getattr(args, "jobs", 1) or 1))
    _warm_imports(arms, dev)  # every module a unit needs is loaded before the workers fork
    pool = None
    if jobs > 1 and dev.type == "cpu":
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_init_worker, initargs=(1,))
    try:
        t_cal = time.perf_counter()
        calib = calibrate(arms, args, rules, pool, log)
        calib_s = time.perf_counter() - t_cal
        cal_thr = tuple(a.threshold for a in arms if a.kind == "cal")  # passed along: the workers forked earlier
        units = [(seed, i) for seed in range(args.seeds) for i in range(len(arms))]
        index = {a.name: i for i, a in enumerate(arms)}
        source = {i: index[a.source] for i, a in enumerate(arms) if a.control}  # control -> its source arm

        def caps_of(seed, i):
            return controls.control_caps(arms[i].kind, done[(seed, source[i])], seed, args.batches)

        done = {}
        if pool is None:
            for seed, i in [u for u in units if u[1] not in source] + [u for u in units if u[1] in source]:
                caps = caps_of(seed, i) if i in source else None
                done[(seed, i)] = _arm_unit(arms[i], seed, cal_thr, caps)
                _log_run(done[(seed, i)], log)
        else:
            from concurrent.futures import FIRST_COMPLETED, wait
            # sources first, longest first (more reuse = more passes) so the workers finish together; each
            # control is submitted as soon as its source unit is done
            first = sorted((u for u in units if u[1] not in source), key=lambda u: -arms[u[1]].max_reuse)
            futs = {pool.submit(_arm_unit, arms[i], seed, cal_thr): (seed, i) for seed, i in first}
            while futs:
                ready, _ = wait(futs, return_when=FIRST_COMPLETED)
                for f in sorted(ready, key=lambda f: futs[f]):
                    seed, i = futs.pop(f)
                    done[(seed, i)] = f.result()
                    _log_run(done[(seed, i)], log)
                    for c, src in source.items():
                        if src == i:
                            futs[pool.submit(_arm_unit, arms[c], seed, cal_thr, caps_of(seed, c))] = (seed, c)
        return [done[u] for u in units], calib, calib_s
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _warm_imports(arms, dev) -> None:
    w = torch.nn.Parameter(torch.ones(4, 3, device=dev))
    kw = {"target_kl": 0.01, "kl_factor": 1.5} if A.has_kl_gate() else {}
    g = dgg.DynamicGradientGate(w, [w], threshold=A.observer_threshold(), **kw)
    w.grad = torch.ones_like(w)
    if kw:
        g.observe_kl(torch.zeros((), device=dev))
    g.step()
    g.stats()
    A.calibration_module()


def _log_run(r: dict, log) -> None:
    closed = sum(u["closed"] for u in r["updates"])
    log(f"  seed {r['seed']} {r['arm']:<34} acc {r['curve'][0][2]:.3f} -> {r['curve'][-1][2]:.3f}  "
        f"updates {len(r['updates']):3d} (closed {closed:2d})  {r['train_seconds']:6.1f} s train, "
        f"{r['unit_seconds']:6.1f} s unit")


def calibrate(arms: list[A.Arm], args, rules, pool, log) -> list[dict]:
    """Set each cal arm's threshold from an observer run (fixed reuse K, gate never closing) on args.calib_seed."""
    cal_arms = [a for a in arms if a.kind == "cal"]
    if not cal_arms:
        return []
    if A.calibration_module() is None:
        raise SystemExit("cal arms need dgg_kernels.calibration, which the installed package lacks")
    out = []
    ks = sorted({a.max_reuse for a in cal_arms})
    jobs = []
    for k in ks:
        group = [a for a in cal_arms if a.max_reuse == k]
        krules = list(dict.fromkeys((a.statistic, a.window_mode) for a in group))
        jobs.append((k, group, krules))
    results = ([pool.submit(_calib_unit, k, kr) for k, _, kr in jobs] if pool is not None
               else [None] * len(jobs))
    for (k, group, krules), fut in zip(jobs, results):
        r = fut.result() if fut is not None else _calib_unit(k, krules)
        for a in group:
            rec = r["recorders"][a.rule]
            a.threshold = float(rec.threshold_for_close_rate(a.close_rate))
            out.append({"arm": a.name, "seed": args.calib_seed, "rule": a.rule, "max_reuse": k,
                        "target_rate": a.close_rate, "threshold": a.threshold,
                        "observer_rates": _rates(rec, CAL_GRID + (a.threshold,)),
                        "observer_acc": r["acc"], "seconds": r["seconds"]})
        log(f"  calibration seed {args.calib_seed} fixed K={k}: "
            + ", ".join(f"{c['arm']} -> threshold {c['threshold']:.3g}" for c in out if c["max_reuse"] == k))
    return out
