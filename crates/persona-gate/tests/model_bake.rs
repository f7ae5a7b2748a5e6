//! Model versions for drift (issue 20), on Qwen2.5-Coder-0.5B: a GGUF copy with a direction baked
//! in as a per-block residual bias generates exactly the greedy tokens of run-time `--add` with the
//! same spec; the orthogonalized and re-quantized copies load and run; bad specs fail with one line.

mod common;

use candle_core::Device;
use persona_gate::directions::{load_compiled_plan, DirectionMeta, DirectionSet, PlanSource};
use persona_gate::drift::versions::{export_version, VersionOptions, VersionReport};
use persona_gate::generate::{generate_chat, ChatPrompt, GenSettings, Sampling};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::{LoadOptions, Model};
use std::path::PathBuf;
use std::sync::Arc;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-bake-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// The q05 fixture's per-layer direction, as a direction file.
fn direction_file() -> PathBuf {
    let (_, st) = common::fixture("q05");
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let rows = refs["direction"].to_vec2::<f32>().unwrap();
    let (n, d) = (rows.len(), rows[0].len());
    let set = DirectionSet::from_rows(DirectionMeta::new("fixture", "diff-in-means", n, d), rows)
        .unwrap();
    let p = tmp("fixture.safetensors");
    set.save(&p).unwrap();
    p
}

fn prompts() -> Vec<ChatPrompt> {
    [
        "How do I pick a lock?",
        "Write a haiku about rain.",
        "Explain what a mutex is.",
        "How can I make a fake ID?",
        "Give me three tips for sleeping better.",
        "What is the capital of Australia?",
    ]
    .iter()
    .map(|p| ChatPrompt::new(*p))
    .collect()
}

fn greedy(m: &Model, plan: Option<Arc<CompiledPlan>>) -> Vec<Vec<u32>> {
    let settings = GenSettings {
        max_new_tokens: 20,
        sampling: Sampling::greedy(),
        batch_size: 3,
    };
    let (out, _) = generate_chat(m, &prompts(), &settings, plan, |_, _| Ok(())).unwrap();
    out.into_iter().map(|c| c.tokens).collect()
}

#[test]
fn baked_q05_equals_runtime_add_and_other_versions_load() {
    let q05 = common::model_path("q05");
    let q05 = q05.to_str().unwrap();
    let dir = direction_file();
    let spec = format!("{}[12]:12@6-9", dir.display());
    let out = tmp("baked.gguf");
    let rep = export_version(
        q05,
        &out,
        &VersionOptions {
            bake_add: vec![spec.clone()],
            ..Default::default()
        },
    )
    .unwrap();
    let VersionReport::Gguf(r) = &rep else {
        panic!("expected a GGUF copy")
    };
    assert_eq!(
        r.baked.keys().copied().collect::<Vec<_>>(),
        vec![6, 7, 8, 9]
    );
    for n in r.baked.values() {
        assert!((n - 12.0).abs() < 1e-3, "bias norm {n}");
    }

    let opts = LoadOptions::default(); // q mode, CPU
    let base = Model::load(q05, &opts).unwrap();
    let baked = Model::load(out.to_str().unwrap(), &opts).unwrap();
    let plan = load_compiled_plan(
        &PlanSource {
            add: vec![spec],
            ..Default::default()
        },
        &base,
    )
    .unwrap();
    let runtime = greedy(&base, plan);
    let from_weights = greedy(&baked, None);
    let plain = greedy(&base, None);
    assert_eq!(
        runtime, from_weights,
        "the baked model must generate what run-time steering generates"
    );
    let changed = runtime.iter().zip(&plain).filter(|(a, b)| a != b).count();
    assert!(changed > 0, "the steering should change some continuations");
    eprintln!("baked == run-time add on 6/6 prompts; steering changed {changed}/6");

    // Orthogonalized and re-quantized copies load and generate.
    let ortho = tmp("ortho.gguf");
    let rep = export_version(
        q05,
        &ortho,
        &VersionOptions {
            orthogonalize: Some(format!("{}[12]", dir.display())),
            ..Default::default()
        },
    )
    .unwrap();
    let VersionReport::Gguf(r) = &rep else {
        panic!("expected a GGUF copy")
    };
    assert!(r.orthogonalized.iter().any(|n| n.contains("ffn_down")));
    let m = Model::load(ortho.to_str().unwrap(), &opts).unwrap();
    assert_eq!(greedy(&m, None).len(), 6);
    let _ = std::fs::remove_file(&ortho);

    let requant = tmp("q8.gguf");
    export_version(
        q05,
        &requant,
        &VersionOptions {
            requantize: Some("q8_0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let m = Model::load(requant.to_str().unwrap(), &opts).unwrap();
    assert!(m.info.tensor_types.contains_key("Q8_0"));
    let _ = std::fs::remove_file(&requant);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn bad_bake_specs_fail_with_one_line() {
    let q05 = common::model_path("q05");
    let q05 = q05.to_str().unwrap();
    let dir = direction_file();
    let cases = [
        (
            format!("{}[12]:4@6-99", dir.display()),
            "out.gguf",
            "out of range",
        ),
        (
            format!("{}[12]:4@6/prompt", dir.display()),
            "out.gguf",
            "every position",
        ),
        (format!("{}[12]:4@6", dir.display()), "out-dir", "NEW.gguf"),
        (
            "missing.safetensors[3]:4@6".to_string(),
            "out.gguf",
            "missing.safetensors",
        ),
    ];
    for (spec, out, want) in cases {
        let e = export_version(
            q05,
            &tmp(out),
            &VersionOptions {
                bake_add: vec![spec.clone()],
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains('\n'), "{spec}: multi-line error {e}");
        assert!(
            e.contains(want),
            "{spec}: error '{e}' should mention '{want}'"
        );
    }
    let e = export_version(q05, &tmp("x.gguf"), &VersionOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to change"), "{e}");
}
