"""dgg_kernels.integrations.verl in verl 0.9's real FSDP2 engine: CPU, gloo, world size 1 and 2.

verl pins transformers<5.11, which TRL's pin excludes, so these tests run in
their own environment (``.ci/verl.sh`` builds it: verl 0.9.1, torch 2.13.0)
and skip in the main one.  Each test launches ``tests/verl_worker.py`` once
per rank under a hard wall-clock limit (test_distributed.py's launcher: a hung
rank is killed and the test FAILS), with a tiny random-init Qwen2 built from a
config (no download) and the CPU platform of ``tests/verl_cpu.py``.  What each
case checks is in verl_worker.py's docstring.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

if importlib.util.find_spec("verl") is None:
    pytest.skip(
        "verl is not installed: the verl integration tests run in their own environment (verl pins "
        "transformers<5.11; TRL needs 5.23): bash .ci/verl.sh",
        allow_module_level=True,
    )
if sys.platform == "win32" or not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import test_distributed  # noqa: E402  (its launcher: hard timeout, kills the ranks, fails with their logs)


@pytest.fixture
def launch(monkeypatch, tmp_path):
    monkeypatch.setattr(test_distributed, "WORKER", HERE / "verl_worker.py")
    monkeypatch.setenv("DGG_VERL_DIR", str(tmp_path / "shared"))

    def run(case: str, world: int, timeout: float) -> list[str]:
        return test_distributed._launch(case, world, tmp_path, timeout)

    return run


@pytest.mark.parametrize("world", [1, 2])
def test_verl_engine_gated_and_open(launch, world):
    """One launch per world size (starting the ranks is most of the cost):
    gate: a surge mid-pass and a one-rank NaN close the gate at exactly that step on every rank; the closed update
    leaves parameters and optimizer state bit-identical; the batch's remaining mini-batches are not run; the LR
    scheduler steps once per rollout batch; the gate state is saved and restored with verl's checkpoint.
    open: with threshold=inf, parameters, optimizer state, losses, grad norms and learning rates equal plain
    verl's, bit for bit."""
    launch("main", world, timeout=360 * world)


def test_settings_and_refusals(launch):
    """The dgg config section, FSDP1 / Megatron / fp16 / LoRA / non-fused optimizers refused with what to do,
    max_reuse below ppo_epochs, and the trainer config prepared for verl's v1 trainer."""
    texts = launch("config", 1, timeout=400)
    if importlib.util.find_spec("transfer_queue") is not None:  # .ci/verl.sh installs verl's v1 trainer's deps
        assert "register_trainers() not exercised" not in texts[0]


# -- the entry point and verl's version, in fresh processes (no ranks: nothing here trains) ----------------------

ROOT = HERE.parent


