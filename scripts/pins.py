#!/usr/bin/env python3
"""Write the tested pins (constraints.txt) from the environment the suite just passed in.

    python scripts/pins.py write     # constraints.txt <- every installed distribution, exact versions

`scripts/test.sh` installs with ``-c constraints.txt``, so a fresh machine tests exactly these versions;
pyproject.toml keeps ranges for users. `scripts/move_pins.sh` is the one caller: it runs the suite in a new,
unpinned environment (the newest versions pyproject.toml allows) and calls this only when the suite passed.
"""

from __future__ import annotations

import datetime
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# The versions the test suite last passed with, on Python {python} (written by scripts/pins.py on {date}).
# scripts/test.sh (the README's test command, run by .ci/run) installs with `-c constraints.txt`, so a fresh machine
# tests exactly these. pyproject.toml keeps ranges for users. Move them only with `bash scripts/move_pins.sh`:
# it installs the newest versions pyproject.toml allows into a new venv, runs the suite there, and rewrites this
# file only if it passes. Local version labels (torch's +cpu) are dropped: `==2.13.0` matches 2.13.0+cpu.
"""


def installed() -> dict[str, str]:
    pins = {}
    for dist in distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in ("fasttune", "pip", "setuptools", "wheel"):
            continue
        pins[name] = dist.version.split("+")[0]
    return pins


def write() -> None:
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [f"{name}=={version}" for name, version in sorted(installed().items())]
    text = HEADER.format(python=python, date=datetime.date.today().isoformat()) + "\n".join(lines) + "\n"
    tmp = CONSTRAINTS.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(CONSTRAINTS)
    print(f"pins: wrote {len(lines)} versions to {CONSTRAINTS.name}")


if __name__ == "__main__":
    if sys.argv[1:] != ["write"]:
        sys.exit(f"usage: python {sys.argv[0]} write")
    write()
