//! What the receipt verifier and its file checks share: the options, the checks collected
//! ([`Ctx`]), and the state of a study's results database ([`DbState`]).
//!
//! Why a module of its own: [`super::verify`] drives [`super::verify_files`], and the file checks
//! push into the same context and read the same database; with these here, neither file imports
//! the other in a circle. `verify` re-exports [`Check`] and [`VerifyOptions`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::provenance::RowLabels;
use super::receipt::Receipt;
use super::untrusted::{Located, ReadPolicy};
use crate::study::store::{RowView, StatusRow, StudyRecord};
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
    /// Not checked, and why (paths outside the bundle folder, nothing to read). `ok` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct VerifyOptions {
    // Without it: the one the receipt names when it is in the bundle folder or a root, else a
    // file of that name in the bundle folder.
    /// Results database (default: the one the receipts name).
    #[cfg_attr(feature = "cli", arg(long))]
    pub db: Option<PathBuf>,
    /// Study file (default: the one the receipts name, when it is inside the bundle folder or a
    /// --root).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study_file: Option<PathBuf>,
    /// The model: a weights file, or the folder holding the receipts' model files (default: the
    /// recorded paths, when inside the bundle folder or a --root). Model names are never resolved
    /// or downloaded.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: Option<PathBuf>,
    /// A folder the paths inside the receipts may lead into, besides the bundle folder
    /// (repeatable), e.g. `--root .` for a project whose study, directions and prompt files live
    /// in it. Paths elsewhere are reported as not checked.
    #[cfg_attr(feature = "cli", arg(long = "root", value_name = "ROOT"))]
    pub roots: Vec<PathBuf>,
    /// Require a signature by this public key (`KEY.pub` from `pgate keygen`) over every file of
    /// the bundle.
    #[cfg_attr(feature = "cli", arg(long))]
    pub pubkey: Option<PathBuf>,
    /// Leave out the model, tokenizer and study files: check the signature, the seals, and the
    /// numbers and labels against the bundled rows and the database (`pgate receipt sign`,
    /// `pgate check`). Not a flag.
    #[cfg_attr(feature = "cli", arg(skip))]
    pub skip_files: bool,
}

pub(crate) fn short(s: &str) -> String {
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        s[..16].to_string()
    } else {
        s.to_string()
    }
}

#[derive(Default)]
pub(crate) struct Ctx {
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    file_hashes: HashMap<(PathBuf, u64), std::result::Result<String, String>>,
}

impl Ctx {
    pub fn push(
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
            skipped: None,
        });
    }

    pub fn skip(&mut self, receipt: &str, what: String, why: String) {
        self.checks.push(Check {
            receipt: receipt.to_string(),
            what,
            ok: true,
            expected: String::new(),
            found: String::new(),
            skipped: Some(why),
        });
    }

    /// sha256 of a located regular file of at most `max` bytes (cached).
    pub fn file_sha(&mut self, p: &Path, max: u64) -> std::result::Result<String, String> {
        self.file_hashes
            .entry((p.to_path_buf(), max))
            .or_insert_with(|| {
                crate::fsutil::sha256_regular_bounded(p, max)
                    .map(|x| x.0)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// The results database of a study, as far as it could be read.
pub(crate) struct DbState {
    pub path: PathBuf,
    pub record: std::result::Result<StudyRecord, String>,
    pub rows: std::result::Result<(Vec<RowView>, Vec<RowLabels>), String>,
    pub status: Vec<StatusRow>,
    /// The stored study's `english` (None when its text does not parse).
    pub english: Option<bool>,
}

impl DbState {
    /// Find and read the database of receipt `r`: `--db`, else the path it records when that lies
    /// inside the bundle folder or a root, else a file of that name in the bundle folder.
    pub(crate) fn open(
        cx: &mut Ctx,
        rn: &str,
        r: &Receipt,
        dir: &Path,
        policy: &ReadPolicy,
        opts: &VerifyOptions,
    ) -> Option<DbState> {
        let recorded = PathBuf::from(&r.study.results_db);
        let located = match &opts.db {
            Some(p) => ReadPolicy::explicit(p),
            None => match policy.locate(&recorded) {
                Located::File(p) => Located::File(p),
                first => match recorded.file_name() {
                    Some(n) => match policy.locate(&dir.join(n)) {
                        Located::File(p) => Located::File(p),
                        _ => first,
                    },
                    None => first,
                },
            },
        };
        let path = match located {
            Located::File(p) => p,
            Located::Outside(why) => {
                cx.skip(rn, "results database".into(), format!("{why}: pass --db"));
                return None;
            }
            Located::Refused(why) => {
                cx.push(rn, "results database".into(), &r.study.results_db, Err(why));
                return None;
            }
        };
        let store = match Store::open_read(&path) {
            Ok(s) => s,
            Err(e) => {
                cx.push(
                    rn,
                    format!("results database {}", path.display()),
                    "readable",
                    Err(e.to_string()),
                );
                return None;
            }
        };
        let record = store.studies().map_err(|e| e.to_string()).and_then(|all| {
            all.into_iter()
                .find(|s| s.hash == r.study.hash)
                .ok_or_else(|| {
                    format!(
                        "study {} ({}) is not in {}",
                        r.study.name,
                        short(&r.study.hash),
                        path.display()
                    )
                })
        });
        let rows = record.as_ref().map_err(Clone::clone).and_then(|rec| {
            let rows = store.rows(&rec.hash).map_err(|e| e.to_string())?;
            let labels = rows
                .iter()
                .map(|x| {
                    store
                        .label_history(x.result_id)
                        .map(|history| RowLabels { history })
                })
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            Ok((rows, labels))
        });
        let status = record
            .as_ref()
            .ok()
            .and_then(|rec| store.status(&rec.hash).ok())
            .unwrap_or_default();
        let english = record.as_ref().ok().and_then(|rec| {
            crate::study::file::StudyFile::parse(&rec.toml, Path::new("."))
                .ok()
                .map(|f| f.english)
        });
        let toml_sha = record
            .as_ref()
            .map(|rec| crate::hash::sha256_bytes(rec.toml.as_bytes()))
            .map_err(Clone::clone);
        cx.push(
            rn,
            format!("study file text stored in the database {}", path.display()),
            &r.study.toml_sha256,
            toml_sha,
        );
        Some(DbState {
            path,
            record,
            rows,
            status,
            english,
        })
    }
}
