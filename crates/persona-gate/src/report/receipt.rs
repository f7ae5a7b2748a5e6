//! Refusal receipts: one JSON audit record per condition of a study, bundled per study.
//!
//! A receipt says what was run (model files and tokenizer by sha256, the persona condition with its
//! system prompt and every intervention with its direction's sha256, prompt sets by hash, generation
//! settings and seeds, software version and git commit) and what happened (label rates with Wilson
//! 95% intervals, judge scores with bootstrap intervals, the benign-prompt refusal rate, paired
//! comparisons with the baseline and with random-direction controls). Every field is documented in
//! `docs/receipt.md`; the schema is versioned by [`RECEIPT_SCHEMA`].
//!
//! Receipts are keyed by the hashes the results store already uses: the study hash, the condition
//! hash and the prompt-set hashes (see [`crate::study`]). [`super::verify`] recomputes every hash
//! from the files and the database.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::provenance::RowLabels;
pub use super::records::{
    labels_record, labels_sha256, mean_ci, rows_sha256, CategoryRates, ConditionRecord, ControlSet,
    Controls, GenerationRecord, JudgedRate, JudgedScore, LabelsRecord, MeanCi, NeutralControl,
    OpRecord, PromptSetRecord, RandomControl, SetResults, Timestamps,
};
use super::rows::{plain_name, BundledFile};
use super::stats::{condition_stats, StatCondition, StatInputs};
use crate::directions::DirectionSet;
use crate::eval::{PromptSet, Rate};
use crate::fsutil;
use crate::label::accuracy;
use crate::study::canon::hash_json;
use crate::study::cluster::record::ShardRecord;
use crate::study::file::{DirRef, DirectionEntry, StudyFile};
use crate::study::plan::Study;
use crate::study::store::{iso_utc, now_ms, RowView, StudyRecord};
use crate::study::Store;
use crate::{Error, Result};

/// Largest receipt or bundle file read: receipts are read from folders others hand over.
pub const MAX_RECEIPT_BYTES: u64 = 64 << 20;

/// Schema tag of one receipt. Bump the number on any change a reader must know about.
pub const RECEIPT_SCHEMA: &str = "pgate-receipt/1";
/// Schema tag of the bundle file (`bundle.json`) that lists a study's receipts.
pub const BUNDLE_SCHEMA: &str = "pgate-receipt-bundle/1";

/// The program that wrote a receipt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Software {
    pub name: String,
    pub version: String,
    /// `git rev-parse HEAD` of the working directory when the receipt was written (None outside a
    /// git checkout); `PGATE_GIT_COMMIT` overrides it (e.g. in a packaged build).
    pub git_commit: Option<String>,
    /// Uncommitted changes to tracked files at that time.
    pub git_dirty: Option<bool>,
}

/// The study a receipt belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudyRef {
    pub name: String,
    /// The study hash (sha256 of its canonical description; key of `studies` in the database).
    pub hash: String,
    /// The study file as recorded by `pgate study run` (relative paths resolve from its folder).
    pub file: Option<String>,
    /// sha256 of the study file's text as stored in the database.
    pub toml_sha256: String,
    pub baseline: String,
    /// The results database the receipt was made from, as given to `pgate receipt`.
    pub results_db: String,
    pub created_at: String,
    pub last_run_at: String,
}

/// A file and its content hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileHash {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// sha256 of the vocabulary (see `ChatTokenizer::vocab_sha256`).
    pub vocab_sha256: String,
    /// sha256 of the chat template source (None: the model has no template).
    pub chat_template_sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The model spec of the study file (`q15`, a path, a hub id).
    pub spec: String,
    pub name: String,
    /// `gguf:PATH` or `hf-dir:PATH` as resolved on the machine that wrote the receipt.
    pub source: String,
    pub format: String,
    pub architecture: String,
    /// Numeric mode the study ran in (`q`, `f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Ran with batch-invariant kernels (outputs independent of the batch size); absent when not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch_invariant: bool,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_params: u64,
    /// Weight storage types of the file (`Q4K x 168`, ...): the quantization.
    pub tensor_types: BTreeMap<String, usize>,
    pub files: Vec<FileHash>,
    pub tokenizer: TokenizerRecord,
}

