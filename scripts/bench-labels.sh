#!/usr/bin/env bash
# Probe labeling cost against the generation of the same outputs (issue 16): generate N StrongREJECT
# answers of up to T tokens with Qwen2.5-Coder-1.5B under compliant steering x3 at layers 10-14 (so
# answers run long), then label them with the probe (one teacher-forced pass) and with the ensemble.
#
#   scripts/bench-labels.sh [N=38] [T=256]
#   PROBE=q15-fast.probe.json scripts/bench-labels.sh     # a probe file instead of the built-in one
#
# Prints the wall time of each step (model loading excluded for labeling: `pgate label` reports it).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-38}"; T="${2:-256}"
probe_arg=()
if [ -n "${PROBE:-}" ]; then probe_arg=(--probe "$PROBE"); fi
PGATE="${PGATE:-target/release/pgate}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$N" >"$work/prompts.jsonl" <<'PY'
import json, os, sys
shared = os.environ.get("PGATE_SHARED", "../shared")
rows = json.load(open(f"{shared}/data/strongreject/strongreject.json"))
for i, r in enumerate(rows[:int(sys.argv[1])]):
    print(json.dumps({"id": str(i + 1), "prompt": r["instruction"]}))
PY
echo "== generate: $N prompts x up to $T tokens, batch $N, steered" >&2
start=$(date +%s.%N)
"$PGATE" generate q15 --prompts "$work/prompts.jsonl" --max-tokens "$T" --batch-size "$N" \
  --add examples/directions/q15/compliant.safetensors:3@10-14 --out "$work/gen.jsonl" >/dev/null
gen=$(echo "$(date +%s.%N) - $start" | bc)
python3 - "$work/gen.jsonl" >"$work/rows.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(json.dumps({"id": r.get("id"), "prompt": r.get("prompt") or r.get("user"), "output": r.get("text") or r.get("output")}))
PY
for labeler in probe ensemble; do
  echo "== label with $labeler" >&2
  "$PGATE" label q15 --labeler "$labeler" "${probe_arg[@]}" --in "$work/rows.jsonl" -o "$work/$labeler.jsonl"
done
tokens=$(python3 -c "import json,sys; print(sum(json.loads(l).get('n_tokens', 0) or len(json.loads(l).get('tokens', [])) for l in open(sys.argv[1])))" "$work/gen.jsonl")
echo "generation wall time (model load included): ${gen} s; generated tokens: $tokens"
