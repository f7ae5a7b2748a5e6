#!/usr/bin/env bash
# CPU benchmark, side by side in one run: pgate (q mode) and llama.cpp on the same GGUF.
#
#   scripts/bench-cpu.sh [MODEL=q15] [THREADS=2] [NEW_TOKENS=128]
#
# llama.cpp comes from the PyPI package llama-cpp-python, built once into $LCPP_VENV (about 8
# minutes on 2 cores); its numbers are llama.cpp's own counters (../shared/bench/llama_cpp_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-q15}"
threads="${2:-2}"
new="${3:-128}"
venv="${LCPP_VENV:-/tmp/lcpp}"
gguf="${PGATE_CACHE:-$HOME/.cache/persona-gate}/models/$model.gguf"
shared="${PGATE_SHARED:-$(cd .. && pwd)/shared}"
bash scripts/setup-models.sh "$model" >/dev/null
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q llama-cpp-python==0.3.36
fi
cargo build --release -q -p pgate
echo "== llama.cpp ($threads threads, $new new tokens)"
"$venv/bin/python" "$shared/bench/llama_cpp_bench.py" "$gguf" "$threads" "$new" | grep '^rep'
echo "== pgate (q mode)"
RAYON_NUM_THREADS="$threads" ./target/release/pgate bench "$model" --dtype q --batches 1,16 --new-tokens "$new"
