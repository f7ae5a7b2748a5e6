"""Captured residuals and logits of Qwen2.5-Coder-0.5B in f32 against the shared PyTorch
references, to the tolerance of the Rust suite (crates/persona-gate/tests/fixtures_numeric.rs:
relative L2 error < 1e-3 per prompt and layer)."""

import numpy as np

TOL = 1e-3


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).sum() / max((b**2).sum(), 1e-30)))


def test_chat_template_gives_the_reference_token_ids(q05_f32, q05_ref):
    r, _ = q05_ref
    for prompt, ids in zip(r["prompts"], r["input_ids"]):
        assert q05_f32.encode(prompt) == ids


def test_residuals_match_pytorch_reference(q05_f32, q05_ref):
    r, t = q05_ref
    want = t["resid_last_token"]  # [layers, 6, d]
    acts = q05_f32.capture(r["input_ids"], layers="all", position="last", batch_size=6)
    assert acts.dtype == np.float32 and acts.shape == want.shape
    assert acts.flags["C_CONTIGUOUS"]
    worst = max(rel_l2(acts[l, i], want[l, i]) for l in range(want.shape[0]) for i in range(want.shape[1]))
    print(f"q05 residuals: worst rel err {worst:.2e}")
    assert worst < TOL
    # The same numbers through the chat template (prompts as text), one layer as a view.
    by_text = q05_f32.capture(r["prompts"], layers=range(10, 14), position="last")
    np.testing.assert_allclose(by_text, acts[10:14], rtol=0, atol=1e-4)
    assert by_text.base is not None  # a view of the engine's buffer, not a copy


def test_logits_match_pytorch_reference(q05_f32, q05_ref):
    r, t = q05_ref
    got = q05_f32.logits(r["input_ids"])
    worst = max(rel_l2(got[i], t["last_logits"][i]) for i in range(len(r["input_ids"])))
    assert worst < TOL, worst
