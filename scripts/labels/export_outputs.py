#!/usr/bin/env python3
"""Export a study database's outputs as development-set candidate rows (JSONL, no labels).

    python3 scripts/labels/export_outputs.py DB MODEL_TAG > rows.jsonl

Each row: id (MODEL_TAG/condition/set/prompt_id), model, condition, set, category, kind
(harmless for the Alpaca set, harmful otherwise), prompt, system (the persona's system prompt, if
any), output, max_tokens (256: the full answer), n_tokens.
"""
import json
import sqlite3
import sys

db, tag = sys.argv[1], sys.argv[2]
con = sqlite3.connect(db)
q = """
SELECT sc.name, c.spec, sps.name, p.prompt_id, p.category, p.text, r.output, r.n_tokens, p.ord
FROM results r
JOIN study_conditions sc ON sc.condition_hash = r.condition_hash
JOIN conditions c ON c.hash = r.condition_hash
JOIN study_prompt_sets sps ON sps.study_hash = sc.study_hash AND sps.prompt_set_hash = r.prompt_set
JOIN prompts p ON p.prompt_set = r.prompt_set AND p.prompt_id = r.prompt_id
WHERE p.ord >= sps.skip AND p.ord < sps.skip + sps.n
ORDER BY sc.ord, sps.name, p.ord
"""
for cond, spec, set_name, pid, cat, text, out, n_tok, _ in con.execute(q):
    system = json.loads(spec)["hashed"].get("system")
    row = {
        "id": f"{tag}/{cond}/{set_name}/{pid}",
        "model": tag,
        "condition": cond,
        "set": set_name,
        "category": cat,
        "kind": "harmless" if set_name == "alpaca" else "harmful",
        "prompt": text,
        "system": system,
        "output": out,
        "max_tokens": 256,
        "n_tokens": n_tok,
    }
    print(json.dumps(row, ensure_ascii=False))
