//! Slurm job scripts for a sharded study: one `sbatch --array` script whose task I runs shard I,
//! and a merge script submitted with `--dependency=afterok:ARRAY`, so the merge starts only when
//! every task succeeded. The scripts are what a user would write by hand; `pgate study submit`
//! submits them with `sbatch --parsable` (or only writes them with `--print`).

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::sh_quote;
use crate::{Error, Result};

/// Scheduler settings of the jobs (each left out of the scripts when not given).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct SlurmOptions {
    #[cfg_attr(feature = "cli", arg(long))]
    pub partition: Option<String>,
    #[cfg_attr(feature = "cli", arg(long))]
    pub account: Option<String>,
    /// Wall-clock limit of each task (Slurm's forms: 4:00:00, 1-00:00:00).
    #[cfg_attr(feature = "cli", arg(long))]
    pub time: Option<String>,
    /// GPUs per shard task; the task then runs on CUDA device 0 of those Slurm gives it.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub gpus_per_task: u32,
    /// CPU cores per task (also the task's `pgate --threads`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cpus_per_task: Option<u32>,
}

/// What the scripts run, resolved to paths on the cluster's shared filesystem.
pub(super) struct TaskWork<'a> {
    pub name: &'a str,
    pub pgate: &'a Path,
    pub study: &'a Path,
    pub dir: &'a Path,
    pub db: &'a Path,
    pub shards: u64,
    pub by: &'a str,
}

fn header(o: &SlurmOptions, job_name: &str, output: &str) -> String {
    let mut s = format!(
        "#!/bin/bash\n#SBATCH --job-name={job_name}\n#SBATCH --output={output}\n#SBATCH --ntasks=1\n"
    );
    for (k, v) in [
        ("partition", &o.partition),
        ("account", &o.account),
        ("time", &o.time),
    ] {
        if let Some(v) = v {
            s += &format!("#SBATCH --{k}={v}\n");
        }
    }
    if let Some(c) = o.cpus_per_task {
        s += &format!("#SBATCH --cpus-per-task={c}\n");
    }
    s
}

/// The array script (all K tasks; a resubmission narrows it with `--array` on the command line).
pub(super) fn array_script(o: &SlurmOptions, w: &TaskWork<'_>) -> String {
    let mut s = header(o, w.name, &format!("{}/logs/shard-%a.out", w.dir.display()));
    s += &format!("#SBATCH --array=0-{}\n", w.shards - 1);
    if o.gpus_per_task > 0 {
        s += &format!("#SBATCH --gpus-per-task={}\n", o.gpus_per_task);
    }
    let threads = o
        .cpus_per_task
        .map(|c| format!(" --threads {c}"))
        .unwrap_or_default();
    let cuda = if o.gpus_per_task > 0 { " --cuda 0" } else { "" };
    s += &format!(
        "# persona-gate: task I runs shard I of {k} (items split by {by}); written by `pgate study submit`.\n\
         # Run again, a task skips what its database holds; `pgate study status --shards {dir}` reads them.\n\
         set -euo pipefail\n\
         I=\"${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch (it is an array job)}}\"\n\
         exec {pgate}{threads} study run {study} --db {dir}/shards/shard-\"$I\".sqlite --shard \"$I/{k}\" --shard-by {by} --no-judge --quiet{cuda}\n",
        k = w.shards,
        by = w.by,
        dir = sh_quote(&w.dir.display().to_string()),
        pgate = sh_quote(&w.pgate.display().to_string()),
        study = sh_quote(&w.study.display().to_string()),
    );
    s
}

/// The merge script: every shard database into the study's database, checked.
pub(super) fn merge_script(o: &SlurmOptions, w: &TaskWork<'_>) -> String {
    let mut s = header(
        o,
        &format!("{}-merge", w.name),
        &format!("{}/logs/merge.out", w.dir.display()),
    );
    let files: Vec<String> = (0..w.shards)
        .map(|i| sh_quote(&format!("{}/shards/shard-{i}.sqlite", w.dir.display())))
        .collect();
    s += &format!(
        "# persona-gate: merges the {k} shard databases once every array task succeeded.\n\
         set -euo pipefail\n\
         exec {pgate} study merge --study {study} --db {db} {files}\n",
        k = w.shards,
        pgate = sh_quote(&w.pgate.display().to_string()),
        study = sh_quote(&w.study.display().to_string()),
        db = sh_quote(&w.db.display().to_string()),
        files = files.join(" ")
    );
    s
}

/// `sbatch --parsable ARGS SCRIPT`: the job id.
pub(super) fn sbatch(args: &[String], script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| {
            Error::InvalidValue(format!(
                "could not run sbatch ({e}): is this a Slurm login node? `--print` writes the scripts without submitting"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::InvalidValue(format!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() {
        return Err(Error::InvalidValue(format!(
            "sbatch {} printed no job id",
            script.display()
        )));
    }
    Ok(id)
}

/// Cancel a job of an earlier submission if it is still queued (a merge job waiting on tasks that
/// are being resubmitted); a job that is gone already is fine.
pub(super) fn cancel_if_pending(job: &str) {
    let _ = Command::new("scancel")
        .args(["--state=PENDING", job])
        .output();
}
