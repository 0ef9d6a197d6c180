#!/usr/bin/env bash
# Move the tested pins (constraints.txt) to the newest versions pyproject.toml allows, if the suite passes on them.
#   bash scripts/move_pins.sh
# A new venv, no pins: pip resolves the newest allowed release of every dependency. The README's test command runs
# there (FASTTUNE_PINS=0); only when it passes is constraints.txt rewritten from that venv. Then commit it with the
# suite's counts and time, and the versions that moved (git diff constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
FASTTUNE_PINS=0 bash scripts/test.sh
python scripts/pins.py write
git --no-pager diff --stat constraints.txt
