"""Where a model comes from: a local folder, a saved LoRA adapter folder, or a Hub id — with clear errors."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from .export.atomic import recover_interrupted
from .gguf_source import gguf_in, gguf_model_folder

logger = logging.getLogger("fasttune")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``base`` is what transformers loads; ``adapter`` a PEFT adapter folder to put on top."""

    base: str
    config: PretrainedConfig
    adapter: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer / processor comes from: the adapter folder when it holds one (``save_pretrained`` with
        the tokenizer), else the base model (``model.save_lora`` writes the adapter alone)."""
        files = ("tokenizer_config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json")
        if self.adapter is not None and any((Path(self.adapter) / f).is_file() for f in files):
            return self.adapter
        return self.base


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return env.upper() in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def _load_config(name: str, token: str | None, revision: str | None, trust_remote_code: bool) -> PretrainedConfig:
    return AutoConfig.from_pretrained(name, token=token, revision=revision, trust_remote_code=trust_remote_code)


def _pickle_weight_files(folder: Path) -> list[str]:
    """Names of the pickle weight files transformers/peft would read from ``folder`` when it has no safetensors."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return []  # transformers and peft prefer safetensors whenever they are there
    return [n for n in names if n.endswith(".bin") and n.startswith(("pytorch_model", "adapter_model"))]


def warn_if_pickle_only(folder: Path) -> None:
    """Log a warning when ``folder``'s weights exist only as pickle (``pytorch_model.bin``, ``adapter_model.bin``).

    Unpickling can run arbitrary code. transformers and peft read these files with ``torch.load(weights_only=True)``,
    a restricted unpickler that blocks most of it but has had bypasses; safetensors holds only tensors (and loads
    faster, memory-mapped), so a checkpoint from anyone but you is safer converted.
    """
    pickles = _pickle_weight_files(folder)
    if pickles:
        logger.warning(
            "fasttune: %r has only pickle weights (%s) and no .safetensors: they are unpickled with torch.load, "
            "and a pickle can run arbitrary code (weights_only=True restricts it but has had bypasses), so load it "
            "only if you trust its source; prefer safetensors: load it once and save it with save_pretrained "
            "(which writes .safetensors), or pick a repository that ships them",
            str(folder), ", ".join(pickles),
        )


def check_safetensors_files(folder: Path) -> None:
    """Open the header of every ``*.safetensors`` file in ``folder``; a truncated or corrupt one is an error naming it.

    safetensors' own message ("incomplete metadata, file not fully covered") names no file, and transformers/peft
    re-raise it without one; a header check costs one small read per file.
    """
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise ValueError(
                f"model_name: {str(path)!r} is not a readable safetensors file ({err}): it is probably truncated "
                f"({path.stat().st_size} bytes) by an interrupted download, copy or save; download or save it again"
            ) from err


def _checked_folder(folder: Path) -> None:
    """What every model/adapter folder gets before loading: repair a killed fasttune save, check the weights."""
    recover_interrupted(folder)
    check_safetensors_files(folder)
    warn_if_pickle_only(folder)


def _from_folder(folder: Path, token: str | None, revision: str | None, trust_remote_code: bool) -> ModelSource:
    if not folder.is_dir():
        raise FileNotFoundError(f"model_name: {str(folder)!r} is a file, not a model folder")
    _checked_folder(folder)
    if (folder / "config.json").is_file():
        return ModelSource(str(folder), _load_config(str(folder), None, None, trust_remote_code))
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise FileNotFoundError(
                f"model_name: {str(folder)!r} holds a LoRA adapter whose adapter_config.json names no "
                "base_model_name_or_path; load the base model and attach the adapter with peft.PeftModel"
            )
        inner = resolve_source(base, token=token, revision=revision, trust_remote_code=trust_remote_code)
        return ModelSource(inner.base, inner.config, adapter=str(folder))
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise FileNotFoundError(
        f"model_name: {str(folder)!r} has no config.json (nor adapter_config.json), so it is not a model folder; "
        f"it contains: {listing}"
    )


def resolve_source(
    model_name: str, token: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSource:
    """Find the model behind ``model_name`` and read its config.

    Raises FileNotFoundError for a missing folder, a folder without config.json, or a Hub id that cannot be fetched
    because the Hub is offline or unreachable (naming the id and the reason).
    """
    path = Path(model_name).expanduser()
    if path.exists():
        gguf = gguf_in(path)
        if gguf is not None:  # a GGUF file as the base model: its cached plain folder (fasttune.gguf_source)
            path = gguf_model_folder(gguf)
        return _from_folder(path, token, revision, trust_remote_code)
    if _looks_like_path(model_name):
        raise FileNotFoundError(f"model_name: folder {model_name!r} does not exist")
    try:
        config = _load_config(model_name, token, revision, trust_remote_code)
    except OSError as err:
        if _hub_offline():
            raise FileNotFoundError(
                f"model_name: {model_name!r} is not a local folder and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE=1) with no cached copy of it; pass the path of a downloaded model folder, "
                "or go online and unset HF_HUB_OFFLINE"
            ) from err
        raise FileNotFoundError(
            f"model_name: {model_name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}); check the id, your "
            "network and `token` for gated models, or pass a local folder"
        ) from err
    return ModelSource(model_name, config)
