"""Markdown table of one GPU call: pgate bench rows next to the HF transformers+hooks rows of the same call.

usage: python3 scripts/gpu/table.py OUT_DIR    (the folder run.sh wrote: pgate_bench.json, hf_gpu_baseline_*.json)

The per-step floor is recomputed with the larger of the two copy bandwidths measured in the call
(the stricter floor): (weight bytes + KV bytes per token * (prompt + new/2) * batch) / bandwidth.
"""
import glob
import json
import os
import sys

d = sys.argv[1]
pg = json.load(open(os.path.join(d, "pgate_bench.json")))
hf_rows, hf_bw, modes = {}, 0, []
for f in sorted(glob.glob(os.path.join(d, "hf_gpu_baseline_*.json"))):
    h = json.load(open(f))
    hf_bw = max(hf_bw, h["bw_GBs"])
    for r in h["rows"]:
        hf_rows[(r["mode"], r["batch"], r["plan"])] = r
        if r["mode"] not in modes:
            modes.append(r["mode"])
bw = max(hf_bw, pg["copy_GBs"] or 0)
print(f"copy bandwidth: pgate {pg['copy_GBs']:.0f} GB/s, HF {hf_bw} GB/s; floor uses {bw:.0f} GB/s")
head = "| plan | batch | graphs | pgate tok/s | pgate decode ms/step | floor ms | % of floor |"
sep = "|---|---:|---|---:|---:|---:|---:|"
for m in modes:
    head += f" HF {m} tok/s | pgate / HF {m} |"
    sep += "---:|---:|"
print(head)
print(sep)
for r in pg["rows"]:
    n, p, b = r["new_tokens"], r["prompt_tokens"], r["batch"]
    floor = (pg["weight_bytes"] + pg["kv_bytes_per_token"] * (p + n / 2) * b) / (bw * 1e9) * 1e3
    g = "on" if r.get("graph_steps", 0) > 0 else "off"
    line = (f"| {r['plan']} | {b} | {g} | {r['tok_s']:.0f} | {r['decode_ms_per_step']:.2f} | {floor:.2f} | "
            f"{100 * floor / r['decode_ms_per_step']:.0f}% |")
    for m in modes:
        h = hf_rows.get((m, b, r["plan"]))
        line += f" {h['tok_s']:.0f} | {r['tok_s'] / h['tok_s']:.2f}x |" if h else " - | - |"
    print(line)
