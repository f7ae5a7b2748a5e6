//! Running one study as many shards where research groups run work: a Slurm job array, a
//! Kubernetes Indexed Job, or the GPUs of one node, then merging the shard databases.
//!
//! persona-gate schedules nothing itself: [`submit`] writes the job scripts or manifests (and
//! hands the Slurm ones to `sbatch`), each task runs `pgate study run --shard I/K` into its own
//! database, and the merge job calls [`merge::merge_shards`]. Everything a task needs is a
//! function of the study file: the split ([`layout`]) is recomputed by every task, so tasks never
//! talk to each other, a resubmitted task finds the same items, and what its database already
//! holds is skipped (results are committed one by one, so a task killed mid-run loses at most the
//! sequences in flight).
//!
//! The work folder of a submission holds `plan.json` (study, shard count, rule, layout),
//! `shards/shard-I.sqlite`, `logs/`, the scripts or manifests, and `submissions.json` (the job ids
//! of every submission), so `status` and a resubmission need nothing but the folder.

pub mod gpus;
mod k8s;
pub mod layout;
pub mod merge;
pub mod progress;
pub mod record;
mod slurm;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use k8s::{Job, K8sOptions};
pub use layout::{ShardBy, ShardLayout};
pub use merge::{merge_shards, ShardMerge};
pub use progress::{shards_progress, ShardsProgress};
pub use record::{ShardRecord, ShardSource};
pub use slurm::SlurmOptions;

use crate::study::plan::Study;
use crate::{Error, Result};

/// Quote a word for a POSIX shell.
pub(crate) fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Which scheduler the submission is for.
#[derive(Debug, Clone)]
pub enum Scheduler {
    Slurm(SlurmOptions),
    /// Manifests only (`kubectl apply -f` them): Kubernetes is not driven from here.
    Kubernetes(K8sOptions),
}

/// A study to split into `shards` tasks.
#[derive(Debug, Clone)]
pub struct SubmitSpec {
    /// The study file, at a path every node can read.
    pub study: PathBuf,
    /// Work folder on the shared filesystem (created if missing).
    pub dir: PathBuf,
    /// The merged database (default: DIR/results.sqlite).
    pub db: Option<PathBuf>,
    pub shards: u64,
    pub by: ShardBy,
    /// The `pgate` the tasks run (default: this executable).
    pub pgate: Option<PathBuf>,
    /// Write the scripts or manifests without submitting.
    pub print_only: bool,
    pub scheduler: Scheduler,
}

/// The flags of `pgate study submit`: a [`SubmitSpec`] with the scheduler chosen by `--slurm` or
/// `--k8s` (manifests are always only written).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct SubmitFlags {
    pub study: PathBuf,
    /// Work folder on a filesystem every node sees: scripts, shard databases, logs.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dir: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub shards: u64,
    /// Merged database (default: DIR/results.sqlite).
    #[cfg_attr(feature = "cli", arg(long))]
    pub db: Option<PathBuf>,
    /// How items are split: tokens (prompt groups balanced by expected tokens) or hash.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "tokens"))]
    pub shard_by: ShardBy,
    #[cfg_attr(
        feature = "cli",
        arg(long, required_unless_present = "k8s", conflicts_with = "k8s")
    )]
    pub slurm: bool,
    /// Write Kubernetes manifests (Indexed Job + merge Job); implies --print.
    #[cfg_attr(feature = "cli", arg(long))]
    pub k8s: bool,
    /// Write the scripts without submitting them.
    #[cfg_attr(feature = "cli", arg(long))]
    pub print: bool,
    /// The pgate the tasks run (default: this one).
    #[cfg_attr(feature = "cli", arg(long))]
    pub pgate: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub slurm_opts: SlurmOptions,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub k8s_opts: K8sOptions,
}

impl SubmitFlags {
    /// The submission the flags ask for.
    pub fn spec(self) -> SubmitSpec {
        SubmitSpec {
            study: self.study,
            dir: self.dir,
            db: self.db,
            shards: self.shards,
            by: self.shard_by,
            pgate: self.pgate,
            print_only: self.print || self.k8s,
            scheduler: if self.k8s {
                Scheduler::Kubernetes(self.k8s_opts)
            } else {
                Scheduler::Slurm(self.slurm_opts)
            },
        }
    }
}

/// What a submission wrote down (`plan.json`): enough for `status`, a resubmission and the merge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitPlan {
    pub version: u32,
    pub study: PathBuf,
    pub study_hash: String,
    pub db: PathBuf,
    pub layout: ShardLayout,
}

