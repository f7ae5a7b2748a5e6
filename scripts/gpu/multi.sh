#!/usr/bin/env bash
# Issue 21 on the 2-GPU kind: one synthetic 8B study (bf16) on one GPU, then over both GPUs with
# `pgate study run --gpus 0,1` (one worker per GPU, token-balanced shards, merged), same study, same
# settings, in one call. Prints both wall times, the speed-up, the merge's share of the run and whether
# the merged rows equal the one-GPU rows.
#
#   bash scripts/gpu/multi.sh            (binary from gpu-bin/carry/pgate.xz as in run.sh, or PGATE_BIN)
#
# The layer split of a model larger than one GPU (scope 4) is scripts/gpu/split.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/pgate-gpu}"
mkdir -p "$OUT"
NV=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="${NV:+$NV:}/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN="${PGATE_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=/tmp/pgate-bin/pgate
  mkdir -p /tmp/pgate-bin
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu-bin/carry/pgate.xz'), open('$BIN', 'wb'))" || exit 1
  chmod +x "$BIN"
fi
SYNTH="${SYNTH:-/tmp/pgate-synth/llama-3.1-8b}"
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/multi_gpus.txt"
[ -e "$SYNTH/model.safetensors" ] || { mkdir -p "$(dirname "$SYNTH")" && "$BIN" synth-model --like llama-3.1-8b --seed 0 -o "$SYNTH" || exit 1; }
W=/tmp/pgate-multi
rm -rf "$W" && mkdir -p "$W"
cat > "$W/study.toml" <<TOML
version = 1
name = "multi-gpu-8b"
[model]
spec = "$SYNTH"
dtype = "bf16"
# (batch-invariant kernels are CPU-only: on the GPU the two runs batch items differently, so greedy
# text can part at near-ties; the summary counts equal rows.)
[prompts]
harmful = { source = "${HARMFUL_SRC:-demo_harmful}", n = ${N_HARMFUL:-32} }
harmless = { source = "${HARMLESS_SRC:-demo_harmless}", n = ${N_HARMLESS:-16} }
[generation]
max_new_tokens = ${NEW_TOKENS:-256}
batch_size = ${BATCH:-32}
[[condition]]
name = "baseline"
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "direct"
persona = "direct"
[[condition]]
name = "companion"
persona = "companion"
TOML
t() { date +%s.%N; }
# A warm-up run first (CUDA module loading, cuBLAS handles, page cache), so the one-GPU run is not
# charged for first-process costs the two-GPU run then skips.
[ "${WARM:-1}" = 1 ] && "$BIN" study run "$W/study.toml" --db "$W/warm.sqlite" --cuda 0 --no-judge --quiet --limit 8 >/dev/null 2>&1
a=$(t); "$BIN" study run "$W/study.toml" --db "$W/one.sqlite" --cuda 0 --no-judge --quiet 2>&1 | tee "$OUT/multi_one.log"; b=$(t)
c=$(t); "$BIN" study run "$W/study.toml" --db "$W/two.sqlite" --gpus 0,1 --no-judge --quiet 2>&1 | tee "$OUT/multi_two.log"; d=$(t)
python3 - "$W" "$a" "$b" "$c" "$d" <<'PY' | tee "$OUT/multi_summary.txt"
import sqlite3, sys, re
w, a, b, c, d = sys.argv[1], *map(float, sys.argv[2:])
rows = lambda db: sorted(sqlite3.connect(f"{w}/{db}").execute(
    "SELECT condition_hash, prompt_set, prompt_id, sample, output, label FROM results").fetchall())
one, two = rows("one.sqlite"), rows("two.sqlite")
toks = sqlite3.connect(f"{w}/one.sqlite").execute("SELECT SUM(n_tokens) FROM results").fetchone()[0]
t1, t2 = b - a, d - c
print(f"items {len(one)}, generated tokens {toks}")
print(f"1 GPU : {t1:.1f} s wall ({toks / t1:.0f} generated tok/s, model load included)")
print(f"2 GPUs: {t2:.1f} s wall ({toks / t2:.0f} generated tok/s), speed-up {t1 / t2:.2f}x (target >= 1.8x)")
same = sum(1 for x, y in zip(one, two) if x == y)
print(f"merged rows equal the one-GPU rows: {one == two} ({same} of {len(two)} rows identical)")
PY
grep -h "merged 2 workers" "$OUT/multi_two.log" | tee -a "$OUT/multi_summary.txt"
