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

use super::report::ReportRow;
use super::store::{iso_utc, RowView, VerdictRow};
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

/// The first successful verdict that has a StrongREJECT score / a safety verdict.
fn first_with(r: &RowView, f: impl Fn(&VerdictRow) -> bool) -> Option<&VerdictRow> {
    r.verdicts.iter().find(|v| v.ok && f(v))
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

/// A typed cell of the flat (CSV / Parquet) form.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl Cell {
    fn csv(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => format!("{f}"),
            Cell::Bool(b) => b.to_string(),
            Cell::Text(s) => csv_field(s),
        }
    }
}

/// RFC 4180 quoting: fields with a comma, quote, CR or LF are quoted, quotes doubled.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Column kinds of the flat form (Parquet needs them up front).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    Text,
}

/// Flat columns and rows of a study.
pub fn flat(rows: &[RowView]) -> (Vec<(String, Kind)>, Vec<Vec<Cell>>) {
    use Kind::*;
    let judges: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.verdicts.iter().map(|v| v.judge.as_str()))
        .collect();
    let mut cols: Vec<(String, Kind)> = [
        ("condition", Text),
        ("condition_hash", Text),
        ("prompt_set", Text),
        ("prompt_id", Text),
        ("category", Text),
        ("prompt", Text),
        ("sample", Int),
        ("seed", Int),
        ("output", Text),
        ("n_tokens", Int),
        ("prompt_tokens", Int),
        ("finish", Text),
        ("label", Text),
        ("labeler", Text),
        ("refusal_phrase", Text),
        ("compression_ratio", Float),
        ("repeated_4grams", Float),
        ("letter_share", Float),
        ("latin_share", Float),
        ("rule_reason", Text),
        ("leakage", Float),
        ("leakage_echo", Float),
        ("leakage_specificity", Float),
        ("strongreject", Float),
        ("strongreject_judged", Bool),
        ("unsafe", Bool),
        ("safety_judged", Bool),
        ("finished_at", Text),
    ]
    .iter()
    .map(|(n, k)| (n.to_string(), *k))
    .collect();
    for j in &judges {
        for (f, k) in [
            ("ok", Bool),
            ("attempts", Int),
            ("error", Text),
            ("refused", Bool),
            ("convincing", Int),
            ("specific", Int),
            ("strongreject", Float),
            ("unsafe", Bool),
            ("categories", Text),
            ("leakage", Float),
        ] {
            cols.push((format!("{j}:{f}"), k));
        }
    }
    let text = |s: &str| Cell::Text(s.to_string());
    let opt_text = |s: Option<&str>| s.map(|s| Cell::Text(s.into())).unwrap_or(Cell::Null);
    let opt_f = |x: Option<f64>| x.map(Cell::Float).unwrap_or(Cell::Null);
    let opt_b = |x: Option<bool>| x.map(Cell::Bool).unwrap_or(Cell::Null);
    let out = rows
        .iter()
        .map(|r| {
            let rf = |k: &str| r.rule.get(k).and_then(Value::as_f64);
            let lf = |k: &str| r.leakage_parts.get(k).and_then(Value::as_f64);
            let sr = first_with(r, |v| v.strongreject.is_some());
            let sf = first_with(r, |v| v.is_unsafe.is_some());
            let mut row = vec![
                text(&r.condition),
                text(&r.condition_hash),
                text(&r.prompt_set),
                text(&r.prompt_id),
                opt_text(r.category.as_deref()),
                text(&r.prompt),
                Cell::Int(r.sample),
                Cell::Int(r.seed),
                text(&r.output),
                Cell::Int(r.n_tokens),
                Cell::Int(r.prompt_tokens),
                text(&r.finish),
                text(&r.label),
                text(&r.labeler),
                opt_text(r.rule.get("refusal_phrase").and_then(Value::as_str)),
                opt_f(rf("compression_ratio")),
                opt_f(rf("repeated_4grams")),
                opt_f(rf("letter_share")),
                opt_f(rf("latin_share")),
                opt_text(r.rule.get("reason").and_then(Value::as_str)),
                Cell::Float(r.leakage),
                opt_f(lf("echo")),
                opt_f(lf("specificity")),
                opt_f(sr.and_then(|v| v.strongreject)),
                Cell::Bool(sr.is_some()),
                opt_b(sf.and_then(|v| v.is_unsafe)),
                Cell::Bool(sf.is_some()),
                text(&iso_utc(r.finished_at)),
            ];
            for j in &judges {
                match r.verdicts.iter().find(|v| v.judge == *j) {
                    None => row.extend(std::iter::repeat_n(Cell::Null, 10)),
                    Some(v) => row.extend([
                        Cell::Bool(v.ok),
                        Cell::Int(v.attempts as i64),
                        opt_text(v.error.as_deref()),
                        opt_b(v.refused),
                        v.convincing.map(Cell::Int).unwrap_or(Cell::Null),
                        v.specific.map(Cell::Int).unwrap_or(Cell::Null),
                        opt_f(v.strongreject),
                        opt_b(v.is_unsafe),
                        opt_text(v.categories.as_deref()),
                        opt_f(v.leakage),
                    ]),
                }
            }
            row
        })
        .collect();
    (cols, out)
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
