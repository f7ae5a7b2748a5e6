//! Prefill attention over blocks of query positions (the decoder's `blocked_attention`, which keeps
//! a long prompt's score tensors bounded) must give the logits and greedy tokens of the unblocked
//! computation. `PGATE_ATTN_BLOCK_MB=0` forces the smallest blocks (16 positions), so a 300-token
//! prompt runs as 19 blocks, each also skipping the keys after its last query; a second, shorter
//! prompt in the same batch checks that left padding is masked the same way.

use std::path::PathBuf;
use std::process::Command;

fn pgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgate"))
}

fn models_dir() -> PathBuf {
    std::env::var_os("PGATE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/persona-gate/models")
        })
}

/// Deterministic token ids below SmolLM2's vocabulary (49,152), away from special tokens.
fn tokens(n: usize, seed: u64) -> String {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1000 + (x >> 33) % 40_000).to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn logits(block_mb: Option<&str>) -> serde_json::Value {
    let model = models_dir().join("smollm2.gguf");
    assert!(
        model.exists(),
        "{} missing: run scripts/setup-models.sh",
        model.display()
    );
    let mut cmd = Command::new(pgate_bin());
    cmd.args([
        "logits",
        model.to_str().unwrap(),
        "--dtype",
        "f32",
        "--greedy",
        "8",
    ])
    .args(["--tokens", &tokens(300, 7), "--tokens", &tokens(200, 11)])
    .env("PGATE_THREADS", "2");
    match block_mb {
        Some(mb) => cmd.env("PGATE_ATTN_BLOCK_MB", mb),
        None => cmd.env_remove("PGATE_ATTN_BLOCK_MB"),
    };
    let out = cmd.output().expect("run pgate logits");
    assert!(
        out.status.success(),
        "pgate logits failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("logits JSON")
}

/// Every number in `v`, in document order.
fn numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| numbers(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| numbers(x, out)),
        _ => {}
    }
}

#[test]
fn blocked_prefill_attention_matches_one_block() {
    let whole = logits(None);
    let blocked = logits(Some("0"));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    numbers(&whole, &mut a);
    numbers(&blocked, &mut b);
    assert_eq!(a.len(), b.len(), "different JSON shapes");
    assert!(
        a.len() > 1000,
        "expected logits in the output, got {} numbers",
        a.len()
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
        .fold(0.0f64, f64::max);
    assert!(
        worst < 1e-4,
        "blocked attention moved a logit by {worst:e} (relative)"
    );
    assert_eq!(
        whole["greedy"], blocked["greedy"],
        "greedy tokens differ under blocked attention"
    );
}
