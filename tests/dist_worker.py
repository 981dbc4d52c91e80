"""One rank of the multi-rank CPU (gloo) tests in test_distributed.py.

Run as ``python tests/dist_worker.py CASE`` with RANK, WORLD_SIZE and
DGG_STORE (a file path for the rendezvous) in the environment; the launcher
sets TRITON_INTERPRET=1 before anything imports triton.  Every check raises
on failure (non-zero exit); a rank that finishes prints "RANK <r> OK <case>".

Cases:
  main    (2 ranks)  sequences through DTensor Shard(0) and plain shards with process_group, torch and
                     triton backends; an FSDP2 model; a TP ColwiseParallel lm_head; state_dict; compile;
                     every bad-input error
  mesh2d  (4 ranks)  FSDP2 x TP on a 2-D mesh (placements (_StridedShard(0), Shard(0))), and HSDP
                     (placements (Replicate(), Shard(0)): the replicas are not counted twice)
  trl     (2 ranks)  DGGGRPOTrainer on a Qwen2 sharded with FSDP2 at load time (transformers'
                     DistributedConfig; accelerate itself enables FSDP only on GPUs), and the rebuild
                     after accelerate-style sharding in prepare, done by hand
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dgg_kernels as dgg  # noqa: E402
from dgg_kernels.backends import triton_usable  # noqa: E402
from semantics_model import play  # noqa: E402
from sequences import assert_stats_match, bit_equal, make_sequence  # noqa: E402
from rank_checks import assert_same_on_all_ranks, expect_error, run_case, state_bits  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
BACKENDS = ["torch"] + (["triton"] if triton_usable(torch.device("cpu")) else [])
CONFIGS = [
    dict(window=3, threshold=0.3, statistic="norm", max_reuse=4),
    dict(window=5, threshold=0.5, statistic="increment", max_reuse=8),
    dict(window=4, threshold=0.1, statistic="energy", eps=1e-3, max_reuse=3),
]


def log(*a):
    print(f"[rank {RANK}]", *a, flush=True)


# -- helpers -------------------------------------------------------------------------------------------------------





def stats_of(gate) -> dict:
    return {k: v.item() for k, v in gate.stats().items()}


def split_rows(full: torch.Tensor, n: int, i: int) -> torch.Tensor:
    """FSDP2/DTensor's uneven Shard(0) split: torch.chunk, empty pieces at the end."""
    pieces = list(torch.chunk(full, n, dim=0))
    return pieces[i] if i < len(pieces) else full[:0]




# -- 1. sequences: decisions equal a single-process gate fed the full gradient ----------------------------------------

def check_sequences(mesh) -> None:
    """Spikes, NaN/inf/overflow in one element (so in one rank's shard only), new_batch at random points."""
    shapes = [(37, 5), (37,)]  # an lm_head weight and bias, 37 rows: uneven over 2 ranks
    pg = dist.new_group(list(range(WORLD)))
    for backend in BACKENDS:
        # the Triton interpreter takes ~20 ms a launch: one setting, a shorter sequence
        for ci, cfg in enumerate(CONFIGS if backend == "torch" else CONFIGS[:1]):
            steps = 150 if backend == "torch" else 50
            seq = make_sequence(1000 * ci + 7, steps, shapes)
            want = play(cfg, seq)
            for layout in ("dtensor", "plain"):
                t0 = time.perf_counter()
                if layout == "dtensor":
                    mon = [nn.Parameter(distribute_tensor(torch.zeros(s), mesh, [Shard(0)])) for s in shapes]
                    gate = dgg.DynamicGradientGate(mon, backend=backend, **cfg)
                else:
                    mon = [nn.Parameter(split_rows(torch.zeros(s), WORLD, RANK).clone()) for s in shapes]
                    gate = dgg.DynamicGradientGate(mon, backend=backend, process_group=pg, **cfg)
                ref_mon = [nn.Parameter(torch.zeros(s)) for s in shapes]
                ref = dgg.DynamicGradientGate(ref_mon, backend="torch", **cfg)  # the semantics
                assert gate.sharded and gate.backend == backend
                play_sequence(gate, ref, seq, want, layout, mesh, f"{backend}/{layout}/{cfg['statistic']}")
                log(f"sequence {backend}/{layout}/{cfg['statistic']}: {steps} steps in {time.perf_counter() - t0:.2f}s")
    # fully replicated DTensor: every rank holds the whole gradient, nothing is combined (no double count)
    full = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    rep = nn.Parameter(distribute_tensor(torch.zeros(9, 4), mesh, [Replicate()]))
    gate = dgg.DynamicGradientGate(rep, window=2)
    assert not gate.sharded and gate._sharding is not None
    rep.grad = distribute_tensor(full.clone(), mesh, [Replicate()], src_data_rank=None)
    gate.step()
    assert abs(gate.stats()["energy"].item() - full.double().square().sum().item()) <= 1e-5 * full.square().sum().item()
    # a RowwiseParallel-style lm_head: split along the hidden dimension, Shard(1)
    cols = [(7, 37)]
    seq = make_sequence(4242, 100, cols)
    mon = [nn.Parameter(distribute_tensor(torch.zeros(s), mesh, [Shard(1)])) for s in cols]
    gate = dgg.DynamicGradientGate(mon, **CONFIGS[0])
    ref = dgg.DynamicGradientGate([nn.Parameter(torch.zeros(s)) for s in cols], **CONFIGS[0])
    play_sequence(gate, ref, seq, play(CONFIGS[0], seq), "dtensor", mesh, "torch/Shard(1)")


