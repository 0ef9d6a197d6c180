"""What a run leaves behind to read: metrics.jsonl (one line per log), loss.png, report.md.

The plot is drawn headless (matplotlib's Agg backend): loss (and evaluation loss) against the step above, the
learning rate below; 800 x 600 pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fasttune.export.atomic import atomic_file

from .memory import gib

METRICS = "metrics.jsonl"
PLOT = "loss.png"
REPORT = "report.md"


class MetricsLog:
    """Appends one JSON line per logging step to ``<run>/metrics.jsonl``, flushed at once (others may tail it)."""

    def __init__(self, run_dir: Path, keep_until_step: int | None = None):
        self.path = run_dir / METRICS
        if keep_until_step is not None:  # resuming: drop lines after the checkpoint (they are trained again)
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            with atomic_file(self.path) as scratch:
                scratch.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
            out.flush()
            os.fsync(out.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict[str, Any]], target: Path) -> Path | None:
    """loss.png from the metric rows; None when no row has a loss (nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if not train:
        return None
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    lrs = [(r["step"], r["learning_rate"]) for r in rows if r.get("learning_rate") is not None]
    fig = Figure(figsize=(8, 6), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    top.plot(*zip(*train), color="tab:blue", linewidth=2, label="training loss")
    if evals:
        top.plot(*zip(*evals), "o--", color="tab:orange", label="evaluation loss")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    if lrs:
        bottom.plot(*zip(*lrs), color="tab:green", linewidth=2)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(target) as scratch:
        fig.savefig(scratch, format="png")
    return target


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def size_text(n: int) -> str:
    return gib(n) if n >= 2**20 else f"{n / 1024:.1f} KiB"


def write_report(run_dir: Path, summary: dict[str, Any], exports: Iterable[dict[str, Any]]) -> Path:
    """report.md: the run's figures and the exports made (paths and sizes)."""
    rows = read_metrics(run_dir / METRICS)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    lines = [f"# Run {run_dir.name}", "", f"Status: {summary.get('status', 'finished')}", "",
             "| figure | value |", "|---|---|",
             f"| model | `{summary.get('model')}` ({summary.get('quantization')}) |",
             f"| steps | {summary.get('step')} of {summary.get('max_steps')} |",
             f"| loss, first -> last log | {_num(losses[0] if losses else None)} -> "
             f"{_num(losses[-1] if losses else None)} |"]
    if evals:
        lines.append(f"| evaluation loss, last | {_num(evals[-1])} |")
    lines += [f"| training time | {summary.get('train_seconds', 0):.1f} s |",
              f"| tokens/s (mean of logs) | {sum(speeds) / len(speeds):.1f} |" if speeds else "| tokens/s | - |"]
    lines += ["", "## Memory", "", *memory_table(summary)]
    lines += ["", "## Exports", ""]
    exported = list(exports)
    if exported:
        lines += ["| kind | path | size |", "|---|---|---|"]
        lines += [f"| {e['kind']} | `{e['path']}` | {size_text(e['bytes'])} |" for e in exported]
    else:
        lines.append("none")
    if (run_dir / PLOT).is_file():
        lines += ["", f"![loss and learning rate]({PLOT})"]
    target = run_dir / REPORT
    with atomic_file(target) as scratch:
        scratch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def measured_peak(summary: dict[str, Any]) -> tuple[int | None, str]:
    """The peak the prediction is compared with and what it is: the device's on CUDA, else the process's RSS."""
    if "device_peak_bytes" in summary:
        return summary["device_peak_bytes"], "device peak (torch max_memory_reserved)"
    return summary.get("peak_rss_bytes"), "process peak RSS, loading + training"


def memory_table(summary: dict[str, Any]) -> list[str]:
    """Peak memory measured while loading and training beside ``fasttune estimate``'s prediction (markdown rows)."""
    predicted = summary.get("predicted_peak_bytes")
    on_device = "device_peak_bytes" in summary
    measured, what = measured_peak(summary)
    if measured is None:
        return ["not measured"]
    error = f"{(predicted - measured) / measured:+.1%}" if predicted else "-"
    rows = ["| memory | predicted (fasttune estimate) | measured | error |", "|---|---|---|---|",
            f"| {what} | {gib(predicted) if predicted else '-'} | {gib(measured)} | {error} |"]
    if not on_device and summary.get("baseline_rss_bytes"):
        rows.append(f"| of which the runtime before loading | (measured) | {gib(summary['baseline_rss_bytes'])} | |")
    return rows


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
