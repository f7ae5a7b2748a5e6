"""HF transformers prefill with SDPA on the Llama-3.1-8B-shaped random model (bf16): throughput of
2k-token prompts at batch 8 and peak allocated memory of one prompt at 1k/2k/4k/8k tokens (the
anchor for issue 22's prefill row). Writes $OUT/hf_prefill.json."""
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
model.eval()
for p in model.parameters():
    p.data.normal_(0, 0.02)


def prefill(batch, plen, reps=3):
    ids = torch.randint(0, cfg.vocab_size, (batch, plen), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(reps):
            model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    return batch * plen * reps / (time.time() - t)


out = {"prefill_2k_b8_tok_s": prefill(8, 2048)}
base = torch.cuda.memory_allocated()
for plen in (1024, 2048, 4096, 8192):
    torch.cuda.reset_peak_memory_stats()
    prefill(1, plen, reps=1)
    out[f"peak_mib_{plen}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
print(json.dumps(out, indent=1))
with open(os.path.join(os.environ.get("OUT", "/tmp"), "hf_prefill.json"), "w") as f:
    json.dump(out, f, indent=1)
