"""pgate on CUDA vs HF transformers on the same GPU, on synthetic models made here by `pgate synth-model`.

For each model shape (llama-3.2-1b and qwen2.5-0.5b widths, 4 layers: q/k/v bias, tied embeddings,
llama3 RoPE scaling, GQA) and each dtype (f32, bf16), with and without an intervention plan
(add at layer 1, ablate at layers 2-3), both engines see the same three token-id prompts of different
lengths. pgate runs them as one left-padded batch (`pgate logits`), transformers one at a time with
forward hooks doing the plan. Checked: last-token logits (relative error ||a - b|| / ||b|| per prompt)
and 16 greedy tokens (EOS ignored).

Pass: f32 logits within 1e-3 and identical greedy tokens; bf16 logits within 3e-2 (bf16 rounding of
every activation in two implementations that round in different places; greedy agreement in bf16 is
reported, not required).

usage: python3 scripts/gpu/compare_hf.py --pgate gpu-bin/pgate --work /tmp/cmp [--out DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--pgate", required=True)
ap.add_argument("--work", default="/tmp/pgate-compare")
ap.add_argument("--out", default=None)
ap.add_argument("--greedy", type=int, default=16)
args = ap.parse_args()
os.makedirs(args.work, exist_ok=True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

SHAPES = [("llama-3.2-1b", 4, 11), ("qwen2.5-0.5b", 4, 12)]
TOL = {"f32": 1e-3, "bf16": 3e-2}
results = []
ok_all = True


def run(cmd):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print("FAILED:", " ".join(cmd), "\n", p.stdout[-2000:], p.stderr[-4000:], flush=True)
        sys.exit(1)
    return time.time() - t


for like, layers, seed in SHAPES:
    d = os.path.join(args.work, f"{like}-L{layers}")
    run([args.pgate, "synth-model", "--like", like, "--layers", str(layers), "--seed", str(seed), "-o", d])
    cfg = json.load(open(os.path.join(d, "config.json")))
    width, vocab = cfg["hidden_size"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab - 8, (n,), generator=g).tolist() for n in (7, 19, 12)]
    u = torch.randn(width, generator=g, dtype=torch.float64)
    v = torch.randn(width, generator=g, dtype=torch.float64)
    plan = {"ops": [
        {"op": "add", "coeff": 4.0, "layers": "1", "positions": "all", "direction": u.tolist()},
        {"op": "ablate", "layers": "2,3", "positions": "all", "direction": v.tolist()},
    ]}
    plan_path = os.path.join(d, "plan.json")
    json.dump(plan, open(plan_path, "w"))
    u_unit, v_unit = u / u.norm(), v / v.norm()

    for dtype in ("f32", "bf16"):
        tdt = torch.float32 if dtype == "f32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(d, dtype=tdt).cuda().eval()
        uu, vv = u_unit.to("cuda", tdt), v_unit.to("cuda", tdt)

        def add_hook(m, i, o):
            h = o[0] if isinstance(o, tuple) else o
            h = h + 4.0 * uu
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        def ablate_hook(m, i, o):
            h = o[0] if isinstance(o, tuple) else o
            h = h - (h @ vv).unsqueeze(-1) * vv
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        for with_plan in (False, True):
            handles = []
            if with_plan:
                handles.append(model.model.layers[1].register_forward_hook(add_hook))
                for layer in (2, 3):
                    handles.append(model.model.layers[layer].register_forward_hook(ablate_hook))
            hf_logits, hf_greedy = [], []
            with torch.no_grad():
                for p in prompts:
                    ids = torch.tensor([p], device="cuda")
                    hf_logits.append(model(ids).logits[0, -1].float().cpu())
                    # Plain greedy by full forwards (generate's min_new_tokens would mask EOS; pgate
                    # ignores EOS without masking it).
                    gen = []
                    for _ in range(args.greedy):
                        nxt = model(ids).logits[0, -1].argmax().item()
                        gen.append(nxt)
                        ids = torch.cat([ids, torch.tensor([[nxt]], device="cuda")], 1)
                    hf_greedy.append(gen)
            for h in handles:
                h.remove()
            jpath = os.path.join(d, f"pgate-{dtype}-{int(with_plan)}.json")
            cmd = [args.pgate, "logits", d, "--dtype", dtype, "--device", "cuda", "-o", jpath,
                   "--greedy", str(args.greedy)]
            for p in prompts:
                cmd += ["--tokens", ",".join(map(str, p))]
            if with_plan:
                cmd += ["--plan", plan_path]
            secs = run(cmd)
            pg = json.load(open(jpath))
            rels, same = [], []
            for i in range(len(prompts)):
                a = torch.tensor(pg["logits"][i], dtype=torch.float64)
                b = hf_logits[i].double()
                rels.append(((a - b).norm() / b.norm()).item())
                same.append(pg["greedy"][i] == hf_greedy[i])
                if not same[-1] and dtype == "f32":
                    print("  greedy differs:", pg["greedy"][i], hf_greedy[i], flush=True)
            rel = max(rels)
            ok = rel <= TOL[dtype] and (dtype == "bf16" or all(same))
            ok_all &= ok
            row = dict(model=f"{like} x{layers} layers", dtype=dtype, plan="add+ablate" if with_plan else "none",
                       max_rel_err=float(f"{rel:.3g}"), greedy_identical=f"{sum(same)}/{len(same)}",
                       tol=TOL[dtype], ok=ok, pgate_secs=round(secs, 2), device=pg["device"])
            results.append(row)
            print(row, flush=True)
        del model
        torch.cuda.empty_cache()

summary = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, ok=ok_all, rows=results)
if args.out:
    json.dump(summary, open(os.path.join(args.out, "compare_hf.json"), "w"), indent=1)
print(f"{'model':<26} {'dtype':<5} {'plan':<11} {'max rel err':>11} {'greedy':>7} ok")
for r in results:
    print(f"{r['model']:<26} {r['dtype']:<5} {r['plan']:<11} {r['max_rel_err']:>11.3g} {r['greedy_identical']:>7} {r['ok']}")
print("COMPARE", "PASS" if ok_all else "FAIL", flush=True)
sys.exit(0 if ok_all else 1)
