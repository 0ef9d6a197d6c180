"""Unsloth-era TRL arguments, as data: what each old spelling is called in the installed TRL (1.16), and where it goes.

Unsloth notebooks were written against TRL <= 0.12, whose trainers took ``tokenizer=`` and the dataset options
(``dataset_text_field``, ``max_seq_length``, ``packing``...) as trainer keywords, and accepted a plain
``transformers.TrainingArguments``. TRL 1.x takes ``processing_class=`` and keeps those options in its config class.
The tables below say where each old name went; :class:`CompatTrainerMixin` and :class:`CompatConfigMixin` walk them.
Every mapping logs one note (once per process and name) with the new spelling. A name in no table and not TRL's own
is an error that names it. ``None`` as a destination: the installed TRL has no such option; the value is dropped with
a note saying so (the notebook keeps running; the behaviour it asked for is not available).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, ClassVar

from ..notes import note_once
from ..patch.checkpointing import honour_checkpointing_mode

# trainer keyword -> TRL 1.16's trainer keyword (every trainer)
TRAINER_RENAMES: dict[str, str] = {"tokenizer": "processing_class"}

# trainer keyword (Unsloth era) -> field of the trainer's config class that holds it now (None: no equivalent)
TRAINER_TO_CONFIG: dict[str, dict[str, str | None]] = {
    "sft": {
        "dataset_text_field": "dataset_text_field", "max_seq_length": "max_length", "packing": "packing",
        "dataset_num_proc": "dataset_num_proc", "dataset_kwargs": "dataset_kwargs", "eval_packing": "eval_packing",
        "model_init_kwargs": "model_init_kwargs", "neftune_noise_alpha": "neftune_noise_alpha",
        "dataset_batch_size": None, "num_of_sequences": None, "chars_per_token": None, "infinite": None,
    },
    "dpo": {
        "beta": "beta", "label_smoothing": "label_smoothing", "loss_type": "loss_type", "max_length": "max_length",
        "truncation_mode": "truncation_mode", "precompute_ref_log_probs": "precompute_ref_log_probs",
        "model_init_kwargs": "model_init_kwargs", "dataset_num_proc": "dataset_num_proc",
        "max_prompt_length": None, "max_target_length": None, "max_completion_length": None, "padding_value": None,
        "generate_during_eval": None,
    },
    "kto": {
        "beta": "beta", "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight",
        "max_length": "max_length", "model_init_kwargs": "model_init_kwargs", "dataset_num_proc": "dataset_num_proc",
        "max_prompt_length": None, "max_completion_length": None,
    },
    "orpo": {
        "beta": "beta", "max_length": "max_length", "max_completion_length": "max_completion_length",
        "dataset_num_proc": "dataset_num_proc", "max_prompt_length": None,
    },
    "grpo": {},
}

# config keyword (Unsloth era) -> field of TRL 1.16's config class (None: no equivalent)
CONFIG_RENAMES: dict[str, dict[str, str | None]] = {
    "sft": {"max_seq_length": "max_length", "dataset_batch_size": None},
    "dpo": {"max_prompt_length": None, "max_completion_length": None, "max_target_length": None},
    "kto": {"max_prompt_length": None, "max_completion_length": None},
    "orpo": {"max_prompt_length": None},
    "grpo": {"max_prompt_length": None},
}
# every config: transformers 5 folded warmup_ratio into warmup_steps (a float in [0, 1) is a ratio of total steps)
for _renames in CONFIG_RENAMES.values():
    _renames["warmup_ratio"] = "warmup_steps"

def _moved(owner: str, old: str, new: str | None, value: Any, where: str) -> None:
    if new is None:
        note_once(f"{owner}.{old}", f"{owner}({old}=...) has no equivalent in the installed TRL; the value {value!r} "
                                    "is ignored")
    else:
        note_once(f"{owner}.{old}", f"{owner}({old}=...) is deprecated; use {where}{new}=... instead")


def translate_config_kwargs(kind: str, owner: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Config keywords with the Unsloth-era spellings of ``CONFIG_RENAMES[kind]`` mapped to TRL's."""
    out = dict(kwargs)
    for old, new in CONFIG_RENAMES[kind].items():
        if old not in out:
            continue
        value = out.pop(old)
        if old == "warmup_ratio" and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{owner}: warmup_ratio={value!r} must be a fraction in [0, 1) of the training steps")
        if new is not None and new in kwargs:
            raise TypeError(f"{owner}: both {old}={value!r} and {new}={kwargs[new]!r} given; {old} is the old "
                            f"spelling of {new}, pass only {new}=")
        _moved(owner, old, new, value, "")
        if new is not None:
            out[new] = value
    return out


