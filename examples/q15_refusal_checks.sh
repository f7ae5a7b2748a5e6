#!/usr/bin/env bash
# The refusal-direction checks on Qwen2.5-Coder-1.5B-Instruct (q mode, greedy, 32 new tokens):
# ablating the selected refusal direction everywhere on 100 StrongREJECT prompts (none used for
# extraction or selection), adding it at its layer on 50 harmless prompts (harmless_val items
# 100-149, after those used for selection), and the same with a norm-matched random direction.
#
#   examples/q15_refusal_checks.sh OUT_DIR
# Expects OUT_DIR/refusal.safetensors from:
#   pgate extract refusal q15 -o OUT_DIR/refusal.safetensors --n-train 64 --n-val 16
set -euo pipefail
out="${1:?usage: q15_refusal_checks.sh OUT_DIR}"
pgate="${PGATE:-target/release/pgate}"
layer=$(python3 -c "import json,struct,sys;f=open('$out/refusal.safetensors','rb');n=struct.unpack('<Q',f.read(8))[0];h=json.loads(f.read(n));print(h['__metadata__'].get('extra.selected_layer') or json.loads(h['__metadata__'].get('extra','{}')).get('selected_layer'))" 2>/dev/null || true)
layer="${LAYER:-$layer}"
[[ -n "$layer" && "$layer" != None ]] || { echo "set LAYER=<selected layer>"; exit 1; }
last=$(( $("$pgate" inspect q15 --json --no-hash | python3 -c "import json,sys;print(json.load(sys.stdin)['n_layers'])") - 1 ))
"$pgate" extract random q15 --seed 7 --like "$out/refusal.safetensors" -o "$out/random.safetensors"
for d in refusal random; do
  cat >"$out/ablate_$d.toml" <<TOML
[[ops]]
op = "ablate"
layers = "0-$last"
direction = { file = "$d.safetensors", layer = $layer }
include_embedding = true
TOML
done
run() { echo "== $1"; shift; "$pgate" eval q15 --max-tokens 32 --batch-size 16 "$@"; }
run "harmful, baseline" --prompts strongreject -n 100 --out "$out/h_base.jsonl"
run "harmful, refusal direction ablated everywhere" --prompts strongreject -n 100 --plan "$out/ablate_refusal.toml" --out "$out/h_ablate.jsonl"
run "harmful, random direction ablated everywhere" --prompts strongreject -n 100 --plan "$out/ablate_random.toml" --out "$out/h_rand.jsonl"
run "harmless, baseline" --prompts harmless_val --skip 100 -n 50 --out "$out/s_base.jsonl"
run "harmless, refusal direction added at layer $layer" --prompts harmless_val --skip 100 -n 50 --add-raw "$out/refusal.safetensors[$layer]:1@$layer" --out "$out/s_add.jsonl"
run "harmless, random direction (same norm) added at layer $layer" --prompts harmless_val --skip 100 -n 50 --add-raw "$out/random.safetensors[$layer]:1@$layer" --out "$out/s_rand.jsonl"
