//! Paths to the real models and the shared fixtures. Tests fail (never skip) when they are missing:
//! CI must prove the engine on real models.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_MODELS_DIR") {
        return PathBuf::from(p);
    }
    persona_gate::model::source::cache_dir().join("models")
}

pub fn model_path(short: &str) -> PathBuf {
    let p = models_dir().join(format!("{short}.gguf"));
    assert!(
        p.exists(),
        "model {} is missing: run scripts/setup-models.sh {short}",
        p.display()
    );
    p
}

pub fn shared_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PGATE_SHARED") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    assert!(
        p.exists(),
        "shared data not found at {} (set PGATE_SHARED)",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> (serde_json::Value, PathBuf) {
    let dir = shared_dir().join("fixtures").join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("fixture reference.json");
    (
        serde_json::from_str(&text).expect("fixture json"),
        dir.join("reference.safetensors"),
    )
}

pub fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// A test steering plan for `model`: a fixed pseudo-random direction added at layers 2-5 with
/// `coeff` and projected out at 10-19 (the shape of the paper's add + ablate conditions).
pub fn add_ablate_plan(
    model: &persona_gate::model::Model,
    coeff: f32,
) -> std::sync::Arc<persona_gate::intervene::CompiledPlan> {
    use persona_gate::intervene::{InterventionPlan, LayerSet};
    let cfg = model.config();
    let d = cfg.d_model;
    let dir: Vec<f32> = (0..d)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let p = InterventionPlan::new()
        .add(LayerSet::parse("2-5").unwrap(), dir.clone(), coeff)
        .ablate(LayerSet::parse("10-19").unwrap(), dir);
    std::sync::Arc::new(
        p.compile(
            cfg.n_layers,
            d,
            model.decoder.dtype(),
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    )
}
