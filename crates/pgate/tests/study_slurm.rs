//! A study split over a real Slurm cluster (the one-node cluster of
//! `../shared/slurm/start-local-slurm.sh`, Debian's slurm-wlm and munge, started as root):
//! `pgate study submit --slurm --shards 4` submits a 4-task array and a merge job that waits for it
//! (`--dependency=afterok`). Task 1 is killed (SIGKILL) after writing two of its items, so its
//! array task fails and Slurm drops the merge job; submitting again runs only shard 1, only its
//! missing items, and the merge. The merged table equals a single-process run row for row, with
//! no duplicate. Then `study run --gpus cpu,cpu` (two workers, merged) gives the same rows too.
//!
//! Skipped, with a message, only where Slurm cannot start (not root and no cluster answering).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use persona_gate::study::{Store, Study};

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

fn sh(cmd: &str) -> std::process::Output {
    Command::new("bash")
        .args(["-c", cmd])
        .output()
        .expect("bash")
}

/// Start the local cluster; why not, when it cannot.
fn slurm_up() -> Result<(), String> {
    if sh("sinfo -h").status.success() {
        return Ok(());
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/slurm/start-local-slurm.sh");
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    if String::from_utf8_lossy(&sh("id -u").stdout).trim() != "0" {
        return Err("starting Slurm needs root".into());
    }
    let out = Command::new("bash").arg(&script).output().expect("bash");
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn pgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgate"))
        .args(args)
        .output()
        .expect("run pgate");
    assert!(
        out.status.success(),
        "pgate {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Wait until Slurm no longer lists `job` (all its array tasks included).
fn wait_gone(job: &str) {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let out = sh(&format!("squeue -h -j {job} 2>/dev/null"));
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "Slurm job {job} still queued after 300 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

type Rows = BTreeMap<(String, String, String, i64), (String, String)>;

fn rows(db: &Path, study: &Study) -> Rows {
    let store = Store::open_read(db).unwrap();
    assert_eq!(store.count_duplicate_keys().unwrap(), 0);
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

fn last_submission(work: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("submissions.json")).unwrap())
            .unwrap();
    v.as_array().unwrap().last().unwrap().clone()
}

#[test]
fn slurm_array_with_a_killed_task_merges_to_the_single_run() {
    if let Err(why) = slurm_up() {
        eprintln!("SKIPPED: no Slurm cluster: {why}");
        return;
    }
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("pgate-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let study_path = dir.join("study.toml");
    std::fs::write(
        &study_path,
        format!(
            r#"
version = 1
name = "slurm-test"
[model]
spec = "{}"
dtype = "q"
[prompts]
harmful = {{ source = "demo_harmful", n = 4 }}
harmless = {{ source = "demo_harmless", n = 2 }}
[generation]
max_new_tokens = 8
# One sequence per batch: outputs are compared exactly across differently split runs.
batch_size = 1
[[condition]]
name = "baseline"
[[condition]]
name = "friendly"
persona = "friendly"
[[condition]]
name = "companion"
persona = "companion"
"#,
            models_dir().join("smollm2.gguf").display()
        ),
    )
    .unwrap();
    let study = Study::load(&study_path).unwrap();
    let total = study.items().len();
    let s = study_path.to_str().unwrap();

    let single = dir.join("single.sqlite");
    pgate(&[
        "--threads",
        "1",
        "study",
        "run",
        s,
        "--db",
        single.to_str().unwrap(),
        "--no-judge",
        "--quiet",
    ]);
    let want = rows(&single, &study);
    assert_eq!(want.len(), total);

    // Task 1's first attempt writes two of its items, then is killed.
    let work = dir.join("work");
    let wrap = dir.join("pgate-wrap.sh");
    std::fs::write(
        &wrap,
        format!(
            "#!/bin/bash\nif [[ \" $* \" == *' --shard 1/4 '* ]] && mkdir {m} 2>/dev/null; then\n  {p} \"$@\" --limit 2\n  kill -KILL $$\nfi\nexec {p} \"$@\"\n",
            m = dir.join("killed-once").display(),
            p = env!("CARGO_BIN_EXE_pgate"),
        ),
    )
    .unwrap();
    sh(&format!("chmod +x {}", wrap.display()));
    let submit = [
        "study",
        "submit",
        s,
        "--slurm",
        "--shards",
        "4",
        "--cpus-per-task",
        "1",
        "--dir",
        work.to_str().unwrap(),
        "--pgate",
        wrap.to_str().unwrap(),
    ];
    let out = pgate(&submit);
    assert!(out.contains("4 of 4 shards have items left"), "{out}");
    let first = last_submission(&work);
    wait_gone(first["array_job"].as_str().unwrap());

    let status: serde_json::Value = serde_json::from_str(&pgate(&[
        "study",
        "status",
        "--shards",
        work.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards[1]["done"], 2, "{status}");
    for (i, sh) in shards.iter().enumerate() {
        if i != 1 {
            assert_eq!(sh["done"], sh["assigned"], "shard {i}: {status}");
        }
    }
    assert!(
        !work.join("results.sqlite").exists(),
        "the merge must wait for every task"
    );

    // Submitting again runs shard 1 alone, its missing items only, then the merge.
    let out = pgate(&submit);
    assert!(out.contains("1 of 4 shards have items left: 1"), "{out}");
    let second = last_submission(&work);
    assert_eq!(second["shards"], serde_json::json!([1]));
    wait_gone(second["merge_job"].as_str().unwrap());
    let log = std::fs::read_to_string(work.join("logs/shard-1.out")).unwrap();
    assert!(log.contains(&format!("{total} items: 2 stored")), "{log}");
    let merge_log = std::fs::read_to_string(work.join("logs/merge.out")).unwrap();
    assert!(
        merge_log.contains(&format!("{total} of {total} items, complete")),
        "{merge_log}"
    );
    assert!(
        merge_log.contains("layout: 4 shards by tokens"),
        "{merge_log}"
    );
    assert_eq!(
        rows(&work.join("results.sqlite"), &study),
        want,
        "merged = single run"
    );
    eprintln!("slurm part: {:.1} s", t0.elapsed().as_secs_f64());

    // Two CPU workers in one process, merged: the same rows again.
    let gpus = dir.join("gpus.sqlite");
    let out = pgate(&[
        "--threads",
        "1",
        "study",
        "run",
        s,
        "--db",
        gpus.to_str().unwrap(),
        "--gpus",
        "cpu,cpu",
        "--no-judge",
        "--quiet",
    ]);
    assert!(out.contains("complete"), "{out}");
    assert_eq!(rows(&gpus, &study), want, "--gpus cpu,cpu = single run");
    eprintln!("total: {:.1} s", t0.elapsed().as_secs_f64());
}
