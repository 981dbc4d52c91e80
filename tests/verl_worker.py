"""One rank of the verl integration tests (test_integrations_verl.py): verl 0.9's FSDP2 engine on CPU with gloo.

Run as ``python tests/verl_worker.py CASE`` with RANK, WORLD_SIZE and DGG_STORE
(a FileStore path) in the environment, and DGG_VERL_DIR (a folder shared by
the ranks).  Every check raises on failure; a rank that finishes prints
"RANK <r> OK <case>".

Cases (main = gate then open, at world size 1 and 2 in one launch):
  gate   DGGActorRolloutRefWorker (role "actor", built from verl's own ppo_trainer config with an
         ``actor_rollout_ref.actor.dgg`` section) over rollout batches of 3 epochs x 2 mini-batches: a surge
         injected into the lm_head gradient mid-pass closes the gate at exactly that step, on every rank; a NaN
         on the last rank alone closes every rank at the first step of a batch; the closed step leaves every
         rank's parameter shard and optimizer state bit-identical; the rest of the batch is not run; the LR
         scheduler steps exactly once per rollout batch; the gate's state is the same on every rank, and it is
         saved with verl's checkpoint and restored into a fresh worker.
  open   the same worker with threshold=inf (the observer mode) against plain verl (ActorRolloutRefWorker): the
         parameters, optimizer state, losses, grad norms and learning rates are bit-identical, batch after batch.
  config (world size 1) the settings and what is refused: dgg keys, FSDP1, Megatron, fp16, LoRA, a non-fused
         optimizer; max_reuse below ppo_epochs (the loop stops at max_reuse passes, the scheduler still steps
         once); prepare_config and verl's validate_config on the example of docs/integrations.md; the
         ``python -m dgg_kernels.integrations.verl`` entry point; the DGG trainers in verl's trainer registry.
  hooks  (world size 1) a verl whose private hook points changed fails loudly instead of training ungated: an
         initialize() that builds through a renamed method, an init_model that ignores actor_worker_cls, a gate
         missing when training starts, a train_mini_batch that bypasses train_batch.
  refusals (world size 1) LoRA, fp16 with verl's scaler, an optimizer without a fused step, fused=false and
         foreach=true are refused by prepare_config (the entry point, before Ray), before it changes the config,
         and by the worker's constructor with the same message.
  defaults (world size 1) with verl's default optimizer settings the engine logs that it builds AdamW with
         fused=True; every dgg/ metric of update_actor is documented in docs/integrations.md's verl section.
"""
from __future__ import annotations

import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import verl_cpu  # noqa: E402

verl_cpu.setup()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dgg_kernels.integrations import verl as dv  # noqa: E402
from dgg_kernels.integrations.checkpoint import GATE_FILE  # noqa: E402
from rank_checks import assert_same_on_all_ranks, expect_error, state_bits  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
SHARED = os.environ["DGG_VERL_DIR"]
EPOCHS = 3
ROWS = 8  # per rank
MINI = 4 * WORLD  # global mini-batch: 4 rows per rank, so 2 mini-batches per epoch
PER_PASS = ROWS // 4


def log(*a):
    print(f"[rank {RANK}]", *a, flush=True)


def model_path() -> str:
    path = os.path.join(SHARED, "model")
    if RANK == 0 and not os.path.exists(os.path.join(path, "config.json")):
        verl_cpu.save_tiny_model(path)
    dist.barrier()
    return path


def make_worker(dgg: dict | None, *, overrides=(), epochs=EPOCHS):
    cfg = verl_cpu.actor_config(model_path(), ppo_epochs=epochs, mini_batch=MINI, dgg=dgg, overrides=overrides)
    cls = dv.DGGActorRolloutRefWorker if dgg is not None else dv.ActorRolloutRefWorker
    worker = cls(cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def batch(i: int, epochs=EPOCHS):
    return verl_cpu.rollout_batch(ROWS, seed=1000 * i + RANK, epochs=epochs, mini_batch=MINI)


def metrics_of(out) -> dict:
    if out is None:
        return {}
    from verl.utils import tensordict_utils as tu

    return tu.get(out, "metrics")


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def snapshot(engine) -> list[torch.Tensor]:
    """This rank's parameter shards and every optimizer state tensor (step counts included), copied."""
    out = [local(p).detach().clone() for p in engine.module.parameters()]
    for p in engine.module.parameters():
        for v in engine.optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                out.append(local(v).detach().clone())
    return out


def bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype
        and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        for x, y in zip(a, b)
    )






