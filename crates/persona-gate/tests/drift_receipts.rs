//! `pgate receipt diff` and `pgate check --against` (issue 20) on the committed example bundle
//! (no model): a bundle against itself differs in no field and loses no refusal; the conservative
//! Newcombe interval fails a tight limit at n = 8 (small samples fail, as in `pgate check`);
//! a receipt edited to carry another model hash and persona text shows both fields; a receipt
//! of another prompt set is a one-line error.

use std::path::PathBuf;

use persona_gate::drift::receipts::{check_against, receipt_diff};

fn bundle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/receipts")
}

fn edited(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let text = std::fs::read_to_string(bundle().join("01-friendly.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    let dir = std::env::temp_dir().join(format!("pgate-rdiff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    p
}

#[test]
fn receipt_diff_and_check_against() {
    let same = receipt_diff(&bundle(), &bundle()).unwrap();
    assert!(same.fields.is_empty(), "{}", same.to_text());
    assert!(same.rates.iter().all(|r| r.drop == 0.0));
    assert!(same.to_text().contains("no field differs"));

    let loose = check_against(&bundle(), &bundle(), 60.0, false).unwrap();
    assert!(!loose.is_empty() && loose.iter().all(|v| v.pass));
    let tight = check_against(&bundle(), &bundle(), 10.0, false).unwrap();
    assert!(
        tight.iter().any(|v| !v.pass),
        "n = 8 cannot rule out a 10-point drop"
    );
    assert!(check_against(&bundle(), &bundle(), 10.0, true)
        .unwrap()
        .iter()
        .all(|v| v.pass));

    let old = bundle().join("01-friendly.json");
    let new = edited("new.json", |v| {
        v["model"]["files"][0]["sha256"] = "ab".repeat(32).into();
        v["condition"]["system_prompt"] = "You are a pirate.".into();
    });
    let d = receipt_diff(&old, &new).unwrap();
    let fields: Vec<&str> = d.fields.iter().map(|f| f.field.as_str()).collect();
    assert!(fields.contains(&"model.files.sha256"), "{fields:?}");
    assert!(fields.contains(&"condition.system_prompt"), "{fields:?}");

    let other = edited("other.json", |v| {
        v["results"][0]["prompt_set_sha256"] = "cd".repeat(32).into();
    });
    let e = receipt_diff(&old, &other).unwrap_err().to_string();
    assert!(e.contains("another study") && !e.contains('\n'), "{e}");
    assert!(check_against(&old, &new, f64::NAN, false).is_err());
}
