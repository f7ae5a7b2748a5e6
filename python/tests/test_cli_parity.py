"""Greedy tokens under a plan equal the CLI's (`pgate generate --plan`) and the PyTorch
references (steer: add coeff * random_unit at the fixture's layers; ablate: project out the
fixture's direction row)."""

import json
import subprocess

import numpy as np
import persona_gate as pg

from conftest import model_path, pgate_bin


def fixture_plans(r, t):
    steer = pg.Plan()
    for layer in r["steer"]["layers"]:
        steer.add(t["random_unit"], r["steer"]["coeff"], layers=layer)
    row = int(r["ablate"]["direction"].split("row ")[1].rstrip(")"))
    ablate = pg.Plan().ablate(t["direction"][row], layers=r["ablate"]["layers"])
    return {"steer": steer, "ablate": ablate}


def same_greedy(case, got, want, margins):
    """As the Rust suite: a difference right after a reference near-tie (< 0.01) is not a bug."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        first = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        m = margins[case][i][first] if first < len(margins[case][i]) else float("inf")
        assert m < 0.01, f"{case} prompt {i}: greedy differs at step {first} (margin {m:.4f})\n{g}\n{w}"


def cli_tokens(tmp_path, plan, prompts, max_tokens):
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    out = tmp_path / "out.jsonl"
    cmd = [pgate_bin(), "generate", model_path("q05"), "--dtype", "f32", "--plan", str(plan_file),
           "--max-tokens", str(max_tokens), "--batch-size", "6", "--out", str(out)]
    for p in prompts:
        cmd += ["--prompt", p]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    by_user = {r["user"]: r["tokens"] for r in rows}
    return [by_user[p] for p in prompts]


def test_greedy_under_plans_equals_cli_and_reference(q05_f32, q05_ref, tmp_path):
    r, t = q05_ref
    n = r["greedy_max_new_tokens"]
    for case, plan in fixture_plans(r, t).items():
        outs = q05_f32.generate(r["prompts"], plan=plan, max_tokens=n, batch_size=6)
        got = outs.tokens
        assert got == cli_tokens(tmp_path, plan, r["prompts"], n), f"{case}: Python and CLI differ"
        same_greedy(case, got, r[case]["greedy"], r["greedy_margins"])
        assert outs.stats["decode_tokens"] > 0


def test_per_prompt_plans_equal_separate_runs(q05_f32, q05_ref):
    r, t = q05_ref
    plans = fixture_plans(r, t)
    mixed = [plans["steer"], None, plans["ablate"]]
    prompts = r["prompts"][:3]
    together = q05_f32.generate(prompts, plans=mixed, max_tokens=8).tokens
    alone = [q05_f32.generate([p], plan=pl, max_tokens=8).tokens[0] for p, pl in zip(prompts, mixed)]
    assert together == alone


def test_plan_file_round_trip(q05_f32, q05_ref, tmp_path):
    r, t = q05_ref
    plan = fixture_plans(r, t)["ablate"]
    plan.save(tmp_path / "p.json")
    again = pg.Plan.load(tmp_path / "p.json", q05_f32)
    assert np.allclose(again.ops[0]["direction"], plan.ops[0]["direction"])
    assert again.ops[0]["layers"] == plan.ops[0]["layers"]
