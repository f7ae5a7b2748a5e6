//! A model split over several devices (`--device A,B,...`, the layer placement that
//! `device_map="auto"` gives HF users) must generate what the unsplit model generates, with plans
//! applied at layers on every device. On the CPU the devices are one and the same, so this checks
//! the placement, the per-segment inputs, plan vectors and cache bookkeeping end to end; the CUDA
//! run over two GPUs is `scripts/gpu/split.sh` (BENCHMARKS.md).

use std::path::PathBuf;
use std::process::Command;

fn pgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .env("PGATE_THREADS", "2")
        .output()
        .expect("run pgate")
}

fn smollm2() -> String {
    let dir = std::env::var_os("PGATE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/persona-gate/models")
        });
    let p = dir.join("smollm2.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup-models.sh",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

#[test]
fn a_split_model_generates_the_unsplit_models_tokens_under_a_plan() {
    let model = smollm2();
    let dir = std::env::temp_dir().join(format!("pgate-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dirs = dir.join("r.safetensors");
    let dirs = dirs.to_str().unwrap();
    let out = pgate(&["extract", "random", &model, "--seed", "3", "-o", dirs]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let add = format!("{dirs}[10]:4@8-14");
    let ablate = format!("{dirs}[20]@12-25");
    let run = |device: &str| {
        let out = pgate(&[
            "generate",
            &model,
            "--device",
            device,
            "--dtype",
            "f32",
            "--max-tokens",
            "12",
            "--add",
            &add,
            "--ablate",
            &ablate,
            "--prompt",
            "Tell me about the sea.",
            "--prompt",
            "hi",
        ]);
        assert!(
            out.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let whole = run("cpu");
    assert!(whole.contains("sea"), "unexpected output: {whole}");
    // Two and three segments: the plan's add and ablate windows cross the segment boundaries.
    assert_eq!(
        run("cpu,cpu"),
        whole,
        "split over 2 devices changed the tokens"
    );
    assert_eq!(
        run("cpu,cpu,cpu"),
        whole,
        "split over 3 devices changed the tokens"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn impossible_splits_are_one_line_errors() {
    let model = smollm2();
    let many = vec!["cpu"; 31].join(",");
    let out = pgate(&[
        "generate",
        &model,
        "--device",
        &many,
        "--max-tokens",
        "2",
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot split 30 layers over 31 devices"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = pgate(&[
        "generate",
        &model,
        "--device",
        "cpu,tpu",
        "--max-tokens",
        "2",
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown device 'tpu'"),
        "{err}"
    );
}
