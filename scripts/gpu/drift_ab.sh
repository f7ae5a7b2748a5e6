#!/usr/bin/env bash
# What the serving drift monitor costs (issue 20), on the GPU: the synthetic 8B-shaped bf16 model, a
# steered preset (add at 16, the bench's), 64 closed-loop clients x 128 new tokens, alternating
#   off: no projection directions and PGATE_SERVE_DRIFT=0 (no last-token capture, no monitor), and
#   on:  persona/refusal directions named (last-token projections per 4-layer window on every
#        request) and the drift monitor on (a score per preset, histograms; measured 2026-11-30 with
#        the PSI version of the score, since replaced by a rank-sum test of the same cost class),
#   proj: directions named (projections), PGATE_SERVE_DRIFT=0 (MODES="off proj on" adds it),
# ROUNDS times each (off, on, off, on, ...), each a fresh server with a 10 s warm-up. Prints both
# medians and the cost in percent; JSON per run in OUT.
#
#   bash scripts/gpu/drift_ab.sh BIN SYNTH_DIR OUT_DIR
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
D=/tmp/pgate-drift-ab
PORT=18600
URL="http://127.0.0.1:$PORT"
ROUNDS="${ROUNDS:-2}"
DUR="${DUR:-30}"
mkdir -p "$D" "$OUT"
for s in 1 2; do
  [ -e "$D/dir$s.safetensors" ] ||
    "$BIN" extract random "$SYNTH" --dtype bf16 --device cuda --seed "$s" -o "$D/dir$s.safetensors" || exit 1
done
cat >"$D/presets.toml" <<'TOML'
[presets.default]
description = "no steering"

[presets.steered]
description = "add at layer 16"
add = ["dir1:4@16"]
TOML
serve_once() { # MODE ROUND
  local mode=$1 r=$2 extra=()
  if [ "$mode" != off ]; then extra=(--persona-direction dir1 --refusal-direction dir2); fi
  PGATE_SERVE_DRIFT=$([ "$mode" = on ] && echo 1 || echo 0) \
    "$BIN" serve "$SYNTH" --dtype bf16 --device cuda --presets "$D/presets.toml" --directions "$D" "${extra[@]}" \
    --max-batch 64 --queue 256 --max-tokens 128 --port "$PORT" >"$OUT/ab-$mode-$r.out" 2>"$OUT/ab-$mode-$r.err" &
  local pid=$!
  for _ in $(seq 1 900); do grep -q "listening on" "$OUT/ab-$mode-$r.out" 2>/dev/null && break; sleep 0.2; done
  # Calibrate the monitor on the default preset, then load the steered preset.
  "$BIN" serve-bench --url "$URL" --clients 8 --duration 5 --max-tokens 8 --preset default >/dev/null 2>&1
  "$BIN" serve-bench --url "$URL" --clients 64 --duration 10 --max-tokens 128 --preset steered >/dev/null 2>&1
  "$BIN" serve-bench --url "$URL" --clients 64 --duration "$DUR" --max-tokens 128 --preset steered --out "$OUT/ab-$mode-$r.json"
  curl -s "$URL/v1/drift" >"$OUT/ab-$mode-$r.drift.json" || true
  kill -TERM "$pid"; wait "$pid"
}
for r in $(seq 1 "$ROUNDS"); do
  for m in ${MODES:-off on}; do serve_once "$m" "$r"; done
done
python3 - "$OUT" <<'PY' | tee "$OUT/drift_ab_summary.txt"
import json, sys, glob, statistics
out = sys.argv[1]
def tps(mode):
    v = []
    for f in sorted(glob.glob(f"{out}/ab-{mode}-*.json")):
        if f.endswith(".drift.json"):
            continue
        j = json.load(open(f))
        v.append(j.get("completion_tokens_per_s") or j.get("tokens_per_s") or j.get("tok_per_s"))
    return v
off, proj, on = tps("off"), tps("proj"), tps("on")
print("off  (no projections, monitor off):", off)
print("proj (projections, monitor off):   ", proj)
print("on   (projections + drift monitor):", on)
med = lambda v: statistics.median(v) if v and None not in v else None
a, p, b = med(off), med(proj), med(on)
if a and b:
    print(f"median off {a:.1f} tok/s, on {b:.1f} tok/s: projections + monitor cost {100 * (a - b) / a:+.2f}%")
if p and b:
    print(f"median proj {p:.1f} tok/s, on {b:.1f} tok/s: the monitor alone costs {100 * (p - b) / p:+.2f}% (goal < 2%)")
PY
