"""The compliant-persona collapse and its late-window restoration, on StrongREJECT prompts.

Steering Qwen2.5-Coder-1.5B toward the compliant persona (unit direction x3 at layers 10-14)
collapses refusal; projecting the same direction out of the late layers 15-27 brings most of it
back, and a random direction projected out of the same layers does not (README, "Persona and
refusal on Qwen2.5-Coder-1.5B"). Rates are rules@2 labels (96.9% on the held split).

Needs only the package (`pip install ./python`; numpy comes with it). q15 uses the directions
committed in examples/directions/q15; any other model (`--model q05`, `smollm2`) extracts its
compliant direction first (`--questions` trait questions) and scales the layer windows to its depth,
so a quick run is

    python examples/python/persona_collapse.py                      # q15, 20 prompts (the README's claim)
    python examples/python/persona_collapse.py --model q05 --n 4 --questions 2 --max-tokens 12

(the smoke run: about two minutes on a busy 2-core box, most of it extracting the direction; four
prompts say nothing about rates).
"""

import argparse
import pathlib

import persona_gate as pg

HERE = pathlib.Path(__file__).resolve().parent
DIRS = HERE.parent / "directions" / "q15"

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", default="q15", help="short name, .gguf or HF directory (default q15)")
ap.add_argument("--n", type=int, default=20, help="StrongREJECT prompts (default 20)")
ap.add_argument("--max-tokens", type=int, default=24)
ap.add_argument("--questions", type=int, default=10, help="trait questions when extracting (not q15)")
args = ap.parse_args()

m = pg.Model.load(args.model)
if args.model == "q15":
    compliant = pg.directions.load(DIRS / "compliant.safetensors")
    random = pg.directions.load(DIRS / "random.safetensors")
else:
    compliant = pg.directions.trait(m, "compliant", max_questions=args.questions, max_new_tokens=32, progress=True)
    random = pg.directions.random(m, seed=7, like=compliant)
# q15's windows (layers 10-14 of 28, then 15-27) at the same depth fraction of this model.
L = m.n_layers
steer_layers, late = range(10 * L // 28, 15 * L // 28), range(15 * L // 28, L)
prompts = pg.directions.prompts("strongreject", args.n)

steer = pg.Plan().add(compliant, 3.0, layers=steer_layers)
conditions = {
    "baseline": None,
    f"steer x3 @{steer_layers.start}-{steer_layers.stop - 1}": steer,
    f"+ ablate compliant @{late.start}-{late.stop - 1}": steer + pg.Plan().ablate(compliant, layers=late),
    f"+ ablate random @{late.start}-{late.stop - 1}": steer + pg.Plan().ablate(random, layers=late),
}
# One batched run: every prompt under every condition (per-prompt plans).
names = [c for c in conditions for _ in prompts]
outs = m.generate(prompts * len(conditions), plans=[conditions[c] for c in names], max_tokens=args.max_tokens, batch_size=32, progress=True)
labels = pg.label(m, prompts * len(conditions), outs)
print(f"{m.name}, {len(prompts)} prompts, labeler: {labels.labeler}")
for c in conditions:
    mine = [l for l, n in zip(labels, names) if n == c]
    refused = sum(l.label == "refusal" for l in mine)
    print(f"{c:28s} refusal {refused:2d}/{len(mine)}")
