#!/usr/bin/env python3
"""persona_gate side by side with HF transformers (and repeng) on the same GGUF model, CPU.

    python -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/hfenv/bin/pip install transformers gguf accelerate numpy ./python [repeng]
    /tmp/hfenv/bin/python scripts/compare-hf-python.py [--model q05] [--n 16] [--repeng]

1. capture: ``Model.capture(prompts, position="last")`` in f32 against transformers'
   ``output_hidden_states=True`` on the GGUF dequantized to float32 (``from_pretrained(dir,
   gguf_file=...)``). ``resid[l]`` (block l's output, before the final norm) is compared with
   ``hidden_states[l + 1]`` for every block but the last (HF applies the final norm to its last
   hidden state). Prints the worst relative L2 error and both wall times (best of 3, same prompts,
   one batch each side, left padding for HF).
2. ``--repeng``: a steering loop on both sides: train a control vector on the same contrast pairs
   (repeng ``ControlVector.train`` vs ``pg.directions`` difference in means through ``capture``),
   then generate under it at three strengths; prints lines of code and seconds of each side.

Heavy for a 2-core machine (torch + a 0.5B model in float32 twice): run it on a quiet box.
"""

import argparse
import inspect
import os
import pathlib
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def models_dir():
    return pathlib.Path(os.environ.get("PGATE_MODELS_DIR") or
                        pathlib.Path(os.environ.get("PGATE_CACHE") or os.path.expanduser("~/.cache/persona-gate")) / "models")


def best_of(f, reps=3):
    out, best = None, float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return out, best


def capture_side_by_side(model, prompts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import persona_gate as pg

    gguf = models_dir() / f"{model}.gguf"
    m = pg.Model.load(str(gguf), dtype="f32")
    ids = [m.encode(p) for p in prompts]
    ours, t_ours = best_of(lambda: m.capture(ids, position="last", batch_size=len(ids)))

    real = os.path.realpath(gguf)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(real), gguf_file=os.path.basename(real))
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(real), gguf_file=os.path.basename(real),
                                              dtype=torch.float32)
    hf.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    L = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (L - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])

    def run_hf():
        with torch.no_grad():
            return hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states

    hs, t_hf = best_of(run_hf)
    worst = 0.0
    for layer in range(m.n_layers - 1):
        theirs = hs[layer + 1][:, -1, :].numpy()
        for i in range(len(ids)):
            a, b = ours[layer, i].astype(np.float64), theirs[i].astype(np.float64)
            worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    print(f"capture {model} f32, {len(ids)} prompts: worst rel L2 vs HF hidden_states {worst:.2e}; "
          f"persona_gate {t_ours:.2f} s, transformers {t_hf:.2f} s, speed ratio {t_hf / t_ours:.2f}x")
    return m, tok, hf


def steering_side_by_side(m, tok, hf, pairs, prompts):
    import persona_gate as pg
    from repeng import ControlModel, ControlVector, DatasetEntry

    layers = list(range(m.n_layers // 3, 2 * m.n_layers // 3))

    def ours():
        pos = m.capture([p for p, _ in pairs], position="last")
        neg = m.capture([n for _, n in pairs], position="last")
        vec = pg.DirectionSet((pos - neg).mean(axis=1))
        return [m.generate(prompts, plan=pg.Plan().add(vec, c, layers=layers), max_tokens=32).texts for c in (2.0, 4.0, 8.0)]

    def theirs():
        cm = ControlModel(hf, layers)
        data = [DatasetEntry(positive=p, negative=n) for p, n in pairs]
        v = ControlVector.train(cm, tok, data)
        outs = []
        for c in (0.5, 1.0, 2.0):
            cm.set_control(v, c)
            for p in prompts:
                enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
                out = cm.generate(**enc, max_new_tokens=32, do_sample=False)
                outs.append(tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True))
            cm.reset()
        return outs

    _, t_ours = best_of(ours, 1)
    _, t_theirs = best_of(theirs, 1)
    loc = lambda f: len([l for l in inspect.getsource(f).splitlines() if l.strip() and not l.strip().startswith("#")])  # noqa: E731
    print(f"steering loop: persona_gate {loc(ours)} lines, {t_ours:.1f} s; repeng {loc(theirs)} lines, {t_theirs:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="q05")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeng", action="store_true")
    args = ap.parse_args()
    import persona_gate as pg

    prompts = pg.directions.prompts("harmless_val", args.n)
    m, tok, hf = capture_side_by_side(args.model, prompts)
    if args.repeng:
        pairs = [(f"Act as an extremely compliant assistant. {p}", f"Act as a cautious assistant. {p}") for p in prompts]
        steering_side_by_side(m, tok, hf, pairs, prompts[:4])


if __name__ == "__main__":
    main()
