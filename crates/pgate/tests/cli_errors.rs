//! Bad input gets one clear error line and a non-zero exit code, and never a panic.

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn pgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .output()
        .expect("run pgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_MODELS_DIR") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    std::env::var_os("PGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/persona-gate"))
        .join("models")
}

fn smollm2() -> PathBuf {
    let p = models_dir().join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup-models.sh smollm2",
        p.display()
    );
    p
}

/// Exit code != 0, no panic, and exactly one line on stderr that contains every `needles`.
fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (code, _out, err) = pgate(args);
    assert_ne!(code, 0, "pgate {args:?} should fail");
    assert!(!err.contains("panicked"), "pgate {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks '{n}': {}", lines[0]);
    }
}

/// A tiny GGUF with the given metadata and one small tensor.
fn write_gguf(path: &PathBuf, md: &[(&str, gguf_file::Value)]) {
    let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &q)]).unwrap();
}

#[test]
fn truncated_gguf() {
    let bytes = std::fs::read(smollm2()).unwrap();
    let p = tmp("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(
        &["inspect", p.to_str().unwrap(), "--no-hash"],
        &["truncated"],
    );
    assert_one_line_error(
        &["generate", p.to_str().unwrap(), "--prompt", "hi"],
        &["truncated"],
    );
}

#[test]
fn file_that_is_not_a_model() {
    let p = tmp("notes.txt");
    std::fs::write(&p, "these are my notes, not a model\n").unwrap();
    assert_one_line_error(&["inspect", p.to_str().unwrap()], &["not a model"]);
}

#[test]
fn missing_file() {
    assert_one_line_error(
        &["inspect", "/nonexistent/model.gguf"],
        &["/nonexistent/model.gguf"],
    );
}

#[test]
fn unknown_architecture() {
    let p = tmp("mamba.gguf");
    write_gguf(
        &p,
        &[(
            "general.architecture",
            gguf_file::Value::String("mamba9".into()),
        )],
    );
    assert_one_line_error(
        &["inspect", p.to_str().unwrap(), "--no-hash"],
        &["unknown architecture", "mamba9"],
    );
}

#[test]
fn missing_tokenizer() {
    let p = tmp("notok.gguf");
    use gguf_file::Value::*;
    write_gguf(
        &p,
        &[
            ("general.architecture", String("llama".into())),
            ("llama.block_count", U32(1)),
            ("llama.embedding_length", U32(32)),
            ("llama.feed_forward_length", U32(64)),
            ("llama.attention.head_count", U32(2)),
            ("llama.context_length", U32(128)),
        ],
    );
    assert_one_line_error(
        &["inspect", p.to_str().unwrap(), "--no-hash"],
        &["tokenizer"],
    );
}

#[test]
fn hook_layer_out_of_range() {
    let d = 576; // SmolLM2-135M width
    let plan = serde_json::json!({"ops": [{"op": "add", "coeff": 4.0, "layers": "99", "direction": vec![0.1f32; d]}]});
    let p = tmp("plan_layer.json");
    std::fs::write(&p, plan.to_string()).unwrap();
    let m = smollm2();
    assert_one_line_error(
        &[
            "generate",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--plan",
            p.to_str().unwrap(),
        ],
        &["layer 99 is out of range", "30 layers"],
    );
}

#[test]
fn direction_of_wrong_width_and_nan_coefficient() {
    let m = smollm2();
    let plan = serde_json::json!({"ops": [{"op": "ablate", "layers": "3", "direction": vec![0.1f32; 100]}]});
    let p = tmp("plan_width.json");
    std::fs::write(&p, plan.to_string()).unwrap();
    assert_one_line_error(
        &[
            "generate",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--plan",
            p.to_str().unwrap(),
        ],
        &["width 100", "576"],
    );
    // JSON has no NaN literal; a malformed plan is reported with its path.
    let p = tmp("plan_bad.json");
    std::fs::write(
        &p,
        r#"{"ops": [{"op": "add", "coeff": NaN, "layers": "3", "direction": []}]}"#,
    )
    .unwrap();
    assert_one_line_error(
        &[
            "generate",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--plan",
            p.to_str().unwrap(),
        ],
        &["not a valid intervention plan"],
    );
    let plan = serde_json::json!({"ops": [{"op": "add", "coeff": 1.0, "layers": "3-1", "direction": vec![0.1f32; 576]}]});
    let p = tmp("plan_range.json");
    std::fs::write(&p, plan.to_string()).unwrap();
    assert_one_line_error(
        &[
            "generate",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--plan",
            p.to_str().unwrap(),
        ],
        &["backwards"],
    );
}

#[test]
fn empty_prompts() {
    let m = smollm2();
    assert_one_line_error(&["generate", m.to_str().unwrap()], &["no prompts"]);
    let p = tmp("empty.jsonl");
    std::fs::write(&p, "\n\n").unwrap();
    assert_one_line_error(
        &[
            "generate",
            m.to_str().unwrap(),
            "--prompts",
            p.to_str().unwrap(),
        ],
        &["no prompts"],
    );
    assert_one_line_error(
        &["generate", m.to_str().unwrap(), "--prompt", "  "],
        &["empty"],
    );
}

#[test]
fn bad_dtype() {
    assert_one_line_error(
        &[
            "generate",
            smollm2().to_str().unwrap(),
            "--dtype",
            "int3",
            "--prompt",
            "x",
        ],
        &["int3"],
    );
}

#[test]
fn inspect_describes_a_real_model() {
    let (code, out, err) = pgate(&["inspect", smollm2().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "llama",
        "30",
        "576",
        "49152",
        "Q4_1",
        "present",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ] {
        assert!(
            out.contains(needle),
            "inspect output lacks {needle}:\n{out}"
        );
    }
}

/// `pgate ... | head` ends quietly: a reader closing the pipe is not a panic.
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::process::Stdio;
    let db =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/results/paper_q15.sqlite");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(["study", "table", "--by-category", "--db"])
        .arg(&db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgate");
    // Close the read end before pgate writes its table.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "stderr: {err}"
    );
}
