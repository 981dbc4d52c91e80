"""One rank of the DeepSpeed tests in test_integrations_deepspeed.py (CPU, gloo, DS_ACCELERATOR=cpu).

Run as ``python tests/ds_worker.py CASE`` with RANK, WORLD_SIZE and DGG_STORE
(a file path for the rendezvous) in the environment (the launcher in
test_distributed.py sets them).  Every check raises on failure (non-zero
exit); a rank that finishes prints "RANK <r> OK <case>".

No DeepSpeed op is JIT-compiled here: DeepSpeed's comm backend builds its
shared-memory op (used only by its inference all-reduce) whenever the op
probes as compatible, which costs minutes of compiling on a fresh machine.
``deepspeed.ops.__compatible_ops__`` is the table that probe fills (computed
once per process, on first use); setting it to an empty table before the
engine starts marks every op incompatible, so nothing is built and the
training collectives go through gloo as usual.

Cases:
  engines  (1 or 2 ranks)  ZeRO-1/2/3 engines on a tiny Embedding -> Linear -> lm_head model, fp32 (and bf16
                           at 2 ranks), both discard routes, the gate stepped explicitly or from inside
                           engine.step(), gradient accumulation; a surge and a NaN (in one rank's fragment)
                           close the gate; decisions equal a single-process gate on the full gradient; params
                           and optimizer state bit-identical across closed steps; what DeepSpeed reports; every
                           refusal
  trl      (2 ranks)       DGGGRPOTrainer under accelerate's DeepSpeed plugin: ZeRO-2 (discard "overflow") and
                           ZeRO-3 ("found_inf"); a NaN on rank 1 closes every rank, the gate saw the unclipped
                           gradient, the closed step moved nothing, what DeepSpeed and the Trainer counted
  round_robin (2 ranks)    ZeRO-1/2 with round_robin_gradients: refused by name, or the gate judges the lm_head's
                           own gradient
  pending  (2 ranks)       gate.step() with no reduced gradient pending (before any backward, after
                           engine.step()) raises at ZeRO-1/2/3 and moves nothing
  checkpoint (2 ranks)     engine.save_checkpoint / load_checkpoint carry the gate: a resumed run equals the
                           uninterrupted one (decisions, weights, optimizer and gate state), a surge right after
                           the resume closes; the refusals and the gate-less checkpoint
  messages (2 ranks)       the BF16_Optimizer refusal names its cause; the docstring's all-gather size is the one
                           sent
"""
from __future__ import annotations

import math
import os
import sys
import time

T0 = time.monotonic()

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

deepspeed.ops.__compatible_ops__ = {}  # build no op (see the docstring)

import dgg_kernels as dgg  # noqa: E402
from dgg_kernels.integrations.deepspeed import DeepSpeedGate  # noqa: E402
from deepspeed.utils import safe_get_full_grad, safe_get_local_grad  # noqa: E402
from sequences import bit_equal  # noqa: E402
from rank_checks import assert_same_on_all_ranks, expect_error, run_case, state_bits  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
VOCAB, HIDDEN = 37, 7  # 259 lm_head elements: ZeRO-3 pads the last rank's partition at 2 ranks


def log(*a):
    print(f"[rank {RANK}] {time.monotonic() - T0:.1f}s", *a, flush=True)








class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        # registered in this order, the lm_head straddles the ZeRO-1/2 partitions of 2 ranks (emb + 28 of its
        # 259 elements on rank 0, the other 231 and lin on rank 1): each rank holds a piece
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lin = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.lin(self.emb(ids))))


def make_engine(stage, *, dtype="fp32", ga=1, fused=True, extra_zero=None, clip=1.0, seed=0, model_cls=None,
                extra_cfg=None):
    torch.manual_seed(seed)
    model = (model_cls or Tiny)()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cfg = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ga, "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, **(extra_zero or {})}, "steps_per_print": 10**6,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra_cfg or {})
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine


