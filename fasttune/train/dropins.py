"""DPO, KTO, ORPO and GRPO drop-ins: TRL's classes (subclasses) that also take the Unsloth-era arguments.

They are built on first use from the table below, so ``import fasttune.trl`` imports none of these trainers (nor
``trl.experimental``, which warns on import). Only the arguments change (see :mod:`fasttune.train.compat`) and the
gradient-checkpointing mode chosen in ``get_peft_model`` is the one that runs; the training itself is TRL's, except
where a mixin of :data:`MIXINS` adds fasttune's fast path (GRPO: rollouts, log-probs, exact accumulation;
ORPO: exact accumulation).
"""

from __future__ import annotations

import functools
import importlib

from .compat import CompatConfigMixin, CompatTrainerMixin

# trainer name -> (module holding TRL's classes, config name, kind in compat's tables)
DROPINS: dict[str, tuple[str, str, str]] = {
    "DPOTrainer": ("trl", "DPOConfig", "dpo"),
    "KTOTrainer": ("trl", "KTOConfig", "kto"),
    "GRPOTrainer": ("trl", "GRPOConfig", "grpo"),
    "ORPOTrainer": ("trl.experimental.orpo", "ORPOConfig", "orpo"),  # TRL 1.x moved ORPO to experimental
}
CONFIGS: dict[str, str] = {config: trainer for trainer, (_, config, _) in DROPINS.items()}
# drop-in name -> fasttune mixin placed between the compat mixin and TRL's class (fasttune's own fast paths)
MIXINS: dict[str, tuple[str, str]] = {
    "GRPOTrainer": ("fasttune.train.grpo", "FastGRPOMixin"),
    "GRPOConfig": ("fasttune.train.grpo", "FastGRPOConfigMixin"),
    "ORPOTrainer": ("fasttune.train.orpo", "FastORPOMixin"),
}


def _mixins(name: str) -> tuple[type, ...]:
    if name not in MIXINS:
        return ()
    module_name, attr = MIXINS[name]
    return (getattr(importlib.import_module(module_name), attr),)


@functools.cache
def dropin(name: str) -> type:
    """The fasttune class called ``name`` (a trainer or config of :data:`DROPINS`), built once."""
    trainer = CONFIGS.get(name, name)
    if trainer not in DROPINS:
        raise AttributeError(f"fasttune.train.dropins: no drop-in named {name!r}; available: "
                             f"{sorted(DROPINS) + sorted(CONFIGS)}")
    module_name, config_name, kind = DROPINS[trainer]
    module = importlib.import_module(module_name)
    attrs = {"fasttune_kind": kind, "__module__": "fasttune.trl"}
    if name == config_name:
        doc = f"TRL's ``{name}``; also takes the Unsloth-era spellings of its options (fasttune.train.compat)."
        return type(name, (CompatConfigMixin, *_mixins(name), getattr(module, name)),
                    {**attrs, "__doc__": doc, "__qualname__": name})
    doc = f"TRL's ``{name}``; also takes the Unsloth-era arguments (fasttune.train.compat)."
    return type(name, (CompatTrainerMixin, *_mixins(name), getattr(module, name)),
                {**attrs, "fasttune_config": dropin(config_name), "__doc__": doc, "__qualname__": name})