class Probe:
    """Wraps one engine's optimizer_step (an instance attribute; verl's train_batch calls self.optimizer_step):
    injects a gradient fault at chosen steps, and records each step's decision and whether it changed anything."""

    def __init__(self, engine):
        self.engine = engine
        self.inner = engine.optimizer_step
        engine.optimizer_step = self
        self.faults: dict[int, str] = {}  # global step index -> "surge" | "nan" | "nan_last_rank"
        self.steps = 0
        self.log: list[tuple[int, bool, bool]] = []  # (step, closed, state changed)

    def __call__(self):
        k = self.steps
        self.steps += 1
        fault = self.faults.get(k)
        grad = local(self.engine.module.lm_head.weight.grad)
        if fault == "surge":
            grad.mul_(1e4)
        elif fault == "nan_last_rank" and RANK == WORLD - 1 and grad.numel():
            grad.view(-1)[0] = math.nan
        before = snapshot(self.engine)
        out = self.inner()
        closed = bool(self.engine.dgg.gate.stats()["closed"])
        changed = not bits_equal(before, snapshot(self.engine))
        self.log.append((k, closed, changed))
        return out


# -- gate ---------------------------------------------------------------------------------------------------------

def gate_case() -> None:
    worker = make_worker({"enable": True, "window": 3, "threshold": 10.0, "statistic": "norm"})
    engine = worker.actor.engine
    assert type(worker.actor) is dv.DGGTrainingWorker and type(engine) is dv.DGGFSDPEngine
    gate = worker.actor.gate
    assert gate is engine.dgg.gate and gate.config.max_reuse == EPOCHS and gate.config.threshold == 10.0
    assert gate.sharded or WORLD == 1, "FSDP2's lm_head should be a DTensor shard the gate combines"
    assert engine.optimizer.param_groups[0].get("fused") is True
    probe = Probe(engine)
    per_batch = PER_PASS * EPOCHS
    plan = [  # (fault: (step within the batch, kind) or None, optimizer steps run, passes, skipped mini-batches)
        (None, per_batch, EPOCHS, 0),
        ((PER_PASS + 1, "surge"), PER_PASS + 2, 2, per_batch - PER_PASS - 2),  # pass 2, its second mini-batch
        ((0, "nan_last_rank"), 1, 1, per_batch - 1),  # the batch's first step (reuse index 1), one rank's NaN
        (None, per_batch, EPOCHS, 0),
    ]
    lrs = []
    for i, (fault, ran, passes, skipped) in enumerate(plan):
        start = probe.steps
        probe.faults = {} if fault is None else {start + fault[0]: fault[1]}
        closed_at = None if fault is None else start + fault[0]
        m = metrics_of(worker.update_actor(batch(i)))
        assert probe.steps - start == ran, f"batch {i}: {probe.steps - start} optimizer steps ran, expected {ran}"
        assert engine.lr_scheduler.last_epoch == i + 1, (
            f"batch {i}: the LR scheduler stepped {engine.lr_scheduler.last_epoch} times in {i + 1} batches")
        for k, closed, changed in probe.log[start:]:
            assert closed == (k == closed_at), f"batch {i} step {k}: closed={closed}, expected a close at {closed_at}"
            assert changed != closed, f"batch {i} step {k}: closed={closed} but the state changed={changed}"
        if m:  # the ranks that return metrics
            assert m["dgg/passes"] == passes and m["dgg/skipped_mini_batches"] == skipped, (i, m)
            assert m["dgg/mini_batches"] == ran and len(m["grad_norm"]) == ran, (i, m)
            assert m["dgg/closed"] == float(closed_at is not None), (i, m)
            assert len(m["lr"]) == 1, f"batch {i}: lr reported {m['lr']}"
            lrs.append(m["lr"][0])
            if closed_at is not None:
                assert m["grad_norm"][-1] == 0.0  # verl clips after the gate: a discarded step's gradient is zero
        assert_same_on_all_ranks(state_bits(gate), f"gate state after batch {i}")
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs), lrs  # cosine decay, one step per batch
    assert_same_on_all_ranks(torch.tensor([c for _, c, _ in probe.log]), "decisions")
    s = gate.stats()
    assert int(s["closed_total"]) == 2 and int(s["accepted"]) == probe.steps - 2

    # the gate's state travels with verl's checkpoint of the actor
    ckpt = os.path.join(SHARED, "ckpt", "actor")
    worker.save_checkpoint(ckpt, global_step=len(plan))
    dist.barrier()
    assert os.path.isfile(os.path.join(ckpt, GATE_FILE))
    saved = state_bits(gate)
    fresh = make_worker({"enable": True, "window": 3, "threshold": 10.0, "statistic": "norm"})
    assert not torch.equal(state_bits(fresh.actor.gate), saved)
    fresh.load_checkpoint(ckpt)
    assert torch.equal(state_bits(fresh.actor.gate), saved), "the restored gate differs from the saved one"
    assert bits_equal(snapshot(fresh.actor.engine), snapshot(engine))