def set_grads(gate, full_grads, layout, mesh):
    for t, g in zip(gate.monitor, full_grads):
        if layout == "dtensor":
            t.grad = distribute_tensor(g.clone(), mesh, t.placements, src_data_rank=None)
        else:
            t.grad = split_rows(g, WORLD, RANK).clone()


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def play_sequence(gate, ref, seq, want, layout, mesh, what):
    bits, n_closed, k = [], 0, 0
    for ev in seq.events:
        if ev[0] == "new_batch":
            gate.new_batch()
            ref.new_batch()
            continue
        full = ev[1]
        set_grads(gate, full, layout, mesh)
        for t, g in zip(ref.monitor, full):
            t.grad = g.clone()
        before = [local(t.grad).clone() for t in gate.monitor]
        closed = gate.step()
        rclosed = ref.step()
        got, exp = stats_of(gate), stats_of(ref)
        assert bool(closed) == bool(rclosed) == want[k][0]["closed"], (what, k, got, exp)
        assert gate.should_stop() == ref.should_stop() == want[k][1], (what, k)
        for key in ("reuse_index", "accepted", "closed_total"):
            assert got[key] == exp[key], (what, k, key)
        assert_stats_match(got, exp, k, want[k][0]["err_scale"])
        after = [local(t.grad) for t in gate.monitor]
        if bool(closed):
            assert all(torch.equal(a, torch.zeros_like(a)) for a in after), (what, k, "closed step left a shard nonzero")
        else:
            assert all(bit_equal(a, b) for a, b in zip(after, before)), (what, k, "open step changed a shard")
        n_closed += bool(closed)
        bits.append(state_bits(gate))
        k += 1
    assert 0 < n_closed < k, (what, n_closed, k)
    assert_same_on_all_ranks(torch.stack(bits), what)


# -- 2. state_dict: identical on every rank; rank 0's dict resumes every rank bit-identically -------------------------

def check_state_dict(mesh) -> None:
    shapes = [(37, 5)]
    cfg = CONFIGS[1]
    seq = make_sequence(77, 80, shapes)
    mon = [nn.Parameter(distribute_tensor(torch.zeros(s), mesh, [Shard(0)])) for s in shapes]
    gate = dgg.DynamicGradientGate(mon, backend="torch", **cfg)
    mon2 = [nn.Parameter(distribute_tensor(torch.zeros(s), mesh, [Shard(0)])) for s in shapes]
    resumed = dgg.DynamicGradientGate(mon2, backend="torch", **cfg)
    half = len(seq.events) // 2
    for i, ev in enumerate(seq.events):
        if i == half:
            sd = gate.state_dict()
            assert_same_on_all_ranks(torch.cat([v.reshape(-1).view(torch.uint8) for v in sd["state"].values()]), "sd")
            box = [sd if RANK == 0 else None]
            dist.broadcast_object_list(box, src=0)
            resumed.load_state_dict(box[0])
            assert torch.equal(state_bits(resumed), state_bits(gate))
        if ev[0] == "new_batch":
            gate.new_batch()
            if i >= half:
                resumed.new_batch()
            continue
        set_grads(gate, ev[1], "dtensor", mesh)
        gate.step()
        if i >= half:
            set_grads(resumed, ev[1], "dtensor", mesh)
            resumed.step()
            assert torch.equal(state_bits(resumed), state_bits(gate)), ("resume differs", i)
    assert_same_on_all_ranks(state_bits(resumed), "resumed state")
    log("state_dict: identical on every rank, rank 0's dict resumes bit-identically")


# -- 3. models: FSDP2 and tensor parallel, with fused AdamW ---------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self, vocab=37, hidden=16, head_bias=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=head_bias)  # untied

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mid(self.emb(ids))))


