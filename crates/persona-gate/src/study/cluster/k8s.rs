//! Kubernetes manifests for a sharded study: an Indexed Job whose pods run one shard each (the
//! shard is the pod's `JOB_COMPLETION_INDEX`), and a merge Job that waits for every shard's
//! completion marker and merges the shard databases.
//!
//! Why typed structs and not a template: the fields a batch/v1 Indexed Job needs
//! (`completionMode`, `completions`, `restartPolicy`, the claim the pods share) are checked by the
//! compiler and by a test that reads the JSON back, and JSON is valid YAML, so
//! `kubectl apply -f` takes the files as written.
//!
//! Kubernetes has no dependency between Jobs, so the merge Job polls for the markers the shard
//! pods write after a successful run (`shard-I.done` beside `shard-I.sqlite`). A failed pod is
//! retried by the Job (`backoffLimit`) and continues from what its database holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sh_quote;

/// Where the pods run and what they share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct K8sOptions {
    /// Container image with `pgate` on its PATH.
    #[cfg_attr(feature = "cli", arg(long, default_value = "persona-gate:latest"))]
    pub image: String,
    /// PersistentVolumeClaim (ReadWriteMany) holding the study and the shard databases.
    #[cfg_attr(feature = "cli", arg(long, default_value = "pgate-study"))]
    pub pvc: String,
    /// Where the claim is mounted in the pods.
    #[cfg_attr(feature = "cli", arg(long, default_value = "/work"))]
    pub mount: String,
    /// The study file's path inside the pods (default: MOUNT/<study file name>).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study_in_pod: Option<String>,
    #[cfg_attr(feature = "cli", arg(long))]
    pub namespace: Option<String>,
    /// GPUs per shard pod (`nvidia.com/gpu`); the pod then runs on CUDA device 0.
    #[cfg_attr(
        feature = "cli",
        arg(id = "k8s_gpus", long = "k8s-gpus", default_value_t = 0)
    )]
    pub gpus_per_task: u32,
    /// Shard pods running at once (default: all).
    #[cfg_attr(feature = "cli", arg(long))]
    pub parallelism: Option<u64>,
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self {
            image: "persona-gate:latest".into(),
            pvc: "pgate-study".into(),
            mount: "/work".into(),
            study_in_pod: None,
            namespace: None,
            gpus_per_task: 0,
            parallelism: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: JobSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub completion_mode: Option<String>,
    pub completions: u64,
    pub parallelism: u64,
    pub backoff_limit: u64,
    pub template: PodTemplate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodTemplate {
    pub metadata: Metadata,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub restart_policy: String,
    pub containers: Vec<Container>,
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resources: Option<Resources>,
    pub volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub limits: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub persistent_volume_claim: Claim,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub claim_name: String,
}

/// What the two Jobs run, already resolved to paths inside the pods.
pub(super) struct PodWork<'a> {
    pub name: &'a str,
    pub shards: u64,
    pub by: &'a str,
    pub gpus_per_task: u32,
    pub db_name: &'a str,
    pub study_file_name: &'a str,
}

/// The Indexed Job of the shards and the merge Job.
pub(super) fn manifests(o: &K8sOptions, w: &PodWork<'_>) -> (Job, Job) {
    let m = o.mount.trim_end_matches('/');
    let study = o
        .study_in_pod
        .clone()
        .unwrap_or_else(|| format!("{m}/{}", w.study_file_name));
    let shards_dir = format!("{m}/shards");
    let cuda = if w.gpus_per_task > 0 { " --cuda 0" } else { "" };
    let run = format!(
        "I=\"$JOB_COMPLETION_INDEX\"; pgate study run {} --db \"{shards_dir}/shard-$I.sqlite\" --shard \"$I/{}\" --shard-by {} --no-judge --quiet{cuda} && touch \"{shards_dir}/shard-$I.done\"",
        sh_quote(&study),
        w.shards,
        w.by
    );
    let files: Vec<String> = (0..w.shards)
        .map(|i| sh_quote(&format!("{shards_dir}/shard-{i}.sqlite")))
        .collect();
    let merge = format!(
        "until [ \"$(ls {shards_dir}/shard-*.done 2>/dev/null | wc -l)\" -ge {} ]; do sleep 30; done; exec pgate study merge --study {} --db {} {}",
        w.shards,
        sh_quote(&study),
        sh_quote(&format!("{m}/{}", w.db_name)),
        files.join(" ")
    );
    let resources = (w.gpus_per_task > 0).then(|| Resources {
        limits: BTreeMap::from([("nvidia.com/gpu".to_string(), w.gpus_per_task.to_string())]),
    });
    let shard_job = job(
        o,
        &format!("{}-shards", w.name),
        run,
        resources,
        Some(w.shards),
    );
    let merge_job = job(o, &format!("{}-merge", w.name), merge, None, None);
    (shard_job, merge_job)
}

/// One Job; `indexed`: an Indexed Job of that many completions.
fn job(
    o: &K8sOptions,
    name: &str,
    script: String,
    resources: Option<Resources>,
    indexed: Option<u64>,
) -> Job {
    let labels = BTreeMap::from([("app.kubernetes.io/name".to_string(), name.to_string())]);
    let n = indexed.unwrap_or(1);
    Job {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        metadata: Metadata {
            name: name.into(),
            namespace: o.namespace.clone(),
            labels: labels.clone(),
        },
        spec: JobSpec {
            completion_mode: indexed.map(|_| "Indexed".to_string()),
            completions: n,
            parallelism: o.parallelism.unwrap_or(n).min(n).max(1),
            backoff_limit: 3 * n,
            template: PodTemplate {
                metadata: Metadata {
                    name: name.into(),
                    namespace: None,
                    labels,
                },
                spec: PodSpec {
                    restart_policy: "Never".into(),
                    containers: vec![Container {
                        name: "pgate".into(),
                        image: o.image.clone(),
                        command: vec!["/bin/sh".into(), "-c".into(), script],
                        resources,
                        volume_mounts: vec![VolumeMount {
                            name: "study".into(),
                            mount_path: o.mount.clone(),
                        }],
                    }],
                    volumes: vec![Volume {
                        name: "study".into(),
                        persistent_volume_claim: Claim {
                            claim_name: o.pvc.clone(),
                        },
                    }],
                },
            },
        },
    }
}

/// A name Kubernetes accepts (DNS label: lowercase letters, digits, '-', at most 40 characters
/// here so the `-shards` / `-merge` suffixes fit).
pub(super) fn dns_name(s: &str) -> String {
    let mut out: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out = out.trim_matches('-').to_string();
    out.truncate(40);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "pgate-study".into()
    } else {
        out
    }
}
