//! Splitting a study for a cluster, without a model: token-balanced layouts, the Kubernetes
//! manifests (a batch/v1 Indexed Job and its merge Job, read back as JSON), the Slurm scripts
//! written with `--print`, and the checks of a shard merge (another study, another labeler,
//! identical and differing duplicates, missing items). Rows are written straight into shard
//! databases, so this runs in a second; the real-Slurm run is `crates/pgate/tests/study_slurm.rs`.
//! One test runs a model (SmolLM2, a few seconds): receipts of a merged study against a single
//! run's.

mod common;

use std::path::{Path, PathBuf};

use persona_gate::study::cluster::{
    self, layout, merge_shards, K8sOptions, Scheduler, ShardBy, SlurmOptions, SubmitSpec,
};
use persona_gate::study::store::{NewResult, Store};
use persona_gate::study::Study;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgate-cluster-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn study_file(dir: &Path, name: &str, model: &str, samples: usize) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
version = 1
name = "{name}"
[model]
spec = "{model}"
dtype = "q"
[prompts]
harmful = {{ source = "demo_harmful", n = 8 }}
harmless = {{ source = "demo_harmless", n = 4 }}
[generation]
max_new_tokens = 16
samples = {samples}
temperature = {temp}
[[condition]]
name = "baseline"
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "companion"
persona = "companion"
"#,
            temp = if samples > 1 { 0.7 } else { 0.0 }
        ),
    )
    .unwrap();
    p
}

/// Write a result for every item of `study` whose index passes `keep`, labeled by `labeler`.
fn fill(db: &Path, study: &Study, labeler: &str, keep: impl Fn(usize) -> bool, output: &str) {
    let mut store = Store::open(db).unwrap();
    store.register(study, None).unwrap();
    for (n, it) in study.items().iter().enumerate() {
        if !keep(n) {
            continue;
        }
        let c = &study.conditions[it.condition];
        let set = &study.prompt_sets[it.set];
        store
            .insert_result(&NewResult {
                condition_hash: &c.hash,
                prompt_set: &set.hash,
                prompt_id: &set.items[it.prompt].id,
                sample: it.sample,
                item_hash: &it.item_hash,
                seed: it.seed,
                output,
                n_tokens: 3,
                prompt_tokens: 20,
                finish: "stop",
                label: "refusal",
                labeler,
                rule_json: "{}".into(),
                leakage: 0.0,
                leakage_json: "{}".into(),
                started_at: 0,
                finished_at: 0,
            })
            .unwrap();
    }
}

#[test]
fn token_layout_is_balanced_keeps_prompts_together_and_is_stable() {
    let dir = tmpdir("layout");
    let study = Study::load(&study_file(&dir, "s", "q05", 3)).unwrap();
    let l = layout::layout(&study, ShardBy::Tokens, 4);
    assert_eq!(
        l.shards.iter().map(|s| s.items).sum::<usize>(),
        study.items().len()
    );
    assert!(l.imbalance() < 1.15, "imbalance {}", l.imbalance());
    // The samples of one prompt under one system prompt land in one shard.
    let of = layout::assign(&study, ShardBy::Tokens, 4);
    for it in study.items() {
        for other in study.items() {
            if (it.condition, it.set, it.prompt) == (other.condition, other.set, other.prompt) {
                assert_eq!(of[&it.item_hash], of[&other.item_hash]);
            }
        }
    }
    assert_eq!(
        l,
        layout::layout(&study, ShardBy::Tokens, 4),
        "same study, same layout"
    );
    let h = layout::layout(&study, ShardBy::Hash, 4);
    assert_ne!(h.hash, l.hash);
}

