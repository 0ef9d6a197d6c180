"""Run folders as the studio sees them: the same folders ``fasttune train`` writes (recipe.yaml, metrics.jsonl,
report.md, checkpoints/, the exports), listed from disk, so a run started on the command line appears here and a run
started here is a ``fasttune train`` process (``python -m fasttune.cli train``) that outlives the page and the server.

A run is *running* while a process holds its ``.lock`` (``fasttune.cli.train.run_lock``: an exclusive ``flock`` the
kernel drops when the process ends, however it ends); its pid is written in the lock file. Stop = SIGINT to that
pid: the CLI's Ctrl-C, which saves a checkpoint after the current step (``callbacks.InterruptCallback``). The studio
writes the process's output to ``<run>/train.log``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from fasttune.cli.recipe import Recipe, dump_recipe
from fasttune.cli.report import METRICS, REPORT, read_metrics
from fasttune.cli.train import CHECKPOINTS, LOCK_FILE, RECIPE_FILE, new_run_dir
from fasttune.export.atomic import atomic_file

LOG_FILE = "train.log"
EXPORT_LOG = "export.log"
_STEP = re.compile(r"step (\d+)/(\d+)")


class BusyError(RuntimeError):
    """A second run was asked for while one trains (the studio refuses it rather than share the machine)."""


def cli(*args: str) -> list[str]:
    """The ``fasttune`` command line, as this interpreter runs it."""
    return [sys.executable, "-m", "fasttune.cli", *args]


def lock_holder(run: Path) -> int | None:
    """The pid of the process writing into ``run`` (it holds the lock), or None."""
    path = run / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def run_status(run: Path, alive: bool = False) -> str:
    """running (a process holds the lock), starting (this server's child is up but has not taken the lock yet),
    stopped (report.md says interrupted), finished, failed (ended without a report) or incomplete."""
    if lock_holder(run) is not None:
        return "running"
    if alive:
        return "starting"
    report = run / REPORT
    if report.is_file():
        first = next((line for line in report.read_text(encoding="utf-8").splitlines()
                      if line.startswith("Status:")), "Status: finished")
        return "stopped" if "interrupted" in first else "finished"
    return "failed" if (run / LOG_FILE).is_file() else "incomplete"


def _max_steps(run: Path, recipe: dict[str, Any]) -> int | None:
    log = run / LOG_FILE
    if log.is_file():
        found = _STEP.findall(log.read_text(encoding="utf-8", errors="replace")[-4000:])
        if found:
            return int(found[-1][1])
    steps = recipe.get("train", {}).get("max_steps")
    return steps or None


def run_info(run: Path, alive: bool = False) -> dict[str, Any]:
    """What the runs list shows of one run folder (``alive``: this server's child process for it is running)."""
    recipe = yaml.safe_load((run / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    pid = lock_holder(run)
    rows = read_metrics(run / METRICS)
    losses = [r for r in rows if r.get("loss") is not None]
    return {"name": run.name, "path": str(run), "status": run_status(run, alive), "pid": pid,
            "method": recipe.get("train", {}).get("method", "sft"), "model": recipe.get("model", {}).get("name"),
            "data": recipe.get("data", {}).get("path"), "step": rows[-1]["step"] if rows else 0,
            "max_steps": _max_steps(run, recipe), "loss": losses[-1]["loss"] if losses else None,
            "modified": (run / RECIPE_FILE).stat().st_mtime,
            "checkpoints": sorted(p.name for p in (run / CHECKPOINTS).glob("checkpoint-*")) if (run / CHECKPOINTS)
            .is_dir() else [], "exports": exports(run)}


def exports(run: Path) -> list[dict[str, Any]]:
    """The exported files of a run: adapter/ and merged/ as folders, each GGUF file and the Modelfile."""
    found = []
    for name in ("adapter", "merged"):
        folder = run / name
        if folder.is_dir():
            found.append({"kind": name, "path": str(folder), "bytes": sum(p.stat().st_size for p in folder.rglob("*")
                                                                          if p.is_file())})
    gguf = run / "gguf"
    if gguf.is_dir():
        for file in sorted(gguf.iterdir()):
            if file.is_file() and (file.suffix == ".gguf" or file.name == "Modelfile"):
                found.append({"kind": "ollama Modelfile" if file.name == "Modelfile" else "gguf", "path": str(file),
                              "bytes": file.stat().st_size})
    return found


class Runs:
    """The run folders under ``root`` and the training/export processes this server started."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def folders(self) -> list[Path]:
        self._reap()
        return sorted((p for p in self.root.iterdir() if (p / RECIPE_FILE).is_file()),
                      key=lambda p: (p / RECIPE_FILE).stat().st_mtime, reverse=True)

    def list(self) -> list[dict[str, Any]]:
        return [run_info(p, self.alive(p.name)) for p in self.folders()]

    def alive(self, key: str) -> bool:
        """Whether this server's child process ``key`` (a run name, or export:NAME) is still running."""
        with self._lock:
            child = self._children.get(key)
        return child is not None and child.poll() is None

    def folder(self, name: str) -> Path:
        """The run folder called ``name`` (a plain name under the runs root; anything else is refused)."""
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise KeyError(f"run: {name!r} is not a run name")
        path = self.root / name
        if not (path / RECIPE_FILE).is_file():
            raise KeyError(f"run: {name!r} is not a run folder under {self.root}")
        return path

    def running(self) -> dict[str, Any] | None:
        """The run that trains now (started here or by ``fasttune train`` into this runs folder), or None."""
        for path in self.folders():
            pid = lock_holder(path)
            if pid is not None or self.alive(path.name):
                with self._lock:
                    child = self._children.get(path.name)
                return {"name": path.name, "pid": pid if pid is not None else child.pid}
        return None

    def _reap(self) -> None:
        """Collect the exit status of ended children (no zombies); they stay listed for their return codes."""
        with self._lock:
            for child in self._children.values():
                child.poll()

    def _spawn(self, key: str, args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:  # the child keeps its own descriptor
            child = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)  # its own session: the server's end is not its
        with self._lock:
            self._children[key] = child
        return child

    def _refuse_if_busy(self) -> None:
        busy = self.running()
        if busy is not None:
            raise BusyError(f"run {busy['name']!r} is training (pid {busy['pid']}); one run at a time: stop it or "
                            "wait until it ends, then start this one")

    def start(self, recipe: Recipe) -> Path:
        """Start ``fasttune train`` on ``recipe`` in a new run folder under the runs root; returns the folder."""
        self._refuse_if_busy()
        recipe.run.runs_root, recipe.run.output_dir = str(self.root), ""  # always a new folder under the runs root
        run = new_run_dir(recipe)
        recipe.run.output_dir = str(run)
        run.mkdir(parents=True)
        with atomic_file(run / RECIPE_FILE) as scratch:
            scratch.write_text(dump_recipe(recipe), encoding="utf-8")
        self._spawn(run.name, cli("train", str(run / RECIPE_FILE), "--quiet"), run / LOG_FILE, run)
        return run

    def resume(self, name: str) -> Path:
        run = self.folder(name)
        self._refuse_if_busy()
        with open(run / LOG_FILE, "a", encoding="utf-8") as log:
            log.write("\n--- resumed from the studio ---\n")
        self._spawn(run.name, cli("train", str(run / RECIPE_FILE), "--resume", str(run), "--quiet"), run / LOG_FILE,
                    run)
        return run

    def stop(self, name: str) -> int:
        """SIGINT to the run's process (a checkpoint is saved after the current step); returns its pid."""
        run = self.folder(name)
        pid = lock_holder(run)
        if pid is None and self.alive(name):  # still starting (imports, loading): nothing to save yet
            with self._lock:
                pid = self._children[name].pid
        if pid is None or pid <= 0:
            raise KeyError(f"run: {name!r} is not training")
        os.kill(pid, signal.SIGINT)
        return pid

    def export(self, name: str, adapter: bool, merged: bool, gguf: list[str], ollama: bool) -> subprocess.Popen:
        """``fasttune export RUN ...`` into the run folder, its output in ``<run>/export.log``."""
        run = self.folder(name)
        key = f"export:{name}"
        with self._lock:
            child = self._children.get(key)
        if child is not None and child.poll() is None:
            raise BusyError(f"run {name!r} is already exporting (pid {child.pid})")
        args = ["export", str(run), "--quiet"] + (["--adapter"] if adapter else []) + (["--merged"] if merged else [])
        args += (["--gguf", ",".join(gguf)] if gguf else []) + (["--ollama"] if ollama else [])
        (run / EXPORT_LOG).write_text("$ fasttune " + " ".join(args) + "\n", encoding="utf-8")
        return self._spawn(key, cli(*args), run / EXPORT_LOG, run)

    def export_state(self, name: str) -> dict[str, Any]:
        run = self.folder(name)
        with self._lock:
            child = self._children.get(f"export:{name}")
        code = None if child is None else child.poll()
        log = run / EXPORT_LOG
        return {"running": child is not None and code is None, "returncode": code,
                "log": log.read_text(encoding="utf-8", errors="replace")[-20000:] if log.is_file() else "",
                "files": exports(run)}


def tail(path: Path, offset: int) -> tuple[str, int]:
    """The text of ``path`` from byte ``offset`` to its last complete line, and the new offset."""
    if not path.is_file():
        return "", offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", errors="replace"), offset + end


def metrics_since(run: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    text, offset = tail(run / METRICS, offset)
    return [json.loads(line) for line in text.splitlines() if line.strip()], offset