def local_snapshot(engine) -> list[torch.Tensor]:
    """This rank's weights (low-precision and fp32 master) and optimizer state, copied."""
    z = engine.optimizer
    out = []
    if engine.zero_optimization_stage() < 3:
        out += [p.detach().clone() for p in engine.module.parameters()]
        out += [t.detach().clone() for t in z.single_partition_of_fp32_groups]
    else:
        out += [p.ds_tensor.detach().clone() for p in engine.module.parameters()]
        out += [t.detach().clone() for t in z.fp32_partitioned_groups_flat]
    for st in z.optimizer.state.values():
        out += [v.detach().clone() for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    return out


def full_state_finite(engine) -> bool:
    """Whether every weight and Adam moment is finite, assembled whole by DeepSpeed (collectives: every rank).

    Not the local partitions: ZeRO-3 allocates a parameter's partition with torch.empty and copies only the real
    elements in, so the last rank's padding holds whatever memory it got (NaN bits now and then), harmlessly."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ok = True
    for p in engine.module.parameters():
        for t in (safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                  safe_get_full_optimizer_state(p, "exp_avg_sq")):
            ok = ok and t is not None and bool(torch.isfinite(t).all())
    return ok


def local_fragment(engine, head):
    """This rank's piece of the lm_head gradient through DeepSpeed's own API (None where it owns none)."""
    if engine.zero_optimization_stage() < 3:
        m = getattr(head, "_hp_mapping", None)
        if m is None:
            return None
        return m.get_lp_grad_fragment(head._index_in_param_group).view(-1)
    z = head._z3_optimizer
    g = z._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition[head.ds_id]  # the partition itself
    if g.dtype == torch.float32:
        assert safe_get_local_grad(head).data_ptr() == g.data_ptr()  # what DeepSpeed's public API returns
    pn, r = head.partition_numel(), dist.get_rank()
    return g.view(-1)[: max(0, min(pn, head.ds_numel - r * pn))]


def solo_group():
    """A process group of this rank alone (every rank takes part in building each)."""
    mine = None
    for r in range(WORLD):
        g = dist.new_group([r])
        if r == RANK:
            mine = g
    return mine


# rollout batches: (name, what to inject at which pass (1-based)); each runs passes until the gate stops
SCHEDULE = [("A", {}), ("B", {2: "surge"}), ("C", {1: "nan"}), ("D", {})]
# eps 0.05 (the norms are ~0.3): the passes' natural wobble stays far below z = 4, the x1000 surge far above
SETTINGS = dict(window=3, threshold=4.0, statistic="norm", eps=0.05, max_reuse=4, backend="torch")


def run_engine(stage, discard, mode, *, dtype="fp32", ga=1, extra_zero=None, solo=None):
    """Train through SCHEDULE; checks every step against a single-process gate on the full gradient."""
    what = f"ZeRO-{stage} {dtype} discard={discard} {mode} ga={ga} {extra_zero or ''}"
    engine = make_engine(stage, dtype=dtype, ga=ga, extra_zero=extra_zero)
    z = engine.optimizer
    head = engine.module.lm_head.weight
    gate = DeepSpeedGate(engine, discard=discard, **SETTINGS)
    assert gate.monitor_params == [head] and vars(z)["step"] == gate._optimizer_step
    full = nn.Parameter(torch.zeros(VOCAB, HIDDEN))
    ref = dgg.DynamicGradientGate(full, decision_group=solo, **SETTINGS)
    assert ref._sharding is None or ref._sharding.group is None or not ref._sharding.combines
    owners = torch.zeros(WORLD, dtype=torch.int64)
    owners[RANK] = 0 if engine.zero_optimization_stage() < 3 and getattr(head, "_hp_mapping", None) is None else 1
    dist.all_reduce(owners)
    nan_rank = max(r for r in range(WORLD) if owners[r])  # the NaN goes into this rank's fragment only
    assert int(owners.sum()) == WORLD, f"{what}: every rank should hold a piece of the lm_head gradient"
    gens = {name: torch.Generator().manual_seed(1000 * i + RANK) for i, (name, _) in enumerate(SCHEDULE)}
    skipped = lr_steps = applied = 0
    decisions, reuse = [], []
    sched = engine.lr_scheduler
    for name, inject in SCHEDULE:
        data = [(torch.randint(VOCAB, (2, 5), generator=gens[name]), torch.randint(VOCAB, (2, 5), generator=gens[name]))
                for _ in range(ga)]
        for k in dgg.reuse_passes(gate):
            if k == 1:
                ref.new_batch()
            for m, (ids, tgt) in enumerate(data):
                loss = F.cross_entropy(engine(ids).float().reshape(-1, VOCAB), tgt.reshape(-1))
                if inject.get(k) == "surge":
                    loss = loss * 1000.0
                engine.backward(loss)
                if m < ga - 1:
                    assert not engine.is_gradient_accumulation_boundary()
                    if mode == "explicit":
                        expect_error(RuntimeError, "outside a gradient accumulation boundary", gate.step)
                    engine.step()  # not a boundary: no optimizer step, no gate step
            if inject.get(k) == "nan" and RANK == nan_rank:
                local_fragment(engine, head)[3] = math.nan
            full.grad = safe_get_full_grad(head).detach().clone().float()  # a collective: every rank
            ref_closed = bool(ref.step())
            before = local_snapshot(engine)
            lr_before = sched.last_epoch
            if mode == "explicit":
                closed = gate.step()
                assert closed.dtype == torch.bool and closed.dim() == 0
                expect_error(RuntimeError, "already called", gate.step)
            engine.step()
            after = local_snapshot(engine)
            s, r = gate.stats(), ref.stats()
            closed = bool(s["closed"])
            assert closed == ref_closed, (what, name, k, closed, ref_closed)
            assert int(s["reuse_index"]) == int(r["reuse_index"]) == k, (what, name, k)
            if math.isfinite(float(r["norm"])):
                # float32 sums in another order: the norms agree to rounding; z divides by a std that can be
                # a thousandth of the norm (passes over one batch), which magnifies that rounding
                for key, rel in (("norm", 1e-5), ("mean", 1e-5), ("std", 1e-3), ("z", 1e-3)):
                    a, b = float(s[key]), float(r[key])
                    assert abs(a - b) <= rel * max(1.0, abs(b)), (what, name, k, key, a, b)
            assert full_state_finite(engine), (what, name, k, closed, "non-finite weights or optimizer state")
            same = all(bit_equal(x, y) for x, y in zip(before, after))
            if closed:
                assert same, (what, name, k, "a closed step changed weights or optimizer state")
            else:
                moved = torch.tensor([0 if same else 1])
                dist.all_reduce(moved)
                assert int(moved) > 0, (what, name, k, "an open step changed nothing")
            assert all(x.grad is None for x in gate._m_proxies + gate._p_proxies), "the gate kept DeepSpeed's buffers"
            # what DeepSpeed reports
            if discard == "overflow":
                skipped += closed
                lr_steps += not closed
                assert engine.was_step_applied() == (not closed)
            else:
                lr_steps += 1
                assert engine.was_step_applied()
            applied += 1
            if closed:
                norm = float(engine.get_global_grad_norm())
                assert norm == (math.inf if discard == "overflow" else 0.0), (what, name, k, norm)
                assert float(z.loss_scale) == 1.0, (what, z.loss_scale)  # bf16/fp32: a static scale, untouched
            assert engine.skipped_steps == skipped, (what, engine.skipped_steps, skipped)
            assert sched.last_epoch - lr_before == (1 if (discard == "found_inf" or not closed) else 0)
            assert engine.global_steps == applied
            decisions.append(closed)
            reuse.append(k)
    # batch A: 4 passes; B: closes at the surge of pass 2; C: closes at the NaN of pass 1; D: 4 passes
    assert reuse == [1, 2, 3, 4, 1, 2, 1, 1, 2, 3, 4], (what, reuse)
    assert decisions == [False] * 5 + [True, True] + [False] * 4, (what, decisions)
    assert int(gate.stats()["closed_total"]) == 2 and int(gate.stats()["accepted"]) == 9
    assert_same_on_all_ranks(state_bits(gate), f"{what}: gate state")
    if stage < 3:
        for p in engine.module.parameters():
            assert_same_on_all_ranks(p.detach().float(), f"{what}: weights")
    gate.remove()
    assert "step" not in vars(z) and getattr(z, "_dgg_gate", None) is None
    log(f"{what}: decisions {decisions} equal the full-gradient gate; closed steps moved nothing; "
        f"skipped_steps={engine.skipped_steps}")


def check_refusals(solo):
    e2 = make_engine(2)
    z = e2.optimizer
    untouched = lambda: ("step" not in vars(z) and getattr(z, "_dgg_gate", None) is None  # noqa: E731
                         and not {"save_checkpoint", "load_checkpoint"} & set(vars(e2)))
    expect_error(ValueError, "discard must be one of", lambda: DeepSpeedGate(e2, discard="nan"))
    expect_error(TypeError, "unknown setting(s) ['windw']", lambda: DeepSpeedGate(e2, windw=3))
    expect_error(ValueError, "window", lambda: DeepSpeedGate(e2, window=1))  # GateConfig's own check
    expect_error(TypeError, "needs a deepspeed.DeepSpeedEngine", lambda: DeepSpeedGate(e2.module))
    expect_error(ValueError, "not in the ZeRO optimizer's parameter groups",
                 lambda: DeepSpeedGate(e2, nn.Parameter(torch.zeros(3))))
    e2.module.lin.bias.requires_grad_(False)
    expect_error(ValueError, "does not require grad", lambda: DeepSpeedGate(e2, e2.module.lin.bias))
    e2.module.lin.bias.requires_grad_(True)
    for attr, value, fragment in [
        ("fp16_enabled", True, "fp16"),
        ("torch_autocast_enabled", True, "torch_autocast"),
        ("managed_gradient_accumulation", False, "managed_gradient_accumulation"),
    ]:
        setattr(e2, attr, lambda v=value: v)
        expect_error(ValueError, fragment, lambda: DeepSpeedGate(e2))
        delattr(e2, attr)
    e2.mpu = object()
    expect_error(ValueError, "model, sequence or expert parallelism", lambda: DeepSpeedGate(e2))
    e2.mpu = None
    assert untouched()
    g = DeepSpeedGate(e2)
    expect_error(RuntimeError, "already has a DeepSpeedGate", lambda: DeepSpeedGate(e2))
    g.remove()
    assert untouched()
    # gate.step() with no reduced gradient (before any backward): a clear error, nothing hooked changed
    g = DeepSpeedGate(e2)
    expect_error(RuntimeError, "holds no reduced gradient", g.step)
    g.remove()
    # found_inf needs a fused torch Adam/AdamW
    e_nf = make_engine(2, fused=False)
    expect_error(ValueError, "needs a fused torch.optim.Adam", lambda: DeepSpeedGate(e_nf, discard="found_inf"))
    assert "step" not in vars(e_nf.optimizer)
    # overflow needs DeepSpeed to look at the gradient: fp32 ZeRO-2 without compute_grad_norm does not
    e_nn = make_engine(2, extra_zero={"compute_grad_norm": False}, clip=0.0)
    expect_error(ValueError, "discard='overflow' needs DeepSpeed to check", lambda: DeepSpeedGate(e_nn))
    assert "step" not in vars(e_nn.optimizer)
    DeepSpeedGate(e_nn, discard="found_inf").remove()  # the route that works there
    # stage 0: no partitioned gradients
    e0 = make_engine(0)
    expect_error(ValueError, "supports ZeRO stages 1, 2 and 3", lambda: DeepSpeedGate(e0))
    log("refusals: each raised with the engine unhooked")


def engines_case() -> None:
    solo = solo_group()
    check_refusals(solo)
    for stage in (1, 2, 3):
        run_engine(stage, "overflow", "hook", solo=solo)
        run_engine(stage, "found_inf", "explicit", solo=solo)
    run_engine(2, "overflow", "explicit", ga=2, solo=solo)
    if WORLD > 1:
        # bf16 (DeepSpeed's overflow check on by default), and overlapped reduction with contiguous buffers
        run_engine(2, "overflow", "hook", dtype="bf16", extra_zero={"overlap_comm": True}, solo=solo)
        run_engine(3, "found_inf", "hook", dtype="bf16", solo=solo)


class Four(nn.Module):
    """Four parameters of one size, registered [emb, lm_head, x1, x2]: with round_robin_gradients at 2 ranks
    DeepSpeed lays the partitions out as [emb, x1 | lm_head, x2], where each parameter's gradient differs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.x1 = nn.Embedding(VOCAB, HIDDEN)  # modules, not bare parameters: those would be listed first
        self.x2 = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids) + 3.0 * self.x1(ids))
        return self.lm_head(h) + 0.5 * self.x2(h)


