#!/usr/bin/env bash
# Issue 21, scope 4 on the 2-GPU kind: models split layer-wise over the GPUs of a node.
#   1. equality: a synthetic Llama-3.2-1B-shaped model (bf16) generates the same greedy tokens under an
#      add + ablate plan on one GPU (--device cuda:0) and split over two (--device cuda:0,cuda:1);
#   2. speed: a synthetic Llama-3.1-70B-shaped model (bf16; BIG_LAYERS of its 80 layers, default 40, since
#      the machine's 128 GB disk cannot hold all 140 GB) split over both GPUs: steered text, then `pgate
#      bench` at batch 1 and 32 (128 prompt + NEW new tokens, add+ablate) beside HF transformers loading
#      the same safetensors with device_map="auto" (scripts/gpu/hf_split.py), in the same call.
#   bash scripts/gpu/split.sh BIN OUT [eq] [big]
set -uo pipefail
BIN="$1"; OUT="$2"; shift 2
STEPS="${*:-eq big}"
SMALL=/tmp/pgate-synth/llama-3.2-1b
BIG=/tmp/pgate-synth/llama-70b-${BIG_LAYERS:-40}l
NEW="${NEW:-64}"
SPLIT="${SPLIT_DEVICES:-cuda:0,cuda:1}"   # cuda:0,cuda:0 exercises the split path on a one-GPU machine
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/split_gpus.txt"
status=0
for s in $STEPS; do
  case "$s" in
  eq)
    [ -e "$SMALL/model.safetensors" ] || "$BIN" synth-model --like llama-3.2-1b --seed 1 -o "$SMALL" || exit 1
    "$BIN" extract random "$SMALL" --dtype bf16 --device cuda:0 --seed 5 -o "$OUT/split_r.safetensors" || exit 1
    # Graphs off on both sides: a split model runs without CUDA graphs, and the graph step's bucketed
    # cache view rounds bf16 differently from the eager step (greedy random-weight text parts at ties).
    for dev in cuda:0 "$SPLIT"; do
      PGATE_CUDA_GRAPHS=0 "$BIN" generate "$SMALL" --dtype bf16 --device "$dev" --max-tokens 48 \
        --add "$OUT/split_r.safetensors[6]:6@4-9" --ablate "$OUT/split_r.safetensors[10]@7-13" \
        --prompt "Tell me about the sea." --prompt "How do I pick a lock?" --prompt "hi" \
        --prompt "Write a poem about persona and refusal, in the style of a shipping manifest." \
        > "$OUT/split_eq_${dev//[:,]/_}.txt" 2>"$OUT/split_eq_${dev//[:,]/_}.log" || status=1
    done
    S="$OUT/split_eq_${SPLIT//[:,]/_}.txt"
    if cmp -s "$OUT/split_eq_cuda_0.txt" "$S"; then
      echo "split equality: identical greedy text on cuda:0 and split over $SPLIT (4 prompts x 48 tokens, add+ablate)" | tee "$OUT/split_eq.txt"
    else
      echo "split equality: DIFFERENT" | tee "$OUT/split_eq.txt"; diff "$OUT/split_eq_cuda_0.txt" "$S" | head -20; status=1
    fi
    "$BIN" bench "$SMALL" --dtype bf16 --device "$SPLIT" --batches 1,32 --prompt-tokens 128 --new-tokens "$NEW" \
      --steer add+ablate --out "$OUT/split_small_bench.json" 2>&1 | tail -4
    ;;
  big)
    t0=$(date +%s)
    [ -e "$BIG/model.safetensors" ] || "$BIN" synth-model --like llama-3.1-70b --layers "${BIG_LAYERS:-40}" --seed 0 -o "$BIG" || exit 1
    echo "synth 70B-shaped ${BIG_LAYERS:-40} layers: $(( $(date +%s) - t0 )) s, $(du -sh "$BIG" | cut -f1)"
    "$BIN" extract random "$BIG" --dtype bf16 --device "$SPLIT" --seed 5 -o "$OUT/split_big_r.safetensors" 2>&1 | tail -1
    "$BIN" generate "$BIG" --dtype bf16 --device "$SPLIT" --max-tokens 24 \
      --add "$OUT/split_big_r.safetensors[20]:6@16-22" --prompt "Tell me about the sea." 2>&1 | tee "$OUT/split_big_generate.txt" | tail -4
    "$BIN" bench "$BIG" --dtype bf16 --device "$SPLIT" --batches 1,32 --prompt-tokens 128 --new-tokens "$NEW" \
      --steer add+ablate --out "$OUT/split_big_bench.json" 2>&1 | tail -4 || status=1
    nvidia-smi --query-gpu=index,memory.used --format=csv | tee -a "$OUT/split_gpus.txt"
    MODEL="$BIG" NEW="$NEW" OUT="$OUT" python3 scripts/gpu/hf_split.py || status=1
    ;;
  esac
done
exit $status
