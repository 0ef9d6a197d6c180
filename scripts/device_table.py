"""The one table of scripts/device_check.sh: the GPU, the versions, the CUDA tests' counts and each benchmark's ratio.

    python scripts/device_table.py --env env.json --junit cuda.xml --sft sft.json --grpo grpo.json \
        --step tests=0 --step sft=124 [--out device_check.md]

``--env``: what the machine is (written by device_check.sh: gpu, driver, torch, cuda, date). ``--junit``: pytest's
``--junitxml`` of ``pytest -m cuda``. ``--sft`` / ``--grpo``: the JSON files bench/bench_sft.py and
bench/bench_grpo.py wrote. ``--step NAME=RC``: each step's exit status (124: stopped at its time limit). A piece that
is missing or failed is a row that says so; the table is printed whatever ran.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

STEP_NAMES = {"install": "install", "models": "real models (PyPI)", "tests": "pytest -m cuda", "sft": "bench_sft",
              "grpo": "bench_grpo"}


def _read_json(path: str | None) -> dict | None:
    if not path or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return None
    return json.loads(Path(path).read_text())


def pytest_counts(junit: str | None) -> str | None:
    """'N passed, F failed, E errors, S skipped in T s' from pytest's JUnit XML; None without the file."""
    if not junit or not Path(junit).is_file():
        return None
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    seconds = sum(float(s.get("time", 0)) for s in suites)
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return (f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped "
            f"in {seconds:.0f} s")


def _mem(r: dict) -> tuple[float, str]:
    return (r["peak_cuda_gib"], "GPU peak") if "peak_cuda_gib" in r else (r["peak_rss_gib"], "RSS peak")


def sft_rows(data: dict | None, fast: str = "notebook", base: str = "baseline") -> list[tuple[str, str]]:
    """One row per model: the notebook flow against the plain stack (tokens/s, memory, last loss)."""
    if data is None:
        return []
    by_model: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        by_model.setdefault(r["model"], {})[r["mode"]] = r
    rows = []
    for model, modes in by_model.items():
        name = f"SFT {model}: {fast} vs {base}"
        f, b = modes.get(fast), modes.get(base)
        broken = [f"{m}: {(r or {}).get('error', 'not run').strip().splitlines()[-1][:80]}"
                  for m, r in ((fast, f), (base, b)) if r is None or "error" in r]
        if broken:
            rows.append((name, "ERROR " + "; ".join(broken)))
            continue
        (fm, label), (bm, _) = _mem(f), _mem(b)
        rows.append((name, f"{f['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s ({f['tokens_per_s']:.0f} vs "
                           f"{b['tokens_per_s']:.0f}); {label} {fm / bm:.2f}x ({fm:.2f} vs {bm:.2f} GiB); last loss "
                           f"{f['loss_last']:.4f} vs {b['loss_last']:.4f}"))
    return rows


def grpo_rows(data: dict | None) -> list[tuple[str, str]]:
    """fasttune's GRPO step against TRL's: seconds per step (and of it, rollout), memory."""
    if data is None:
        return []
    f, b = data["results"].get("fasttune"), data["results"].get("baseline")
    name = "GRPO: fasttune vs TRL"
    broken = [f"{m}: {(r or {}).get('error', 'not run').strip().splitlines()[-1][:80]}"
              for m, r in (("fasttune", f), ("TRL", b)) if r is None or "error" in r]
    if broken:
        return [(name, "ERROR " + "; ".join(broken))]
    (fm, label), (bm, _) = _mem(f), _mem(b)
    return [(name, f"{b['step_s'] / f['step_s']:.2f}x faster per step ({f['step_s']:.2f} vs {b['step_s']:.2f} s; "
                   f"rollout {f['rollout_s']:.2f} vs {b['rollout_s']:.2f} s); {label} {fm / bm:.2f}x "
                   f"({fm:.2f} vs {bm:.2f} GiB)")]


def render(env: dict | None, tests: str | None, sft: dict | None, grpo: dict | None, steps: dict[str, int]) -> str:
    env = env or {}
    rows = [("GPU", f"{env.get('gpu', 'unknown')} (driver {env.get('driver', '?')}, {env.get('memory', '?')})"),
            ("torch / CUDA", f"{env.get('torch', '?')} / CUDA {env.get('cuda', '?')}, triton {env.get('triton', '?')}"),
            ("date (UTC)", env.get("date", "?"))]
    rows.append(("pytest -m cuda", tests or "did not run (no JUnit report)"))
    rows += sft_rows(sft) or [("SFT", "did not run (no results file)")]
    rows += grpo_rows(grpo) or [("GRPO", "did not run (no results file)")]
    for step, rc in steps.items():
        if rc != 0:
            why = "stopped at its time limit" if rc in (124, 137) else f"exit status {rc}"
            rows.append((f"step {STEP_NAMES.get(step, step)}", why))
    lines = ["| check | result |", "| --- | --- |"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def _step(text: str) -> tuple[str, int]:
    name, sep, rc = text.partition("=")
    if not sep or not rc.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"--step: {text!r} is not NAME=EXIT_STATUS (e.g. tests=0)")
    return name, int(rc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env")
    parser.add_argument("--junit")
    parser.add_argument("--sft")
    parser.add_argument("--grpo")
    parser.add_argument("--step", type=_step, action="append", default=[])
    parser.add_argument("--out", help="also write the table here")
    opts = parser.parse_args(argv)
    table = render(_read_json(opts.env), pytest_counts(opts.junit), _read_json(opts.sft), _read_json(opts.grpo),
                   dict(opts.step))
    print(table)
    if opts.out:
        Path(opts.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