def local_snapshot(model, opt):
    params = [local(p.detach()).clone() for p in model.parameters()]
    state = [local(v).clone() for p in model.parameters() for v in opt.state.get(p, {}).values()]
    return params, state


def train_and_check(model, opt, gate, monitor, *, steps, seed, data_seed, what, cfg, holds=None):
    """Random loss scales with spikes, NaN in one rank's shard every 9th step, new_batch at random points.

    The reference is a single-process gate fed the full gradient (full_tensor(), a collective).
    ``holds(r)``: whether this rank holds rank r's shard (replicas hold the same one; default: r == RANK).
    """
    holds = holds or (lambda r: r == RANK)
    ref_mon = [nn.Parameter(torch.zeros(t.shape)) for t in monitor]
    ref = dgg.DynamicGradientGate(ref_mon, backend="torch", **cfg)
    g = torch.Generator().manual_seed(seed)  # the same on every rank: decisions about the schedule
    gd = torch.Generator().manual_seed(data_seed)  # this rank's data (or the shared data under TP)
    vocab = model.lm_head.out_features
    n_closed, n_nan, bits, log_scale, err_scale = 0, 0, [], 0.0, 0.0
    for step in range(steps):
        if float(torch.rand((), generator=g)) < 0.2:
            gate.new_batch()
            ref.new_batch()
        log_scale = max(-2.0, min(3.0, log_scale + 0.4 * (float(torch.rand((), generator=g)) - 0.5)))
        scale = math.exp(log_scale) * (6.0 if float(torch.rand((), generator=g)) < 0.15 else 1.0)
        nan_rank = int(torch.randint(WORLD, (), generator=g)) if step % 9 == 4 else -1
        ids = torch.randint(vocab, (4, 6), generator=gd)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1)) * scale
        loss.backward()
        if nan_rank >= 0 and holds(nan_rank):  # NaN in one shard only
            lg = local(monitor[0].grad)
            if lg.numel():
                lg.view(-1)[0] = math.nan
        if nan_rank >= 0:
            n_nan += 1
        full = [t.grad.full_tensor() if isinstance(t.grad, DTensor) else t.grad.clone() for t in monitor]
        for t, f in zip(ref_mon, full):
            t.grad = f
        snap = local_snapshot(model, opt)
        closed = bool(gate.step())
        assert closed == bool(ref.step()), (what, step)
        got, exp = stats_of(gate), stats_of(ref)
        if math.isfinite(exp["norm"]):
            err_scale = max(err_scale, exp["energy"] if cfg.get("statistic") == "energy" else exp["norm"])
        assert_stats_match(got, exp, step, err_scale)
        for key in ("reuse_index", "accepted", "closed_total"):
            assert got[key] == exp[key], (what, step, key)
        if nan_rank >= 0:
            assert closed, (what, step, "a NaN on one rank must close every rank")
        if closed:
            for p in model.parameters():
                if p.grad is not None:
                    assert torch.equal(local(p.grad), torch.zeros_like(local(p.grad))), (what, step, "grad not zeroed")
        opt.step()
        params, state = local_snapshot(model, opt)
        if closed:  # fused AdamW skipped: params, moments and step count bit-identical
            assert all(bit_equal(a, b) for a, b in zip(params, snap[0])), (what, step, "closed step moved a param")
            assert len(state) == len(snap[1]) and all(bit_equal(a, b) for a, b in zip(state, snap[1])), (
                what, step, "closed step changed optimizer state")
        else:
            head_at = [i for i, p in enumerate(model.parameters()) if p is model.lm_head.weight][0]
            assert not bit_equal(params[head_at], snap[0][head_at]), (what, step, "open step did not move the lm_head")
        opt.zero_grad(set_to_none=True)
        n_closed += closed
        bits.append(state_bits(gate))
    assert 0 < n_closed < steps and n_nan > 0, (what, n_closed, n_nan)
    assert_same_on_all_ranks(torch.stack(bits), what)
    log(f"{what}: {steps} steps, {n_closed} closed ({n_nan} with NaN on one rank), every rank bit-identical")


