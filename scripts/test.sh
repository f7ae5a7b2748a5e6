#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the real models if needed, then run every test
# in release mode (the engine runs real models in f32; an unoptimized build would take hours).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-models.sh
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
cargo test --release --workspace --no-fail-fast -- --test-threads=1 "$@"
