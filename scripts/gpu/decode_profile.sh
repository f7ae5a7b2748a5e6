#!/usr/bin/env bash
# Where a steered decode step spends its time (issue 22): kernel durations under Nsight Compute
# (--clock-control none, one metric, no replay) for runs of 3 and 9 new tokens at batch 1 and 64; the
# difference is six decode steps, so prefill and setup cancel. Per kernel name: ms per step, launches per
# step. Compare the per-step kernel sum with the bench's ms/step (graphs on) to see the gap between kernels.
# Graphs are off under ncu, so this is the engine's eager step (exact-length cache views, candle's argmax),
# not the fixed-slot graph step the bench replays; the per-layer kernels are the same.
#   bash scripts/gpu/decode_profile.sh BIN SYNTH OUT
set -uo pipefail
BIN=$1 SYNTH=$2 OUT=$3
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu" | tee "$OUT/decode_profile.txt"; exit 0; }
for b in ${PROFILE_BATCHES:-1 64}; do
  for n in 3 9; do
    PGATE_CUDA_GRAPHS=0 timeout "${NCU_TIMEOUT:-200}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
      --log-file "/tmp/ncu_b${b}_n${n}.log" "$BIN" bench "$SYNTH" --dtype bf16 --device cuda --steer "${PROFILE_STEER:-add+ablate}" \
      --batches "$b" --prompt-tokens 128 --new-tokens "$n" --warmup 0 > /dev/null 2>"/tmp/ncu_b${b}_n${n}.err" || echo "ncu b$b n$n failed"
  done
  python3 - "/tmp/ncu_b${b}_n3.log" "/tmp/ncu_b${b}_n9.log" "$b" <<'PY' | tee -a "$OUT/decode_profile.txt"
import csv, sys, collections
def load(path):
    tot, cnt = collections.Counter(), collections.Counter()
    for r in csv.reader(open(path)):
        if len(r) < 15 or r[12] != "gpu__time_duration.sum":
            continue
        v = float(r[14].replace(",", ""))
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r[13], 1e-6)
        name = r[4][:90]
        tot[name] += v * scale; cnt[name] += 1
    return tot, cnt
(t3, c3), (t9, c9) = load(sys.argv[1]), load(sys.argv[2])
steps = 6
names = set(t9) | set(t3)
rows = [(n, (t9[n] - t3[n]) / steps, (c9[n] - c3[n]) / steps) for n in names]
rows = [r for r in rows if r[2] > 0]
rows.sort(key=lambda r: -r[1])
tot = sum(r[1] for r in rows); launches = sum(r[2] for r in rows)
print(f"batch {sys.argv[3]}: kernel time per decode step {tot:.3f} ms over {launches:.0f} launches")
for n, t, c in rows[:30]:
    print(f"  {t:8.3f} ms {100*t/max(tot,1e-9):5.1f}%  x{c:6.1f}  {n}")
PY
done