def check_fsdp2(mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    cfg = dict(window=4, threshold=0.3, max_reuse=4)
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = Tiny()
        fully_shard(model.mid, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        head = model.lm_head.weight
        assert isinstance(head, DTensor) and head.placements == (Shard(0),)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        gate = dgg.DynamicGradientGate(head, model.parameters(), backend=backend, **cfg)
        gate.attach(opt)
        assert gate.sharded
        train_and_check(model, opt, gate, [head], steps=40 if backend == "torch" else 20, seed=5, data_seed=100 + RANK,
                        what=f"FSDP2/{backend}", cfg=cfg)


def check_tp(mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    cfg = dict(window=4, threshold=0.3, max_reuse=4)
    torch.manual_seed(0)
    model = Tiny(head_bias=True)
    parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
    head = model.lm_head
    assert head.weight.placements == (Shard(0),) and head.bias.placements == (Shard(0),)
    # fused optimizers refuse DTensor and plain params in one group: split them
    dt = [p for p in model.parameters() if isinstance(p, DTensor)]
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    opt = torch.optim.AdamW([{"params": dt}, {"params": plain}], lr=1e-2, fused=True)
    gate = dgg.DynamicGradientGate([head.weight, head.bias], model.parameters(), backend="torch", **cfg)
    gate.attach(opt)
    assert gate.sharded
    # TP: every rank sees the same data
    train_and_check(model, opt, gate, [head.weight, head.bias], steps=40, seed=6, data_seed=200, what="TP colwise",
                    cfg=cfg)


# -- 4. torch.compile: the sharded step compiles (fullgraph) and equals eager ------------------------------------

def check_compile(mesh) -> None:
    shapes = [(37, 5)]
    cfg = dict(window=3, threshold=0.2)
    seq = make_sequence(31, 14, shapes, p_bad=0.0)
    gates = []
    for _ in range(2):
        mon = [nn.Parameter(distribute_tensor(torch.zeros(s), mesh, [Shard(0)])) for s in shapes]
        gates.append(dgg.DynamicGradientGate(mon, backend="torch", **cfg))
    eager, compiled = gates
    step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
    t0 = time.perf_counter()
    for ev in seq.events:
        if ev[0] == "new_batch":
            eager.new_batch()
            compiled.new_batch()
            continue
        set_grads(eager, ev[1], "dtensor", mesh)
        set_grads(compiled, ev[1], "dtensor", mesh)
        a, b = eager.step(), step()
        assert bool(a) == bool(b)
        assert torch.equal(state_bits(eager), state_bits(compiled))
        assert bit_equal(local(compiled.monitor[0].grad), local(eager.monitor[0].grad))
    assert_same_on_all_ranks(state_bits(compiled), "compiled")
    log(f"compile: fullgraph sharded step equals eager ({time.perf_counter() - t0:.1f}s)")


# -- 4b. rank agreement: plain replicas, gradients synchronized by hand, DDP -----------------------------------------

def check_agreement(mesh) -> None:
    """Every rank reaches the same decision, bit for bit, whatever each rank's gradient holds."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = dict(window=3, threshold=0.3, max_reuse=4)
    for backend in BACKENDS:
        # 1. plain tensors, a different gradient on each rank and no sync: one decision, the most cautious one
        w = nn.Parameter(torch.zeros(9, 4))
        gate = dgg.DynamicGradientGate(w, backend=backend, **cfg)
        assert gate.decision_group is dist.group.WORLD and not gate.sharded
        g = torch.Generator().manual_seed(5)  # the same on every rank: every rank knows every rank's gradient
        closed_at, bits = [], []
        for step in range(18):
            scales = [1.0 + (4.0 if step % 5 == 4 and r == step % WORLD else 0.0) for r in range(WORLD)]
            fulls = [torch.randn(9, 4, generator=g) * scales[r] for r in range(WORLD)]
            if step == 11:
                fulls[WORLD - 1][2, 1] = math.nan  # one rank only
            w.grad = fulls[RANK].clone()
            closed = bool(gate.step())
            energies = [f.double().square().sum().item() for f in fulls]
            got = gate.stats()["energy"].item()
            if step == 11:
                assert closed and math.isnan(got), (backend, step)
            else:
                assert math.isclose(got, max(energies), rel_tol=1e-5), (backend, step, got, energies)
            closed_at.append(closed)
            bits.append(state_bits(gate))
        assert_same_on_all_ranks(torch.stack(bits), f"{backend}: unsynchronized replicas")
        assert any(closed_at) and not all(closed_at), closed_at

    # 1b. the KL stop: each rank gives the KL of its own tokens; every rank judges their mean (plain replicas
    # and FSDP2-style shards alike), reaching one decision even where a rank's own KL says otherwise
    for backend in BACKENDS:
        for kind in ("plain", "sharded"):
            def param(x):
                return nn.Parameter(x if kind == "plain" else distribute_tensor(x, mesh, [Shard(0)]))

            w = param(torch.zeros(9, 4))
            gate = dgg.DynamicGradientGate(w, backend=backend, threshold=math.inf, target_kl=0.01, kl_factor=1.5,
                                           max_reuse=8)
            g = torch.Generator().manual_seed(9)  # the same on every rank
            gate.new_batch()
            closed_at, bits = [], []
            for step in range(10):
                full = torch.randn(9, 4, generator=g)
                w.grad = full.clone() if kind == "plain" else distribute_tensor(full, mesh, [Shard(0)])
                kls = (torch.rand(WORLD, generator=g) * 0.03).to(torch.float32)
                gate.observe_kl(kls[RANK].clone())
                closed = bool(gate.step())
                mean = kls.double().mean().item()
                assert gate.stats()["kl"].item() == float(torch.tensor(mean, dtype=torch.float32)), (backend, kind)
                reuse = gate.stats()["reuse_index"].item()
                assert closed == (reuse > 1 and mean > 0.015), (backend, kind, step, closed, mean)
                closed_at.append(closed)
                bits.append(state_bits(gate))
                if gate.should_stop():
                    gate.new_batch()
            assert any(closed_at) and not all(closed_at), (backend, kind, closed_at)
            assert_same_on_all_ranks(torch.stack(bits), f"{backend} {kind}: KL stop")

    # 2. gradients all-reduced by hand after backward (common in RL trainers): overlap is refused, the plain
    # step judges the synchronized gradient and matches a single-rank gate fed the mean gradient
    torch.manual_seed(0)
    model = Tiny()
    expect_error(ValueError, "overlap=True is not supported under torch.distributed",
                 lambda: dgg.DynamicGradientGate(model.lm_head.weight, model.parameters(), overlap=True))
    gate = dgg.DynamicGradientGate(model.lm_head.weight, model.parameters(), backend="torch", **cfg)
    gd = torch.Generator().manual_seed(100 + RANK)
    for step in range(10):
        ids = torch.randint(37, (4, 6), generator=gd)
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 37), ids[:, 1:].reshape(-1)) * (1 + 5 * (step == 7))
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        mean = model.lm_head.weight.grad.clone()
        closed = gate.step()
        assert math.isclose(gate.stats()["energy"].item(), mean.double().square().sum().item(), rel_tol=1e-5)
        assert_same_on_all_ranks(torch.stack([state_bits(gate)]), f"hand-synced step {step}")
        model.zero_grad(set_to_none=True)
        del closed

    # 3. DDP: the gate after backward sees the all-reduced gradient; a NaN written on one rank after the sync
    # (a local fault) closes every rank, and the fused AdamW skips on every rank
    torch.manual_seed(0)
    ddp = DistributedDataParallel(Tiny())
    head = ddp.module.lm_head.weight
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, fused=True)
    gate = dgg.DynamicGradientGate(head, ddp.parameters(), backend=BACKENDS[-1], window=3, threshold=math.inf)
    gate.attach(opt)
    gd = torch.Generator().manual_seed(200 + RANK)
    bits, n_closed = [], 0
    for step in range(12):
        ids = torch.randint(37, (4, 6), generator=gd)
        F.cross_entropy(ddp(ids[:, :-1]).reshape(-1, 37), ids[:, 1:].reshape(-1)).backward()
        if step in (5, 9) and RANK == step % WORLD:
            head.grad[0, 0] = math.nan
        snap = local_snapshot(ddp.module, opt)
        closed = bool(gate.step())
        assert closed == (step in (5, 9)), (step, closed)
        opt.step()
        if closed:
            params, state = local_snapshot(ddp.module, opt)
            assert all(bit_equal(a, b) for a, b in zip(params, snap[0])), ("DDP closed step moved a param", step)
        opt.zero_grad(set_to_none=True)
        n_closed += closed
        bits.append(state_bits(gate))
    assert_same_on_all_ranks(torch.stack(bits), "DDP")
    assert_same_on_all_ranks(torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]), "DDP params")

    # 4. decision_group: a group without this rank, or without a rank holding a shard, is refused
    only0 = dist.new_group([0])
    if RANK != 0:
        expect_error(ValueError, "decision_group does not contain this rank", lambda: dgg.DynamicGradientGate(
            nn.Parameter(torch.zeros(4)), decision_group=only0))
    solo = [dist.new_group([r]) for r in range(WORLD)][RANK]
    w = nn.Parameter(distribute_tensor(torch.zeros(8, 3), mesh, [Shard(0)]))
    expect_error(ValueError, "does not hold every rank that shares", lambda: dgg.DynamicGradientGate(
        w, decision_group=solo))
    log("agreement: unsynchronized replicas, hand-synced grads and DDP reach one decision on every rank")


# -- 5. bad input: clear errors, nothing modified ----------------------------------------------------------------

def check_auto_inputs(mesh) -> None:
    """backend="auto" looks the same table point up on every rank, even where the shards differ in size."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from dgg_kernels.backends import auto

    rows = 2 * WORLD + 1  # uneven: some ranks hold one row more
    t = distribute_tensor(torch.zeros(rows, 5, dtype=torch.bfloat16), mesh, [Shard(0)])
    got = auto.monitor_dtype_and_bytes([t, torch.zeros(3)])
    every = [None] * WORLD
    dist.all_gather_object(every, got)
    assert all(e == got for e in every), every
    assert got == (torch.bfloat16, -(-rows * 5 // WORLD) * 2 + 12), got  # global entries / shards, rounded up
    local_rows = [None] * WORLD
    dist.all_gather_object(local_rows, t.to_local().shape[0])
    assert len(set(local_rows)) == 2, local_rows  # the case this guards: shards of 3 and of 2 rows


def check_errors(mesh) -> None:
    from dgg_kernels.autograd import GatedLinear

    mk = lambda shape, pl, m=mesh: nn.Parameter(distribute_tensor(torch.zeros(shape), m, pl))  # noqa: E731
    w = mk((8, 3), [Shard(0)])
    # a process_group without this rank (new_group is called by every rank)
    only0 = dist.new_group([0])
    if RANK != 0:
        expect_error(ValueError, "does not contain this rank", lambda: dgg.DynamicGradientGate(
            nn.Parameter(torch.zeros(4)), process_group=only0))
    expect_error(TypeError, "must be a torch.distributed.ProcessGroup", lambda: dgg.DynamicGradientGate(
        nn.Parameter(torch.zeros(4)), process_group="world"))
    # meshes disagree
    other = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("a", "b"))
    expect_error(ValueError, "must live on one device mesh", lambda: dgg.DynamicGradientGate(
        [w, mk((8, 3), [Replicate(), Shard(0)], other)]))
    # groups disagree: sharded vs replicated over the same mesh
    expect_error(ValueError, "split over the same mesh dimensions", lambda: dgg.DynamicGradientGate(
        [w, mk((8,), [Replicate()])]))
    # DTensor and plain shards without a group
    expect_error(ValueError, "no process_group was given", lambda: dgg.DynamicGradientGate(
        [w, nn.Parameter(torch.zeros(3))]))
    # a group whose ranks are not the DTensor's shards
    v = mk((8, 3), [Replicate(), Shard(0)], other)  # sharded over mesh dim 1: all ranks
    solo = [dist.new_group([r]) for r in range(WORLD)][RANK]
    expect_error(ValueError, "must hold exactly the ranks", lambda: dgg.DynamicGradientGate(v, process_group=solo))
    # a Partial parameter at construction
    expect_error(ValueError, "Partial", lambda: dgg.DynamicGradientGate(
        nn.Parameter(DTensor.from_local(torch.zeros(4, 3), mesh, [Partial()], run_check=False))))
    # overlap, GatedLinear
    expect_error(ValueError, "overlap=True is not supported", lambda: dgg.DynamicGradientGate(w, overlap=True))
    expect_error(ValueError, "overlap=True is not supported", lambda: dgg.DynamicGradientGate(
        nn.Parameter(torch.zeros(3)), process_group=dist.group.WORLD, overlap=True))
    lin = nn.Linear(3, 8, bias=False)
    lin.weight = w
    expect_error(ValueError, "a gated linear layer cannot", lambda: GatedLinear(lin, dgg.DynamicGradientGate(w)))

    # a Partial gradient at step(): refused before anything is written
    gate = dgg.DynamicGradientGate(w, window=2)
    w.grad = distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)], src_data_rank=None)
    gate.step()
    before_state = state_bits(gate)
    pgrad = DTensor.from_local(torch.randn(8, 3), mesh, [Partial()], run_check=False)
    w.grad = pgrad
    before_grad = pgrad.to_local().clone()
    expect_error(ValueError, "Partial gradient is not reduced yet", gate.step)
    assert torch.equal(state_bits(gate), before_state) and torch.equal(pgrad.to_local(), before_grad)
    # a plain gradient on a DTensor monitor cannot be set (autograd checks); a grad on another mesh:
    w2 = mk((8, 3), [Shard(0)])
    gate2 = dgg.DynamicGradientGate(w2, window=2)
    w2.grad = distribute_tensor(torch.randn(8, 3), other, [Replicate(), Shard(0)], src_data_rank=None)
    s0 = state_bits(gate2)
    expect_error(ValueError, "but the gate was built for", gate2.step)
    assert torch.equal(state_bits(gate2), s0)
    log("errors: every bad input refused with a clear message, nothing modified")


def main_case() -> None:
    mesh = init_device_mesh("cpu", (WORLD,))
    t00 = time.perf_counter()
    for check in (check_errors, check_auto_inputs, check_agreement, check_sequences, check_state_dict, check_fsdp2,
                  check_tp, check_compile):
        t0 = time.perf_counter()
        check(mesh)
        log(f"{check.__name__}: {time.perf_counter() - t0:.1f}s")
    log(f"checks took {time.perf_counter() - t00:.1f}s")


def mesh2d_case() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    assert WORLD == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    cfg = dict(window=4, threshold=0.3, max_reuse=4)
    for one_group in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
        for m in (model.mid, model.lm_head, model):
            fully_shard(m, mesh=mesh["dp"])
        head = model.lm_head.weight
        assert head.device_mesh.ndim == 2 and all(p.is_shard() or "StridedShard" in type(p).__name__
                                                  for p in head.placements), head.placements
        dt = [p for p in model.parameters() if isinstance(p, DTensor) and p.device_mesh.ndim == 2]
        rest = [p for p in model.parameters() if not any(p is q for q in dt)]
        opt = torch.optim.AdamW([{"params": dt}, {"params": rest}], lr=1e-2, fused=True)
        # one_group: the group named by hand; else the mesh's ranks (the whole world): one gather either way
        gate = dgg.DynamicGradientGate(head, model.parameters(), backend="torch",
                                       process_group=dist.group.WORLD if one_group else None, **cfg)
        assert gate._sharding.n_sets == 1 and gate._sharding.ranks == list(range(WORLD))
        gate.attach(opt)
        # FSDP shards the batch over dp; TP ranks of one dp group see the same data
        dp = mesh.get_coordinate()[0]
        train_and_check(model, opt, gate, [head], steps=20, seed=8, data_seed=300 + dp,
                        what=f"FSDP2xTP ({'one group' if one_group else 'per mesh dim'})", cfg=cfg)
    hsdp_check(init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    stage_check(mesh)


def stage_check(mesh) -> None:
    """Only some ranks step a gate (a pipeline's last stage: ranks 2 and 3 hold the lm_head, sharded over a 1-D
    sub-mesh): its decision group is that sub-mesh, also when its group is passed as process_group, so the other
    ranks take part in nothing."""
    sub = mesh["tp"]  # rows of the 2 x 2 mesh: ranks (0, 1) and (2, 3)
    if RANK >= 2:
        for pg in (None, sub.get_group(0)):
            w = nn.Parameter(distribute_tensor(torch.zeros(9, 4), sub, [Shard(0)]))
            gate = dgg.DynamicGradientGate(w, backend="torch", window=2, threshold=1e9, process_group=pg)
            assert sorted(dist.get_process_group_ranks(gate.decision_group)) == [2, 3]
            for k in range(3):
                full = torch.randn(9, 4, generator=torch.Generator().manual_seed(k))
                if k == 2:
                    full[8, 3] = math.nan  # in rank 3's shard only
                w.grad = distribute_tensor(full, sub, [Shard(0)], src_data_rank=None)
                assert bool(gate.step()) == (k == 2)
    dist.barrier()
    log("a gate stepped by ranks 2 and 3 only combined over them")


def hsdp_check(mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    cfg = dict(window=4, threshold=0.3, max_reuse=4)
    torch.manual_seed(0)
    model = Tiny()
    for m in (model.mid, model.lm_head, model):
        fully_shard(m, mesh=mesh)  # a 2-D mesh: HSDP, replicate over dim 0, shard over dim 1
    head = model.lm_head.weight
    assert head.placements == (Replicate(), Shard(0)), head.placements
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    gate = dgg.DynamicGradientGate(head, model.parameters(), backend="torch", **cfg)
    assert gate._sharding.n_sets == 2 and gate._sharding.ranks == sorted(mesh.mesh[mesh.get_coordinate()[0]].tolist())
    gate.attach(opt)
    # HSDP all-reduces across replicas, so a replica holds the same shard values: poison shard r % 2 everywhere;
    # the data differs per replica group only (FSDP2 reduce-scatters the shard group's batch)
    shard = mesh.get_coordinate()[1]
    train_and_check(model, opt, gate, [head], steps=20, seed=9, data_seed=400 + RANK, what="HSDP", cfg=cfg,
                    holds=lambda r: r % 2 == shard)


# -- TRL -------------------------------------------------------------------------------------------------------

def trl_case() -> None:
    import tempfile

    from transformers import Qwen2ForCausalLM
    from transformers.distributed import DistributedConfig

    from dgg_kernels.integrations.trl import DGGGRPOTrainer
    from test_integrations_trl import _config, _dataset, _model, _reward, _tokenizer

    tok = _tokenizer()
    path = os.path.join(os.path.dirname(os.environ["DGG_STORE"]), "tiny-qwen2")
    if RANK == 0:
        _model(len(tok)).save_pretrained(path)
    dist.barrier()

    class Probe(DGGGRPOTrainer):
        poison_step = 1  # rank 1 only writes a NaN into its lm_head shard at this optimizer step

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.seen, self.snapshots = [], {}

        def _clip_grad_norm(self, model):
            step = self.state.global_step
            head = self.model.get_output_embeddings().weight
            opt = getattr(self.optimizer, "optimizer", self.optimizer)
            self.snapshots[step] = local_snapshot(self.model, opt)
            if step == self.poison_step and RANK == 1:
                head.grad.to_local().view(-1)[3] = math.nan
            raw = float(head.grad.full_tensor().norm())  # the unclipped gradient, as one process would see it
            out = super()._clip_grad_norm(model)
            s = self.gate.stats()
            self.seen.append((step, raw, float(s["norm"]), bool(s["closed"]), int(s["reuse_index"])))
            return out

    model = Qwen2ForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=WORLD))
    out_dir = tempfile.mkdtemp()
    tr = Probe(model=model, reward_funcs=_reward, args=_config(out_dir, max_steps=6), train_dataset=_dataset(),
               processing_class=tok, gate_threshold=1e9)
    head = tr.model.get_output_embeddings().weight
    assert isinstance(head, DTensor) and tr.gate.sharded and tr.gate.monitor[0] is head
    tr.train()
    assert [s for s, *_ in tr.seen] == list(range(6))
    for step, raw, gate_norm, closed, _ in tr.seen:
        assert closed == (step == Probe.poison_step), (step, closed)
        if not closed:
            assert gate_norm == pytest_approx(raw), (step, raw, gate_norm)
    assert [r for *_, r in tr.seen] == [1, 2, 1, 2, 3, 4]  # the close cut batch 1 short: regenerated on every rank
    assert tr.dgg_early_stops == 1 and tr.dgg_regenerations == 2
    assert all(bit_equal(a, b) for a, b in zip(tr.snapshots[1][0], tr.snapshots[2][0]))  # the closed step moved nothing
    assert all(bit_equal(a, b) for a, b in zip(tr.snapshots[1][1], tr.snapshots[2][1]))  # nor the AdamW state
    opt = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert float(opt.state[head]["step"]) == 5
    assert_same_on_all_ranks(state_bits(tr.gate), "trl gate")
    log("TRL + FSDP2 (DistributedConfig): gate judged the raw full gradient, NaN on rank 1 closed every rank")

    # accelerate's FSDP2 prepare (GPU only) shards the model in place after the trainer is built and swaps the
    # optimizer's parameters; do the same by hand and check the trainer's rebuild
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    tr2 = DGGGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=_config(tempfile.mkdtemp(), max_steps=2),
                         train_dataset=_dataset(), processing_class=tok, gate_threshold=1e9)
    assert not tr2.gate.sharded
    opt = tr2.create_optimizer()
    opt = getattr(opt, "optimizer", opt)
    before = list(tr2.model.named_parameters())
    for layer in tr2.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(tr2.model, mesh=mesh)
    after = dict(tr2.model.named_parameters())
    # accelerate keys its mapping by the bound method p.data_ptr (see accelerate's fsdp2_prepare_model)
    fsdp2_switch_optimizer_parameters(opt, {p.data_ptr: after[n] for n, p in before})
    tr2._dgg_rebind()
    head = tr2.model.get_output_embeddings().weight
    assert isinstance(head, DTensor) and tr2.gate.monitor[0] is head and tr2.gate.sharded
    ids = torch.randint(len(tok), (2, 6), generator=torch.Generator().manual_seed(RANK))
    for poison in (False, True):
        tr2.model(ids).logits.float().square().mean().backward()
        if poison and RANK == 0:
            head.grad.to_local().view(-1)[0] = math.inf
        snap = local_snapshot(tr2.model, opt)
        tr2._clip_grad_norm(tr2.model)  # the gate steps here, then accelerate clips
        opt.step()  # the rebuilt gate's attach hook hands its decision to the fused AdamW
        new = local_snapshot(tr2.model, opt)
        moved = not all(bit_equal(a, b) for a, b in zip(new[0], snap[0]))
        assert bool(tr2.gate.stats()["closed"]) == poison and moved == (not poison), (poison, moved)
        opt.zero_grad(set_to_none=True)
    log("TRL: the gate rebuilt after accelerate-style FSDP2 sharding watches the DTensor lm_head and skips AdamW")


def pytest_approx(x, rel=1e-5):
    import pytest

    return pytest.approx(x, rel=rel)


if __name__ == "__main__":
    run_case({"main": main_case, "mesh2d": mesh2d_case, "trl": trl_case})