#[test]
fn kubernetes_manifests_are_an_indexed_job_and_a_merge_job() {
    let dir = tmpdir("k8s");
    let study = study_file(&dir, "k8s-study", "q05", 1);
    let out = cluster::submit(&SubmitSpec {
        study: study.clone(),
        dir: dir.join("work"),
        db: None,
        shards: 5,
        by: ShardBy::Tokens,
        pgate: None,
        print_only: true,
        scheduler: Scheduler::Kubernetes(K8sOptions {
            gpus_per_task: 1,
            ..Default::default()
        }),
    })
    .unwrap();
    assert!(out.submission.is_none());
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("work").join(f)).unwrap()).unwrap()
    };
    let j = read("k8s-shards.json");
    assert_eq!(j["apiVersion"], "batch/v1");
    assert_eq!(j["kind"], "Job");
    let name = j["metadata"]["name"].as_str().unwrap();
    assert!(
        name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    );
    assert_eq!(j["spec"]["completionMode"], "Indexed");
    assert_eq!(j["spec"]["completions"], 5);
    assert!(j["spec"]["parallelism"].as_u64().unwrap() >= 1);
    let pod = &j["spec"]["template"]["spec"];
    assert!(["Never", "OnFailure"].contains(&pod["restartPolicy"].as_str().unwrap()));
    let c = &pod["containers"][0];
    assert!(c["image"].is_string());
    let cmd = c["command"].as_array().unwrap();
    let script = cmd.last().unwrap().as_str().unwrap();
    assert!(script.contains("JOB_COMPLETION_INDEX"), "{script}");
    assert!(
        script.contains("--shard \"$I/5\" --shard-by tokens"),
        "{script}"
    );
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    let vol = &pod["volumes"][0];
    assert_eq!(vol["persistentVolumeClaim"]["claimName"], "pgate-study");
    assert_eq!(c["volumeMounts"][0]["name"], vol["name"]);
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/work");
    let m = read("k8s-merge.json");
    assert_eq!(m["apiVersion"], "batch/v1");
    assert!(m["spec"].get("completionMode").is_none());
    let ms = m["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(
        ms.contains("study merge --study /work/k8s-study.toml"),
        "{ms}"
    );
    for i in 0..5 {
        assert!(
            ms.contains(&format!("/work/shards/shard-{i}.sqlite")),
            "{ms}"
        );
    }
    // The typed form reads back what was written.
    let back: cluster::Job = serde_json::from_value(j).unwrap();
    assert_eq!(back.spec.completions, 5);
}

#[test]
fn slurm_print_writes_array_and_merge_scripts() {
    let dir = tmpdir("slurm");
    let study = study_file(&dir, "slurm-study", "q05", 1);
    let out = cluster::submit(&SubmitSpec {
        study,
        dir: dir.join("work"),
        db: None,
        shards: 4,
        by: ShardBy::Tokens,
        pgate: Some("/opt/pgate".into()),
        print_only: true,
        scheduler: Scheduler::Slurm(SlurmOptions {
            partition: Some("gpu".into()),
            gpus_per_task: 1,
            time: Some("4:00:00".into()),
            ..Default::default()
        }),
    })
    .unwrap();
    assert_eq!(out.unfinished, vec![0, 1, 2, 3]);
    let a = std::fs::read_to_string(dir.join("work/shards.sbatch")).unwrap();
    for want in [
        "#SBATCH --array=0-3",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --time=4:00:00",
        "SLURM_ARRAY_TASK_ID",
        "--shard \"$I/4\" --shard-by tokens",
        "--cuda 0",
    ] {
        assert!(a.contains(want), "{want} not in\n{a}");
    }
    let m = std::fs::read_to_string(dir.join("work/merge.sbatch")).unwrap();
    assert!(m.contains("/opt/pgate study merge --study"), "{m}");
    assert!(out.commands[1].contains("--dependency=afterok:$A"));
    // Another study in the same folder is refused.
    let other = study_file(&dir, "other", "q15", 1);
    let e = cluster::submit(&SubmitSpec {
        study: other,
        dir: dir.join("work"),
        db: None,
        shards: 4,
        by: ShardBy::Tokens,
        pgate: None,
        print_only: true,
        scheduler: Scheduler::Slurm(SlurmOptions::default()),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("use another --dir"), "{e}");
}

#[test]
fn merge_checks_study_labeler_duplicates_and_missing() {
    let dir = tmpdir("merge");
    let study = Study::load(&study_file(&dir, "m", "q05", 1)).unwrap();
    let n = study.items().len();
    let (a, b, c) = (
        dir.join("a.sqlite"),
        dir.join("b.sqlite"),
        dir.join("c.sqlite"),
    );
    fill(&a, &study, "rules@2", |i| i % 2 == 0, "same");
    fill(&b, &study, "rules@2", |i| i % 2 == 1 || i < 4, "same");
    // c repeats two items with another output and leaves the last item out.
    fill(&c, &study, "rules@2", |i| i == 1 || i == 3, "other");
    let m = merge_shards(
        &dir.join("all.sqlite"),
        &study,
        None,
        &[a.clone(), b.clone(), c.clone()],
    )
    .unwrap();
    assert_eq!(m.results, n);
    assert!(m.complete());
    assert_eq!(m.collapsed, 2, "items 0 and 2 are in a and b alike");
    assert_eq!(m.differing.len(), 2);
    assert_eq!(m.differing[0].other, c);
    let merged = Store::open_read(&dir.join("all.sqlite")).unwrap();
    assert_eq!(merged.count_results().unwrap(), n);
    assert_eq!(merged.count_duplicate_keys().unwrap(), 0);

    // Missing items are listed.
    let m = merge_shards(
        &dir.join("half.sqlite"),
        &study,
        None,
        std::slice::from_ref(&a),
    )
    .unwrap();
    assert_eq!(m.missing.len(), n / 2);
    assert!(m.to_string().contains("items have no result yet"));

    // Another labeler is refused, and nothing is written.
    let d = dir.join("d.sqlite");
    fill(&d, &study, "rules@1", |i| i == 5, "same");
    let target = dir.join("refused.sqlite");
    let e = merge_shards(&target, &study, None, &[a.clone(), d])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("labeled by rules@1") && e.contains("nothing was merged"),
        "{e}"
    );
    assert!(!target.exists());

    // Another study (another model) is refused.
    let other = Study::load(&study_file(&dir, "m2", "q15", 1)).unwrap();
    let o = dir.join("o.sqlite");
    fill(&o, &other, "rules@2", |_| true, "same");
    let e = merge_shards(&target, &study, None, &[a, o])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model q15, not q05") && e.contains("not a shard of this study"),
        "{e}"
    );
}

