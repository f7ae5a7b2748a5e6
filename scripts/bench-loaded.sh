#!/usr/bin/env bash
# CPU decode on a busy machine (issue 18, scope 3): `pgate bench` with one thread and with the default
# thread count, each on an idle machine and while a competing CPU-bound process runs on the same cores.
# Prints one row per configuration (median decode tok/s over ROUNDS interleaved rounds, and every
# round's value) and, per batch, the ratio the issue asks for: default threads under load / one thread
# under the same load (goal >= 0.7).
#
#   scripts/bench-loaded.sh [MODEL] [NEW_TOKENS] [BATCHES] [ROUNDS]
#   scripts/bench-loaded.sh q15 32 1,16 3                # the defaults
#   PGATE=/tmp/pgate-before scripts/bench-loaded.sh      # another build, e.g. from before a change
#   HOGS=2 scripts/bench-loaded.sh                       # two competing processes instead of one
#   CONFIGS="busy-1 busy-default busy-default-nogov" scripts/bench-loaded.sh   # + governor off
#
# A configuration is LOAD-THREADS[-nogov]: LOAD is idle or busy, THREADS is 1, default or a count
# (set with PGATE_THREADS and RAYON_NUM_THREADS: the latter also sizes candle's own pool, and is
# what builds from before PGATE_THREADS read), -nogov sets PGATE_GOVERNOR=off. The load is HOGS busy
# loops (python3, default 1) pinned with the benchmark to the same CPUs (CPUS, default every online
# CPU). Run it on an otherwise quiet machine: anything else running shifts every row.
set -euo pipefail

MODEL=${1:-q15}
NEW=${2:-32}
BATCHES=${3:-1,16}
ROUNDS=${4:-3}
PGATE=${PGATE:-target/release/pgate}
HOGS=${HOGS:-1}
CPUS=${CPUS:-0-$(($(nproc) - 1))}
WARMUP=${WARMUP:-0}
CONFIGS=${CONFIGS:-idle-1 idle-default busy-1 busy-default}

[[ -x $PGATE ]] || { echo "no $PGATE: cargo build --release -p pgate" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }

tmp=$(mktemp -d)
hog_pids=()
stop_hogs() {
    local p
    for p in "${hog_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${hog_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    hog_pids=()
}
trap 'stop_hogs; rm -rf "$tmp"' EXIT

start_hogs() {
    local i
    for ((i = 0; i < HOGS; i++)); do
        taskset -c "$CPUS" python3 -c 'while True: pass' &
        hog_pids+=($!)
    done
    sleep 0.5
}

# run CONFIG: appends "batch decode_tok_s" lines to $tmp/CONFIG
run() {
    local cfg=$1 load threads nogov envs=()
    IFS=- read -r load threads nogov <<<"$cfg"
    [[ $threads != default ]] && envs+=(PGATE_THREADS="$threads" RAYON_NUM_THREADS="$threads")
    [[ $nogov == nogov ]] && envs+=(PGATE_GOVERNOR=off)
    [[ $load == busy ]] && start_hogs
    env "${envs[@]}" taskset -c "$CPUS" "$PGATE" bench "$MODEL" --dtype q --batches "$BATCHES" \
        --new-tokens "$NEW" --warmup "$WARMUP" --reps 1 2>"$tmp/err" >/dev/null ||
        { stop_hogs; cat "$tmp/err" >&2; exit 1; }
    [[ $load == busy ]] && stop_hogs
    # pgate bench prints one JSON object per row on stderr
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{\"plan\""):
        r = json.loads(line)
        print(r["batch"], r["decode_tok_s"])
' "$tmp/err" >>"$tmp/$cfg"
}

echo "pgate: $PGATE  model: $MODEL  new tokens: $NEW  batches: $BATCHES  rounds: $ROUNDS"
echo "cpus: $CPUS  hogs under load: $HOGS  load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ROUNDS; r++)); do
    for cfg in $CONFIGS; do
        run "$cfg"
    done
    echo "round $r done (load average $(cut -d' ' -f1 /proc/loadavg))" >&2
done

# shellcheck disable=SC2086
python3 -c '
import statistics, sys
tmp, batches, configs = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], sys.argv[3:]
rows = {}
for cfg in configs:
    for line in open(f"{tmp}/{cfg}"):
        b, v = line.split()
        rows.setdefault((cfg, int(b)), []).append(float(v))
def med(c, b):
    vs = rows.get((c, b))
    return statistics.median(vs) if vs else float("nan")
print("\n| load | threads | batch | decode tok/s (median) | rounds |")
print("|---|---|---:|---:|---|")
for b in batches:
    for cfg in configs:
        load, threads = cfg.split("-", 1)
        vs = ", ".join(f"{v:.2f}" for v in rows.get((cfg, b), []))
        print(f"| {load} | {threads} | {b} | {med(cfg, b):.2f} | {vs} |")
print()
for b in batches:
    for load in ["busy", "idle"]:
        if f"{load}-1" in configs and f"{load}-default" in configs:
            goal = " (goal >= 0.7)" if load == "busy" else ""
            r = med(f"{load}-default", b) / med(f"{load}-1", b)
            print(f"batch {b}: {load} default/1 = {r:.2f}{goal}")
' "$tmp" "$BATCHES" $CONFIGS
