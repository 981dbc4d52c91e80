"""Trainer integrations.  Each lives in its own module and imports its framework lazily:

- ``dgg_kernels.integrations.trl``: ``DGGGRPOTrainer``, TRL's GRPOTrainer with the gate, on FSDP2 or
  DeepSpeed (``pip install "dgg-kernels[trl]"``);
- ``dgg_kernels.integrations.deepspeed``: ``DeepSpeedGate``, the gate on ZeRO-1/2/3 partitioned gradients
  (``pip install "dgg-kernels[deepspeed]"``);
- ``dgg_kernels.integrations.verl``: the gate in verl's FSDP2 engine and its pass loop
  (``pip install "dgg-kernels[verl]"``);
- ``dgg_kernels.integrations.adapter``: what every trainer adapter shares (finding the lm_head, building
  and rebuilding the gate, metrics);
- ``dgg_kernels.integrations.checkpoint``: the gate's state in trainer checkpoints.

docs/integrations.md has each one's hook points and what it refuses.
"""
