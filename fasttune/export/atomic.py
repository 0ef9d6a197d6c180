"""Crash-safe saves: the export is built in a scratch folder, then installed so the previous one is never lost.

    with atomic_directory("out", managed=is_export_file, may_write=...) as scratch:
        write_everything_into(scratch)          # the slow part; "out" is not touched meanwhile

What a save replaces. Only the entries (files or folders at the top level of the target) it writes. ``managed(name)``
says which names belong to the kind of export being saved (for transformers folders ``hf.is_export_file``: weights,
weight indexes, config and tokenizer files). A managed entry the new export does not write is *stale*: it would be
loaded together with, or instead of, the new export (old shards beside new ones, an adapter beside merged weights).
Stale entries make the save fail with ``ExportConflictError`` (listing them, nothing changed) unless
``overwrite=True``, which removes them. Entries that are not managed (notes, ``checkpoint-*`` folders, scripts, GGUF
files) always stay. The current working directory, or a folder above it, is refused unless ``overwrite=True``. The
refusal comes before the slow work when ``may_write(name)`` rules a name out, else after it, before the install.

How it is installed (the first case that applies when the new export is complete):
1. the target does not exist: the scratch folder (a sibling ``.<name>.tmp-<tag>``) is renamed onto it;
2. every entry of the target is managed or rewritten: ``renameat2(RENAME_EXCHANGE)`` swaps scratch and target in one
   step (where the system lacks it: ``target -> .<name>.old-<tag>``, then ``scratch -> target``), then the old folder
   is deleted;
3. otherwise (entries that must stay), entry by entry with a backup: the entries to replace or remove move into
   ``<target>/.fasttune.backup-<tag>`` (``KEYSTONES`` first), the backup is renamed ``.fasttune.done-<tag>`` (the
   commit point), the new entries move in (``KEYSTONES`` last), then the backup is deleted. A target that must not
   move (the working directory, a symlink, a mount point, a folder whose parent is read-only) is always filled this
   way, from a scratch folder inside it (``<target>/.fasttune.tmp-<tag>``).

Guarantee when the process dies at any instant (kill -9, out-of-memory killer; a power cut is not covered, nothing is
fsync'ed). Case 1 and case 2 with the exchange: the target holds the complete old or the complete new export at every
instant. Case 2 without it: between the two renames the target is missing and the next save renames the ``.old-``
folder back. Case 3: the target holds the complete old export, the complete new one, or (between the first and the
last move) a folder without ``config.json`` / ``adapter_config.json``, which transformers and peft refuse to load,
so old and new weights are never silently mixed; the next save into that folder, or ``recover_interrupted(target)``, rolls it back (before
the commit point) or forward (after it). Every hidden entry is tagged with its owner's pid and process start time;
the next save deletes or recovers those whose owner is gone (it never touches a running save's). Entries the save
neither writes nor removes are never moved, so they are intact at every instant.

Errors. Anything raised while writing removes the scratch and leaves the target unchanged. A failing install raises
``ExportInstallError`` saying whether the new export is installed and where the old and new files are. If only the
deletion of the old files fails after a successful install, a warning says where they are. Not supported: two saves
into one folder at the same time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Files without which transformers / peft refuse to load a folder: moved out first and in last (case 3), the model's
# config outermost, so a half-done install never holds the model config beside a mix of old and new files.
KEYSTONES = ("config.json", "adapter_config.json", "tokenizer_config.json")
_TAG = r"(?P<tag>(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8})"
_SIBLING_RE = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>tmp|old)-{_TAG}$")
_BACKUP_RE = re.compile(rf"^\.fasttune\.(?P<kind>backup|done)-{_TAG}$")
_ACTIVE: set[str] = set()  # tags of the saves running in this process


class ExportConflictError(FileExistsError):
    """The target folder holds files the new export would be mixed with (or is the working directory)."""


class ExportInstallError(OSError):
    """Moving a finished export into place failed; the message says what is installed and where the files are."""


# ---------------------------------------------------------------------------------------------------------- owners


def _start_time(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux ``/proc``), "0" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else "0"


def new_tag() -> str:
    """``<pid>-<start time>-<random>``: names this save's hidden entries so a later save can tell if it is gone."""
    return f"{os.getpid()}-{_start_time(os.getpid())}-{uuid.uuid4().hex[:8]}"


