//! Splitting a study for a cluster, without a model: token-balanced layouts, the Kubernetes
//! manifests (a batch/v1 Indexed Job and its merge Job, read back as JSON), the Slurm scripts
//! written with `--print`, and the checks of a shard merge (another study, another labeler,
//! identical and differing duplicates, missing items). Rows are written straight into shard
//! databases, so this runs in a second; the real-Slurm run is `crates/pgate/tests/study_slurm.rs`.

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
