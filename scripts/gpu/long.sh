#!/usr/bin/env bash
# Issue 22's extra rows, measured as they stand: a long-context decode row (8k-token cache) and a prefill
# row (2k-token prompts, batch 8) for pgate, with GPU memory at prompt lengths 1k/2k/4k/8k (peak of
# nvidia-smi's memory.used sampled every 50 ms, minus the idle reading), beside HF transformers with SDPA
# (scripts/gpu/hf_prefill.py) in the same call.
#
#   bash scripts/gpu/long.sh BIN SYNTH_DIR OUT_DIR
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
mkdir -p "$OUT"
B=(bench "$SYNTH" --dtype bf16 --device cuda --steer add+ablate --warmup 1)
peak() { # OUTFILE CMD...: run CMD while sampling GPU memory; print the peak MiB
  local f=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$f.mem" &
  local s=$!
  "$@" >"$f.out" 2>"$f.err"
  local rc=$?
  kill "$s" 2>/dev/null; wait "$s" 2>/dev/null
  echo "$(sort -n "$f.mem" | tail -1) MiB peak (rc $rc)"
}
status=0
echo "idle $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits) MiB" | tee "$OUT/long.txt"
for P in 1024 2048 4096 8192; do
  echo "prefill P=$P batch 1: $(peak "$OUT/prefill_$P" "$BIN" "${B[@]}" --batches 1 --prompt-tokens $P --new-tokens 2 --json)" | tee -a "$OUT/long.txt"
done
"$BIN" "${B[@]}" --batches 8 --prompt-tokens 2048 --new-tokens 2 --out "$OUT/pgate_prefill2k.json" >"$OUT/pgate_prefill2k.txt" 2>&1 || status=1
"$BIN" "${B[@]}" --batches 1,16 --prompt-tokens 8192 --new-tokens 128 --out "$OUT/pgate_ctx8k.json" >"$OUT/pgate_ctx8k.txt" 2>&1 || status=1
tail -n 4 "$OUT/pgate_prefill2k.txt" "$OUT/pgate_ctx8k.txt"
OUT="$OUT" python3 "$(dirname "$0")/hf_prefill.py" || status=1
exit $status
