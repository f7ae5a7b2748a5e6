#!/usr/bin/env bash
# Load test of `pgate serve` (issue 6): CLIENTS concurrent clients for SECONDS on loopback, first against
# a continuous-batching server (--max-batch CLIENTS), then against the same server serving one request
# at a time (--max-batch 1), same model, same load. Prints both reports and the throughput ratio; writes
# the JSON reports to OUT_DIR. Extra server flags in $PGATE_SERVE_ARGS (e.g. "--dtype f32"). On a shared
# machine set RAYON_NUM_THREADS=1: with more threads than free cores, worker threads spinning at
# barriers make every step many times slower.
#
#   scripts/serve-bench.sh [MODEL] [CLIENTS] [SECONDS] [MAX_TOKENS] [OUT_DIR]
#   scripts/serve-bench.sh smollm2 32 60 64 /tmp/serve-bench
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2}"
CLIENTS="${2:-32}"
SECONDS_="${3:-60}"
MAX_TOKENS="${4:-64}"
OUT="${5:-/tmp/serve-bench}"
PORT="${PGATE_BENCH_PORT:-18431}"
BIN="${PGATE_BIN:-target/release/pgate}"
mkdir -p "$OUT"
[ -x "$BIN" ] || cargo build --release -p pgate

run() { # name max_batch
  local name=$1 batch=$2
  # shellcheck disable=SC2086
  "$BIN" serve "$MODEL" --port "$PORT" --max-batch "$batch" --queue 64 --max-tokens "$MAX_TOKENS" ${PGATE_SERVE_ARGS:-} \
    >"$OUT/$name.server.out" 2>"$OUT/$name.server.err" &
  local pid=$!
  for _ in $(seq 1 600); do
    grep -q "listening on" "$OUT/$name.server.out" 2>/dev/null && break
    sleep 0.2
  done
  echo "== $name: --max-batch $batch, $CLIENTS clients x $SECONDS_ s, max_tokens $MAX_TOKENS ($MODEL ${PGATE_SERVE_ARGS:-}, RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-unset}, load $(cut -d' ' -f1-3 /proc/loadavg))"
  local rc=0
  "$BIN" serve-bench --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --duration "$SECONDS_" \
    --max-tokens "$MAX_TOKENS" --out "$OUT/$name.json" || rc=$?
  kill -TERM "$pid"
  wait "$pid" || true
  return $rc
}

run batched "$CLIENTS"
run one-at-a-time 1
python3 - "$OUT" <<'EOF'
import json, sys
d = sys.argv[1]
b = json.load(open(f"{d}/batched.json"))
s = json.load(open(f"{d}/one-at-a-time.json"))
for name, r in (("batched", b), ("one-at-a-time", s)):
    print(f"{name:>14}: {r['completion_tokens_per_s']:7.1f} tok/s, {r['requests_per_s']:5.2f} req/s, "
          f"{r['requests_ok']} ok, {r['rejected_429']} x 429, {r['errors']} errors, "
          f"p50 {r['latency_p50_s']:.2f} s, p95 {r['latency_p95_s']:.2f} s, "
          f"RSS max {r['rss_max_bytes'] / 2**20:.0f} MiB")
print(f"throughput ratio batched / one-at-a-time: {b['completion_tokens_per_s'] / s['completion_tokens_per_s']:.2f}x")
EOF