def _owner_gone(match: re.Match) -> bool:
    """True when the save that made this entry no longer runs (dead pid, a reused pid, or this process's past)."""
    pid, start = int(match["pid"]), match["start"]
    if pid == os.getpid() and start == _start_time(pid):
        return match["tag"] not in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    now = _start_time(pid)
    return start != "0" and now != "0" and now != start


# ------------------------------------------------------------------------------------------------------ primitives


def _load_renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step. False where the system or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _remove_or_warn(path: Path, what: str) -> None:
    try:
        _remove(path)
    except OSError as err:
        logger.warning("%s; it is left at %s because it could not be deleted (%s): delete it by hand", what, path, err)


def _entries(folder: Path) -> list[str]:
    """Names in ``folder`` except fasttune's own hidden scratch / backup entries."""
    return sorted(n for n in os.listdir(folder) if not (_SIBLING_RE.match(n) or _BACKUP_RE.match(n)))


def _keystones_first(names: Iterable[str]) -> list[str]:
    """``KEYSTONES`` in their order (the model's config before the tokenizer's), then the rest by name."""
    return sorted(names, key=lambda n: (KEYSTONES.index(n) if n in KEYSTONES else len(KEYSTONES), n))


def _keystones_last(names: Iterable[str]) -> list[str]:
    return _keystones_first(names)[::-1]


# -------------------------------------------------------------------------------------------------------- recovery


def _scratch_of(folder: Path, tag: str) -> Path:
    inside = folder / f".fasttune.tmp-{tag}"
    return inside if inside.exists() else folder.parent / f".{folder.name}.tmp-{tag}"


def _roll_back(folder: Path, backup: Path, scratch: Path) -> None:
    """Undo an entry-by-entry install interrupted before its commit point: the backed-up entries go back."""
    for name in _keystones_last(os.listdir(backup)):
        if os.path.lexists(folder / name):
            raise ExportInstallError(f"{folder / name} exists although the interrupted save had moved it to {backup}; "
                                     "compare the two and remove one by hand")
        os.rename(backup / name, folder / name)
    os.rmdir(backup)
    _remove(scratch)


def _roll_forward(folder: Path, done: Path, scratch: Path) -> None:
    """Finish an entry-by-entry install interrupted after its commit point: the remaining new entries go in."""
    if scratch.exists():
        for name in _keystones_last(os.listdir(scratch)):
            if os.path.lexists(folder / name):
                raise ExportInstallError(f"{folder / name} exists although the interrupted save had yet to move "
                                         f"{scratch / name} there; compare the two and remove one by hand")
            os.rename(scratch / name, folder / name)
        os.rmdir(scratch)
    shutil.rmtree(done)


def _recover_backups(folder: Path) -> list[str]:
    done: list[str] = []
    for name in sorted(os.listdir(folder)):
        match = _BACKUP_RE.match(name)
        if not match or not _owner_gone(match):
            continue
        scratch = _scratch_of(folder, match["tag"])
        if match["kind"] == "backup":
            _roll_back(folder, folder / name, scratch)
            done.append(f"rolled back an interrupted save in {folder} (the previous files are back)")
        else:
            _roll_forward(folder, folder / name, scratch)
            done.append(f"finished an interrupted save in {folder} (its new files are now in place)")
    return done


def _pending_backup(folder: Path, match: re.Match) -> bool:
    """True when the scratch ``match`` names is still needed by an unfinished backup (it is recovered first)."""
    homes = [folder, folder / match["name"]]
    return any((home / f".fasttune.{kind}-{match['tag']}").exists() for home in homes for kind in ("backup", "done"))


def _recover_siblings(folder: Path, only: str | None = None) -> list[str]:
    """Restore ``.<name>.old-*`` folders whose target is missing, delete the other stale ``.old-`` / ``.tmp-``."""
    done: list[str] = []
    if not os.access(folder, os.R_OK | os.X_OK):
        return done  # cannot be listed (a shared parent), so nothing there can be cleaned either
    matches = [m for m in map(_SIBLING_RE.match, sorted(os.listdir(folder))) if m]
    for match in sorted(matches, key=lambda m: m["kind"] != "old"):
        if (only is not None and match["name"] != only) or not _owner_gone(match) or _pending_backup(folder, match):
            continue
        path, target = folder / match.string, folder / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(path, target)
            done.append(f"restored {target} from {path}, left by a save that died between its two renames")
        else:
            _remove(path)
            done.append(f"deleted {path}, left by an interrupted save")
    return done