def round_robin_case() -> None:
    """round_robin_gradients: the gate either refuses the engine, naming the setting, or judges the lm_head's own
    gradient (every rank gets the same batch, so the reduced gradient is a single model's)."""
    gen = torch.Generator().manual_seed(7)
    ids, tgt = torch.randint(VOCAB, (2, 5), generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
    torch.manual_seed(0)  # make_engine's seed: the same initial weights
    ref = Four()
    F.cross_entropy(ref(ids).reshape(-1, VOCAB), tgt.reshape(-1)).backward()
    want = float(ref.lm_head.weight.grad.norm())
    for stage in (2, 1):
        for rr in (False, True):
            what = f"ZeRO-{stage} round_robin_gradients={rr}"
            e = make_engine(stage, model_cls=Four, extra_zero={"round_robin_gradients": rr})
            try:
                gate = DeepSpeedGate(e, **SETTINGS)
            except ValueError as err:
                assert rr and "round_robin_gradients" in str(err), (what, str(err))
                assert "step" not in vars(e.optimizer) and getattr(e.optimizer, "_dgg_gate", None) is None
                assert not {"save_checkpoint", "load_checkpoint"} & set(vars(e)), what
                log(f"{what}: refused ({err})")
                continue
            e.backward(F.cross_entropy(e(ids).float().reshape(-1, VOCAB), tgt.reshape(-1)))
            gate.step()
            norm = float(gate.stats()["norm"])
            assert abs(norm - want) <= 1e-5 * want, (
                f"{what}: the gate judged a gradient of norm {norm:.4f}, the lm_head's is {want:.4f}")
            e.step()
            gate.remove()
            log(f"{what}: the gate judged the lm_head's gradient (norm {norm:.4f})")


def pending_case() -> None:
    """gate.step() with no reduced gradient pending (before any backward, after engine.step()) raises on every
    rank, at every stage, and moves nothing; the loop then goes on as usual."""
    gen = torch.Generator().manual_seed(11 + RANK)
    ids, tgt = torch.randint(VOCAB, (2, 5), generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
    for stage in (1, 2, 3):
        e = make_engine(stage)
        gate = DeepSpeedGate(e, **SETTINGS)

        def backward():
            e.backward(F.cross_entropy(e(ids).float().reshape(-1, VOCAB), tgt.reshape(-1)))

        def refused(when):
            bits, count = state_bits(gate), gate.step_count
            try:
                gate.step()
            except RuntimeError as err:
                assert "holds no reduced gradient" in str(err), (stage, when, str(err))
            else:
                raise AssertionError(f"ZeRO-{stage}: gate.step() {when} was accepted, with no reduced gradient "
                                     "pending (it judged a stale buffer)")
            assert bit_equal(bits, state_bits(gate)) and gate.step_count == count and not gate._stepped, (stage, when)

        refused("before any backward")
        backward()
        e.step()  # the gate steps inside
        refused("after engine.step()")
        backward()
        gate.step()
        e.step()
        assert gate.step_count == 2 and int(gate.stats()["accepted"]) == 2, (stage, gate.stats())
        assert_same_on_all_ranks(state_bits(gate), f"ZeRO-{stage}: gate state")
        gate.remove()
        log(f"ZeRO-{stage}: gate.step() with no reduced gradient pending refused, nothing moved")


# rollout batches (name, {pass: "surge"}); the checkpoint is taken after pass 1 of B, so the surge of B's pass 2
# comes right after the resume (a first pass never closes on a finite gradient: the surge must be a reuse pass)
CKPT_SCHEDULE = [("A", {}), ("B", {2: "surge"}), ("C", {})]
CKPT_AT = ("B", 1)


def train_batches(engine, gate, batches, *, first=1, until=None) -> list:
    """Run rollout batches, each until the gate stops it (the first batch from pass ``first``: a resumed batch
    continues without new_batch()); stop after the pass ``until`` (name, pass).  Returns (name, pass, closed)
    per step."""
    out = []
    for name, inject in batches:
        gen = torch.Generator().manual_seed(100 * ord(name) + RANK)
        ids, tgt = torch.randint(VOCAB, (2, 5), generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
        if first == 1:
            gate.new_batch()
        for k in range(first, gate.config.max_reuse + 1):
            gate.new_pass()
            loss = F.cross_entropy(engine(ids).float().reshape(-1, VOCAB), tgt.reshape(-1))
            engine.backward(loss * 1000.0 if inject.get(k) == "surge" else loss)
            engine.step()
            out.append((name, k, bool(gate.stats()["closed"])))
            if (name, k) == until:
                return out
            if gate.should_stop():
                break
        first = 1
    return out


def full_training_state(engine) -> list[torch.Tensor]:
    """Every fp32 master weight and Adam moment, assembled whole (collectives: every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = []
    for p in engine.module.parameters():
        out += [safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                safe_get_full_optimizer_state(p, "exp_avg_sq").clone()]
    return out


def checkpoint_case() -> None:
    """engine.save_checkpoint / load_checkpoint carry the gate: a resumed run's decisions, weights, optimizer
    state and gate state equal the uninterrupted run's, the surge right after the resume closes the gate."""
    import warnings

    root = os.path.join(os.path.dirname(os.environ["DGG_STORE"]), "ckpt")
    for stage in (1, 2, 3):
        what = f"ZeRO-{stage}"
        folder = os.path.join(root, f"z{stage}")
        e1 = make_engine(stage)
        g1 = DeepSpeedGate(e1, **SETTINGS)
        head = train_batches(e1, g1, CKPT_SCHEDULE[:2], until=CKPT_AT)
        assert head == [("A", k, False) for k in (1, 2, 3, 4)] + [("B", 1, False)], (what, head)
        e1.save_checkpoint(folder, tag="mid_B", client_state={"epoch": 7})
        saved, saved_bits = int(g1.stats()["accepted"]), state_bits(g1)
        tail1 = train_batches(e1, g1, CKPT_SCHEDULE[1:], first=2)
        assert tail1[0] == ("B", 2, True), (what, "the uninterrupted run should close on the surge", tail1)
        final1, bits1 = full_training_state(e1), state_bits(g1)

        e2 = make_engine(stage, seed=1)  # other initial weights: the checkpoint must bring everything
        g2 = DeepSpeedGate(e2, **SETTINGS)
        path, client = e2.load_checkpoint(folder, tag="mid_B")
        assert path is not None and client["epoch"] == 7, (what, path, client)
        loaded = int(g2.stats()["accepted"])
        tail2 = train_batches(e2, g2, CKPT_SCHEDULE[1:], first=2)
        assert (loaded, tail2) == (saved, tail1), (
            f"{what}: resumed from the checkpoint, the gate had accepted {loaded} steps (saved: {saved}) and decided "
            f"{tail2}; the uninterrupted run decided {tail1}")
        final2 = full_training_state(e2)
        assert all(bit_equal(a, b) for a, b in zip(final1, final2)), f"{what}: weights or optimizer state differ"
        assert bit_equal(bits1, state_bits(g2)), f"{what}: gate state differs"
        log(f"{what}: the resumed run equals the uninterrupted one ({tail2})")
        if stage != 2:
            continue

        # a user's own client_state key clashing with the gate's: refused before anything is written
        expect_error(ValueError, "dgg_gate", lambda: e2.save_checkpoint(folder, tag="clash",
                                                                        client_state={"dgg_gate": 1}))
        assert not os.path.exists(os.path.join(folder, "clash"))
        # between gate.step() and engine.step() the gate has judged a step the weights have not taken
        gen = torch.Generator().manual_seed(5)
        ids, tgt = torch.randint(VOCAB, (2, 5), generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
        e2.backward(F.cross_entropy(e2(ids).float().reshape(-1, VOCAB), tgt.reshape(-1)))
        g2.step()
        expect_error(RuntimeError, "between gate.step() and engine.step()",
                     lambda: e2.save_checkpoint(folder, tag="mid"))
        expect_error(RuntimeError, "between gate.step() and engine.step()",
                     lambda: e2.load_checkpoint(folder, tag="mid_B"))
        e2.step()
        assert not os.path.exists(os.path.join(folder, "mid"))
        # a checkpoint without a gate state (saved with the gate removed): a warning, the gate left as it was
        g1.remove()
        for name in ("save_checkpoint", "load_checkpoint"):
            assert name not in vars(e1), f"remove() left engine.{name} hooked"
        e1.save_checkpoint(folder, tag="no_gate")
        bits = state_bits(g2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e2.load_checkpoint(folder, tag="no_gate")
        assert any("holds no gate state" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert bit_equal(bits, state_bits(g2))
        # load_module_only (a warm start): the gate is left as it was
        e2.load_checkpoint(folder, tag="mid_B", load_module_only=True)
        assert bit_equal(bits, state_bits(g2))
        # a fresh optimizer (or scheduler) on the saved weights: the gate is still restored, bit for bit
        e2.load_checkpoint(folder, tag="mid_B", load_optimizer_states=False, load_lr_scheduler_states=False)
        assert bit_equal(saved_bits, state_bits(g2)), "load_optimizer_states=False did not restore the gate"
        # a gate built with other settings: the error says the engine was restored and the gate was not
        g2.remove()
        g3 = DeepSpeedGate(e2, **dict(SETTINGS, window=4))
        bits = state_bits(g3)
        expect_error(ValueError, "other settings", lambda: e2.load_checkpoint(folder, tag="mid_B"))
        assert bit_equal(bits, state_bits(g3))
        g3.remove()
        log(f"{what}: clashing client_state, mid-step save/load, a gate-less checkpoint, module-only and "
            "optimizer-less loads, other settings")


def messages_case() -> None:
    """Two texts checked against what runs: the BF16_Optimizer refusal names its cause (not the DeepSpeed
    version), and the module docstring's all-gather size is the one the gate sends."""
    import re

    import dgg_kernels.distributed as D
    import dgg_kernels.integrations.deepspeed as DS

    problems = []
    e = make_engine(1, dtype="bf16", extra_cfg={"data_types": {"grad_accum_dtype": "fp32"}})
    assert type(e.optimizer).__name__ == "BF16_Optimizer", type(e.optimizer).__name__
    try:
        DeepSpeedGate(e)
        problems.append("a BF16_Optimizer engine was accepted")
    except (ValueError, RuntimeError) as err:
        msg = str(err)
        if "grad_accum_dtype" not in msg or "tested with" in msg:
            problems.append(f"the BF16_Optimizer refusal does not name its cause: {msg}")
    assert "step" not in vars(e.optimizer)

    sent, real = [], D._all_gather

    def spy(out, inp, *a, **kw):
        sent.append(inp.numel() * inp.element_size())
        return real(out, inp, *a, **kw)

    e = make_engine(2)
    gate = DeepSpeedGate(e, **SETTINGS)
    D._all_gather = spy
    try:
        gen = torch.Generator().manual_seed(3)
        ids, tgt = torch.randint(VOCAB, (2, 5), generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
        e.backward(F.cross_entropy(e(ids).float().reshape(-1, VOCAB), tgt.reshape(-1)))
        e.step()
    finally:
        D._all_gather = real
    gate.remove()
    said = re.search(r"one\s+(\d+)-byte\s+all-gather\s+per\s+rank", DS.__doc__)
    if len(sent) != 1 or said is None or int(said.group(1)) != sent[0]:
        problems.append(f"the module docstring says {said and said.group(0)!r}; a step sent {sent} bytes per rank")
    assert not problems, problems
    log("messages: the BF16_Optimizer refusal names its cause; the docstring's all-gather size is the one sent")


def run_trl(stage: int, discard: str | None) -> None:
    """DGGGRPOTrainer under accelerate's DeepSpeed plugin: a NaN in one element of rank 1's lm_head gradient
    (before the reduction) at optimizer step 1 closes the gate on every rank."""
    import tempfile

    from accelerate.state import AcceleratorState, PartialState

    from dgg_kernels.integrations.deepspeed import DeepSpeedGate
    from dgg_kernels.integrations.trl import DGGGRPOTrainer
    from test_integrations_trl import _config, _dataset, _model, _reward, _tokenizer

    what = f"TRL + ZeRO-{stage} discard={discard or 'overflow'}"
    ds_config = {
        "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10**6,
    }

    class Probe(DGGGRPOTrainer):
        poison_step = 1

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.seen, self.snapshots, self.raw = [], {}, []
            head = self.model.get_output_embeddings().weight
            head.register_hook(self._poison)  # runs on this rank's gradient, before DeepSpeed reduces it

        def _poison(self, grad):
            if self.state.global_step == self.poison_step and RANK == 1:
                grad = grad.clone()
                grad.view(-1)[3] = math.nan
            return grad

        def _dgg_bind_deepspeed(self):
            super()._dgg_bind_deepspeed()
            gate, step = self.gate, self.gate._gate_step

            def traced():  # the gradient the gate is about to judge, assembled whole (a collective: every rank)
                head = self.model.get_output_embeddings().weight
                self.raw.append(float(safe_get_full_grad(head).norm()))
                return step()

            gate._gate_step = traced

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            self.snapshots[step] = local_snapshot(self.deepspeed)
            out = super().training_step(model, inputs, num_items_in_batch)  # backward + engine.step() + gate
            s = self.gate.stats()
            self.seen.append((step, float(s["norm"]), bool(s["closed"]), int(s["reuse_index"]),
                              self.deepspeed.skipped_steps))
            return out

    # transformers hands accelerate no backend under DeepSpeed (it expects a GPU, where accelerate picks NCCL); on
    # a CPU-only machine accelerate would then count one process. Its state is a process-wide singleton: set it up
    # first, for DeepSpeed over gloo, and tell the Trainer's arguments to use it (use_configured_state).
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    assert state.num_processes == WORLD and state.process_index == RANK
    tok = _tokenizer()
    args = _config(tempfile.mkdtemp(), max_steps=6, use_cpu=False, bf16=False, deepspeed=ds_config,
                   accelerator_config={"use_configured_state": True})
    tr = Probe(model=_model(len(tok)), reward_funcs=_reward, args=args, train_dataset=_dataset(),
               processing_class=tok, gate_threshold=1e9, gate_discard=discard)
    assert tr.is_deepspeed_enabled and isinstance(tr.gate, dgg.DynamicGradientGate)  # until the engine exists
    tr.train()
    gate, engine = tr.gate, tr.deepspeed
    assert isinstance(gate, DeepSpeedGate) and gate.engine is engine and gate.stage == stage
    assert gate.discard == (discard or "overflow")
    assert gate.monitor_params[0] is tr.model.get_output_embeddings().weight
    assert [s for s, *_ in tr.seen] == list(range(6)) and len(tr.raw) == 6
    for (step, norm, closed, _, _), raw in zip(tr.seen, tr.raw):
        assert closed == (step == Probe.poison_step), (what, step, closed)
        if not closed:  # the raw, reduced gradient: before DeepSpeed clipped it to max_grad_norm
            assert abs(norm - raw) <= 1e-5 * raw and raw > 100 * tr.args.max_grad_norm, (what, step, norm, raw)
    assert [r for _, _, _, r, _ in tr.seen] == [1, 2, 1, 2, 3, 4], what  # the close cut batch 1 short
    assert tr.dgg_early_stops == 1 and tr.dgg_regenerations == 2
    assert all(bit_equal(a, b) for a, b in zip(tr.snapshots[1], tr.snapshots[2])), what  # it moved nothing
    assert not all(bit_equal(a, b) for a, b in zip(tr.snapshots[0], tr.snapshots[1])), what
    steps = [float(st["step"]) for st in engine.optimizer.optimizer.state.values()]  # one per param group
    assert steps and all(n == 5.0 for n in steps), (what, steps)  # the fused AdamW ran 5 of the 6 steps
    if gate.discard == "overflow":  # DeepSpeed counted the discarded step, and accelerate told the Trainer
        assert [k for *_, k in tr.seen] == [0, 1, 1, 1, 1, 1] and tr.lr_scheduler.last_epoch == 5, what
    else:  # DeepSpeed did not see it: the step counts as applied, the scheduler stepped
        assert [k for *_, k in tr.seen] == [0] * 6 and tr.lr_scheduler.last_epoch == 6, what
    logged = [h for h in tr.state.log_history if "dgg/closed" in h]
    assert [h["dgg/closed"] for h in logged] == [float(s == Probe.poison_step) for s in range(6)], what
    assert_same_on_all_ranks(state_bits(gate), f"{what}: gate")
    if stage < 3:
        for p in tr.model.parameters():
            assert_same_on_all_ranks(p.detach(), f"{what}: weights")
    log(f"{what}: a NaN on rank 1 closed every rank; the gate judged the unclipped gradient; skipped_steps "
        f"{engine.skipped_steps}")


def trl_case() -> None:
    run_trl(2, None)
    run_trl(3, "found_inf")


if __name__ == "__main__":
    run_case({"engines": engines_case, "trl": trl_case, "round_robin": round_robin_case, "pending": pending_case,
              "checkpoint": checkpoint_case, "messages": messages_case})
