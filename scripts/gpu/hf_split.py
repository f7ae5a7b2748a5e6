"""HF transformers with device_map="auto" on a synthetic model directory written by `pgate synth-model`
(bf16 safetensors): the layer-split anchor for `pgate bench --device cuda:0,cuda:1` (issue 21). Greedy
generation of NEW tokens after 128 prompt tokens at batch 1 and 32 (EOS ignored), steered the way
`pgate bench --steer add+ablate` steers: add a random unit direction x 4 at layer n/2, project another
out of layers 5n/8 .. 5n/8+2, with forward hooks on the decoder layers (each vector on its layer's GPU).
Writes $OUT/hf_split.json."""
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

path = os.environ["MODEL"]
new = int(os.environ.get("NEW", "64"))
t = time.time()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
model.eval()
load_s = time.time() - t
layers = model.model.layers
n = len(layers)
devs = sorted({str(p.device) for p in model.parameters()})
print(f"HF loaded {n} layers over {devs} in {load_s:.1f} s", flush=True)
d = model.config.hidden_size
g = torch.Generator().manual_seed(0)
add_v = torch.randn(d, generator=g)
add_v = (4.0 * add_v / add_v.norm()).to(torch.bfloat16)
abl_v = torch.randn(d, generator=g)
abl_v = (abl_v / abl_v.norm()).to(torch.bfloat16)


def hook_add(mod, args, out):
    h = out[0] if isinstance(out, tuple) else out
    h = h + add_v.to(h.device)
    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


def hook_ablate(mod, args, out):
    h = out[0] if isinstance(out, tuple) else out
    v = abl_v.to(h.device)
    h = h - (h @ v).unsqueeze(-1) * v
    return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


layers[n // 2].register_forward_hook(hook_add)
for li in range(5 * n // 8, 5 * n // 8 + 3):
    layers[li].register_forward_hook(hook_ablate)

first = next(model.parameters()).device
res = {"load_s": load_s, "devices": devs, "layers": n, "new_tokens": new, "rows": []}
for b in (1, 32):
    ids = torch.randint(0, model.config.vocab_size, (b, 128), device=first)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))
        torch.cuda.synchronize()
        t = time.time()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    s = time.time() - t
    row = {"batch": b, "seconds": s, "tok_s": b * new / s, "ms_per_step": 1000 * s / new}
    print(json.dumps(row), flush=True)
    res["rows"].append(row)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "hf_split.json"), "w") as f:
    json.dump(res, f, indent=1)