impl ModelRecord {
    /// The numeric mode as reports print it (`q`, `q, batch-invariant`).
    pub fn dtype_label(&self) -> String {
        if self.batch_invariant {
            format!("{}, batch-invariant", self.dtype)
        } else {
            self.dtype.clone()
        }
    }
}

/// One refusal receipt (one condition of one study). See docs/receipt.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub schema: String,
    /// sha256 of the canonical JSON of this receipt with this field set to "".
    pub receipt_sha256: String,
    pub policy_version: String,
    pub software: Software,
    pub study: StudyRef,
    pub model: ModelRecord,
    pub condition: ConditionRecord,
    pub generation: GenerationRecord,
    pub prompt_sets: Vec<PromptSetRecord>,
    /// All work items of the condition have a result.
    pub complete: bool,
    pub results: Vec<SetResults>,
    /// Refusal over the benign sets (pooled: they are one family): the over-refusal check.
    pub benign_refusal: Option<Rate>,
    pub controls: Controls,
    /// The study's judges (name, kind, mode, model); API keys are never recorded.
    pub judges: Vec<Value>,
    /// Statistics settings: bootstrap resamples and seed.
    pub stats: Value,
    pub timestamps: Timestamps,
    /// Endpoint studies only (absent for local weights): the endpoint (API root, model id),
    /// `white_box: false` and the white-box fields that do not apply, the model names the server
    /// reported, what `GET /models` listed, and this condition's tries, failed tries, token usage
    /// and estimated cost. `model` then describes the endpoint: no files, tokenizer or layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Value>,
    /// The labelers of the rows, a hash over the labels, and the labelers' measured accuracy
    /// (absent in receipts written before labelers were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<LabelsRecord>,
    /// Receipts written from a merged database only (absent for a single run, and in receipts
    /// written before merges were recorded): how the study was split into shards and merged, with
    /// this condition's duplicates (see `study::cluster::record`). Every other field is what a
    /// single run of the study would record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardRecord>,
}

impl Receipt {
    /// The hash this receipt should carry in `receipt_sha256`.
    ///
    /// Non-integer numbers enter the hash as text with 12 significant digits (`1.23456789012e-1`):
    /// serde_json's default float parser may land one ULP away from the printed value, so a
    /// receipt read back from its file must hash the same without relying on exact float parsing.
    pub fn compute_sha256(&self) -> Result<String> {
        let mut v = serde_json::to_value(self)?;
        v["receipt_sha256"] = Value::String(String::new());
        canon_floats(&mut v);
        Ok(hash_json(&v))
    }

    pub fn seal(&mut self) -> Result<()> {
        self.receipt_sha256 = self.compute_sha256()?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Receipt> {
        let text = fsutil::read_text_bounded(path, MAX_RECEIPT_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidValue(format!("{}: not JSON: {e}", path.display())))?;
        let schema = v.get("schema").and_then(Value::as_str).unwrap_or("");
        if schema != RECEIPT_SCHEMA {
            return Err(Error::InvalidValue(format!(
                "{}: schema '{schema}' is not a receipt this pgate reads ({RECEIPT_SCHEMA})",
                path.display()
            )));
        }
        serde_json::from_value(v)
            .map_err(|e| Error::InvalidValue(format!("{}: malformed receipt: {e}", path.display())))
    }

    /// How the results were put together, in one line: the merge's summary (`2 shards by tokens
    /// (layout 1b063870e203), 2 databases merged`) or `no merge recorded` (a single run).
    pub fn shards_line(&self) -> String {
        self.shards
            .as_ref()
            .map_or_else(|| "no merge recorded".into(), ShardRecord::summary)
    }

    /// The results of a prompt set.
    pub fn set(&self, name: &str) -> Option<&SetResults> {
        self.results.iter().find(|s| s.prompt_set == name)
    }
}

pub(crate) fn canon_floats(v: &mut Value) {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            *v = Value::String(format!("{x:.11e}"));
        }
        Value::Array(a) => a.iter_mut().for_each(canon_floats),
        Value::Object(m) => m.values_mut().for_each(canon_floats),
        _ => {}
    }
}