impl SubmitPlan {
    pub fn load(dir: &Path) -> Result<SubmitPlan> {
        let p = dir.join("plan.json");
        let text = std::fs::read_to_string(&p).map_err(|e| {
            Error::InvalidValue(format!(
                "{}: {e} (not the work folder of a `pgate study submit`?)",
                p.display()
            ))
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The database of shard `i`.
    pub fn shard_db(dir: &Path, i: u64) -> PathBuf {
        dir.join("shards").join(format!("shard-{i}.sqlite"))
    }
}

/// One submission's job ids (kept in `submissions.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub at_ms: i64,
    /// Shards submitted (the unfinished ones).
    pub shards: Vec<u64>,
    pub array_job: Option<String>,
    pub merge_job: Option<String>,
}

/// What [`submit`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    pub plan: SubmitPlan,
    /// Files written (scripts or manifests, plan).
    pub files: Vec<PathBuf>,
    /// Shards with items left before this submission (all of them the first time).
    pub unfinished: Vec<u64>,
    /// Slurm: the submission (absent with `--print` and for Kubernetes).
    pub submission: Option<Submission>,
    /// Commands that submit or apply what was written.
    pub commands: Vec<String>,
}

/// Write the jobs of a sharded study and, for Slurm without `print_only`, submit the unfinished
/// shards as an array and the merge after them. Run again, it submits only the shards whose
/// databases still lack items (each task then runs only its missing items) and cancels the
/// queued merge of the earlier submission.
pub fn submit(spec: &SubmitSpec) -> Result<Submitted> {
    if spec.shards == 0 {
        return Err(Error::InvalidValue("--shards must be at least 1".into()));
    }
    let study_path = absolute(&spec.study)?;
    let study = Study::load(&study_path)?;
    let dir = absolute_dir(&spec.dir)?;
    for sub in ["shards", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| Error::io(dir.join(sub), e))?;
    }
    let db = match &spec.db {
        Some(p) => absolute(p)?,
        None => dir.join("results.sqlite"),
    };
    let plan = SubmitPlan {
        version: 1,
        study: study_path.clone(),
        study_hash: study.hash.clone(),
        db: db.clone(),
        layout: layout::layout(&study, spec.by, spec.shards),
    };
    if let Ok(old) = SubmitPlan::load(&dir) {
        if old.study_hash != plan.study_hash || old.layout.hash != plan.layout.hash {
            return Err(Error::InvalidValue(format!(
                "{} was a submission of study {} split {} ways by {}; this is study {} split {} ways by {}: use another --dir so the shard databases do not mix",
                dir.display(),
                &old.study_hash[..12],
                old.layout.count,
                old.layout.by.name(),
                &plan.study_hash[..12],
                plan.layout.count,
                plan.layout.by.name()
            )));
        }
    }
    let mut files = vec![write(
        &dir.join("plan.json"),
        &serde_json::to_string_pretty(&plan)?,
    )?];
    let progress = shards_progress(&study, spec.by, spec.shards, &|i| {
        SubmitPlan::shard_db(&dir, i)
    })?;
    let unfinished = progress.unfinished();
    let pgate = match &spec.pgate {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| Error::io("pgate executable", e))?,
    };
    let name = format!("pgate-{}", k8s::dns_name(&study.name));
    let mut out = Submitted {
        plan,
        files: Vec::new(),
        unfinished,
        submission: None,
        commands: Vec::new(),
    };
    match &spec.scheduler {
        Scheduler::Slurm(o) => {
            let w = slurm::TaskWork {
                name: &name,
                pgate: &pgate,
                study: &study_path,
                dir: &dir,
                db: &db,
                shards: spec.shards,
                by: spec.by.name(),
            };
            let array = write(&dir.join("shards.sbatch"), &slurm::array_script(o, &w))?;
            let merge = write(&dir.join("merge.sbatch"), &slurm::merge_script(o, &w))?;
            out.commands = vec![
                format!(
                    "A=$(sbatch --parsable {})",
                    sh_quote(&array.display().to_string())
                ),
                format!(
                    "sbatch --dependency=afterok:$A --kill-on-invalid-dep=yes {}",
                    sh_quote(&merge.display().to_string())
                ),
            ];
            files.extend([array.clone(), merge.clone()]);
            if !spec.print_only {
                out.submission = Some(submit_slurm(&dir, &out.unfinished, &array, &merge)?);
            }
        }
        Scheduler::Kubernetes(o) => {
            let file_name = study_path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_else(|| "study.toml".into());
            let db_name = db
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_else(|| "results.sqlite".into());
            let (shards, merge) = k8s::manifests(
                o,
                &k8s::PodWork {
                    name: &name,
                    shards: spec.shards,
                    by: spec.by.name(),
                    gpus_per_task: o.gpus_per_task,
                    db_name: &db_name,
                    study_file_name: &file_name,
                },
            );
            let a = write(
                &dir.join("k8s-shards.json"),
                &serde_json::to_string_pretty(&shards)?,
            )?;
            let b = write(
                &dir.join("k8s-merge.json"),
                &serde_json::to_string_pretty(&merge)?,
            )?;
            out.commands = vec![
                format!(
                    "copy {} (and the files it names) into the claim {} at {}",
                    study_path.display(),
                    o.pvc,
                    o.mount
                ),
                format!("kubectl apply -f {} -f {}", a.display(), b.display()),
                format!(
                    "kubectl wait --for=condition=complete job/{}-merge --timeout=-1s",
                    name
                ),
            ];
            files.extend([a, b]);
        }
    }
    out.files = files;
    Ok(out)
}

