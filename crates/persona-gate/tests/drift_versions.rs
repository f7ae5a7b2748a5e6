//! `pgate drift` on Qwen2.5-Coder-0.5B (issue 20), small settings: a model compared with itself
//! shows no drift in any mode; a version with the harmful-harmless direction baked in against
//! refusal (a stand-in for a fine-tune that lost refusal) is flagged on refusal with its
//! interval; versions of different shapes or tokenizers and missing direction files are one-line
//! errors.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use persona_gate::directions::{
    extract_trait, DirectionMeta, DirectionSet, Position, TraitOptions, TraitSpec,
};
use persona_gate::drift::versions::{export_version, VersionOptions};
use persona_gate::drift::{run_drift, DriftOptions};
use persona_gate::events::Discard;
use persona_gate::model::{LoadOptions, Model};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-drift-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn small() -> DriftOptions {
    DriftOptions {
        prompts: "harmful_val".into(),
        n: 10,
        max_tokens: 16,
        modes: vec!["baseline".into(), "friendly".into()],
        n_train: 12,
        n_val: 4,
        layer_stride: 3,
        trait_questions: 2,
        ..Default::default()
    }
}

/// The q05 fixture's harmful-harmless difference in means (layer 12 as the selected refusal
/// layer), as a direction set.
fn fixture_set() -> DirectionSet {
    let (_, st) = common::fixture("q05");
    let refs = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let rows = refs["direction"].to_vec2::<f32>().unwrap();
    let (n, d) = (rows.len(), rows[0].len());
    let meta = DirectionMeta::new("harmful-harmless", "diff-in-means", n, d);
    let mut set = DirectionSet::from_rows(meta, rows).unwrap();
    set.meta.extra.insert("selected_layer".into(), "12".into());
    set
}

fn fixture_direction() -> PathBuf {
    let p = tmp("fixture.safetensors");
    fixture_set().save(&p).unwrap();
    p
}

/// A `--directions` folder: the fixture's refusal direction and the compliant persona vector
/// (last prompt token, 2 questions) for both versions, so the test spends its time on answers,
/// not on extraction (what the `pgate extract` tests cover).
fn directions_dir(model: &Model) -> PathBuf {
    let spec = TraitSpec::load("compliant").unwrap();
    let opts = TraitOptions {
        position: Position::LAST,
        max_questions: Some(2),
        ..Default::default()
    };
    let persona = extract_trait(model, &spec, &opts, |_, _, _| {})
        .unwrap()
        .set;
    let dir = tmp("dirs");
    for side in ["old", "new"] {
        std::fs::create_dir_all(dir.join(side)).unwrap();
        fixture_set()
            .save(&dir.join(side).join("refusal.safetensors"))
            .unwrap();
        persona
            .save(&dir.join(side).join("persona.safetensors"))
            .unwrap();
    }
    dir
}

#[test]
fn q05_against_itself_no_drift_and_against_a_baked_version_drifted() {
    let q05 = common::model_path("q05");
    let q05 = q05.to_str().unwrap();
    let model = Model::load(q05, &LoadOptions::default()).unwrap();
    let opts = DriftOptions {
        directions: Some(directions_dir(&model)),
        ..small()
    };
    drop(model);
    let out = tmp("same");
    let same = run_drift(q05, q05, &out, &opts, &mut Discard).unwrap();
    print!("{}", same.to_text());
    assert!(same.drifted_modes().is_empty(), "{}", same.to_text());
    assert!(!same.directions.geometry_drifted);
    assert!(!same.directions.persona_drifted);
    assert_eq!(
        same.directions.refusal_layer_old,
        same.directions.refusal_layer_new
    );
    for m in &same.modes {
        assert_eq!(m.refusal_change.diff, 0.0);
        assert!(
            m.verdict_line().contains("no drift"),
            "{}",
            m.verdict_line()
        );
    }
    let files = same.write(&out).unwrap();
    assert_eq!(files.len(), 3);
    let html = std::fs::read_to_string(&files[2]).unwrap();
    assert!(html.contains("<table>") && html.contains("no drift"));

    // A version whose weights push against the refusal direction: refusal falls.
    let baked = tmp("against-refusal.gguf");
    export_version(
        q05,
        &baked,
        &VersionOptions {
            bake_add: vec![format!("{}[12]:-12@11-13", fixture_direction().display())],
            ..Default::default()
        },
    )
    .unwrap();
    let opts = DriftOptions {
        modes: vec!["baseline".into()],
        ..opts
    };
    let rep = run_drift(
        q05,
        baked.to_str().unwrap(),
        &tmp("baked"),
        &opts,
        &mut Discard,
    )
    .unwrap();
    print!("{}", rep.to_text());
    let base = rep.modes.iter().find(|m| m.mode == "baseline").unwrap();
    assert!(base.drifted, "{}", base.verdict_line());
    assert!(base.refusal_change.hi < 0.0, "{}", base.verdict_line());
    let _ = std::fs::remove_file(&baked);
}

#[test]
fn incomparable_versions_and_missing_directions_fail_with_one_line() {
    let q05 = common::model_path("q05");
    let smol = common::model_path("smollm2");
    let (q05, smol) = (q05.to_str().unwrap(), smol.to_str().unwrap());
    let e = run_drift(q05, smol, &tmp("x"), &small(), &mut Discard)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different tokenizers"), "{e}");
    assert!(!e.contains('\n'));

    let opts = DriftOptions {
        directions: Some(tmp("no-such-directions")),
        ..small()
    };
    let e = run_drift(q05, q05, &tmp("y"), &opts, &mut Discard)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing direction file") && e.contains("refusal.safetensors"),
        "{e}"
    );

    let opts = DriftOptions {
        modes: vec!["pirate".into()],
        ..small()
    };
    let e = run_drift(q05, q05, &tmp("z"), &opts, &mut Discard)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown persona mode 'pirate'"), "{e}");
}
