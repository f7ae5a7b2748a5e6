"""Cosine between the compliant-persona, refusal and random directions of Qwen2.5-Coder-1.5B,
layer by layer, as a plot (matplotlib) or a table when matplotlib is missing.

Loads no model: it reads the direction files committed in examples/directions/q15 (or `--dir`, a
folder with compliant/refusal/random.safetensors from `pgate extract`). Needs the package and, for the
plot, matplotlib (`pip install matplotlib`); without it only the table is printed.

    python examples/python/geometry_plot.py [out.png] [--dir examples/directions/q15]
"""

import argparse
import pathlib
import sys

import persona_gate as pg

ap = argparse.ArgumentParser()
ap.add_argument("out", nargs="?", default="geometry.png", help="the plot's file (default geometry.png)")
ap.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent.parent / "directions" / "q15")
args = ap.parse_args()
sets = {n: pg.directions.load(args.dir / f"{n}.safetensors") for n in ("compliant", "refusal", "random")}
geo = pg.directions.geometry(*sets.values())
print(geo)  # the table `pgate geometry` prints

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(pip install matplotlib for the plot)")
    sys.exit(0)

names = [s.name for s in sets.values()]
fig, ax = plt.subplots(figsize=(7, 3.5))
for a, b in [(0, 1), (0, 2), (1, 2)]:
    ax.plot(geo.cosines(names[a], names[b]), marker=".", label=f"{names[a]} / {names[b]}")
ax.axhline(geo["random_abs_cos"], color="grey", lw=0.8, ls="--", label="E|cos| of random directions")
ax.set_xlabel("layer")
ax.set_ylabel("cosine")
ax.legend()
fig.tight_layout()
fig.savefig(args.out, dpi=120)
print(f"wrote {args.out}")