/// One entry of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleEntry {
    pub file: String,
    pub condition: String,
    pub condition_hash: String,
    pub receipt_sha256: String,
}

/// `bundle.json`: a study's receipts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub schema: String,
    pub study: StudyRef,
    pub policy_version: String,
    pub software: Software,
    pub created_at: String,
    pub receipts: Vec<BundleEntry>,
    /// The study's result rows, bundled (`rows.jsonl`): the evidence every number is recomputed
    /// from. Absent in bundles written before rows were bundled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<BundledFile>,
    /// Each row's labeler and label history (`labels.jsonl`), parallel to `rows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BundledFile>,
}

impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle> {
        let text = fsutil::read_text_bounded(path, MAX_RECEIPT_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidValue(format!("{}: not JSON: {e}", path.display())))?;
        let schema = v.get("schema").and_then(Value::as_str).unwrap_or("");
        if schema != BUNDLE_SCHEMA {
            return Err(Error::InvalidValue(format!(
                "{}: schema '{schema}' is not a receipt bundle this pgate reads ({BUNDLE_SCHEMA})",
                path.display()
            )));
        }
        serde_json::from_value(v)
            .map_err(|e| Error::InvalidValue(format!("{}: malformed bundle: {e}", path.display())))
    }
}

/// Options of [`build_receipts`].
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReceiptOptions {
    /// Study name or hash prefix (default: the most recently run in the database).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<String>,
    /// The safety-policy version to record (e.g. "acme-safety-2026.11").
    #[cfg_attr(feature = "cli", arg(long = "policy", value_name = "POLICY"))]
    pub policy_version: Option<String>,
    /// A benign prompt set (repeatable; default: sets whose name or source contains
    /// "harmless" or "benign").
    #[cfg_attr(feature = "cli", arg(long))]
    pub benign: Vec<String>,
    /// The study file, if it moved since `pgate study run` (relative paths resolve from it).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study_file: Option<PathBuf>,
    /// The refusal direction's name in the study (default: names containing "refusal").
    #[cfg_attr(feature = "cli", arg(long))]
    pub refusal_direction: Option<String>,
}

/// Everything a report needs: the receipts, the rows and the resolved study.
pub struct StudyReceipts {
    pub bundle: Bundle,
    pub receipts: Vec<Receipt>,
    pub rows: Vec<RowView>,
    /// Each row's label history, parallel to `rows`.
    pub labels: Vec<RowLabels>,
    pub study: Study,
    pub record: StudyRecord,
}

/// Git commit and dirty flag of the current directory.
pub fn git_info() -> (Option<String>, Option<bool>) {
    if let Ok(c) = std::env::var("PGATE_GIT_COMMIT") {
        return (Some(c), None);
    }
    let run = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "HEAD"]).filter(|s| !s.is_empty());
    let dirty = commit
        .as_ref()
        .and_then(|_| run(&["status", "--porcelain", "--untracked-files=no"]))
        .map(|s| !s.is_empty());
    (commit, dirty)
}

pub fn software() -> Software {
    let (git_commit, git_dirty) = git_info();
    Software {
        name: "pgate".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit,
        git_dirty,
    }
}