def recover_interrupted(target: str | os.PathLike) -> list[str]:
    """Repair what saves that died (kill -9, crash) left in and beside the folder ``target``; returns what was done.

    An entry-by-entry install into ``target`` is rolled back or forward; a missing ``target`` gets its ``.old-`` folder
    back; other stale hidden entries (scratch folders and files, old folders, backups) are deleted. Entries of saves
    still running are left alone. Every save calls this first; call it yourself before loading a folder that a
    killed save may have left half installed.
    """
    target = Path(target).absolute()
    done = _recover_backups(target) if target.is_dir() else []
    if target.parent.is_dir():
        done += _recover_siblings(target.parent, only=target.name)
    if target.is_dir():
        done += _recover_siblings(target)
    for line in done:
        logger.warning("save: %s", line)
    return done


# ---------------------------------------------------------------------------------------------------------- checks


def _holds_cwd(target: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:  # the working directory was deleted: it is not the target
        return False
    resolved = target.resolve()
    return cwd == resolved or resolved in cwd.parents


def _must_stay(target: Path) -> bool:
    """A symlinked target or the working directory (or above it) is filled in place, never swapped or renamed."""
    return target.is_symlink() or _holds_cwd(target)


# How a full disk shows up: OSError ENOSPC / EDQUOT, safetensors' error text, or numpy's short write (tofile).
_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|\d+ requested and \d+ written")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, safetensors' ``SafetensorError``, ...) means the disk or the quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(_NO_SPACE.search(str(error)))


def _raise_if_disk_full(error: BaseException, target: Path, what: str) -> None:
    """Re-raise a full disk as ``OSError(ENOSPC)`` saying where and that nothing changed (the cause kept as context)."""
    if is_disk_full(error):
        raise OSError(errno.ENOSPC, f"no space left on the disk holding {str(target.parent)!r}: {what}; free some "
                                    "space or choose another folder", str(target)) from error


def _refuse_non_folder(target: Path) -> None:
    """A save target that exists but is not a folder, named for what it is: a file, or a link to nowhere."""
    if target.is_symlink() and not target.exists():
        raise FileNotFoundError(errno.ENOENT, f"save_directory: {str(target)!r} is a symbolic link to "
                                f"{os.readlink(target)!r}, which does not exist; nothing was written. Create that "
                                "folder, or remove the link")
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(errno.EEXIST, f"save_directory: {str(target)!r} is a file, not a folder; nothing was "
                              "written. Exports write a folder: choose a folder path")


def check_writable(folder: Path) -> None:
    """Raise ``PermissionError`` (nothing written yet) unless files can be created and removed in ``folder`` or, when
    it does not exist, in the nearest folder above it that does."""
    _refuse_non_folder(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != folder and not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"save_directory: {str(probe)!r} is a file, so {str(folder)!r} cannot "
                                 "be created under it; nothing was written. Choose a path under a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"save_directory: {str(probe)!r} is not writable, so {str(folder)!r} "
                              "cannot be saved; nothing was written. Make it writable or choose another folder")


def _refuse_stale(target: Path, stale: list[str], overwrite: bool, written: bool) -> None:
    if not stale or overwrite:
        return
    when = "nothing was written" if not written else "the new export was discarded and nothing was changed"
    shown = f"{stale}" if len(stale) <= 12 else f"{stale[:12]} and {len(stale) - 12} more"
    raise ExportConflictError(
        f"save_directory: {str(target)!r} already holds {shown} which this save does not write; they would be loaded "
        f"with (or instead of) the new export, so {when}. Save into an empty folder, delete or move those files, or "
        "pass overwrite=True to remove them (other files such as notes and checkpoint-* folders always stay)"
    )


# --------------------------------------------------------------------------------------------------------- install


def _install_swap(scratch: Path, target: Path, tag: str) -> None:
    """Case 2: swap the whole folder (atomic exchange, or two renames), then delete the old folder."""
    old = target.parent / f".{target.name}.old-{tag}"
    try:
        swapped = _exchange(scratch, target)
        if not swapped:
            os.rename(target, old)
            try:
                os.rename(scratch, target)
            except OSError:
                os.rename(old, target)
                raise
    except OSError as err:
        _remove(scratch)
        raise ExportInstallError(f"save_directory: moving the new export into {str(target)!r} failed ({err}); "
                                 "nothing was changed: the previous export is in place, the new one was discarded"
                                 ) from err
    _remove_or_warn(scratch if swapped else old, f"save: the new export is installed in {target}; the previous one")


def _install_entries(scratch: Path, target: Path, remove: list[str], tag: str) -> None:
    """Case 3: move replaced / stale entries into a backup, commit, move the new entries in (see module docstring)."""
    names = _entries(scratch)
    moving_out = _keystones_first({n for n in names if os.path.lexists(target / n)} | set(remove))
    backup, done = target / f".fasttune.backup-{tag}", target / f".fasttune.done-{tag}"
    backup.mkdir()
    try:
        for name in moving_out:
            os.rename(target / name, backup / name)
        os.rename(backup, done)
    except OSError as err:
        _roll_back(target, backup, scratch)
        raise ExportInstallError(f"save_directory: installing into {str(target)!r} failed ({err}); the previous files "
                                 "were put back and the new export was discarded") from err
    try:
        for name in _keystones_last(names):
            os.rename(scratch / name, target / name)
        os.rmdir(scratch)
    except OSError as err:
        raise ExportInstallError(
            f"save_directory: installing into {str(target)!r} stopped half way ({err}): some new files are in place, "
            f"the rest are in {scratch}, the previous ones in {done}. The next save into this folder (or "
            f"fasttune.export.atomic.recover_interrupted({str(target)!r})) completes it") from err
    _remove_or_warn(done, f"save: the new export is installed in {target}; the files it replaced")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     managed: Callable[[str], bool] = lambda name: True,
                     may_write: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty scratch folder; once the block completes its entries are installed into ``target``.

    ``managed`` / ``may_write`` / ``overwrite``: what may be replaced or removed, see the module docstring. An existing
    file at ``target`` is an error. On an exception in the block the scratch folder is removed and it propagates.
    """
    target = Path(target).absolute()
    _refuse_non_folder(target)
    recover_interrupted(target)
    if target.is_dir():
        if _holds_cwd(target) and not overwrite:
            raise ExportConflictError(
                f"save_directory: {str(target)!r} is the current working directory or holds it; saving there could "
                "mix the export with your files, so nothing was written. Save into a new subfolder, or pass "
                "overwrite=True (only export files are replaced; your other files stay)")
        if may_write is not None:
            _refuse_stale(target, [n for n in _entries(target) if managed(n) and not may_write(n)], overwrite, False)
    # The scratch goes beside the target unless the target must stay where it is (then case 3 from inside).
    in_place = target.is_dir() and (_must_stay(target) or target.stat().st_dev != target.parent.stat().st_dev
                                    or not os.access(target.parent, os.W_OK | os.X_OK))
    check_writable(target)
    tag = new_tag()
    _ACTIVE.add(tag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target / f".fasttune.tmp-{tag}" if in_place else target.parent / f".{target.name}.tmp-{tag}"
        scratch.mkdir()
        try:
            yield scratch
        except BaseException as error:
            shutil.rmtree(scratch)
            _raise_if_disk_full(error, target, "the export stopped, its partial files were removed and "
                                               f"{str(target)!r} was not changed")
            raise
        _install(scratch, target, overwrite, managed, tag)
    finally:
        _ACTIVE.discard(tag)


def _install(scratch: Path, target: Path, overwrite: bool, managed: Callable[[str], bool], tag: str) -> None:
    if not target.is_dir():
        try:
            os.rename(scratch, target)
        except OSError as err:
            _remove(scratch)
            raise ExportInstallError(f"save_directory: moving the new export to {str(target)!r} failed ({err}); "
                                     "nothing was written there") from err
        return
    written = set(_entries(scratch))
    present = _entries(target)
    stale = [n for n in present if managed(n) and n not in written]
    if stale and not overwrite:
        shutil.rmtree(scratch)
        _refuse_stale(target, stale, overwrite, True)
    keep = [n for n in present if not managed(n) and n not in written]
    if keep or _must_stay(target) or scratch.parent != target.parent:
        _install_entries(scratch, target, stale, tag)
    else:
        _install_swap(scratch, target, tag)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch path beside ``target``; on success it is renamed onto ``target``, on error it is deleted.

    A rename onto a file is atomic, so ``target`` is the old or the new file at every instant. Stale scratch files of
    earlier saves to ``target`` whose process is gone are deleted first.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_siblings(target.parent, only=target.name)
    tag = new_tag()
    _ACTIVE.add(tag)
    scratch = target.parent / f".{target.name}.tmp-{tag}"
    try:
        try:
            yield scratch
        except BaseException as error:
            scratch.unlink(missing_ok=True)
            _raise_if_disk_full(error, target, f"the partial file was removed and {str(target)!r} was not changed")
            raise
        os.replace(scratch, target)
    finally:
        _ACTIVE.discard(tag)
