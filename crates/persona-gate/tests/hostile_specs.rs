//! Specs, plans and studies that ask for absurd amounts (issue 17, "Loaders and specs"): refused
//! with one error line against the model's shape or the documented limits of
//! `persona_gate::model::limits`, before anything is allocated.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use persona_gate::directions::{DirectionSpec, PlanBuilder};
use persona_gate::intervene::LayerSet;
use persona_gate::study::file::StudyFile;
use persona_gate::study::plan::Study;

/// The error of `f`, checked: no panic, quick (nothing was expanded), one line.
fn error_of<T>(what: &str, f: impl FnOnce() -> persona_gate::Result<T>) -> String {
    let t0 = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what}: panicked"));
    let e = match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        t0.elapsed().as_secs_f64() < 5.0,
        "{what}: took {:?}",
        t0.elapsed()
    );
    assert!(!e.contains('\n'), "{what}: error is not one line: {e}");
    e
}

#[test]
fn layer_range_past_the_limit_is_refused() {
    let e = error_of("LayerSet", || LayerSet::parse("0-999999999999"));
    assert!(
        e.contains("layer 999999999999 is beyond the limit of 1024"),
        "{e}"
    );
    let e = error_of("--add", || {
        DirectionSpec::parse_add("compliant.safetensors:8@0-999999999999")
    });
    assert!(e.contains("beyond the limit"), "{e}");
    let e = error_of("--ablate", || {
        DirectionSpec::parse_ablate("refusal[3]@5,0-18446744073709551615")
    });
    assert!(e.contains("beyond the limit"), "{e}");
    let e = error_of("overflowing index", || {
        LayerSet::parse("0-99999999999999999999999")
    });
    assert!(e.contains("must be integers"), "{e}");
    // The last allowed index parses; the model's own count is checked at compile time.
    assert!(LayerSet::parse("1023").is_ok());
}

#[test]
fn plan_layers_past_the_limit_are_refused() {
    let base = std::env::temp_dir();
    let d = vec![0.5f32; 8];
    for layers in [
        serde_json::json!("0-999999999999"),
        serde_json::json!(999_999_999_999u64),
        serde_json::json!([1, 999_999_999_999u64]),
    ] {
        let plan = serde_json::json!({"ops": [{"op": "add", "coeff": 1.0, "layers": layers, "direction": d}]});
        let e = error_of("plan json", || {
            PlanBuilder::new()
                .plan_text(&plan.to_string(), false, &base, "plan.json")
                .map(|_| ())
        });
        assert!(e.contains("beyond the limit"), "{layers}: {e}");
    }
    let toml = "[[ops]]\nop = \"ablate\"\nlayers = \"0-999999999999\"\ndirection = [1.0, 0.0]\n";
    let e = error_of("plan toml", || {
        PlanBuilder::new()
            .plan_text(toml, true, &base, "plan.toml")
            .map(|_| ())
    });
    assert!(e.contains("beyond the limit"), "{e}");
    // Within the limit, the model's layer count refuses it.
    let plan =
        serde_json::json!({"ops": [{"op": "add", "coeff": 1.0, "layers": "0-40", "direction": d}]});
    let mut b = PlanBuilder::new();
    b.plan_text(&plan.to_string(), false, &base, "plan.json")
        .unwrap();
    let e = error_of("against the model", || b.finish(30, 8));
    assert!(
        e.contains("layer 30 is out of range: the model has 30 layers"),
        "{e}"
    );
}

fn study(generation: &str, sweep: &str) -> String {
    format!(
        r#"version = 1
[model]
spec = "smollm2"
[prompts]
harmful = "demo_harmful"
[generation]
{generation}
[[condition]]
name = "baseline"
{sweep}
"#
    )
}

fn parse(text: &str) -> persona_gate::Result<StudyFile> {
    StudyFile::parse(text, Path::new("."))
}

#[test]
fn study_samples_1e9_is_refused() {
    let t = study("temperature = 0.7\nsamples = 1000000000", "");
    let e = error_of("samples 1e9", || parse(&t));
    assert!(
        e.contains("generation.samples = 1000000000 is above the limit of 1000"),
        "{e}"
    );
    for (g, needle) in [
        (
            "max_new_tokens = 1000000000000",
            "generation.max_new_tokens",
        ),
        ("batch_size = 100000000", "generation.batch_size"),
    ] {
        let e = error_of(g, || parse(&study(g, "")));
        assert!(e.contains(needle) && e.contains("limit"), "{e}");
    }
    let t = format!("{}\n[stats]\nbootstrap = 1000000000000\n", study("", ""));
    let e = error_of("bootstrap", || parse(&t));
    assert!(e.contains("stats.bootstrap"), "{e}");
}

#[test]
fn study_sweep_range_1e12_is_refused() {
    let sweep = "[[sweep]]\nsystem = \"s{i}\"\ni = { range = [0, 1000000000000] }";
    let e = error_of("range 1e12", || parse(&study("", sweep)));
    assert!(
        e.contains("has 1000000000001 values, above the limit of 1000"),
        "{e}"
    );
    let sweep =
        "[[sweep]]\nsystem = \"s{w}\"\nw = { windows = [0, 9223372036854775807], width = 1 }";
    let e = error_of("windows to i64::MAX", || parse(&study("", sweep)));
    assert!(e.contains("above the limit"), "{e}");
    let sweep = "[[sweep]]\nsystem = \"s{w}\"\nw = { windows = [5, 9223372036854775807], width = 9223372036854775807 }";
    let e = error_of("windows width i64::MAX", || parse(&study("", sweep)));
    assert!(e.contains("do not fit"), "{e}");
    let sweep = "[[sweep]]\nsystem = \"s{a}{b}{c}\"\na = { range = [0, 99] }\nb = { range = [0, 99] }\nc = { range = [0, 99] }";
    let e = error_of("1e6 combinations", || parse(&study("", sweep)));
    assert!(
        e.contains("1000000 combinations") && e.contains("10000 conditions"),
        "{e}"
    );
    // A sweep within the limits still expands.
    let sweep = "[[sweep]]\nsystem = \"s{i}\"\ni = { range = [0, 9], step = 3 }";
    assert_eq!(
        parse(&study("", sweep))
            .unwrap()
            .conditions()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn study_work_items_past_the_limit_are_refused() {
    let sweep = "[[sweep]]\nsystem = \"s{i}\"\ni = { range = [0, 199] }";
    let f = parse(&study("temperature = 0.7\nsamples = 1000", sweep)).unwrap();
    let e = error_of("items", || Study::resolve(f));
    assert!(e.contains("work items") && e.contains("1000000"), "{e}");
}

#[test]
fn study_names_with_newlines_stay_one_line() {
    let t = format!("{}\n[personas]\n\"evil\\nname\" = \"x\"\n", study("", ""));
    let e = error_of("persona name", || parse(&t));
    assert!(e.contains("evil\\nname"), "{e}");
}
