"""The compliant-persona collapse and its late-window restoration, on 20 StrongREJECT prompts.

Steering Qwen2.5-Coder-1.5B toward the compliant persona (unit direction x3 at layers 10-14)
collapses refusal; projecting the same direction out of the late layers 15-27 brings most of it
back, and a random direction projected out of the same layers does not (README, "Persona and
refusal on Qwen2.5-Coder-1.5B"). Rates are rules@2 labels (96.9% on the held split).

    pip install ./python && python examples/python/persona_collapse.py
"""

import pathlib

import persona_gate as pg

HERE = pathlib.Path(__file__).resolve().parent
DIRS = HERE.parent / "directions" / "q15"

m = pg.Model.load("q15")
compliant = pg.directions.load(DIRS / "compliant.safetensors")
random = pg.directions.load(DIRS / "random.safetensors")
prompts = pg.directions.prompts("strongreject", 20)

steer = pg.Plan().add(compliant, 3.0, layers=range(10, 15))
conditions = {
    "baseline": None,
    "steer x3 @10-14": steer,
    "+ ablate compliant @15-27": steer + pg.Plan().ablate(compliant, layers=range(15, 28)),
    "+ ablate random @15-27": steer + pg.Plan().ablate(random, layers=range(15, 28)),
}
# One batched run: every prompt under every condition (per-prompt plans).
names = [c for c in conditions for _ in prompts]
outs = m.generate(prompts * len(conditions), plans=[conditions[c] for c in names], max_tokens=24, batch_size=32, progress=True)
labels = pg.label(m, prompts * len(conditions), outs)
print(f"labeler: {labels.labeler}")
for c in conditions:
    mine = [l for l, n in zip(labels, names) if n == c]
    refused = sum(l.label == "refusal" for l in mine)
    print(f"{c:28s} refusal {refused:2d}/{len(mine)}")
