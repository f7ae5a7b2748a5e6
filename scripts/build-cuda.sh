#!/usr/bin/env bash
# Build `pgate` with CUDA on a machine without a GPU (recipe: ../shared/cuda/NOTES.md), for Hopper (sm_90).
#
#   bash scripts/build-cuda.sh   # -> gpu-bin/pgate (stripped) and gpu-bin/carry/pgate.xz (gitignored)
#
# 1. nvcc, NVVM and the CUDA 13.0 headers/libraries come from PyPI wheels (the GPU machine's driver is CUDA
#    13.0; a newer nvcc emits code it may reject), downloaded once into $PGATE_CUDA_CACHE
#    (default ~/.cache/persona-gate/cuda), never into the repository.
# 2. candle forces cudarc's dynamic linking, so the linker needs libcudart/libnvrtc/libcublas/libcurand
#    (unversioned symlinks are added) and libcuda, the driver, which has no wheel: a stub with one empty
#    function per driver symbol the build references links instead. At run time the GPU machine's real
#    libcuda.so.1 and PyTorch's CUDA 13 libraries are loaded (scripts/gpu/env.sh).
# 3. Its own target dir ($CARGO_TARGET_DIR, default /work/target-cuda or ../target-cuda): candle-kernels
#    takes ~13 min on 2 cores the first time; keep the dir, and never change RUSTFLAGS between builds.
# CI does not run this: the `cuda` feature is opt-in and the default build needs none of it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE="${PGATE_CUDA_CACHE:-$HOME/.cache/persona-gate/cuda}"
ROOT="$CACHE/root"
CUDA_ROOT="$ROOT/nvidia/cu13"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(cd .. && pwd)/target-cuda}"
OUTBIN="${PGATE_CUDA_OUT:-$REPO/gpu-bin/pgate}"
NICE="${PGATE_NICE:-10}"

mkdir -p "$CACHE/whl" "$ROOT"
if [ ! -x "$CUDA_ROOT/bin/nvcc" ] || [ ! -e "$CUDA_ROOT/lib/libcublas.so" ]; then
  echo "== fetching the CUDA 13.0 toolkit wheels into $CACHE/whl" >&2
  python3 -m pip download --no-deps --only-binary=:all: -d "$CACHE/whl" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
  for w in "$CACHE"/whl/*.whl; do unzip -q -o "$w" -d "$ROOT"; done
  chmod +x "$CUDA_ROOT"/bin/* "$CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
fi
(
  cd "$CUDA_ROOT/lib"
  for name in cudart nvrtc curand cublas cublasLt; do
    if [ ! -e "lib$name.so" ]; then
      f=$(ls "lib$name.so."* 2>/dev/null | sort | tail -1)
      [ -n "$f" ] || { echo "lib$name.so.* missing in $CUDA_ROOT/lib" >&2; exit 1; }
      ln -sf "$f" "lib$name.so"
    fi
  done
)

export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH" CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvcc --version | tail -2 >&2

# libcuda has no wheel: link against a stub with one empty function per driver symbol that the cudarc,
# candle and persona-gate rlibs reference (PGATE_CUDA_RESTUB=1 remakes it after new driver calls). The first build (no stub yet) fails at the final link but leaves the rlibs.
# Always build the same package set (-p pgate): another set unifies features differently and recompiles
# the CUDA kernels.
if [ ! -e "$CUDA_ROOT/lib/libcuda.so" ] || [ "${PGATE_CUDA_RESTUB:-0}" = 1 ]; then
  echo "== building the dependencies (cuda) in $CARGO_TARGET_DIR; the link step may fail here" >&2
  nice -n "$NICE" cargo build --release -p pgate --features cuda || true
  syms=$(for f in "$CARGO_TARGET_DIR"/release/deps/lib{cudarc,candle_core,candle_nn,persona_gate}-*.rlib; do
           nm -u "$f" 2>/dev/null || true
         done | awk '{print $NF}' | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u)
  [ -n "$syms" ] || { echo "no driver symbols found in the rlibs" >&2; exit 1; }
  { echo "/* libcuda link stub (scripts/build-cuda.sh): never loaded at run time */"
    for s in $syms; do echo "int $s(void) { return 999; }"; done; } >"$CACHE/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib/libcuda.so" "$CACHE/libcuda_stub.c"
  echo "== libcuda stub: $(echo "$syms" | wc -l) symbols" >&2
fi

echo "== building pgate (cuda) in $CARGO_TARGET_DIR" >&2
nice -n "$NICE" cargo build --release -p pgate --features cuda
mkdir -p "$(dirname "$OUTBIN")"
strip -o "$OUTBIN" "$CARGO_TARGET_DIR/release/pgate"
# What travels to the GPU machine is size-limited (64 MiB): carry gpu-bin/carry/ (scripts/gpu/run.sh).
CARRY="$(dirname "$OUTBIN")/carry"
mkdir -p "$CARRY"
xz -T0 -6 -c "$OUTBIN" >"$CARRY/pgate.xz"
if [ -f ../shared/bench/hf_gpu_baseline.py ]; then cp ../shared/bench/hf_gpu_baseline.py "$CARRY/"; fi
ls -la "$OUTBIN" "$CARRY" >&2
