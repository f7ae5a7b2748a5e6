#!/usr/bin/env python3
"""How much of a persona change between two model versions lies along refusal (issue 20).

For each `pgate drift` output folder given, reads the direction files its drift.json names and
prints per layer: cos(old, new) of the persona directions raw, with the span of both versions'
refusal directions at that layer removed (what `pgate drift` reports as persona geometry), and
with the span of both versions' refusal directions at ALL layers removed (a much larger refusal
subspace); then the share of the unit persona change inside each of those spans and inside a
random subspace of the all-layer span's rank (the chance level).

A diagnostic, not a verdict: it asks whether a larger refusal reference would explain the change.
Needs numpy and safetensors (e.g. ~/.cache/persona-gate/hfenv/bin/python).
Usage: scripts/drift-refusal-subspace.py DRIFT_DIR [DRIFT_DIR ...]
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open


def load(path):
    with safe_open(path, "np") as f:
        return f.get_tensor("direction").astype(np.float64)


def basis(rows):
    q, r = np.linalg.qr(np.asarray(rows).T)
    keep = np.abs(np.diag(r)) > 1e-6 * np.abs(np.diag(r)).max()
    return q[:, keep].T


def off(v, b):
    return v - b.T @ (b @ v)


def cos(a, b):
    n = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / n) if n > 1e-12 else float("nan")


def share(d, b):
    dd = d @ d
    return float(np.sum((b @ d) ** 2) / dd) if dd > 1e-12 else float("nan")


def main(dirs):
    rng = np.random.default_rng(0)
    for dr in dirs:
        rep = json.loads((Path(dr) / "drift.json").read_text())
        (ro, po), (rn, pn) = [[load(f) for f in rep[s]["direction_files"]] for s in ("old", "new")]
        all_ref = basis(np.vstack([ro, rn]))
        rand = basis(rng.standard_normal(all_ref.shape))
        print(f"== {dr}: {rep['old']['source']} -> {rep['new']['source']}; all-layer refusal span rank {len(all_ref)}")
        print("layer | persona cos | off refusal (layer) | off refusal (all layers) | share along: layer span | all layers | random")
        for l in range(po.shape[0]):
            a, b = po[l] / np.linalg.norm(po[l]), pn[l] / np.linalg.norm(pn[l])
            ref = basis([ro[l], rn[l]])
            d = b - a
            print(f"{l:5d} | {cos(a, b):11.3f} | {cos(off(a, ref), off(b, ref)):19.3f} | "
                  f"{cos(off(a, all_ref), off(b, all_ref)):24.3f} | {share(d, ref):23.3f} | "
                  f"{share(d, all_ref):10.3f} | {share(d, rand):6.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
