//! Exports of a study's rows: JSONL (everything, nested), CSV (flat: rule measurements and one
//! group of columns per judge) and Parquet (the CSV's columns, typed). And the summary table as
//! CSV.
//!
//! Rows without a verdict say so explicitly: `strongreject` / `unsafe` are null and
//! `strongreject_judged` / `safety_judged` are false, so a rules-only run is never mistaken for a
//! run judged safe.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::flat::first_with;
pub use super::flat::{csv_field, flat, Cell, Kind};
use super::report::ReportRow;
use super::store::{iso_utc, RowView};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "parquet" | "pq" => Ok(Format::Parquet),
            other => Err(Error::InvalidValue(format!(
                "export format '{other}' must be jsonl, csv or parquet"
            ))),
        }
    }
}

/// One row as a JSON object (the JSONL record).
pub fn row_json(r: &RowView) -> Value {
    let sr = first_with(r, |v| v.strongreject.is_some());
    let sf = first_with(r, |v| v.is_unsafe.is_some());
    json!({
        "condition": r.condition,
        "condition_hash": r.condition_hash,
        "prompt_set": r.prompt_set,
        "prompt_set_hash": r.prompt_set_hash,
        "prompt_id": r.prompt_id,
        "category": r.category,
        "prompt": r.prompt,
        "sample": r.sample,
        "seed": r.seed,
        "item_hash": r.item_hash,
        "output": r.output,
        "n_tokens": r.n_tokens,
        "prompt_tokens": r.prompt_tokens,
        "finish": r.finish,
        "label": r.label,
        "labeler": r.labeler,
        "rule": r.rule,
        "leakage": r.leakage,
        "leakage_parts": r.leakage_parts,
        "strongreject": sr.and_then(|v| v.strongreject),
        "strongreject_judged": sr.is_some(),
        "unsafe": sf.and_then(|v| v.is_unsafe),
        "safety_categories": sf.and_then(|v| v.categories.clone()),
        "safety_judged": sf.is_some(),
        "verdicts": r.verdicts.iter().map(|v| json!({
            "judge": v.judge, "mode": v.mode, "ok": v.ok, "attempts": v.attempts,
            "error": v.error, "raw": v.raw, "verdict": v.verdict,
            "judged_at": iso_utc(v.judged_at),
        })).collect::<Vec<_>>(),
        "started_at": iso_utc(r.started_at),
        "finished_at": iso_utc(r.finished_at),
    })
}

/// Write a study's rows to `path` in `format`. Returns the number of rows.
pub fn export(rows: &[RowView], format: Format, path: &Path) -> Result<usize> {
    let io = |e: std::io::Error| Error::io(path, e);
    match format {
        Format::Jsonl => {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
            for r in rows {
                writeln!(f, "{}", row_json(r)).map_err(io)?;
            }
            f.flush().map_err(io)?;
        }
        Format::Csv => {
            let (cols, data) = flat(rows);
            let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
            let header: Vec<String> = cols.iter().map(|(n, _)| csv_field(n)).collect();
            writeln!(f, "{}", header.join(",")).map_err(io)?;
            for row in &data {
                let line: Vec<String> = row.iter().map(Cell::csv).collect();
                writeln!(f, "{}", line.join(",")).map_err(io)?;
            }
            f.flush().map_err(io)?;
        }
        Format::Parquet => super::parquet_out::write(rows, path)?,
    }
    Ok(rows.len())
}

/// The summary table as CSV.
pub fn report_csv(rows: &[ReportRow]) -> String {
    let judges: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.judges.iter().map(|j| j.judge.as_str()))
        .collect();
    let mut head: Vec<String> = [
        "condition",
        "condition_hash",
        "prompt_set",
        "category",
        "n",
        "refusal",
        "refusal_lo",
        "refusal_hi",
        "bypass",
        "bypass_lo",
        "bypass_hi",
        "degenerate",
        "degenerate_lo",
        "degenerate_hi",
        "leakage_mean",
        "baseline",
        "n_pairs",
        "mcnemar_b",
        "mcnemar_c",
        "mcnemar_p_exact",
        "mcnemar_p_mid",
        "refusal_diff",
        "refusal_diff_lo",
        "refusal_diff_hi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for j in &judges {
        for f in [
            "judged",
            "failed",
            "strongreject_mean",
            "unsafe_rate",
            "leakage_mean",
        ] {
            head.push(format!("{j}:{f}"));
        }
    }
    let mut out = head.join(",") + "\n";
    let o = |x: Option<f64>| x.map(|v| format!("{v}")).unwrap_or_default();
    for r in rows {
        let mut cells = vec![
            csv_field(&r.condition),
            r.condition_hash.clone(),
            csv_field(&r.prompt_set),
            csv_field(r.category.as_deref().unwrap_or("")),
            r.n.to_string(),
        ];
        for rate in [&r.refusal, &r.bypass, &r.degenerate] {
            cells.extend([rate.p, rate.lo, rate.hi].map(|x| format!("{x}")));
        }
        cells.push(format!("{}", r.leakage_mean));
        match &r.vs_baseline {
            None => cells.extend(std::iter::repeat_n(String::new(), 9)),
            Some(v) => cells.extend([
                csv_field(&v.baseline),
                v.n_pairs.to_string(),
                v.mcnemar.b.to_string(),
                v.mcnemar.c.to_string(),
                format!("{}", v.mcnemar.p_exact),
                format!("{}", v.mcnemar.p_mid),
                format!("{}", v.diff.diff),
                format!("{}", v.diff.lo),
                format!("{}", v.diff.hi),
            ]),
        }
        for j in &judges {
            match r.judges.iter().find(|x| x.judge == *j) {
                None => cells.extend(std::iter::repeat_n(String::new(), 5)),
                Some(s) => cells.extend([
                    s.judged.to_string(),
                    s.failed.to_string(),
                    o(s.strongreject_mean),
                    o(s.unsafe_rate.map(|r| r.p)),
                    o(s.leakage_mean),
                ]),
            }
        }
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}
