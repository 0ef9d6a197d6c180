"""Push merged models and GGUF files to the Hugging Face Hub with ``huggingface_hub``.

Both functions save into a temporary folder with the same code as the local saves, then create the repo (if needed)
and upload the folder in one commit. ``endpoint=`` (or the ``HF_ENDPOINT`` environment variable) points at another
Hub-compatible server, which is how the tests run against a local one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from torch import nn

_PUSH_KEYWORDS = ("endpoint", "commit_message", "revision")


def upload_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                  commit_message: str | None = None, endpoint: str | None = None,
                  revision: str | None = None) -> str:
    """Create ``repo_id`` (model repo, ok if it exists) and upload ``folder`` in one commit; returns the commit URL."""
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        raise ValueError(f"repo_id: {repo_id!r} must look like 'name' or 'user/name'")
    api = HfApi(endpoint=endpoint, token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload model with fasttune")
    return str(info.commit_url)


def _split(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    push = {k: kw.pop(k) for k in _PUSH_KEYWORDS if k in kw}
    return push, kw


def push_to_hub_merged(model: nn.Module, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None, **kw: Any) -> str:
    """``save_pretrained_merged`` into a temporary folder, then upload it to ``repo_id``; returns the commit URL.

    Extra keywords: ``endpoint``, ``commit_message``, ``revision`` (upload) and those of ``save_pretrained_merged``.
    """
    from .hf import save_pretrained_merged

    push, save_kw = _split(dict(kw))
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_pretrained_merged(model, Path(scratch) / "model", tokenizer, save_method=save_method, **save_kw)
        return upload_folder(folder, repo_id, token=token, private=private, **push)


def push_to_hub_gguf(model: nn.Module, repo_id: str, tokenizer: Any = None,
                     quantization_method: str | list[str] = "fast_quantized", token: str | None = None,
                     **kw: Any) -> str:
    """``save_pretrained_gguf`` into a temporary folder (GGUF files + Modelfile), then upload it to ``repo_id``.

    Extra keywords: ``private``, ``endpoint``, ``commit_message``, ``revision`` and those of ``save_pretrained_gguf``.
    """
    from .gguf.save import save_pretrained_gguf

    private = kw.pop("private", None)
    push, save_kw = _split(dict(kw))
    with tempfile.TemporaryDirectory() as scratch:
        save_pretrained_gguf(model, scratch, tokenizer, quantization_method=quantization_method, **save_kw)
        return upload_folder(scratch, repo_id, token=token, private=private, **push)