# -- open ---------------------------------------------------------------------------------------------------------

def open_case() -> None:
    plain = make_worker(None)
    gated = make_worker({"enable": True, "window": 3, "threshold": "inf"})
    assert type(plain.actor.engine).__name__ == "FSDPEngineWithLMHead" and not hasattr(plain.actor, "gate")
    assert math.isinf(gated.actor.gate.config.threshold)
    assert bits_equal(snapshot(plain.actor.engine), snapshot(gated.actor.engine))
    for i in range(3):
        mp = metrics_of(plain.update_actor(batch(i)))
        mg = metrics_of(gated.update_actor(batch(i)))
        assert bits_equal(snapshot(plain.actor.engine), snapshot(gated.actor.engine)), f"batch {i}: state differs"
        if mp:
            assert {k for k in mg if not k.startswith("dgg/")} == set(mp), (sorted(mg), sorted(mp))
            for key in ("loss", "grad_norm", "lr", "actor/pg_loss"):
                assert list(map(float, mp[key])) == list(map(float, mg[key])), (i, key, mp[key], mg[key])
            assert mg["dgg/closed"] == 0.0 and mg["dgg/passes"] == EPOCHS and mg["dgg/skipped_mini_batches"] == 0
            assert mg["dgg/z"] != 0.0  # the window is full (3 of 6 steps in): z is computed, it just never closes
    assert plain.actor.engine.lr_scheduler.last_epoch == gated.actor.engine.lr_scheduler.last_epoch == 3


# -- config (world size 1) ----------------------------------------------------------------------------------------



