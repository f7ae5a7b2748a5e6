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
  PGATE_CUDA_GRAPHS=0 timeout 300 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$OUT/ncu.log" "$BIN" "${B[@]}" --warmup 0 > "$OUT/ncu_prefill.csv" 2>"$OUT/ncu.err"
  python3 - "$OUT/ncu_prefill.csv" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    print("no ncu rows"); sys.exit()
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(r[ui], 1e-6)
    name = r[ki][:90]; tot[name] += v * scale; cnt[name] += 1
s = sum(tot.values())
print(f"total kernel time {s:.1f} ms over {sum(cnt.values())} kernels")
for n, t in tot.most_common(25):
    print(f"{t:9.2f} ms {100*t/s:5.1f}% x{cnt[n]:5d}  {n}")
PY
else
  echo "no ncu" | tee "$OUT/ncu_summary.txt"
fi
