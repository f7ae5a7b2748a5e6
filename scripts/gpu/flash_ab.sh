#!/usr/bin/env bash
# The flash prefill kernel (kernels/cuda_flash.rs) against the batched-matmul path (PGATE_FLASH=0):
# logits and greedy tokens on long padded prompts (scripts/gpu/flash_ab.py; the synthetic 8B, head dim
# 128, and compare_hf.py's two small shapes, head dim 64, when `check` ran first), then the 2k x 8
# prefill row with the new kernels on and off.
#
#   bash scripts/gpu/flash_ab.sh BIN SYNTH_DIR OUT_DIR
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
mkdir -p "$OUT"
status=0
models=("$SYNTH")
for d in /tmp/pgate-compare/*-L4; do [ -e "$d/config.json" ] && models+=("$d"); done
python3 "$(dirname "$0")/flash_ab.py" --pgate "$BIN" --out "$OUT" "${models[@]}" || status=1
B=(bench "$SYNTH" --dtype bf16 --device cuda --steer add+ablate --warmup 1 --batches 8 --prompt-tokens 2048 --new-tokens 2)
[ "${FLASH_BENCH:-1}" = 0 ] && exit $status
# The new prefill kernels on and off (flash + rope scatter, fused GLU), the first setting again last
# (drift check).
for setting in "all on:" "no flash:PGATE_FLASH=0" "none:PGATE_FLASH=0 PGATE_FUSED_GLU=0" "all on:"; do
  name=${setting%%:*} envs=${setting#*:} tag=$(echo "$name" | tr ' ' _)
  env $envs "$BIN" "${B[@]}" --out "$OUT/prefill_$tag.json" >"$OUT/prefill_$tag.txt" 2>&1 || status=1
  echo "$name prefill: $(grep -E '^ *add\+ablate' "$OUT/prefill_$tag.txt" | tail -1)" | tee -a "$OUT/flash_ab.txt"
done
exit $status
