//! `pgate receipt verify`: recompute every hash a receipt records, from the files and the results
//! database, and say which differ.
//!
//! Checked, per receipt:
//! - the receipt's own `receipt_sha256` (an edited receipt), and the bundle's copy of it;
//! - the study file text stored in the database (`toml_sha256`), and the study and condition
//!   hashes recomputed from the study file and every file it names;
//! - `hashed` hashes to the condition hash (the receipt describes the condition it names);
//! - each model file's sha256, and the tokenizer's vocabulary and chat-template hashes;
//! - each direction file's sha256;
//! - each prompt set's sha256 (the whole set) and the sha256 of the prompts used, read again from
//!   its source;
//! - each prompt set's result rows: their sha256 (outputs, labels, measurements, verdicts), their
//!   number, and the refusal / bypass / degenerate counts;
//! - the condition's labels (each row's key, label and labeler: `labels_sha256`), when the receipt
//!   records them (receipts written before labelers were recorded do not).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::receipt::{
    labels_sha256, prompt_source_path, rows_sha256, selected_sha256, study_base_dir, Bundle,
    Receipt,
};
use crate::eval::PromptSet;
use crate::study::canon::hash_json;
use crate::study::file::StudyFile;
use crate::study::plan::Study;
use crate::study::store::RowView;
use crate::study::Store;
use crate::Result;

/// One recomputed value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// The receipt file (or `bundle`).
    pub receipt: String,
    /// What was checked, e.g. `model file /path/q15.gguf sha256`.
    pub what: String,
    pub ok: bool,
    /// The receipt's value.
    pub expected: String,
    /// The value now (or why it could not be computed).
    pub found: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checks: Vec<Check>,
}

impl VerifyReport {
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Results database (default: the one the receipt names).
    pub db: Option<PathBuf>,
    /// Study file (default: the one the receipt names).
    pub study_file: Option<PathBuf>,
}

fn short(s: &str) -> String {
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        s[..16].to_string()
    } else {
        s.to_string()
    }
}

struct Ctx {
    checks: Vec<Check>,
    file_hashes: HashMap<PathBuf, std::result::Result<String, String>>,
}

impl Ctx {
    fn push(
        &mut self,
        receipt: &str,
        what: String,
        expected: &str,
        found: std::result::Result<String, String>,
    ) {
        let (ok, found) = match found {
            Ok(f) => (f == expected, f),
            Err(e) => (false, format!("cannot compute: {e}")),
        };
        self.checks.push(Check {
            receipt: receipt.to_string(),
            what,
            ok,
            expected: expected.to_string(),
            found,
        });
    }

