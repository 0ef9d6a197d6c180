"""Atomic folder writes: build the result beside the target, then rename it into place.

An interrupted save (exception, Ctrl-C, out of disk) leaves the previous folder untouched and at most a hidden
``.<name>.tmp-*`` folder beside it; a finished save swaps the new folder in with two renames on the same filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty scratch folder beside ``target``; on success it replaces ``target`` (an existing folder is
    replaced whole, an existing file is an error). On any exception the scratch folder is removed and the exception
    propagates."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_directory: {str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    scratch = target.parent / f".{target.name}.tmp-{tag}"
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{tag}"
        os.replace(target, old)
        os.replace(scratch, target)
        shutil.rmtree(old)
    else:
        os.replace(scratch, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch path beside ``target``; on success it is renamed onto ``target``, on error it is deleted."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield scratch
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    os.replace(scratch, target)
