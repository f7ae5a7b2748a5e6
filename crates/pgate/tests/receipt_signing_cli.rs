//! `pgate keygen`, `pgate receipt sign`, `receipt verify --pubkey` and `check --pubkey` from the
//! command line, on a small study of a synthetic model (`pgate synth-model`, 4 tokens: seconds).
//! Keys are made in a temporary folder, never in the repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run pgate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "pgate failed:\n{t}");
    t
}

fn fails(o: Output) -> String {
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "pgate should exit 1:\n{t}");
    t
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-sign-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Edit a receipt and seal it again (as someone with the files and 30 lines of code would).
fn reseal(dir: &Path, file: &str, edit: impl FnOnce(&mut Value)) {
    let p = dir.join(file);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    let mut r: persona_gate::report::Receipt = serde_json::from_value(v).unwrap();
    r.seal().unwrap();
    std::fs::write(&p, serde_json::to_string_pretty(&r).unwrap()).unwrap();
    let bp = dir.join("bundle.json");
    let mut b: Value = serde_json::from_str(&std::fs::read_to_string(&bp).unwrap()).unwrap();
    for e in b["receipts"].as_array_mut().unwrap() {
        if e["file"] == file {
            e["receipt_sha256"] = json!(r.receipt_sha256);
        }
    }
    std::fs::write(&bp, serde_json::to_string_pretty(&b).unwrap()).unwrap();
}

#[test]
fn signed_bundle_verifies_with_its_key_and_fails_with_another_cli() {
    let dir = tmpdir("main");
    let model = dir.join("model");
    ok(pgate(&[
        "synth-model",
        "--like",
        "llama-tiny",
        "--f32",
        "-o",
        s(&model),
    ]));
    let study = dir.join("study.toml");
    std::fs::write(
        &study,
        format!(
            r#"
version = 1
name = "cli-signing"
[model]
spec = "{}"
dtype = "f32"
[prompts]
harmful = {{ source = "demo_harmful", n = 3 }}
harmless = {{ source = "demo_harmless", n = 2 }}
[generation]
max_new_tokens = 4
[stats]
bootstrap = 200
[[condition]]
name = "baseline"
[[condition]]
name = "companion"
persona = "companion"
"#,
            model.display()
        ),
    )
    .unwrap();
    let db = dir.join("r.sqlite");
    ok(pgate(&[
        "study",
        "run",
        "--quiet",
        "--db",
        s(&db),
        s(&study),
    ]));
    let out = dir.join("receipts");
    ok(pgate(&["receipt", s(&db), "-o", s(&out)]));
    assert!(out.join("rows.jsonl").is_file() && out.join("labels.jsonl").is_file());

    let keys = tmpdir("keys");
    let (key, other) = (keys.join("signer.key"), keys.join("other.key"));
    let t = ok(pgate(&["keygen", "-o", s(&key)]));
    assert!(t.contains("mode 0600"), "{t}");
    let t = fails(pgate(&["keygen", "-o", s(&key)]));
    assert!(t.contains("refusing to overwrite"), "{t}");
    ok(pgate(&["keygen", "-o", s(&other)]));
    let (pubkey, other_pub) = (keys.join("signer.key.pub"), keys.join("other.key.pub"));

    // Unsigned: --pubkey fails.
    let t = fails(pgate(&[
        "receipt",
        "verify",
        s(&out),
        "--pubkey",
        s(&pubkey),
    ]));
    assert!(t.contains("not signed"), "{t}");
    let t = ok(pgate(&["receipt", "sign", s(&out), "--key", s(&key)]));
    assert!(t.contains("receipts.dsse.json"), "{t}");
    // Its key: all match. Another key: exit 1.
    let t = ok(pgate(&[
        "receipt",
        "verify",
        s(&out),
        "--pubkey",
        s(&pubkey),
    ]));
    assert!(t.contains("all match"), "{t}");
    let t = fails(pgate(&[
        "receipt",
        "verify",
        s(&out),
        "--pubkey",
        s(&other_pub),
    ]));
    assert!(t.contains("no signature verifies with key"), "{t}");
    // The gate on signed receipts only.
    ok(pgate(&[
        "check",
        s(&out),
        "--max-refusal-drop",
        "100",
        "--pubkey",
        s(&pubkey),
    ]));
    let t = fails(pgate(&[
        "check",
        s(&out),
        "--max-refusal-drop",
        "100",
        "--pubkey",
        s(&other_pub),
    ]));
    assert!(t.contains("FAIL") && t.contains("signature"), "{t}");

    // A receipt edited and sealed again: the signature no longer covers it, verify names the
    // number, check fails, and sign refuses to sign it.
    reseal(&out, "01-companion.json", |v| {
        v["results"][0]["vs_baseline"]["diff"]["hi"] = json!(0.5);
    });
    let t = fails(pgate(&[
        "receipt",
        "verify",
        s(&out),
        "--pubkey",
        s(&pubkey),
    ]));
    assert!(t.contains("changed since it was signed"), "{t}");
    assert!(t.contains("results[harmful].vs_baseline.diff.hi"), "{t}");
    let t = fails(pgate(&["check", s(&out), "--max-refusal-drop", "100"]));
    assert!(
        t.contains("FAIL companion") && t.contains("does not verify"),
        "{t}"
    );
    let t = fails(pgate(&["receipt", "sign", s(&out), "--key", s(&key)]));
    assert!(t.contains("not signing"), "{t}");
    // A private key readable by others is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let t = fails(pgate(&["receipt", "sign", s(&out), "--key", s(&key)]));
        assert!(t.contains("readable by others"), "{t}");
    }
}
