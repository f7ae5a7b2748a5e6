#!/usr/bin/env bash
# Mixed hostile load against `pgate serve` (issue 17): slow sockets, ~4 MB bodies, ~4k-token prompts,
# cancelled streams and non-ASCII stops beside 16 normal clients. Prints panics, lost normal requests,
# /health p99 and the server's RSS (start, peak, and SETTLE seconds after the load stopped); exits 1 on a
# panic, a lost normal request or /health p99 over 50 ms. Extra server flags in $PGATE_SERVE_ARGS. On a
# shared machine set RAYON_NUM_THREADS.
#
#   scripts/serve-hostile.sh [MODEL] [SECONDS] [SLOW_SOCKETS] [OUT_JSON] [serve-hostile.py flags...]
#   scripts/serve-hostile.sh q05 120 200 /tmp/serve-hostile.json
#   scripts/serve-hostile.sh smollm2 5 32 /tmp/quick.json --long-tokens 300 --settle 2   # quick check
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-q05}"
SECONDS_="${2:-120}"
SLOW="${3:-200}"
OUT="${4:-/tmp/serve-hostile.json}"
shift $(( $# < 4 ? $# : 4 ))
BIN="${PGATE_BIN:-target/release/pgate}"
[ -x "$BIN" ] || cargo build --release -p pgate
exec python3 scripts/serve-hostile.py --bin "$BIN" --model "$MODEL" --duration "$SECONDS_" --slow "$SLOW" \
  --normal 16 --big 2 --long 2 --long-tokens 4000 --cancel 4 --stops 2 --settle 15 \
  --serve-args "${PGATE_SERVE_ARGS:-}" --json "$OUT" "$@"