    fn file_sha(&mut self, p: &Path) -> std::result::Result<String, String> {
        let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        self.file_hashes
            .entry(real.clone())
            .or_insert_with(|| {
                if !real.exists() {
                    return Err(format!("{} does not exist", p.display()));
                }
                crate::hash::sha256_file(&real).map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// Verify receipts (with their bundle when there is one).
pub fn verify(
    receipts: &[(PathBuf, Receipt)],
    bundle: Option<&Bundle>,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let mut cx = Ctx {
        checks: Vec::new(),
        file_hashes: HashMap::new(),
    };
    // Per study: its database rows and its re-resolved files, computed once.
    let mut studies: HashMap<String, StudyState> = HashMap::new();
    let mut tokenizers: HashMap<String, std::result::Result<(String, Option<String>), String>> =
        HashMap::new();
    for (path, r) in receipts {
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| path.display().to_string());
        let rn = name.as_str();
        cx.push(
            rn,
            "receipt_sha256 (the receipt's own content)".into(),
            &r.receipt_sha256,
            r.compute_sha256().map_err(|e| e.to_string()),
        );
        if let Some(b) = bundle {
            let entry = b
                .receipts
                .iter()
                .find(|e| e.condition_hash == r.condition.hash);
            cx.push(
                rn,
                "bundle.json entry for this receipt".into(),
                &r.receipt_sha256,
                entry
                    .map(|e| e.receipt_sha256.clone())
                    .ok_or_else(|| "no entry in bundle.json".to_string()),
            );
        }
        cx.push(
            rn,
            format!(
                "condition '{}': hash of its recorded `hashed` input",
                r.condition.name
            ),
            &r.condition.hash,
            Ok(hash_json(&r.condition.hashed)),
        );
        // Model files and tokenizer.
        for f in &r.model.files {
            let p = PathBuf::from(&f.path);
            let found = if p.exists() {
                cx.file_sha(&p)
            } else {
                // Another machine: resolve the spec again.
                match crate::model::ModelSource::resolve(&r.model.spec) {
                    Ok(crate::model::ModelSource::Gguf(g)) => cx.file_sha(&g),
                    Ok(other) => Err(format!(
                        "{} does not exist and the spec resolves to {}",
                        f.path,
                        other.describe()
                    )),
                    Err(e) => Err(format!("{} does not exist ({e})", f.path)),
                }
            };
            cx.push(
                rn,
                format!("model file {} sha256", f.path),
                &f.sha256,
                found,
            );
        }
        // Endpoint receipts have no model files or tokenizer to check (white-box fields n/a).
        let tok = if r.endpoint.is_some() {
            Ok((
                r.model.tokenizer.vocab_sha256.clone(),
                r.model.tokenizer.chat_template_sha256.clone(),
            ))
        } else {
            tokenizers
                .entry(
                    r.model
                        .files
                        .first()
                        .map(|f| f.path.clone())
                        .unwrap_or_default(),
                )
                .or_insert_with(|| tokenizer_hashes(r))
                .clone()
        };
        cx.push(
            rn,
            "tokenizer vocabulary sha256".into(),
            &r.model.tokenizer.vocab_sha256,
            tok.clone().map(|t| t.0),
        );
        cx.push(
            rn,
            "chat template sha256".into(),
            r.model
                .tokenizer
                .chat_template_sha256
                .as_deref()
                .unwrap_or("none"),
            tok.map(|t| t.1.unwrap_or_else(|| "none".into())),
        );
        // Study: database and files.
        let db = opts
            .db
            .clone()
            .unwrap_or_else(|| PathBuf::from(&r.study.results_db));
        let key = format!("{}\u{1f}{}", db.display(), r.study.hash);
        let st = studies
            .entry(key)
            .or_insert_with(|| StudyState::load(&db, r, opts.study_file.as_deref()));
        match &st.toml_sha256 {
            Ok(h) => cx.push(
                rn,
                "study file text stored in the database".into(),
                &r.study.toml_sha256,
                Ok(h.clone()),
            ),
            Err(e) => cx.push(
                rn,
                format!("study {} in {}", r.study.name, db.display()),
                &r.study.hash,
                Err(e.clone()),
            ),
        }
        match &st.study {
            Err(e) => {
                cx.push(
                    rn,
                    "study files (re-read)".into(),
                    &r.study.hash,
                    Err(e.clone()),
                );
            }
            Ok(study) => {
                cx.push(
                    rn,
                    "study hash (from the study file and its files)".into(),
                    &r.study.hash,
                    Ok(study.hash.clone()),
                );
                let c = study
                    .condition(&r.condition.name)
                    .map(|i| &study.conditions[i]);
                cx.push(
                    rn,
                    format!("condition '{}' hash (system prompt, ops and directions, model, generation)", r.condition.name),
                    &r.condition.hash,
                    c.map(|c| c.hash.clone())
                        .ok_or_else(|| "no such condition in the study file".into()),
                );
                for ps in &r.prompt_sets {
                    let Some(s) = study.prompt_sets.iter().find(|s| s.name == ps.name) else {
                        cx.push(
                            rn,
                            format!("prompt set '{}'", ps.name),
                            &ps.set_sha256,
                            Err("not in the study file".into()),
                        );
                        continue;
                    };
                    let src = prompt_source_path(&study.file, &s.source);
                    let whole = PromptSet::load(&src)
                        .map(|p| p.sha256())
                        .map_err(|e| e.to_string());
                    cx.push(
                        rn,
                        format!("prompt set '{}' ({}) sha256", ps.name, ps.source),
                        &ps.set_sha256,
                        whole,
                    );
                    cx.push(
                        rn,
                        format!(
                            "prompt set '{}' prompts used (skip {}, n {}) sha256",
                            ps.name, ps.skip, ps.n
                        ),
                        &ps.selected_sha256,
                        Ok(selected_sha256(&s.items)),
                    );
                }
                let base = &study.file.base_dir;
                for o in &r.condition.ops {
                    let (Some(file), Some(sha)) =
                        (&o.file, o.identity.get("sha256").and_then(|v| v.as_str()))
                    else {
                        continue;
                    };
                    let p = PathBuf::from(file);
                    let p = if p.is_relative() { base.join(p) } else { p };
                    let found = cx.file_sha(&p);
                    cx.push(
                        rn,
                        format!("direction '{}' file {} sha256", o.direction, p.display()),
                        sha,
                        found,
                    );
                }
            }
        }
        match &st.rows {
            Err(e) => cx.push(
                rn,
                format!("result rows in {}", db.display()),
                "rows",
                Err(e.clone()),
            ),
            Ok(rows) => {
                for s in &r.results {
                    let mine: Vec<&RowView> = rows
                        .iter()
                        .filter(|x| {
                            x.condition_hash == r.condition.hash && x.prompt_set == s.prompt_set
                        })
                        .collect();
                    let what = |w: &str| {
                        format!(
                            "condition '{}' set '{}' {w}",
                            r.condition.name, s.prompt_set
                        )
                    };
                    cx.push(
                        rn,
                        what("result rows sha256"),
                        &s.rows_sha256,
                        rows_sha256(mine.iter().copied()).map_err(|e| e.to_string()),
                    );
                    let count = |l: &str| mine.iter().filter(|x| x.label == l).count();
                    cx.push(
                        rn,
                        what("rows / refusal / bypass / degenerate counts"),
                        &format!("{}/{}/{}/{}", s.n, s.refusal.k, s.bypass.k, s.degenerate.k),
                        Ok(format!(
                            "{}/{}/{}/{}",
                            mine.len(),
                            count("refusal"),
                            count("bypass"),
                            count("degenerate")
                        )),
                    );
                }
                // Receipts written before labelers were recorded have no labels block.
                if let Some(l) = &r.labels {
                    let all = rows.iter().filter(|x| x.condition_hash == r.condition.hash);
                    cx.push(
                        rn,
                        format!(
                            "condition '{}' labels sha256 (row keys, labels, labelers {})",
                            r.condition.name,
                            l.labelers.join(", ")
                        ),
                        &l.labels_sha256,
                        Ok(labels_sha256(all)),
                    );
                }
            }
        }
    }
    Ok(VerifyReport { checks: cx.checks })
}

fn tokenizer_hashes(r: &Receipt) -> std::result::Result<(String, Option<String>), String> {
    let p = r
        .model
        .files
        .first()
        .map(|f| PathBuf::from(&f.path))
        .filter(|p| p.exists());
    let src = match p {
        Some(p) if r.model.format == "gguf" => crate::model::ModelSource::Gguf(p),
        _ => crate::model::ModelSource::resolve(&r.model.spec).map_err(|e| e.to_string())?,
    };
    let opened = crate::model::open(&src, &crate::model::LoadOptions::default())
        .map_err(|e| e.to_string())?;
    Ok((
        opened.tokenizer.vocab_sha256(),
        opened.tokenizer.chat_template_sha256(),
    ))
}

struct StudyState {
    toml_sha256: std::result::Result<String, String>,
    study: std::result::Result<Study, String>,
    rows: std::result::Result<Vec<RowView>, String>,
}

impl StudyState {
    fn load(db: &Path, r: &Receipt, study_file: Option<&Path>) -> StudyState {
        let store = match Store::open_read(db) {
            Ok(s) => s,
            Err(e) => {
                let e = e.to_string();
                return StudyState {
                    toml_sha256: Err(e.clone()),
                    study: Err(e.clone()),
                    rows: Err(e),
                };
            }
        };
        let rec = store.studies().map_err(|e| e.to_string()).and_then(|all| {
            all.into_iter()
                .find(|s| s.hash == r.study.hash)
                .ok_or_else(|| {
                    format!(
                        "study {} ({}) is not in {}",
                        r.study.name,
                        short(&r.study.hash),
                        db.display()
                    )
                })
        });
        let rec = match rec {
            Ok(x) => x,
            Err(e) => {
                return StudyState {
                    toml_sha256: Err(e.clone()),
                    study: Err(e.clone()),
                    rows: Err(e),
                }
            }
        };
        let file = study_file
            .map(Path::to_path_buf)
            .or_else(|| r.study.file.as_ref().map(PathBuf::from));
        let base = study_base_dir(&rec, file.as_deref());
        let study = StudyFile::parse(&rec.toml, &base)
            .and_then(Study::resolve)
            .map_err(|e| e.to_string());
        StudyState {
            toml_sha256: Ok(crate::hash::sha256_bytes(rec.toml.as_bytes())),
            study,
            rows: store.rows(&rec.hash).map_err(|e| e.to_string()),
        }
    }
}

/// One line per check: `ok` / `DIFFERS`, the receipt, what, and both values when they differ.
pub fn format_check(c: &Check) -> String {
    if c.ok {
        format!("ok       {}: {}", c.receipt, c.what)
    } else {
        format!(
            "DIFFERS  {}: {}: receipt {}, now {}",
            c.receipt,
            c.what,
            short(&c.expected),
            short(&c.found)
        )
    }
}