def translate_trainer_kwargs(kind: str, owner: str, trl_params: list[str],
                             kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trainer call into (keywords for TRL's trainer, config fields given at trainer level)."""
    out: dict[str, Any] = {}
    config_fields: dict[str, Any] = {}
    unknown = []
    table = TRAINER_TO_CONFIG[kind]
    for name, value in kwargs.items():
        if name in trl_params:
            out[name] = value
        elif name in TRAINER_RENAMES:
            new = TRAINER_RENAMES[name]
            if new in kwargs:
                raise TypeError(f"{owner}: both {name}= and {new}= given; {name} is the old spelling of {new}, "
                                f"pass only {new}=")
            _moved(owner, name, new, value, "")
            out[new] = value
        elif name in table:
            _moved(owner, name, table[name], value, "the config's ")
            if table[name] is not None:
                config_fields[table[name]] = value
        else:
            unknown.append(name)
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; TRL's {owner} takes {', '.join(trl_params)}, and the "
            f"Unsloth-era {', '.join(sorted(set(TRAINER_RENAMES) | set(table)))}"
        )
    return out, config_fields


def explicitly_set(config: Any, name: str) -> bool:
    """Whether the user gave config field ``name``: recorded by our configs; for others, "differs from default"."""
    explicit = getattr(config, "_fasttune_explicit", None)
    if explicit is not None:
        return name in explicit
    field = next((f for f in dataclasses.fields(config) if f.name == name), None)
    return field is not None and getattr(config, name) != field.default


def build_config(config_cls: type, trl_config_cls: type, args: Any, moved: dict[str, Any], owner: str) -> Any:
    """The config the trainer gets: a copy of ``args`` (never the user's object) with ``moved`` fields set.

    A plain ``transformers.TrainingArguments`` becomes ``config_cls`` (TRL's config for this trainer, with every
    TrainingArguments field carried over); trainer-level values win over the config's, as they did in old TRL.
    """
    from transformers import TrainingArguments

    if args is None:
        return config_cls(**moved) if moved else None
    if isinstance(args, trl_config_cls):
        config = copy.copy(args)
        for name, value in moved.items():
            setattr(config, name, value)
        config._fasttune_explicit = frozenset(
            {f.name for f in dataclasses.fields(args) if explicitly_set(args, f.name)} | set(moved))
        return config
    if isinstance(args, TrainingArguments):
        note_once(f"{owner}.TrainingArguments", f"{owner}(args=TrainingArguments(...)) is converted to "
                                                f"{config_cls.__name__}; use args={config_cls.__name__}(...)")
        init_fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
        values = {k: v for k, v in args.to_dict().items() if k in init_fields}
        values["hub_token"] = args.hub_token  # to_dict hides it
        config = config_cls(**values, **moved)
        config._fasttune_explicit = frozenset(moved)
        return config
    raise TypeError(f"{owner}: args={type(args).__name__} is not a {trl_config_cls.__name__} or "
                    "transformers.TrainingArguments")


class CompatConfigMixin:
    """A TRL config class that also takes the Unsloth-era spellings of ``CONFIG_RENAMES[fasttune_kind]``."""

    fasttune_kind: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs = translate_config_kwargs(self.fasttune_kind, type(self).__name__, kwargs)
        super().__init__(*args, **kwargs)
        self._fasttune_explicit = frozenset(kwargs) | ({"output_dir"} if args else frozenset())


def trl_base(cls: type) -> type:
    """The TRL class a fasttune drop-in subclasses (the first of its bases that comes from ``trl``)."""
    return next(c for c in cls.__mro__ if c.__module__.split(".")[0] == "trl")


class CompatTrainerMixin:
    """A TRL trainer class that takes the Unsloth-era arguments (see the module docstring); mix in first.

    ``_fasttune_prepare(kwargs)`` runs on the translated keywords before TRL's ``__init__`` (subclasses extend it).
    """

    fasttune_kind: ClassVar[str]
    fasttune_config: ClassVar[type]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base = trl_base(type(self))
        owner = base.__name__
        params = [p for p in inspect.signature(base.__init__).parameters if p != "self"]
        if len(args) > len(params):
            raise TypeError(f"{owner}: {len(args)} positional arguments given; it takes at most {len(params)} "
                            f"({', '.join(params)})")
        for name, value in zip(params, args):
            if name in kwargs:
                raise TypeError(f"{owner}: got multiple values for argument {name!r}")
            kwargs[name] = value
        mro = type(self).__mro__
        own = [name for cls in mro[:mro.index(base)] if "__init__" in vars(cls)  # fasttune mixins' own options
               for name, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY]
        kwargs, moved = translate_trainer_kwargs(self.fasttune_kind, owner, params + own, kwargs)
        trl_config = trl_base(self.fasttune_config)
        kwargs["args"] = build_config(self.fasttune_config, trl_config, kwargs.get("args"), moved, owner)
        kwargs = self._fasttune_prepare(kwargs)
        super().__init__(**kwargs)

    def _fasttune_prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("args") is not None and "model" in kwargs:
            honour_checkpointing_mode(kwargs["model"], kwargs["args"])
        return kwargs
