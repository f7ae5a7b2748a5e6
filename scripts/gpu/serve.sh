#!/usr/bin/env bash
# `pgate serve` on the GPU against `pgate bench` in the same call (issue 18): the synthetic 8B-shaped
# bf16 model, a steered preset (add at layer 16 + ablate at 20-22, the bench's add+ablate), and
#   1. 64 closed-loop clients x 256 new tokens (serve-bench) -> completion tok/s, beside the bench's
#      batch-64 add+ablate decode rate (run `bench` in the same call);
#   2. one client -> tok/s beside the bench's batch 1;
#   3. the burst test (serve_burst.py): p50 time to first token of 32 new requests arriving while 32
#      others decode, against an idle server's, and whether the 32 kept decoding during the burst.
#
#   bash scripts/gpu/serve.sh BIN SYNTH_DIR OUT_DIR       (SERVE_PARTS="burst": the burst test alone;
#                                                      PGATE_SLOT_REUSE=0: without slot reuse)
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
D=/tmp/pgate-serve-gpu
PORT=18500
URL="http://127.0.0.1:$PORT"
mkdir -p "$D" "$OUT"
for s in 1 2; do
  [ -e "$D/dir$s.safetensors" ] ||
    "$BIN" extract random "$SYNTH" --dtype bf16 --device cuda --seed "$s" -o "$D/dir$s.safetensors" || exit 1
done
cat >"$D/presets.toml" <<'TOML'
[presets.default]
description = "no steering"

[presets.steered]
description = "the bench's add+ablate: add at layer 16, ablate another direction at 20-22"
add = ["dir1:4@16"]
ablate = ["dir2@20-22"]
TOML
"$BIN" serve "$SYNTH" --dtype bf16 --device cuda --presets "$D/presets.toml" --directions "$D" \
  --max-batch 64 --queue 256 --max-tokens 256 --port "$PORT" >"$OUT/serve.out" 2>"$OUT/serve.err" &
PID=$!
for _ in $(seq 1 900); do grep -q "listening on" "$OUT/serve.out" 2>/dev/null && break; sleep 0.2; done
status=0
# SERVE_PARTS picks the measured parts (default all three: "64 1 burst").
PARTS=" ${SERVE_PARTS:-64 1 burst} "
# Warm-up (graphs recorded, allocator settled), then the measured runs.
if [[ "$PARTS" == *" 64 "* ]]; then
  "$BIN" serve-bench --url "$URL" --clients 64 --duration 10 --max-tokens 256 --preset steered >/dev/null 2>&1
  "$BIN" serve-bench --url "$URL" --clients 64 --duration 60 --max-tokens 256 --preset steered --out "$OUT/serve64.json" || status=1
fi
if [[ "$PARTS" == *" 1 "* ]]; then
  "$BIN" serve-bench --url "$URL" --clients 1 --duration 20 --max-tokens 256 --preset steered --out "$OUT/serve1.json" || status=1
fi
if [[ "$PARTS" == *" burst "* ]]; then
  python3 "$(dirname "$0")/serve_burst.py" --url "$URL" --preset steered --out "$OUT/burst.json" || status=1
fi
# How often the decode stepper (its CUDA graphs) was made anew, and how many requests joined in place.
python3 -c "import urllib.request; print(urllib.request.urlopen('$URL/metrics').read().decode())" 2>/dev/null |
  grep -E '^pgate_(decode_steppers|slots_reused|decode_steps|decode_tokens)_total' | tee "$OUT/serve_metrics.txt"
kill -TERM "$PID"; wait "$PID"
tail -3 "$OUT/serve.err"
exit $status
