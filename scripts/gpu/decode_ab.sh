#!/usr/bin/env bash
# The decode attention kernel (kernels/cuda_decode.rs; PGATE_DECODE_ATTN=1: at every cache length) against
# the batched path (PGATE_DECODE_ATTN=0), and both against the step with the fused decode Q/K/V write and
# the argmax kernel off too (PGATE_FUSED_ROPE=0 PGATE_FAST_ARGMAX=0):
# decode-step logits against f32 (scripts/gpu/flash_ab.py --decode; the synthetic 8B and, when `check`
# ran first, compare_hf.py's two small shapes), then the decode rows both ways: batch 1/16/64 with a
# 128-token prompt and batch 1/16 with an 8k-token cache, add+ablate, CUDA graphs on.
#
#   bash scripts/gpu/decode_ab.sh BIN SYNTH_DIR OUT_DIR
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
mkdir -p "$OUT"
status=0
models=("$SYNTH")
for d in /tmp/pgate-compare/*-L4; do [ -e "$d/config.json" ] && models+=("$d"); done
python3 "$(dirname "$0")/flash_ab.py" --decode --pgate "$BIN" --out "$OUT" "${models[@]}" || status=1
B=(bench "$SYNTH" --dtype bf16 --device cuda --steer add+ablate --warmup 1 --cuda-graphs on)
for f in 1 0; do
  PGATE_DECODE_ATTN=$f "$BIN" "${B[@]}" --batches 1,16,64 --prompt-tokens 128 --new-tokens 128 \
    --out "$OUT/decode_short_$f.json" >"$OUT/decode_short_$f.txt" 2>&1 || status=1
  PGATE_DECODE_ATTN=$f "$BIN" "${B[@]}" --batches 1,16 --prompt-tokens 8192 --new-tokens 128 \
    --out "$OUT/decode_8k_$f.json" >"$OUT/decode_8k_$f.txt" 2>&1 || status=1
  for t in short 8k; do
    grep -E '^ *add\+ablate' "$OUT/decode_${t}_$f.txt" | sed "s/^/decode_attn=$f $t: /" | tee -a "$OUT/decode_ab.txt"
  done
done
# The step as it was before the fused decode Q/K/V write and the argmax kernel (both off too).
PGATE_DECODE_ATTN=0 PGATE_FUSED_ROPE=0 PGATE_FAST_ARGMAX=0 "$BIN" "${B[@]}" --batches 1,16,64 --prompt-tokens 128 \
  --new-tokens 128 --out "$OUT/decode_short_old.json" >"$OUT/decode_short_old.txt" 2>&1 || status=1
grep -E '^ *add\+ablate' "$OUT/decode_short_old.txt" | sed "s/^/all new off short: /" | tee -a "$OUT/decode_ab.txt"
exit $status
