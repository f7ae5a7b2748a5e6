//! Running a small study on a real model (SmolLM2-135M, q mode): a run in pieces (`limit`,
//! resumed) and two shards merged store exactly the same rows; the stop flag stops
//! between waves; tables and exports read the store.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use persona_gate::model::{DTypeMode, LoadOptions, Model};
use persona_gate::study::export::{export, Format};
use persona_gate::study::report::{report, ReportOptions};
use persona_gate::study::{run_study, RunOptions, Store, Study};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-study-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn study_text(model: &Path) -> String {
    format!(
        r#"
version = 1
name = "run-test"
[model]
spec = "{}"
dtype = "q"
[directions]
ctl = {{ random = 5 }}
[prompts]
harmful = {{ source = "demo_harmful", n = 3 }}
harmless = {{ source = "demo_harmless", n = 1 }}
[generation]
max_new_tokens = 8
# One sequence per batch: in q mode a near-tie can go either way with the batch composition, and
# this test compares outputs exactly across differently split runs.
batch_size = 1
[[condition]]
name = "baseline"
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "steer"
add = ["ctl:6@15"]
prompts = ["harmful"]
"#,
        model.display()
    )
}

type Rows = BTreeMap<(String, String, String, i64), (String, String)>;

/// Key -> (output, label) of every result of the study.
fn rows(store: &Store, study: &Study) -> Rows {
    store
        .rows(&study.hash)
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                (r.condition_hash, r.prompt_set_hash, r.prompt_id, r.sample),
                (r.output, r.label),
            )
        })
        .collect()
}

#[test]
fn run_in_pieces_shards_and_exports() {
    let t0 = std::time::Instant::now();
    let dir = tmpdir("main");
    let path = dir.join("study.toml");
    std::fs::write(&path, study_text(&common::model_path("smollm2"))).unwrap();
    let study = Study::load(&path).unwrap();
    let total = 3 * 3 + 2;
    assert_eq!(study.items().len(), total);
    let model = Model::load(
        &study.file.model.spec,
        &LoadOptions {
            dtype: DTypeMode::Q,
            ..Default::default()
        },
    )
    .unwrap();
    let go = AtomicBool::new(false);
    let quiet = &mut |_: persona_gate::study::runner::RunEvent<'_>| {};

    // The study in three pieces, each run continuing the last (a resumed run).
    let mut b = Store::open(&dir.join("b.sqlite")).unwrap();
    for (limit, already) in [(4, 0), (3, 4), (100, 7)] {
        let opts = RunOptions {
            limit: Some(limit),
            wave: Some(2),
            ..Default::default()
        };
        let s = run_study(&study, &mut b, &model, &opts, &go, quiet).unwrap();
        assert_eq!((s.total, s.already), (total, already));
        assert_eq!(s.written, limit.min(total - already));
    }
    assert_eq!(b.count_results().unwrap(), total);
    assert_eq!(b.count_duplicate_keys().unwrap(), 0);
    let full = rows(&b, &study);
    assert_eq!(full.len(), total);
    // Nothing left: a further run writes nothing.
    let s = run_study(&study, &mut b, &model, &RunOptions::default(), &go, quiet).unwrap();
    assert_eq!((s.already, s.planned, s.written), (total, 0, 0));

    // Two shards, merged.
    let mut parts = Vec::new();
    for i in 0..2u64 {
        let p = dir.join(format!("shard{i}.sqlite"));
        let mut st = Store::open(&p).unwrap();
        let opts = RunOptions {
            shard: Some((i, 2)),
            ..Default::default()
        };
        let s = run_study(&study, &mut st, &model, &opts, &go, quiet).unwrap();
        assert_eq!(s.written + s.other_shards, total);
        parts.push((p, s.written));
    }
    assert!(
        parts.iter().all(|(_, n)| *n > 0),
        "both shards get work: {parts:?}"
    );
    let mut merged = Store::open(&dir.join("merged.sqlite")).unwrap();
    for (p, _) in &parts {
        merged.merge_from(p).unwrap();
    }
    // Merging a shard twice adds nothing.
    assert_eq!(merged.merge_from(&parts[0].0).unwrap(), 0);
    assert_eq!(merged.count_results().unwrap(), total);
    assert_eq!(
        rows(&merged, &study),
        full,
        "merged shards store what one run stores"
    );

    // A set stop flag stops before the first wave.
    let stop = AtomicBool::new(true);
    let mut c = Store::open(&dir.join("c.sqlite")).unwrap();
    let s = run_study(&study, &mut c, &model, &RunOptions::default(), &stop, quiet).unwrap();
    assert!(s.interrupted);
    assert_eq!(s.written, 0);

    // Status, table, exports.
    let ro = Store::open_read(&dir.join("b.sqlite")).unwrap();
    let rec = ro.find_study(None).unwrap();
    assert_eq!(rec.hash, study.hash);
    let status = ro.status(&study.hash).unwrap();
    assert_eq!(status.len(), 2 + 2 + 1);
    assert!(status.iter().all(|r| r.done == r.total));
    let all = ro.rows(&study.hash).unwrap();
    let rep = report(&all, &rec.baseline, &ReportOptions::default());
    assert_eq!(rep.len(), 5);
    let steer = rep.iter().find(|r| r.condition == "steer").unwrap();
    let v = steer.vs_baseline.as_ref().unwrap();
    assert_eq!(v.n_pairs, 3);
    assert!(rep.iter().all(|r| r.n > 0 && r.judges.is_empty()));
    let jl = dir.join("rows.jsonl");
    assert_eq!(export(&all, Format::Jsonl, &jl).unwrap(), total);
    let text = std::fs::read_to_string(&jl).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["strongreject_judged"], false);
    assert!(first["strongreject"].is_null() && first["unsafe"].is_null());
    assert!(first["leakage"].as_f64().is_some());
    let csv = dir.join("rows.csv");
    export(&all, Format::Csv, &csv).unwrap();
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert!(csv_text.starts_with("condition,condition_hash,prompt_set,prompt_id"));
    let pq = dir.join("rows.parquet");
    export(&all, Format::Parquet, &pq).unwrap();
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(&pq).unwrap()).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), total as i64);
    eprintln!("study_run: {:.1} s", t0.elapsed().as_secs_f64());
}