/// Submit the unfinished shards and the merge; record the job ids.
fn submit_slurm(dir: &Path, unfinished: &[u64], array: &Path, merge: &Path) -> Result<Submission> {
    let log = dir.join("submissions.json");
    let mut past: Vec<Submission> = std::fs::read_to_string(&log)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for s in &past {
        if let Some(m) = &s.merge_job {
            slurm::cancel_if_pending(m);
        }
    }
    let array_job = if unfinished.is_empty() {
        None
    } else {
        let list: Vec<String> = unfinished.iter().map(u64::to_string).collect();
        Some(slurm::sbatch(
            &[format!("--array={}", list.join(","))],
            array,
        )?)
    };
    let dep = match &array_job {
        Some(a) => vec![
            format!("--dependency=afterok:{a}"),
            "--kill-on-invalid-dep=yes".to_string(),
        ],
        None => Vec::new(),
    };
    let merge_job = Some(slurm::sbatch(&dep, merge)?);
    let s = Submission {
        at_ms: crate::study::store::now_ms(),
        shards: unfinished.to_vec(),
        array_job,
        merge_job,
    };
    past.push(s.clone());
    write(&log, &serde_json::to_string_pretty(&past)?)?;
    Ok(s)
}

fn write(path: &Path, text: &str) -> Result<PathBuf> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    Ok(path.to_path_buf())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(p, e))
}

fn absolute_dir(p: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    absolute(p)
}

/// Progress of every shard of the submission in `dir`, read from the shard databases (while they
/// run, too).
pub fn submission_progress(dir: &Path) -> Result<ShardsProgress> {
    let plan = SubmitPlan::load(dir)?;
    let study = Study::load(&plan.study)?;
    if study.hash != plan.study_hash {
        return Err(Error::InvalidValue(format!(
            "{} changed since it was submitted (study hash {} then, {} now)",
            plan.study.display(),
            &plan.study_hash[..12],
            &study.hash[..12]
        )));
    }
    shards_progress(&study, plan.layout.by, plan.layout.count, &|i| {
        SubmitPlan::shard_db(dir, i)
    })
}

impl std::fmt::Display for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.plan.layout;
        writeln!(
            f,
            "study {} split {} ways by {} (layout {}): largest shard {:.3}x the mean expected tokens",
            &self.plan.study_hash[..12],
            l.count,
            l.by.name(),
            &l.hash[..12],
            l.imbalance()
        )?;
        for p in &self.files {
            writeln!(f, "wrote {}", p.display())?;
        }
        let todo: Vec<String> = self.unfinished.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "{} of {} shards have items left{}",
            todo.len(),
            l.count,
            if todo.is_empty() {
                String::new()
            } else {
                format!(": {}", todo.join(","))
            }
        )?;
        match &self.submission {
            Some(s) => writeln!(
                f,
                "submitted: array job {}, merge job {} (after the array succeeds) -> {}",
                s.array_job.as_deref().unwrap_or("-"),
                s.merge_job.as_deref().unwrap_or("-"),
                self.plan.db.display()
            )?,
            None => {
                writeln!(f, "not submitted; to submit:")?;
                for c in &self.commands {
                    writeln!(f, "  {c}")?;
                }
            }
        }
        Ok(())
    }
}