def _python(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_entry_point_overrides_a_yaml_dgg_section(tmp_path):
    """A config of the user's own that extends verl's ppo_trainer and sets the dgg section: the entry point's
    ``actor_rollout_ref.actor.dgg.<key>=...`` overrides it, written with or without Hydra's ``+``."""
    (tmp_path / "my_ppo.yaml").write_text(
        "hydra:\n  searchpath:\n    - pkg://verl.trainer.config\n"
        "defaults:\n  - ppo_trainer\n  - _self_\n"
        "actor_rollout_ref:\n  actor:\n    dgg:\n      enable: true\n      window: 4\n      threshold: 0.3\n"
    )
    run = _python(["-m", "dgg_kernels.integrations.verl", "--config-path", str(tmp_path), "--config-name", "my_ppo",
                   "--cfg", "job", "actor_rollout_ref.actor.dgg.threshold=0.5", "+actor_rollout_ref.actor.dgg.window=6",
                   "+actor_rollout_ref.actor.dgg.statistic=norm"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    from omegaconf import OmegaConf

    dgg = OmegaConf.to_container(OmegaConf.create(run.stdout).actor_rollout_ref.actor.dgg)
    assert dgg == {"enable": True, "window": 6, "threshold": 0.5, "statistic": "norm"}, dgg


def test_untested_verl_version_warns(tmp_path):
    """Importing the integration under a verl version it was not tested with warns, naming both versions."""
    run = _python(["-c", (
        "import warnings, verl\n"
        "verl.__version__ = '0.10.0'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import dgg_kernels.integrations.verl\n"
        "print('WARNINGS', [str(x.message) for x in w if 'dgg' in str(x.message)])\n"
    )], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("WARNINGS"))
    assert "verl 0.10.0" in line and "0.9.1" in line, line


@pytest.mark.parametrize("renamed,script", [
    ("FSDPEngineWithLMHead._build_model_optimizer", (
        "from verl.workers.engine.fsdp.transformer_impl import FSDPEngine\n"
        "FSDPEngine._build_model_and_optimizer = FSDPEngine._build_model_optimizer\n"
        "del FSDPEngine._build_model_optimizer\n"
        "import dgg_kernels.integrations.verl\n"
    )),
    ("PPOTrainerSync._init_resource_pool_mgr", (
        "from verl.trainer.ppo.v1.trainer_base import PPOTrainer\n"
        "PPOTrainer._init_worker_mapping = PPOTrainer._init_resource_pool_mgr\n"
        "del PPOTrainer._init_resource_pool_mgr\n"
        "import dgg_kernels.integrations.verl as dv\n"
        "dv.register_trainers()\n"
    )),
    ("TrainingWorker.train_mini_batch no longer calls self.train_batch", (
        "from verl.workers.engine_workers import TrainingWorker\n"
        "def train_mini_batch(self, data):\n"
        "    return self.engine.forward_backward_batch(data)\n"
        "TrainingWorker.train_mini_batch = train_mini_batch\n"
        "import dgg_kernels.integrations.verl\n"
    )),
    ("TrainingWorker.train_mini_batch no longer calls self.train_batch", (  # the engine's, not the worker's
        "from verl.workers.engine_workers import TrainingWorker\n"
        "def train_mini_batch(self, data):\n"
        "    return [self.engine.train_batch(mb) for mb in data]\n"
        "TrainingWorker.train_mini_batch = train_mini_batch\n"
        "import dgg_kernels.integrations.verl\n"
    )),
])
def test_missing_hook_point_fails_at_import_or_registration(tmp_path, renamed, script):
    """A verl that renamed a method the integration overrides, or whose loop no longer calls one: importing the
    integration (or registering its trainers) fails, naming it, instead of verl training ungated (or running a
    closed batch's remaining mini-batches)."""
    if "trainer" in script and importlib.util.find_spec("transfer_queue") is None:
        pytest.skip("verl's v1 trainer needs transfer_queue (.ci/verl.sh installs it)")
    run = _python(["-c", script + "print('NOT REFUSED')\n"], tmp_path)
    assert run.returncode != 0 and "NOT REFUSED" not in run.stdout, f"{renamed} renamed: not refused"
    assert renamed in run.stderr, run.stderr[-3000:]


def test_gate_never_built_fails_loudly(launch):
    """A gated run on a verl whose hook points moved raises instead of training as plain verl (verl_worker.py)."""
    launch("hooks", 1, timeout=400)


def test_unsupported_settings_refused_before_ray(launch):
    """LoRA, fp16 with verl's scaler, non-fused optimizers: refused by the entry point's check before Ray, by the
    same function as in the worker (verl_worker.py)."""
    launch("refusals", 1, timeout=400)


def test_dry_run_validates_without_ray(tmp_path):
    """``--dry-run``: the gate's and verl's checks on the composed config, then exit; Ray is never started."""
    import verl_cpu

    example = verl_cpu.docs_example_args()
    ok = _python(["-m", "dgg_kernels.integrations.verl", "--dry-run", *example], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "dry run" in ok.stdout and "threshold" in ok.stdout, ok.stdout[-3000:]
    bad = _python(["-m", "dgg_kernels.integrations.verl", "--dry-run", *example, "actor_rollout_ref.model.lora_rank=8"],
                  tmp_path)
    assert bad.returncode != 0 and "LoRA" in bad.stdout + bad.stderr, (bad.stdout + bad.stderr)[-3000:]
    for out in (ok, bad):
        assert "ray.init" not in out.stdout + out.stderr and "Started a local Ray" not in out.stdout + out.stderr


def test_defaults_said_and_metrics_documented(launch):
    """The engine logs that it builds AdamW with fused=True over verl's default; every dgg/ metric is documented
    (verl_worker.py)."""
    launch("defaults", 1, timeout=400)