/// The folder a stored study's relative paths resolve from.
pub fn study_base_dir(record: &StudyRecord, study_file: Option<&Path>) -> PathBuf {
    let src = study_file
        .map(Path::to_path_buf)
        .or_else(|| record.source_path.as_ref().map(PathBuf::from));
    src.as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Re-read a stored study (its TOML from the database, files from its folder).
pub fn resolve_stored(record: &StudyRecord, study_file: Option<&Path>) -> Result<Study> {
    let base = study_base_dir(record, study_file);
    let file = StudyFile::parse(&record.toml, &base)?;
    Study::resolve(file)
}

/// The path of a prompt set source as the study reads it.
pub fn prompt_source_path(file: &StudyFile, source: &str) -> String {
    let local = file.base_dir.join(source);
    if Path::new(source).is_relative() && local.exists() {
        local.to_string_lossy().to_string()
    } else {
        source.to_string()
    }
}

/// sha256 of the items used (same form as `PromptSet::sha256`).
pub fn selected_sha256(items: &[crate::eval::PromptItem]) -> String {
    PromptSet {
        name: String::new(),
        source: String::new(),
        items: items.to_vec(),
    }
    .sha256()
}

fn is_benign(name: &str, source: &str, benign: &[String]) -> bool {
    if !benign.is_empty() {
        return benign.iter().any(|b| b == name);
    }
    let n = name.to_ascii_lowercase();
    let s = source.to_ascii_lowercase();
    ["harmless", "benign"]
        .iter()
        .any(|k| n.contains(k) || s.contains(k))
}

/// Role of a direction: `refusal`, `random` or `persona`.
pub fn direction_role(
    name: &str,
    entry: Option<&DirectionEntry>,
    file: Option<&Path>,
    refusal: Option<&str>,
) -> String {
    let lower = name.to_ascii_lowercase();
    let is_refusal = match refusal {
        Some(r) => r == name,
        None => lower.contains("refusal"),
    };
    if is_refusal {
        return "refusal".into();
    }
    if matches!(entry, Some(DirectionEntry::Random { .. })) || lower.contains("random") {
        return "random".into();
    }
    if let Some(f) = file {
        if let Ok(set) = DirectionSet::load(f) {
            if set.meta.method.starts_with("random") {
                return "random".into();
            }
        }
    }
    "persona".into()
}

fn dir_file(file: &StudyFile, name: &str) -> Option<(String, PathBuf)> {
    match file.directions.get(name)? {
        DirectionEntry::Path(p) | DirectionEntry::File { file: p } => {
            let path = PathBuf::from(p);
            let full = if path.is_relative() {
                file.base_dir.join(&path)
            } else {
                path
            };
            Some((p.clone(), full))
        }
        DirectionEntry::Random { .. } => None,
    }
}

/// Per-op records of a condition.
pub fn op_records(study: &Study, ci: usize, refusal: Option<&str>) -> Result<Vec<OpRecord>> {
    let c = &study.conditions[ci];
    let hashed_ops = c.hash_input["ops"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for (i, o) in c.ops.iter().enumerate() {
        let h = hashed_ops.get(i).cloned().unwrap_or(Value::Null);
        let (direction, file, full, entry) = match &o.direction {
            DirRef::Named(n) => {
                let f = dir_file(&study.file, n);
                (
                    n.clone(),
                    f.as_ref().map(|x| x.0.clone()),
                    f.map(|x| x.1),
                    study.file.directions.get(n),
                )
            }
            DirRef::Path(p) => (
                p.file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                Some(p.display().to_string()),
                Some(p.clone()),
                None,
            ),
        };
        let num = |k: &str| {
            h.get(k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
        };
        out.push(OpRecord {
            field: o.field.key().into(),
            spec: o.text.clone(),
            role: direction_role(&direction, entry, full.as_deref(), refusal),
            direction,
            file,
            identity: h.get("direction").cloned().unwrap_or(Value::Null),
            coeff: num("coeff"),
            raw: h.get("raw").and_then(Value::as_bool).unwrap_or(false),
            lo: num("lo"),
            hi: num("hi"),
            pick: o.spec.pick,
            layers: o.spec.layers.0.iter().copied().collect(),
            positions: h
                .get("positions")
                .and_then(Value::as_str)
                .unwrap_or("all")
                .to_string(),
        });
    }
    Ok(out)
}

/// The model record: opens the model's files (no tensors loaded) and hashes them.
pub fn model_record(study: &Study) -> Result<ModelRecord> {
    if let Some(ep) = study.endpoint() {
        // A served model: nothing to open or hash; the receipt's `endpoint` says what applies.
        return Ok(ModelRecord {
            spec: format!("endpoint:{}", ep.normalized_base()),
            name: ep.model.clone(),
            source: ep.normalized_base(),
            format: "openai-chat-completions".into(),
            architecture: "n/a (endpoint)".into(),
            dtype: "n/a (endpoint)".into(),
            batch_invariant: false,
            n_layers: 0,
            d_model: 0,
            n_params: 0,
            tensor_types: BTreeMap::new(),
            files: vec![],
            tokenizer: TokenizerRecord {
                vocab_sha256: "n/a (endpoint)".into(),
                chat_template_sha256: None,
            },
        });
    }
    let spec = study.model_spec();
    let src = crate::model::ModelSource::resolve(&spec)?;
    let opts = crate::model::LoadOptions {
        dtype: crate::model::DTypeMode::parse(&study.file.model.dtype)?,
        ..Default::default()
    };
    let opened = crate::model::open(&src, &opts)?;
    let info = &opened.info;
    let mut files = Vec::new();
    for f in &info.files {
        let real = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        let bytes = std::fs::metadata(&real).map(|m| m.len()).unwrap_or(0);
        files.push(FileHash {
            path: f.display().to_string(),
            sha256: crate::hash::sha256_file(&real)?,
            bytes,
        });
    }
    Ok(ModelRecord {
        spec: study.file.model.spec.clone(),
        name: info.name.clone(),
        source: info.source.clone(),
        format: info.format.clone(),
        architecture: info.architecture.clone(),
        dtype: study.file.model.dtype.to_ascii_lowercase(),
        batch_invariant: study.file.model.batch_invariant,
        n_layers: info.n_layers,
        d_model: info.d_model,
        n_params: info.n_params,
        tensor_types: info.tensor_types.clone(),
        files,
        tokenizer: TokenizerRecord {
            vocab_sha256: opened.tokenizer.vocab_sha256(),
            chat_template_sha256: opened.tokenizer.chat_template_sha256(),
        },
    })
}

/// One line naming the labelers of a study's receipts and their measured accuracy:
/// `labels: ensemble@1:... (agreement 96.1% [93.0, 97.9] on the held-back split, n=310)` or
/// `labels: rules@1 (not measured)`.
pub fn labels_line(receipts: &[Receipt]) -> String {
    let mut seen: Vec<String> = Vec::new();
    let mut parts = Vec::new();
    for r in receipts {
        let Some(l) = &r.labels else { continue };
        for id in &l.labelers {
            if !seen.contains(id) {
                seen.push(id.clone());
                parts.push(accuracy::describe(id, l.accuracy(id).as_ref()));
            }
        }
    }
    if parts.is_empty() {
        return "labels: not recorded in these receipts (written before pgate recorded labelers; rows labeled then were labeled by rules@1)".into();
    }
    format!("labels: {}", parts.join("; "))
}

fn prompt_set_records(study: &Study, benign: &[String]) -> Vec<PromptSetRecord> {
    study
        .prompt_sets
        .iter()
        .map(|s| {
            let mut categories = BTreeMap::new();
            for it in &s.items {
                *categories
                    .entry(it.category.clone().unwrap_or_else(|| "(none)".into()))
                    .or_insert(0) += 1;
            }
            PromptSetRecord {
                name: s.name.clone(),
                family: if is_benign(&s.name, &s.source, benign) {
                    "benign".into()
                } else {
                    "harmful".into()
                },
                source: s.source.clone(),
                set_sha256: s.hash.clone(),
                selected_sha256: selected_sha256(&s.items),
                skip: s.skip,
                n: s.items.len(),
                categories,
            }
        })
        .collect()
}

/// Build the receipts of a study in a database (nothing written).
pub fn build_receipts(db: &Path, opts: &ReceiptOptions) -> Result<StudyReceipts> {
    let store = Store::open_read(db)?;
    let record = store.find_study(opts.study.as_deref())?;
    let study = resolve_stored(&record, opts.study_file.as_deref()).map_err(|e| {
        Error::InvalidValue(format!(
            "study {}: cannot re-read its files: {} (pass --study-file if it moved)",
            record.name,
            e.to_string().trim_start_matches("invalid value: ")
        ))
    })?;
    if study.hash != record.hash {
        return Err(changed_study(&store, &record, &study)?);
    }
    let rows = store.rows(&record.hash)?;
    // Each row's label history, for the labels provenance (see `provenance`).
    let labels: Vec<RowLabels> = rows
        .iter()
        .map(|r| {
            Ok(RowLabels {
                history: store.label_history(r.result_id)?,
            })
        })
        .collect::<Result<_>>()?;
    let status = store.status(&record.hash)?;
    let shards = crate::study::cluster::merge::read_record(&store, &record.hash)?;
    let stats = &study.file.stats;
    let baseline_name = study.conditions[study.baseline].name.clone();
    let model = model_record(&study)?;
    // Endpoint studies: the recorded target and per-condition usage (see study::remote).
    let target = match study.endpoint() {
        None => None,
        Some(_) => store.target(&record.hash)?,
    };
    let usage = match &target {
        None => vec![],
        Some(_) => store.endpoint_usage(&record.hash)?,
    };
    let software = software();
    let now = iso_utc(now_ms());
    let policy = opts
        .policy_version
        .clone()
        .unwrap_or_else(|| "unspecified".into());
    let refusal = opts.refusal_direction.as_deref();
    let sets = prompt_set_records(&study, &opts.benign);
    let families: HashMap<String, String> = sets
        .iter()
        .map(|s| (s.name.clone(), s.family.clone()))
        .collect();
    let generation = generation_record(&study);
    let study_ref = study_ref(&record, opts, &baseline_name, db);
    let judges = judge_records(&study);
    let all_ops: Vec<Vec<OpRecord>> = (0..study.conditions.len())
        .map(|ci| op_records(&study, ci, refusal))
        .collect::<Result<_>>()?;
    let conditions = stat_conditions(&study, &all_ops);
    let expected: HashMap<(String, String), usize> = status
        .iter()
        .map(|s| ((s.condition_hash.clone(), s.prompt_set.clone()), s.total))
        .collect();
    let b = &study.conditions[study.baseline];
    let computed = condition_stats(&StatInputs {
        rows: &rows,
        labels: &labels,
        row_lines: None,
        conditions: &conditions,
        baseline: (&b.name, &b.hash),
        families: &families,
        bootstrap: stats.bootstrap,
        seed: stats.seed,
        expected: &expected,
        english: study.file.english,
        discover_controls: true,
    })?;
    let mut receipts = Vec::new();
    for ((ci, c), cs) in study.conditions.iter().enumerate().zip(computed) {
        let system_sha = c
            .system
            .as_ref()
            .map(|s| crate::hash::sha256_bytes(s.as_bytes()));
        let mut r = Receipt {
            schema: RECEIPT_SCHEMA.into(),
            receipt_sha256: String::new(),
            policy_version: policy.clone(),
            software: software.clone(),
            study: study_ref.clone(),
            model: model.clone(),
            condition: ConditionRecord {
                name: c.name.clone(),
                hash: c.hash.clone(),
                ord: ci,
                is_baseline: ci == study.baseline,
                persona: c.persona.clone(),
                system_prompt: c.system.clone(),
                system_prompt_sha256: system_sha,
                ops: all_ops[ci].clone(),
                vars: c.vars.clone(),
                hashed: c.hash_input.clone(),
            },
            generation: generation.clone(),
            prompt_sets: c.prompt_sets.iter().map(|&i| sets[i].clone()).collect(),
            complete: cs.complete,
            results: cs.results,
            benign_refusal: cs.benign_refusal,
            controls: cs.controls,
            judges: judges.clone(),
            stats: json!({"bootstrap": stats.bootstrap, "seed": stats.seed, "interval": "95%"}),
            timestamps: Timestamps {
                receipt_created: now.clone(),
                study_created: iso_utc(record.created_at),
                study_last_run: iso_utc(record.last_run_at),
                first_result: cs.first_result,
                last_result: cs.last_result,
            },
            endpoint: target
                .as_ref()
                .map(|t| endpoint_record(&study, t, &usage, &c.hash)),
            labels: Some(cs.labels),
            shards: shards.as_ref().map(|s| s.for_condition(&c.name)),
        };
        r.seal()?;
        receipts.push(r);
    }
    let bundle = Bundle {
        schema: BUNDLE_SCHEMA.into(),
        study: study_ref,
        policy_version: policy,
        software,
        created_at: now,
        receipts: receipts
            .iter()
            .map(|r| BundleEntry {
                file: receipt_file_name(r),
                condition: r.condition.name.clone(),
                condition_hash: r.condition.hash.clone(),
                receipt_sha256: r.receipt_sha256.clone(),
            })
            .collect(),
        rows: None,
        labels: None,
    };
    Ok(StudyReceipts {
        bundle,
        receipts,
        rows,
        labels,
        study,
        record,
    })
}

/// The conditions as the statistics see them (see [`super::stats`]).
fn stat_conditions(study: &Study, all_ops: &[Vec<OpRecord>]) -> Vec<StatCondition> {
    study
        .conditions
        .iter()
        .zip(all_ops)
        .map(|(c, ops)| StatCondition {
            name: c.name.clone(),
            hash: c.hash.clone(),
            system: c.system.clone(),
            ops: ops.clone(),
            prompt_sets: c
                .prompt_sets
                .iter()
                .map(|&i| {
                    let s = &study.prompt_sets[i];
                    (s.name.clone(), s.hash.clone())
                })
                .collect(),
        })
        .collect()
}

fn study_ref(record: &StudyRecord, opts: &ReceiptOptions, baseline: &str, db: &Path) -> StudyRef {
    StudyRef {
        name: record.name.clone(),
        hash: record.hash.clone(),
        file: opts
            .study_file
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| record.source_path.clone()),
        toml_sha256: crate::hash::sha256_bytes(record.toml.as_bytes()),
        baseline: baseline.to_string(),
        results_db: db.display().to_string(),
        created_at: iso_utc(record.created_at),
        last_run_at: iso_utc(record.last_run_at),
    }
}

/// The error for a study whose files changed since its run, naming the conditions affected.
fn changed_study(store: &Store, record: &StudyRecord, study: &Study) -> Result<Error> {
    let stored: std::collections::HashSet<String> = store
        .status(&record.hash)?
        .into_iter()
        .map(|s| s.condition_hash)
        .collect();
    let changed: Vec<&str> = study
        .conditions
        .iter()
        .filter(|c| !stored.contains(&c.hash))
        .map(|c| c.name.as_str())
        .collect();
    Ok(Error::InvalidValue(format!(
        "study {}: its files changed since the run (study hash {} now {}; conditions with a new hash: {}); run `pgate study run` again or restore the files",
        record.name,
        &record.hash[..12],
        &study.hash[..12],
        if changed.is_empty() { "none (prompt sets or settings changed)".to_string() } else { changed.join(", ") }
    )))
}

fn generation_record(study: &Study) -> GenerationRecord {
    let g = &study.file.generation;
    GenerationRecord {
        max_new_tokens: g.max_new_tokens,
        batch_size: g.batch_size,
        temperature: g.temperature as f64,
        top_p: g.top_p as f64,
        seed: g.seed,
        samples: g.samples,
        seed_rule: "item seed = first 8 bytes of sha256(\"seed\\x1f{seed}\\x1f{prompt_set_sha256}\\x1f{prompt_id}\\x1f{sample}\") & (2^63-1), shared by all conditions; greedy when temperature = 0".into(),
    }
}

fn judge_records(study: &Study) -> Vec<Value> {
    study
        .file
        .judges
        .iter()
        .map(|j| {
            json!({
                "name": j.display_name(),
                "kind": j.kind,
                "mode": j.effective_mode().map(|m| m.name()),
                "model": j.model,
                "base_url": j.base_url,
            })
        })
        .collect()
}

/// The `endpoint` block of one condition's receipt (endpoint studies only).
fn endpoint_record(
    study: &Study,
    t: &crate::study::store::TargetRecord,
    usage: &[crate::study::store::EndpointUsage],
    condition_hash: &str,
) -> Value {
    let u = usage.iter().find(|u| u.condition_hash == condition_hash);
    let ep = study.endpoint();
    json!({
        "target": t.target,
        "reported_models": t.reported_models,
        "server_models": t.server_models,
        "tries": u.map(|u| u.tries_ok_rows + u.failed_tries),
        "failed_tries": u.map(|u| u.failed_tries),
        "prompt_tokens": u.map(|u| u.prompt_tokens),
        "completion_tokens": u.map(|u| u.completion_tokens),
        "estimated_cost": u.and_then(|u| ep.and_then(|e| e.cost(u.prompt_tokens, u.completion_tokens))),
    })
}

/// `03-steer-c8.json`: order, then the name with anything unusual replaced.
pub fn receipt_file_name(r: &Receipt) -> String {
    let clean: String = r
        .condition
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '=' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{:02}-{clean}.json", r.condition.ord)
}

/// Write `bundle.json`, one file per receipt, and the rows they were computed from
/// (`rows.jsonl`, `labels.jsonl`) into `dir`. Every file is written atomically (a reader never
/// sees half a receipt); `bundle.json` goes last. A signature left from earlier receipts in `dir`
/// no longer applies and is removed (the returned flag says so).
pub fn write_receipts(sr: &StudyReceipts, dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(write_receipts_noting(sr, dir)?.0)
}

/// [`write_receipts`], also saying whether a stale signature was removed.
pub fn write_receipts_noting(sr: &StudyReceipts, dir: &Path) -> Result<(Vec<PathBuf>, bool)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let sig = dir.join(super::rows::SIGNATURE_FILE);
    let removed = match std::fs::remove_file(&sig) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(&sig, e)),
    };
    let mut out = Vec::new();
    let (rows, labels) = super::rows::write_rows(dir, &sr.rows, &sr.labels)?;
    out.push(dir.join(&rows.file));
    out.push(dir.join(&labels.file));
    for (r, e) in sr.receipts.iter().zip(&sr.bundle.receipts) {
        let p = dir.join(plain_name(&e.file)?);
        let text = serde_json::to_string_pretty(r)? + "\n";
        fsutil::write_atomic(&p, text.as_bytes())?;
        out.push(p);
    }
    let mut bundle = sr.bundle.clone();
    bundle.rows = Some(rows);
    bundle.labels = Some(labels);
    let p = dir.join("bundle.json");
    let text = serde_json::to_string_pretty(&bundle)? + "\n";
    fsutil::write_atomic(&p, text.as_bytes())?;
    out.push(p);
    Ok((out, removed))
}

