"""verl 0.9's FSDP2 engine on CPU, for the tests: a CPU platform, gloo, a tiny Qwen2 built from a config.

verl 0.9.1 has no CPU platform: it falls back to its nvidia platform and
builds its device meshes with ``init_device_mesh("cuda")``.  ``setup()``
therefore, before any verl engine module is imported (they read the platform
at import):

- registers a CPU platform with verl's platform manager
  (``verl.plugin.platform``: ``PlatformRegistry.register`` and
  ``set_platform``); its device module answers verl's memory queries
  (``max_memory_allocated`` and friends) with 0;
- sets ``VERL_ENGINE_DEVICE=cuda``: verl registers its engines for cuda and
  npu only, and the variable makes ``EngineRegistry`` look them up there;
- initializes torch.distributed with gloo (from a FileStore) before verl
  would initialize its own process group.

Nothing in verl is patched.  The model is a random-init Qwen2 (vocab 1024,
width 64, 2 layers) saved with a locally built word-level tokenizer, so
nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

VOCAB = 1024
PROMPT_LEN = 6
RESPONSE_LEN = 5


class _CPUDeviceModule:
    """What verl calls on ``get_torch_device()`` during training, answered for the CPU."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(index) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def manual_seed(seed) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"  # verl's MFU metric looks its peak FLOPs up by this name (none for the CPU)

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def mem_get_info(device=None):
        return (0, 0)

    @staticmethod
    def get_rng_state(device=None):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None) -> None:
        torch.set_rng_state(state)


def _platform_class():
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    @PlatformRegistry.register(platform="dgg_test_cpu")
    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = _CPUDeviceModule

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return True

        def current_device(self):
            return "cpu"  # verl moves tensors with .to(current_device()): an index would mean an accelerator

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    return CPUPlatform


def setup(store: str | None = None) -> None:
    """Platform, environment and gloo process group, from RANK / WORLD_SIZE (default 0 / 1) and a FileStore.

    Call before importing verl's engine modules or dgg_kernels.integrations.verl.
    """
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VERL_USE_EXTERNAL_PLUGINS", "none")
    from verl.plugin.platform import set_platform

    set_platform(_platform_class()())
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if store is None:
            store = os.environ["DGG_STORE"]
        dist.init_process_group(
            "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )


# -- the tiny model ---------------------------------------------------------------------------------------------------

def save_tiny_model(path: str, seed: int = 0) -> str:
    """A random-init Qwen2 (vocab 1024, width 64, 2 layers) and a word-level tokenizer, saved to ``path``."""
    import tokenizers
    import transformers

    os.makedirs(path, exist_ok=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, torch_dtype="float32",
    )
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


# -- verl's configs ---------------------------------------------------------------------------------------------------

def actor_config(model_path: str, *, ppo_epochs: int = 3, mini_batch: int = 4, dgg: dict | None = None,
                 overrides: tuple[str, ...] = (), fused: bool | None = True):
    """verl's own ppo_trainer config (Hydra, verl's YAML) for a CPU FSDP2 actor.

    ``fused``: ``optim.override_optimizer_config.fused`` (True by default, so that plain verl runs the optimizer
    the DGG engine runs; None leaves verl's default).
    """
    import verl.trainer
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.trainer.__file__), "config")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    o = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.use_remove_padding=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_epochs={ppo_epochs}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.optim.clip_grad=1.0",
        "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
        "actor_rollout_ref.actor.optim.total_training_steps=10",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        *(() if fused is None else (f"+actor_rollout_ref.actor.optim.override_optimizer_config.fused={fused}".lower(),)),
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra]",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=1",
        f"trainer.n_gpus_per_node={world}",
        *overrides,
    ]
    if dgg is not None:
        o += [f"+actor_rollout_ref.actor.dgg.{k}={v}" for k, v in dgg.items()]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=o)
    return cfg


def docs_example_args() -> list[str]:
    """The arguments of the ``python -m dgg_kernels.integrations.verl`` example in docs/integrations.md, as a user
    types them (before the entry point's own rewriting)."""
    import shlex

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "integrations.md")).read()
    start = text.index("python -m dgg_kernels.integrations.verl \\")
    block = text[start:text.index("```", start)]
    return shlex.split(block.replace("\\\n", " ").replace("$HOME", "/home/user"))[3:]


# -- a rollout batch --------------------------------------------------------------------------------------------------

def rollout_batch(rows: int, seed: int, *, epochs: int, mini_batch: int, advantage_scale: float = 1.0):
    """One rollout batch as verl's v1 trainer hands it to ``update_actor`` (this rank's rows, no padding)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    seq = PROMPT_LEN + RESPONSE_LEN
    input_ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    attention_mask = torch.ones(rows, seq, dtype=torch.long)
    pad = torch.randint(0, 3, (rows,), generator=g)  # left padding of the prompts
    for i in range(rows):
        attention_mask[i, : pad[i]] = 0
        input_ids[i, : pad[i]] = 0
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    response_mask = torch.ones(rows, RESPONSE_LEN, dtype=torch.long)
    data = TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "prompts": input_ids[:, :PROMPT_LEN],
            "responses": input_ids[:, PROMPT_LEN:],
            "response_mask": response_mask,
            "old_log_probs": -torch.rand(rows, RESPONSE_LEN, generator=g) * 5 - 2,
            "advantages": torch.randn(rows, RESPONSE_LEN, generator=g) * advantage_scale,
        },
        batch_size=[rows],
    )
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=mini_batch,
        mini_batch_size=mini_batch,
        epochs=epochs,
        seed=42,
        dataloader_kwargs={"shuffle": False},
        temperature=1.0,
    )
    return data
