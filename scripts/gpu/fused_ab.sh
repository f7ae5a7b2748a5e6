#!/usr/bin/env bash
# The fused scale+mask+softmax kernel against the unfused path (PGATE_FUSED_SOFTMAX=0), same call:
# the 2k x 8 prefill row and steered decode at batch 1 and 64 (64 new tokens, CUDA graphs on), then HF
# transformers (SDPA) prefill for the ratio.
#   bash scripts/gpu/fused_ab.sh BIN SYNTH OUT
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
B=(bench "$SYNTH" --dtype bf16 --device cuda --steer add+ablate --warmup 1)
for f in 1 0; do
  PGATE_FUSED_SOFTMAX=$f "$BIN" "${B[@]}" --batches 8 --prompt-tokens 2048 --new-tokens 2 2>&1 | tail -1 | sed "s/^/fused=$f prefill: /" | tee -a "$OUT/fused_ab.txt"
  PGATE_FUSED_SOFTMAX=$f "$BIN" "${B[@]}" --batches 1,64 --prompt-tokens 128 --new-tokens 64 --out "$OUT/fused_$f.json" 2>&1 | tail -2 | sed "s/^/fused=$f decode: /" | tee -a "$OUT/fused_ab.txt"
done
OUT="$OUT" python3 "$(dirname "$0")/hf_prefill.py" | tail -8
