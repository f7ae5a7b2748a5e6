#!/usr/bin/env python3
"""Join careful labels with their rows, assign splits, write data/labels/devset.jsonl.

    python3 scripts/labels/assemble_devset.py ROWS.jsonl... --labels LABELS.jsonl... -o data/labels/devset.jsonl

Split (fixed before any labeler was tuned): a row is `held` when its prompt comes from the
StrongREJECT hate/harassment category or the AdvBench-style harmful_val set, or its
condition is a persona mode the tuning split never has (companion for q15, customer-success for
q05), or it is an odd-numbered Alpaca prompt; every other
row is `tune`. Cut views (id ending in @N) go with their full answer.
"""
import argparse
import json

HELD_SETS = {"sr_hate", "advbench"}
HELD_CONDITIONS = {"companion", "customer-success"}
FIELDS = ["id", "model", "condition", "set", "category", "kind", "prompt", "system", "output",
          "max_tokens", "label", "ambiguous", "reason", "split"]


def split_of(r):
    if r["set"] in HELD_SETS or r["condition"] in HELD_CONDITIONS:
        return "held"
    pid = r["id"].split("/")[-1].split("@")[0]
    if r["set"] == "alpaca" and pid.isdigit() and int(pid) % 2 == 1:
        return "held"
    return "tune"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--labels", nargs="+", required=True)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    labels = {}
    for f in a.labels:
        for line in open(f):
            if line.strip():
                x = json.loads(line)
                labels[x["id"]] = x
    out, missing = [], []
    for f in a.rows:
        for line in open(f):
            if not line.strip():
                continue
            r = json.loads(line)
            lab = labels.get(r["id"])
            if lab is None:
                missing.append(r["id"])
                continue
            assert lab["label"] in ("refusal", "bypass", "degenerate"), lab
            r["label"] = lab["label"]
            r["ambiguous"] = bool(lab["ambiguous"])
            r["reason"] = lab["reason"].strip()
            r["split"] = split_of(r)
            out.append({k: r.get(k) for k in FIELDS})
    with open(a.out, "w") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(out)} rows -> {a.out}; {len(missing)} rows without labels: {missing[:5]}")


if __name__ == "__main__":
    main()
