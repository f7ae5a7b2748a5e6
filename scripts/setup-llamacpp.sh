#!/usr/bin/env bash
# The llama.cpp the control-vector cross-check test compares against (llama-cpp-python 0.3.36, built
# from source: PyPI has no binary wheel). Built once into ${PGATE_CACHE:-~/.cache/persona-gate}/lcpp-venv
# and reused; only the library is built (no llava/mtmd, tools, examples or tests), which is most of
# what made the first test run slow. Prints the venv's python on success.
set -euo pipefail
CACHE="${PGATE_CACHE:-$HOME/.cache/persona-gate}"
VENV="$CACHE/lcpp-venv"
PY="$VENV/bin/python"
if [[ -x "$PY" ]] && "$PY" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "$PY"
  exit 0
fi
mkdir -p "$CACHE"
# One build at a time (the test command and the test itself may both ask).
exec 9>"$CACHE/lcpp-venv.lock"
flock 9
if [[ -x "$PY" ]] && "$PY" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "$PY"
  exit 0
fi
python3 -m venv "$VENV"
export CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
"$PY" -m pip install -q "llama-cpp-python==0.3.36" numpy >&2
"$PY" -c "import llama_cpp, numpy"
echo "$PY"
