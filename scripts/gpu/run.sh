#!/usr/bin/env bash
# Everything persona-gate does on the GPU machine, in one call. Build here with scripts/build-cuda.sh and
# carry gpu-bin/carry/: pgate.xz (the stripped CUDA binary, xz-compressed to fit what travels) and a copy
# of ../shared/bench/hf_gpu_baseline.py.
#
#   bash scripts/gpu/run.sh check synth bench hf=eager
#
# Steps, in the order given:
#   check        scripts/gpu/compare_hf.py: pgate CUDA vs transformers, f32 and bf16, with/without a plan
#   synth        pgate synth-model --like llama-3.1-8b --seed 0 -o $SYNTH (bf16, 16 GB)
#   bench        pgate bench on it: bf16, batch 1/16/64, 128 prompt + 256 new tokens, EOS ignored,
#                plans none / add / add+ablate (the HF baseline's), per-step floor from the copy bandwidth;
#                each row with and without CUDA graphs (BENCH_GRAPHS=on|off|both, default both)
#   quick        batch 1 and 64, plans none and add+ablate, 64 new tokens
#   serve        scripts/gpu/serve.sh: pgate serve with a steered preset, 64 clients and 1 client x 256
#                tokens, and the TTFT burst test (compare with `bench` in the same call)
#   driftab      scripts/gpu/drift_ab.sh: serving throughput with and without the drift monitor (issue 20)
#   multi        scripts/gpu/multi.sh: the synthetic 8B study on one GPU and over --gpus 0,1 (issue 21)
#   split        scripts/gpu/split.sh: layer split over 2 GPUs (equality on a 1B shape; 70B shape vs HF
#                device_map="auto"); split=eq or split=big for one part
#   fused        scripts/gpu/fused_ab.sh: the fused softmax kernel against the unfused path (prefill, decode)
#   flash        scripts/gpu/flash_ab.sh: the flash prefill kernel against the batched-matmul path (logits,
#                greedy tokens, the 2k x 8 prefill row); run `check` first to include head dim 64
#   decode       scripts/gpu/decode_ab.sh: the decode attention kernel against the batched path (decode-step
#                logits vs f32, decode rows at 128 and 8k tokens of cache)
#   profile      scripts/gpu/prefill_profile.sh: the 2k x 8 prefill row per kernel (ncu durations) and
#                with/without attention blocks
#   dprofile     scripts/gpu/decode_profile.sh: kernel time per decode step at batch 1 and 64 (ncu), by kernel
#   long         scripts/gpu/long.sh: 8k-token-cache decode row, 2k x 8 prefill row, GPU memory at 1k-8k
#                prompts, beside HF transformers with SDPA (issue 22's extra rows, as they stand)
#   hf=MODES     the HF transformers+hooks anchor (MODES: eager, static or eager,static; BATCHES and PLANS
#                select rows, as for pgate BENCH_BATCHES and BENCH_STEER)
# Results go to $OUT (the device tool brings it back) or /tmp/pgate-gpu.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/pgate-gpu}"
mkdir -p "$OUT"
NV=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))")
export LD_LIBRARY_PATH="$NV:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
BIN="${PGATE_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=/tmp/pgate-bin/pgate
  mkdir -p /tmp/pgate-bin
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu-bin/carry/pgate.xz'), open('$BIN', 'wb'))" || exit 1
fi
SYNTH="${SYNTH:-/tmp/pgate-synth/llama-3.1-8b}"
chmod +x "$BIN" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
BENCH=(bench "$SYNTH" --dtype bf16 --device cuda --prompt-tokens 128)
status=0
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    check) python3 scripts/gpu/compare_hf.py --pgate "$BIN" --work /tmp/pgate-compare --out "$OUT" || status=1 ;;
    synth) if [ -e "$SYNTH/model.safetensors" ]; then echo "$SYNTH exists"; else
             mkdir -p "$(dirname "$SYNTH")" && "$BIN" synth-model --like llama-3.1-8b --seed 0 -o "$SYNTH" || status=1; fi ;;
    bench) "$BIN" "${BENCH[@]}" --batches "${BENCH_BATCHES:-1,16,64}" --new-tokens 256 --steer "${BENCH_STEER:-none,add,add+ablate}" --cuda-graphs "${BENCH_GRAPHS:-both}" \
             --out "$OUT/pgate_bench.json" 2>"$OUT/pgate_bench.log" || { status=1; tail -5 "$OUT/pgate_bench.log"; } ;;
    quick) "$BIN" "${BENCH[@]}" --batches 1,64 --new-tokens 64 --steer none,add+ablate --cuda-graphs both --out "$OUT/pgate_quick.json" || status=1 ;;
    split) bash scripts/gpu/split.sh "$BIN" "$OUT" || status=1 ;;
    split=*) bash scripts/gpu/split.sh "$BIN" "$OUT" "${step#split=}" || status=1 ;;
    fused) bash scripts/gpu/fused_ab.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    flash) bash scripts/gpu/flash_ab.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    decode) bash scripts/gpu/decode_ab.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    profile) bash scripts/gpu/prefill_profile.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    dprofile) bash scripts/gpu/decode_profile.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    long) bash scripts/gpu/long.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    serve) bash scripts/gpu/serve.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    driftab) bash scripts/gpu/drift_ab.sh "$BIN" "$SYNTH" "$OUT" || status=1 ;;
    multi) PGATE_BIN="$BIN" SYNTH="$SYNTH" OUT="$OUT" bash scripts/gpu/multi.sh || status=1 ;;
    hf=*) MODE="${step#hf=}" OUT="$OUT" python3 gpu-bin/carry/hf_gpu_baseline.py || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
echo "=== done $(date +%T) status $status"
exit $status