def config_case() -> None:
    import warnings

    from omegaconf import OmegaConf

    path = model_path()

    def actor(dgg, *overrides):
        return verl_cpu.actor_config(path, mini_batch=MINI, dgg=dgg, overrides=overrides).actor_rollout_ref.actor

    on = {"enable": True}
    cfg = dv.gate_config_from_actor(actor({**on, "window": 5, "statistic": "energy+increment",
                                           "window_mode": "batch"}))
    assert (cfg.window, cfg.statistic, cfg.window_mode, cfg.max_reuse) == (5, "energy+increment", "batch", EPOCHS)
    assert dv.gate_config_from_actor(actor({"enable": False, "window": 5})) is None
    assert dv.gate_config_from_actor(actor(None)) is None
    expect_error(ValueError, "unknown key(s) ['windw']", lambda: dv.gate_config_from_actor(actor({**on, "windw": 5})))
    expect_error(ValueError, "dgg.target_kl: the KL stop is not wired",
                 lambda: dv.gate_config_from_actor(actor({**on, "target_kl": 0.01})))
    expect_error(ValueError, "unknown key(s)", lambda: dv.gate_config_from_actor(actor({"enable": False, "windw": 5})))
    expect_error(ValueError, "window must be an int >= 2", lambda: dv.gate_config_from_actor(actor({**on, "window": 1})))
    expect_error(ValueError, "enable must be true or false", lambda: dv.gate_config_from_actor(actor({"enable": "yes"})))
    e = expect_error(ValueError, "FSDP1", lambda: dv.gate_config_from_actor(actor(on, "actor_rollout_ref.actor.strategy=fsdp")))
    assert "strategy=fsdp2" in str(e)
    e = expect_error(ValueError, "Megatron", lambda: dv.gate_config_from_actor(
        actor(on, "actor_rollout_ref.actor.strategy=megatron")))
    assert "process_group" in str(e)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dv.gate_config_from_actor(actor(on, "actor_rollout_ref.actor.ppo_epochs=1"))
    assert any("only closes on non-finite" in str(x.message) for x in w), [str(x.message) for x in w]
    # a worker refuses before it builds anything
    expect_error(ValueError, "FSDP1", lambda: make_worker(on, overrides=("actor_rollout_ref.actor.strategy=fsdp",)))
    # and the engine, once it knows the optimizer, precision and LoRA setting
    expect_error(ValueError, "fused=True", lambda: make_worker(
        on, overrides=("++actor_rollout_ref.actor.optim.override_optimizer_config.fused=false",)))
    expect_error(ValueError, "torch.optim", lambda: make_worker(
        on, overrides=("actor_rollout_ref.actor.optim.optimizer=RMSprop",)))
    expect_error(ValueError, "fp16 with a gradient scaler", lambda: make_worker(
        on, overrides=("++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp16",)))
    expect_error(ValueError, "LoRA", lambda: make_worker(on, overrides=("actor_rollout_ref.model.lora_rank=4",
                                                                  "actor_rollout_ref.model.target_modules=all-linear")))

    # max_reuse below ppo_epochs: the loop stops after max_reuse passes; the scheduler still steps once
    worker = make_worker({**on, "max_reuse": 2, "threshold": "inf"})
    for i in range(2):
        m = metrics_of(worker.update_actor(batch(i)))
        assert m["dgg/passes"] == 2 and m["dgg/mini_batches"] == 2 * PER_PASS, m
        assert m["dgg/skipped_mini_batches"] == PER_PASS * (EPOCHS - 2) and len(m["lr"]) == 1, m
        assert worker.actor.engine.lr_scheduler.last_epoch == i + 1

    # verl's trainer config: the DGG trainer, Ray's setup hook, and a copy verl's validate_config accepts
    from verl.utils.config import validate_config

    full = verl_cpu.actor_config(path, mini_batch=MINI, dgg=on, overrides=(
        "data.train_batch_size=8", "trainer.nnodes=1"))
    checked = dv.prepare_config(full)
    assert full.trainer.v1.trainer_mode == "dgg_sync"
    assert full.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == dv.SETUP_HOOK
    assert "dgg" in full.actor_rollout_ref.actor and "dgg" not in checked.actor_rollout_ref.actor
    validate_config(checked, use_reference_policy=False, use_critic=False)
    expect_error(Exception, "dgg", lambda: validate_config(full, use_reference_policy=False, use_critic=False))
    again = dv.prepare_config(full)  # idempotent: dgg_sync stays dgg_sync
    assert full.trainer.v1.trainer_mode == "dgg_sync" and OmegaConf.to_container(again) == OmegaConf.to_container(
        checked)
    expect_error(ValueError, "use_v1", lambda: dv.prepare_config(verl_cpu.actor_config(
        path, mini_batch=MINI, dgg=on, overrides=("trainer.use_v1=false",))))
    expect_error(ValueError, "separate_async", lambda: dv.prepare_config(verl_cpu.actor_config(
        path, mini_batch=MINI, dgg=on, overrides=("trainer.v1.trainer_mode=separate_async",))))
    # the example in docs/integrations.md composes, prepares and passes verl's checks
    example = docs_example()
    assert any(a.startswith("++actor_rollout_ref.actor.dgg.") for a in example), example
    import verl.trainer
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.trainer.__file__), "config"),
                               version_base=None):
        doc_cfg = compose(config_name="ppo_trainer", overrides=example)
    doc_checked = dv.prepare_config(doc_cfg)
    assert doc_cfg.trainer.v1.trainer_mode == "dgg_sync"
    assert dv.gate_config_from_actor(doc_cfg.actor_rollout_ref.actor).threshold == 0.3
    validate_config(doc_checked, use_reference_policy=False, use_critic=False)
    # the entry point, as a user runs it (Hydra's --cfg job prints the composed config and runs nothing)
    import subprocess

    run = subprocess.run(
        [sys.executable, "-m", "dgg_kernels.integrations.verl", "--cfg", "job",
         "actor_rollout_ref.actor.dgg.enable=true", "+actor_rollout_ref.actor.dgg.threshold=0.5"],
        capture_output=True, text=True, timeout=300, cwd=SHARED,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    printed = OmegaConf.create(run.stdout)
    assert OmegaConf.to_container(printed.actor_rollout_ref.actor.dgg) == {"enable": True, "threshold": 0.5}

    try:
        import transfer_queue  # noqa: F401  (verl's v1 trainer imports it; .ci/verl.sh installs it)
    except ImportError:
        log("transfer_queue not installed: register_trainers() not exercised")
        return
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSync, get_trainer_cls

    dv.ray_setup()  # what Ray runs in every worker process: registers, and again without complaint
    dv.ray_setup()
    trainers = dv.register_trainers()
    assert sorted(trainers) == ["dgg_colocate_async", "dgg_sync"]
    assert get_trainer_cls("dgg_sync") is trainers["dgg_sync"] and issubclass(trainers["dgg_sync"], PPOTrainerSync)
    assert issubclass(trainers["dgg_colocate_async"], PPOTrainerColocateAsync)
    for ref, role in ((False, Role.ActorRollout), (True, Role.ActorRolloutRef)):
        cfg = verl_cpu.actor_config(path, mini_batch=MINI, dgg=on, overrides=(
            "data.train_batch_size=8", "trainer.nnodes=1") + (("actor_rollout_ref.actor.use_kl_loss=true",)
                                                             if ref else ()))
        dv.prepare_config(cfg)
        trainer = trainers["dgg_sync"].__new__(trainers["dgg_sync"])
        trainer.config = cfg
        trainer._init_resource_pool_mgr()  # verl's, then the actor role gets the DGG worker
        remote = trainer.role_worker_mapping[role]
        assert issubclass(remote.__ray_metadata__.modified_class, dv.DGGActorRolloutRefWorker), (role, remote)


def docs_example() -> list[str]:
    """The overrides of the ``python -m dgg_kernels.integrations.verl`` example in docs/integrations.md, as the
    module's main() hands them to Hydra."""
    return dv.hydra_overrides(verl_cpu.docs_example_args())


# -- hooks (world size 1): a verl whose private hook points changed must not train ungated ---------------------------

def hooks_case() -> None:
    import functools
    import inspect
    import textwrap

    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    on = {"enable": True, "window": 3}
    failures = []  # every scenario runs, so that a failure report lists each one that trained ungated

    def refused(what: str, fragment: str, fn) -> None:
        try:
            expect_error(RuntimeError, fragment, fn)
        except AssertionError as e:
            failures.append(f"{what}: {e}")

    # a verl whose initialize() builds the model and optimizer through a renamed method: verl's own builder runs,
    # DGGFSDPEngine._build_model_optimizer (where the gate is built) never does
    saved = FSDPEngine.__dict__["initialize"], FSDPEngine.__dict__["_build_model_optimizer"]
    source = textwrap.dedent(inspect.getsource(saved[0]))
    assert "self._build_model_optimizer()" in source, "verl's initialize() changed: update this simulation"
    scope: dict = {}
    exec(source.replace("self._build_model_optimizer()", "self._build_model_and_optimizer()"),
         vars(sys.modules[FSDPEngine.__module__]), scope)
    FSDPEngine.initialize = scope["initialize"]
    FSDPEngine._build_model_and_optimizer = saved[1]
    del FSDPEngine._build_model_optimizer
    try:
        refused("renamed builder", "_build_model_optimizer", lambda: make_worker(on))
    finally:
        FSDPEngine.initialize, FSDPEngine._build_model_optimizer = saved
        del FSDPEngine._build_model_and_optimizer

    # a verl whose init_model no longer builds the actor from actor_worker_cls
    cfg = verl_cpu.actor_config(model_path(), ppo_epochs=EPOCHS, mini_batch=MINI, dgg=on)
    worker = dv.DGGActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    worker.actor_worker_cls = dv.TrainingWorker
    refused("actor_worker_cls ignored", "actor_worker_cls", worker.init_model)

    # a gated worker whose gate is missing when training starts: refused, not run as plain verl
    worker = make_worker(on)
    engine = worker.actor.engine
    dgg, engine.dgg = engine.dgg, None
    before = snapshot(engine)
    refused("gate missing at train_mini_batch", "never built", lambda: worker.update_actor(batch(0)))
    if not bits_equal(before, snapshot(engine)):
        failures.append("gate missing at train_mini_batch: the batch changed the model")
    engine.dgg = dgg

    # a verl whose train_mini_batch no longer runs the mini-batches through TrainingWorker.train_batch (the
    # gate's loop): the gate would still step, but the rest of a closed batch would run
    worker.actor.train_batch = functools.partial(dv.TrainingWorker.train_batch, worker.actor)
    refused("train_batch bypassed", "train_batch", lambda: worker.update_actor(batch(1)))
    assert not failures, "\n".join(failures)


# -- refusals (world size 1): what the gate does not support is refused before Ray starts -------------------------

def refusals_case() -> None:
    from omegaconf import OmegaConf

    path = model_path()
    on = {"enable": True}
    unsupported = {
        "LoRA": ("actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.target_modules=all-linear"),
        "fp16 with a gradient scaler": ("++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp16",),
        "optimizer_impl=torch.optim": ("actor_rollout_ref.actor.optim.optimizer=RMSprop",),
        "fused=True": ("++actor_rollout_ref.actor.optim.override_optimizer_config.fused=false",),
        "remove fused/foreach": ("++actor_rollout_ref.actor.optim.override_optimizer_config.foreach=true",),
    }
    failures = []
    for what, overrides in unsupported.items():
        # the entry point's check, before ray.init: the config is refused before anything in it is changed
        full = verl_cpu.actor_config(path, mini_batch=MINI, dgg=on, overrides=overrides + (
            "data.train_batch_size=8", "trainer.nnodes=1"))
        try:
            dv.prepare_config(full)
        except ValueError as e:
            entry = str(e)
        else:
            failures.append(f"{what}: prepare_config (the entry point, before Ray) accepted it")
            continue
        if what not in entry:
            failures.append(f"{what}: prepare_config refused it with {entry!r}")
        if full.trainer.v1.trainer_mode != "sync" or OmegaConf.select(
                full, "ray_kwargs.ray_init.runtime_env.worker_process_setup_hook") is not None:
            failures.append(f"{what}: prepare_config changed the config before refusing it")
        # the worker: the same check, the same message, before it builds anything
        try:
            dv.DGGActorRolloutRefWorker(full.actor_rollout_ref, role="actor")
        except ValueError as e:
            if str(e) != entry:
                failures.append(f"{what}: the worker says {str(e)!r}, the entry point {entry!r}")
        else:
            failures.append(f"{what}: the worker's constructor accepted it")
    assert not failures, "\n".join(failures)
    # with the gate off, none of it is the gate's business
    off = verl_cpu.actor_config(path, mini_batch=MINI, dgg={"enable": False}, overrides=unsupported["LoRA"] + (
        "data.train_batch_size=8", "trainer.nnodes=1"))
    dv.prepare_config(off)


# -- defaults (world size 1): what the engine changes in verl's defaults is said, and its metrics are documented ---

def defaults_case() -> None:
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.INFO)
    logger = logging.getLogger(dv.__name__)
    logger.addHandler(handler)
    try:
        # verl's default optimizer settings (override_optimizer_config unset: torch's unfused AdamW)
        cfg = verl_cpu.actor_config(model_path(), ppo_epochs=EPOCHS, mini_batch=MINI, fused=None,
                                    dgg={"enable": True, "window": 3})
        worker = dv.DGGActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
        worker.init_model()
    finally:
        logger.removeHandler(handler)
    assert worker.actor.engine.optimizer.param_groups[0].get("fused") is True
    problems = []
    if not any("fused=True" in r.getMessage() for r in records if r.levelno >= logging.INFO):
        problems.append(f"building AdamW with fused=True over verl's default was not logged: "
                        f"{[r.getMessage() for r in records]}")
    m = metrics_of(worker.update_actor(batch(0)))
    text = open(os.path.join(os.path.dirname(HERE), "docs", "integrations.md")).read()
    section = text[text.index("## verl"):]
    undocumented = sorted(k for k in m if k.startswith("dgg/") and f"`{k}`" not in section)
    if undocumented:
        problems.append(f"metrics missing from docs/integrations.md's verl section: {undocumented}")
    assert not problems, "\n".join(problems)


def main_case() -> None:
    gate_case()
    open_case()


CASES = {"main": main_case, "gate": gate_case, "open": open_case, "config": config_case, "hooks": hooks_case,
         "refusals": refusals_case, "defaults": defaults_case}

if __name__ == "__main__":
    case = sys.argv[1]
    CASES[case]()
    dist.barrier()
    print(f"RANK {RANK} OK {case}", flush=True)
    dist.destroy_process_group()
