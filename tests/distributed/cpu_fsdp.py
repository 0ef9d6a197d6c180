"""Let accelerate run its FSDP2 path on CPU processes (gloo), for tests only.

accelerate 1.15 turns FSDP on only for accelerator process groups: with ``use_cpu`` it picks ``MULTI_CPU`` and drops
the FSDP plugin. Everything its FSDP2 path then does (``fully_shard`` per decoder layer and on the model, the full
state dict for checkpoints, sharded optimizer state, loading on resume) is plain PyTorch that runs on CPU with gloo.
This shim sets the distributed type to FSDP after accelerate decided MULTI_CPU, in both shared states accelerate
keeps (a later ``AcceleratorState()`` re-reads ``PartialState``'s), so the Trainer, TRL and fasttune run the exact
code a GPU run of ``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` runs.
"""

from __future__ import annotations

import accelerate.state as state
from accelerate.utils import DistributedType

_original_init = state.AcceleratorState.__init__


def _init(self, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def allow_fsdp_on_cpu() -> None:
    state.AcceleratorState.__init__ = _init
