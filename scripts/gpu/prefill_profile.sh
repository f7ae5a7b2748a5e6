#!/usr/bin/env bash
# Where prefill time goes (issue 22): the 2k x 8 prefill row under Nsight Compute, durations only
# (--clock-control none, one metric, so kernels are timed, not replayed for counters), summed per kernel
# name; and the same row with attention blocks of 256 MiB (the default) against one block (4 GiB).
#   bash scripts/gpu/prefill_profile.sh BIN SYNTH OUT
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
B=(bench "$SYNTH" --dtype bf16 --device cuda --steer add+ablate --batches 8 --prompt-tokens 2048 --new-tokens 2)
for mb in 256 4096; do
  PGATE_ATTN_BLOCK_MB=$mb "$BIN" "${B[@]}" --warmup 1 2>&1 | tail -1 | sed "s/^/blocks ${mb} MiB: /" | tee -a "$OUT/prefill_blocks.txt"
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  PGATE_CUDA_GRAPHS=0 timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$OUT/ncu.log" "$BIN" "${B[@]}" --warmup 0 > "$OUT/ncu_prefill.csv" 2>"$OUT/ncu.err"
  python3 - "$OUT/ncu.log" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys, collections
tot = collections.Counter(); cnt = collections.Counter()
for r in csv.reader(open(sys.argv[1])):
    if len(r) < 15 or r[12] != "gpu__time_duration.sum":
        continue
    v = float(r[14].replace(",", ""))
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r[13], 1e-6)
    tot[r[4][:80]] += v * scale; cnt[r[4][:80]] += 1
s = sum(tot.values())
print(f"total kernel time {s:.1f} ms over {sum(cnt.values())} kernels")
for n, t in tot.most_common(25):
    print(f"{t:9.2f} ms {100*t/max(s,1e-9):5.1f}% x{cnt[n]:5d}  {n}")
PY
else
  echo "no ncu" | tee "$OUT/ncu_summary.txt"
fi
