"""Trainer integrations.  Each lives in its own module and imports its framework lazily:

- ``dgg_kernels.integrations.trl``: ``DGGGRPOTrainer``, TRL's GRPOTrainer with the gate
  (needs ``pip install trl transformers``).

verl has no module here; docs/integrations.md gives the recipe (a DataParallelPPOActor subclass).
"""
