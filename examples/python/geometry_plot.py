"""Cosine between the compliant-persona, refusal and random directions of Qwen2.5-Coder-1.5B,
layer by layer, as a plot (matplotlib) or a table when matplotlib is missing.

    python examples/python/geometry_plot.py [out.png]
"""

import pathlib
import sys

import persona_gate as pg

DIRS = pathlib.Path(__file__).resolve().parent.parent / "directions" / "q15"
sets = {n: pg.directions.load(DIRS / f"{n}.safetensors") for n in ("compliant", "refusal", "random")}
geo = pg.directions.geometry(*sets.values())
print(geo)  # the table `pgate geometry` prints

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
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
out = sys.argv[1] if len(sys.argv) > 1 else "geometry.png"
fig.savefig(out, dpi=120)
print(f"wrote {out}")
