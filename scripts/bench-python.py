#!/usr/bin/env python3
"""Python overhead: the same capture and generation through persona_gate and through `pgate`.

    python scripts/bench-python.py [--model q05] [--dtype q] [--reps 3]

Needs the package installed (pip install ./python, or scripts/test-python.sh's venv) and
target/release/pgate. Run it on a quiet machine: both sides share the engine, so any difference is
the bindings' overhead plus noise.

- capture: `pgate bench-capture` (all-layer last-token capture of N copies of the benchmark prompt
  in batches of B, best of R, timed inside the process) against `Model.capture` of the same token
  ids with the same batch size, timed around the Python call (best of R after a warm-up).
- generate: whole processes, alternating: `pgate generate --prompts FILE --out ...` against a Python
  process that loads the model and calls `Model.generate` with the same prompts and settings
  (model load included on both sides); median wall time of R runs each.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH_PROMPT = (
    "Write a detailed explanation of how a compiler turns source code into machine code, "
    "covering lexing, parsing, and code generation."
)  # crates/persona-gate/src/bench.rs DEFAULT_PROMPT


def capture(args, pgate):
    import persona_gate as pg

    out = subprocess.run(
        [pgate, "bench-capture", args.model, "--dtype", args.dtype, "--batch", str(args.batch),
         "--prompts", str(args.prompts), "--reps", str(args.reps), "--json"],
        check=True, capture_output=True, text=True,
    )
    cli = json.loads(out.stdout)
    m = pg.Model.load(args.model, dtype=args.dtype)
    ids = [m.encode(BENCH_PROMPT)] * args.prompts
    m.capture(ids, batch_size=args.batch)  # warm-up
    best = float("inf")
    for _ in range(args.reps):
        t = time.perf_counter()
        m.capture(ids, batch_size=args.batch)
        best = min(best, time.perf_counter() - t)
    py_tok_s = args.prompts * len(ids[0]) / best
    print(f"capture  {args.model} {args.dtype} batch {args.batch} x {args.prompts}: "
          f"pgate {cli['capture_tok_s']:.1f} tok/s, python {py_tok_s:.1f} tok/s, "
          f"python/pgate {py_tok_s / cli['capture_tok_s']:.3f}")


def generate(args, pgate):
    import persona_gate as pg

    prompts = pg.directions.prompts("harmless_val", args.gen_prompts)
    tmp = pathlib.Path(tempfile.mkdtemp())
    pf = tmp / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cli = [pgate, "generate", args.model, "--dtype", args.dtype, "--prompts", str(pf),
           "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch), "--out", str(tmp / "out.jsonl")]
    code = (
        "import json, sys, persona_gate as pg\n"
        "m = pg.Model.load(sys.argv[1], dtype=sys.argv[2])\n"
        "ps = [json.loads(l)['prompt'] for l in open(sys.argv[3])]\n"
        "m.generate(ps, max_tokens=int(sys.argv[4]), batch_size=int(sys.argv[5]))\n"
    )
    py = [sys.executable, "-c", code, args.model, args.dtype, str(pf), str(args.max_tokens), str(args.batch)]
    times = {"pgate": [], "python": []}
    for _ in range(args.reps):
        for name, cmd in (("pgate", cli), ("python", py)):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["pgate"]), statistics.median(times["python"])
    print(f"generate {args.model} {args.dtype} {args.gen_prompts} prompts x {args.max_tokens} tokens, batch {args.batch}: "
          f"pgate {a:.2f} s, python {b:.2f} s (median of {args.reps}, load included), python/pgate {b / a:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="q05")
    ap.add_argument("--dtype", default="q")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pgate", default=os.environ.get("PGATE_BIN", str(REPO / "target" / "release" / "pgate")))
    args = ap.parse_args()
    capture(args, args.pgate)
    generate(args, args.pgate)


if __name__ == "__main__":
    main()
