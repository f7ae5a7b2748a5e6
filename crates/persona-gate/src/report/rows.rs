//! The result rows bundled with a study's receipts (`rows.jsonl` and `labels.jsonl`).
//!
//! A receipt's numbers are only as good as the rows they come from, so `pgate receipt` writes the
//! rows next to the receipts: `verify` and `check` recompute every statistic from them without the
//! results database, and a signature over the bundle covers the evidence, not only the summary.
//!
//! - `rows.jsonl`: one line per result row of the study, in the database's order: exactly the
//!   canonical JSON that `rows_sha256` hashes (the row id and the labeler left out). Hashing the
//!   lines as stored avoids any dependence on float parsing.
//! - `labels.jsonl`: one line per row, same order: `{"labeler": ..., "history": [...]}`, the
//!   labeler of the row's label and its label history (see [`super::provenance`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::provenance::RowLabels;
use crate::fsutil;
use crate::study::canon::canonical_json;
use crate::study::store::RowView;
use crate::{Error, Result};

pub const ROWS_FILE: &str = "rows.jsonl";
pub const LABELS_FILE: &str = "labels.jsonl";
/// The signature envelope's file name in the bundle folder (`dsse`; here, with the other bundle
/// file names, so writing receipts need not import the signer).
pub const SIGNATURE_FILE: &str = "receipts.dsse.json";

/// Largest bundled rows or labels file read (a study of 10^5 rows of 1,000 tokens fits).
pub const MAX_ROWS_BYTES: u64 = 2 << 30;

/// A file of the bundle with its content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundledFile {
    /// File name inside the bundle folder.
    pub file: String,
    pub sha256: String,
    /// Lines (rows) in the file.
    pub n: usize,
}

/// Rows read back from a bundle.
#[derive(Debug, Clone)]
pub struct BundledRows {
    pub rows: Vec<RowView>,
    /// Each row's line as stored (what the rows hashes are computed over).
    pub lines: Vec<String>,
    pub labels: Vec<RowLabels>,
}

#[derive(Serialize, Deserialize)]
struct LabelsLine {
    labeler: String,
    #[serde(default)]
    history: Vec<crate::study::store::LabelRecord>,
}

/// The canonical JSON of a row as the rows hashes cover it: the database's row id and the
/// labeler left out (the id changes on merge; the labeler is covered by the labels hash).
pub fn row_line(row: &RowView) -> Result<String> {
    let mut v = serde_json::to_value(row)?;
    if let Some(m) = v.as_object_mut() {
        m.remove("result_id");
        m.remove("labeler");
    }
    Ok(canonical_json(&v))
}

/// Write `rows.jsonl` and `labels.jsonl` into `dir` (atomically), returning their entries.
pub fn write_rows(
    dir: &Path,
    rows: &[RowView],
    labels: &[RowLabels],
) -> Result<(BundledFile, BundledFile)> {
    let mut text = String::new();
    let mut ltext = String::new();
    for (r, l) in rows.iter().zip(labels) {
        text.push_str(&row_line(r)?);
        text.push('\n');
        let line = serde_json::to_value(LabelsLine {
            labeler: r.labeler.clone(),
            history: l.history.clone(),
        })?;
        ltext.push_str(&canonical_json(&line));
        ltext.push('\n');
    }
    let mut out = Vec::new();
    for (name, t) in [(ROWS_FILE, &text), (LABELS_FILE, &ltext)] {
        fsutil::write_atomic(&dir.join(name), t.as_bytes())?;
        out.push(BundledFile {
            file: name.into(),
            sha256: crate::hash::sha256_bytes(t.as_bytes()),
            n: rows.len(),
        });
    }
    let l = out.pop().expect("two files");
    let r = out.pop().expect("two files");
    Ok((r, l))
}

/// A file name a bundle may name: a plain name in the bundle folder (no folders, no `..`).
pub fn plain_name(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !(cfg!(windows) && name.contains(':'));
    if ok {
        Ok(name)
    } else {
        Err(Error::InvalidValue(format!(
            "'{name}' is not a plain file name: a bundle names only files in its own folder"
        )))
    }
}

/// Read one bundled file: a plain name, a regular file, bounded, with the recorded sha256.
fn read_checked(dir: &Path, f: &BundledFile) -> Result<String> {
    let p = dir.join(plain_name(&f.file)?);
    let bytes = fsutil::read_regular_bounded(&p, MAX_ROWS_BYTES)?;
    let sha = crate::hash::sha256_bytes(&bytes);
    if sha != f.sha256 {
        return Err(Error::InvalidValue(format!(
            "{}: sha256 {} but bundle.json records {}",
            p.display(),
            &sha[..16],
            f.sha256.get(..16).unwrap_or(&f.sha256)
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::InvalidValue(format!("{}: not UTF-8 text", p.display())))
}

/// Read the rows and labels a bundle names from its folder, checking both files' hashes and that
/// they hold the same number of lines.
pub fn read_rows(dir: &Path, rows: &BundledFile, labels: &BundledFile) -> Result<BundledRows> {
    let text = read_checked(dir, rows)?;
    let ltext = read_checked(dir, labels)?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let llines: Vec<&str> = ltext.lines().collect();
    if lines.len() != rows.n || llines.len() != lines.len() {
        return Err(Error::InvalidValue(format!(
            "{}: {} rows and {} label lines, bundle.json records {}",
            dir.display(),
            lines.len(),
            llines.len(),
            rows.n
        )));
    }
    let mut out_rows = Vec::with_capacity(lines.len());
    let mut out_labels = Vec::with_capacity(lines.len());
    for (i, (line, lline)) in lines.iter().zip(&llines).enumerate() {
        let bad = |what: &str, e: serde_json::Error| {
            Error::InvalidValue(format!("{}: line {}: {what}: {e}", dir.display(), i + 1))
        };
        let mut v: Value = serde_json::from_str(line).map_err(|e| bad(ROWS_FILE, e))?;
        let l: LabelsLine = serde_json::from_str(lline).map_err(|e| bad(LABELS_FILE, e))?;
        if let Some(m) = v.as_object_mut() {
            m.insert("result_id".into(), Value::from(i as i64));
            m.insert("labeler".into(), Value::String(l.labeler));
        }
        let row: RowView = serde_json::from_value(v).map_err(|e| bad(ROWS_FILE, e))?;
        out_rows.push(row);
        out_labels.push(RowLabels { history: l.history });
    }
    Ok(BundledRows {
        rows: out_rows,
        lines,
        labels: out_labels,
    })
}