/// The bundle (when there is one) and each receipt with the file it came from.
pub type LoadedReceipts = (Option<Bundle>, Vec<(PathBuf, Receipt)>);

/// Receipts from a path: a receipt file, a `bundle.json`, or a folder holding one. Returns the
/// bundle when there is one.
pub fn load_receipts(path: &Path) -> Result<LoadedReceipts> {
    let bundle_path = if path.is_dir() {
        Some(path.join("bundle.json"))
    } else if path.file_name().is_some_and(|n| n == "bundle.json") {
        Some(path.to_path_buf())
    } else {
        None
    };
    match bundle_path {
        Some(bp) => {
            if !bp.exists() {
                return Err(Error::InvalidValue(format!(
                    "{}: no bundle.json here (write receipts with `pgate receipt DB -o DIR`)",
                    path.display()
                )));
            }
            let b = Bundle::load(&bp)?;
            let dir = bp.parent().unwrap_or(Path::new("."));
            let mut rs = Vec::new();
            for e in &b.receipts {
                // A bundle names files in its own folder only.
                let p = dir.join(plain_name(&e.file)?);
                let r = Receipt::load(&p)?;
                rs.push((p, r));
            }
            Ok((Some(b), rs))
        }
        None => {
            let r = Receipt::load(path)?;
            Ok((None, vec![(path.to_path_buf(), r)]))
        }
    }
}
