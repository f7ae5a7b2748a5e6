//! Steering that warns (issue 20): on Qwen2.5-Coder-1.5B's extracted directions, adding the
//! compliant persona at layers 10-14 is flagged against the refusal direction (most anti-aligned
//! layer named with its cosine); a random direction at the same layers (unit steering, so of the
//! same norm) is not. No model is loaded: the check reads direction files only.

use std::path::PathBuf;

use persona_gate::directions::{load_plan, DirectionSet, PlanSource};
use persona_gate::drift::warn::steering_warning;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/directions/q15")
}

fn plan(spec: &str) -> persona_gate::intervene::InterventionPlan {
    load_plan(
        &PlanSource {
            add: vec![spec.into()],
            ..Default::default()
        },
        28,
        1536,
    )
    .unwrap()
    .unwrap()
}

#[test]
fn compliant_steering_warns_random_does_not() {
    let refusal = DirectionSet::load(&dir().join("refusal.safetensors")).unwrap();
    let compliant = format!("{}:8@10-14", dir().join("compliant.safetensors").display());
    let w = steering_warning(&plan(&compliant), &refusal, "refusal.safetensors")
        .expect("the compliant direction is anti-aligned with refusal at layer 14");
    assert_eq!(w.layer, 14);
    assert!(w.cos < -0.09 && w.cos > -0.12, "cos {}", w.cos);
    let line = w.line();
    assert!(
        line.contains("layer 14") && line.contains("-0.10"),
        "{line}"
    );
    assert!(!line.contains('\n'));
    eprintln!("{line}");

    let random = format!("{}:8@10-14", dir().join("random.safetensors").display());
    assert!(steering_warning(&plan(&random), &refusal, "refusal.safetensors").is_none());
    // Steering away from the persona (negative coefficient) is not flagged either.
    let away = format!("{}:-8@10-14", dir().join("compliant.safetensors").display());
    assert!(steering_warning(&plan(&away), &refusal, "refusal.safetensors").is_none());
}
