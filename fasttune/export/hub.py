"""Upload a saved folder to the Hugging Face Hub with ``huggingface_hub`` (a leaf: it imports no other export module).

``push_to_hub_merged`` (export/hf.py) and ``push_to_hub_gguf`` (export/gguf/save.py) save into a temporary folder with
the same code as the local saves, then call :func:`upload_folder`, which creates the repo (if needed) and uploads the
folder in one commit. ``endpoint=`` (or the ``HF_ENDPOINT`` environment variable) points at another
Hub-compatible server, which is how the tests run against a local one.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import HfApi

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


def split_push_kwargs(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    push = {k: kw.pop(k) for k in _PUSH_KEYWORDS if k in kw}
    return push, kw