/// Fields of a receipt that say where and when it was made rather than what was measured: the
/// database path, registration and result timestamps, the rows hashes (each row's bytes carry its
/// start and finish times), the seal over all of them, and the merge record itself.
fn measured_fields(r: &persona_gate::report::receipt::Receipt) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    let o = v.as_object_mut().unwrap();
    for k in ["receipt_sha256", "timestamps", "shards"] {
        o.remove(k);
    }
    let study = o["study"].as_object_mut().unwrap();
    for k in ["results_db", "created_at", "last_run_at"] {
        study.remove(k);
    }
    for set in o["results"].as_array_mut().unwrap() {
        let set = set.as_object_mut().unwrap();
        for k in ["first_result_at", "last_result_at", "rows_sha256"] {
            set.remove(k);
        }
    }
    v
}

/// A SmolLM2 study run once whole and once as two token-balanced shards (one shard's database
/// handed over twice, as a task that ran again would) merged: the merged database records the
/// layout, each source and the collapsed duplicates; receipts written from it equal the single
/// run's in everything measured and carry that record; both verify, and `receipt diff` between
/// them differs only in its `shards` line.
#[test]
fn merged_receipts_equal_a_single_runs_and_record_the_layout() {
    use persona_gate::drift::receipts::receipt_diff;
    use persona_gate::report::ops::verify_path;
    use persona_gate::report::receipt::{build_receipts, write_receipts, Receipt};
    use persona_gate::report::{ReceiptOptions, VerifyOptions};
    use persona_gate::study::ops::{run, RunSpec};

    let t0 = std::time::Instant::now();
    let dir = tmpdir("receipts");
    let path = dir.join("study.toml");
    let model = common::model_path("smollm2");
    std::fs::write(
        &path,
        format!(
            r#"
version = 1
name = "merged-receipts"
[model]
spec = "{}"
dtype = "q"
[directions]
ctl = {{ random = 5 }}
[prompts]
harmful = {{ source = "demo_harmful", n = 2 }}
harmless = {{ source = "demo_harmless", n = 1 }}
[generation]
max_new_tokens = 6
# One sequence per batch: in q mode a near-tie can go either way with the batch composition, and
# the two runs batch different items together.
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
        ),
    )
    .unwrap();
    let study = Study::load(&path).unwrap();
    let go = std::sync::atomic::AtomicBool::new(false);
    let run_into = |db: &Path, shard: Option<(u64, u64)>| {
        let spec = RunSpec {
            study: path.clone(),
            db: db.to_path_buf(),
            limit: None,
            shard,
            shard_by: ShardBy::Tokens,
            wave: None,
            judge: false,
            device: persona_gate::device::Device::Cpu,
            concurrency: None,
        };
        run(&spec, &go, &mut |_: persona_gate::events::Event| {}).unwrap()
    };
    let single = dir.join("single.sqlite");
    run_into(&single, None);
    let shards: Vec<PathBuf> = (0..2u64)
        .map(|i| {
            let p = dir.join(format!("shard-{i}.sqlite"));
            run_into(&p, Some((i, 2)));
            p
        })
        .collect();
    let again = dir.join("shard-1-again.sqlite");
    std::fs::copy(&shards[1], &again).unwrap();
    let merged = dir.join("merged.sqlite");
    let from = [shards[0].clone(), shards[1].clone(), again.clone()];
    let m = merge_shards(&merged, &study, Some(&path), &from).unwrap();
    assert!(m.complete() && m.differing.is_empty(), "{m}");

    // The record: layout, sources with the shard each holds, the duplicates of the copy.
    let rec: &persona_gate::study::cluster::ShardRecord = &m.record;
    let l = rec
        .layout
        .as_ref()
        .expect("the shards recorded their layout");
    assert_eq!((l.count, l.by), (2, ShardBy::Tokens));
    assert_eq!(l, &layout::layout(&study, ShardBy::Tokens, 2));
    let held: Vec<(Vec<u64>, usize)> = rec
        .sources
        .iter()
        .map(|s| (s.shards.clone(), s.results))
        .collect();
    let n1 = l.shards[1].items;
    assert_eq!(
        held,
        vec![(vec![0], l.shards[0].items), (vec![1], n1), (vec![1], n1)]
    );
    assert_eq!(rec.sources[1].results_sha256, rec.sources[2].results_sha256);
    assert_ne!(rec.sources[0].results_sha256, rec.sources[1].results_sha256);
    assert_eq!(
        rec.collapsed.len(),
        n1,
        "every result of the copy collapses"
    );
    assert!(rec.differing.is_empty());
    let stored = persona_gate::study::cluster::merge::read_record(
        &Store::open_read(&merged).unwrap(),
        &study.hash,
    )
    .unwrap();
    assert_eq!(
        stored.as_ref(),
        Some(rec),
        "the merged database keeps the record"
    );

    // Receipts from both databases.
    let opts = ReceiptOptions {
        policy_version: Some("merge-test".into()),
        ..Default::default()
    };
    let (rs, rm) = (dir.join("r-single"), dir.join("r-merged"));
    write_receipts(&build_receipts(&single, &opts).unwrap(), &rs).unwrap();
    write_receipts(&build_receipts(&merged, &opts).unwrap(), &rm).unwrap();
    let load = |d: &Path| -> Vec<Receipt> {
        let (_, v) = persona_gate::report::receipt::load_receipts(d).unwrap();
        v.into_iter().map(|(_, r)| r).collect()
    };
    let (a, b) = (load(&rs), load(&rm));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(x.shards.is_none(), "a single run records no merge");
        let s = y
            .shards
            .as_ref()
            .expect("the merged receipt records the merge");
        assert_eq!(s, &rec.for_condition(&y.condition.name));
        assert!(s.collapsed.iter().all(|i| i.condition == y.condition.name));
        assert_eq!(
            measured_fields(x),
            measured_fields(y),
            "condition {}: the merged receipt says what the single run's says",
            x.condition.name
        );
    }
    let collapsed: usize = b
        .iter()
        .map(|r| r.shards.as_ref().unwrap().collapsed.len())
        .sum();
    assert_eq!(
        collapsed, n1,
        "each collapsed result is in its condition's receipt"
    );

    // Both verify (the merged one also against its database's record).
    let vopts = VerifyOptions {
        roots: vec![dir.clone()],
        ..Default::default()
    };
    for d in [&rs, &rm] {
        let v = verify_path(d, &vopts).unwrap();
        assert!(v.report.ok(), "{}: {}", d.display(), v.to_text(false));
    }
    let v = verify_path(&rm, &vopts).unwrap();
    let shard_checks = v
        .report
        .checks
        .iter()
        .filter(|c| c.what.contains("shard layout"))
        .count();
    assert_eq!(shard_checks, 3, "one shard check per merged receipt");

    // The diff: one bundle-wide `shards` line, no rate moves.
    let d = receipt_diff(&rs, &rm).unwrap();
    assert_eq!(d.fields.len(), 3, "{}", d.to_text());
    let want = format!(
        "2 shards by tokens (layout {}), 3 databases merged",
        &l.hash[..12]
    );
    assert!(d
        .fields
        .iter()
        .all(|f| f.field == "shards" && f.old == "no merge recorded" && f.new == want));
    assert!(d.rates.iter().all(|r| r.drop == 0.0 && r.old.k == r.new.k));
    let text = d.to_text();
    assert_eq!(
        text.lines().filter(|l| l.contains("shards")).count(),
        1,
        "{text}"
    );

    // A merged receipt that hides its merge (field removed, resealed) fails the shard check.
    let file = rm.join("00-baseline.json");
    let mut r = Receipt::load(&file).unwrap();
    r.shards = None;
    r.seal().unwrap();
    std::fs::write(&file, serde_json::to_string_pretty(&r).unwrap()).unwrap();
    let v = verify_path(&rm, &vopts).unwrap();
    assert!(v
        .report
        .failures()
        .iter()
        .any(|c| c.what.contains("shard layout") && c.expected == "none"));
    eprintln!(
        "merged receipts: {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        text
    );
}
