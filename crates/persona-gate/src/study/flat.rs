//! The flat form of a study's rows: one typed cell per column, rule measurements and one group of
//! columns per judge. The CSV export writes it as text and the Parquet export with its types.
//!
//! Why its own module: both writers read this one form, so the CSV and Parquet columns cannot
//! drift apart, and neither writer depends on the other (the Parquet writer used to import it from
//! the export module that called it).

use std::collections::BTreeSet;

use serde_json::Value;

use super::store::{iso_utc, RowView, VerdictRow};

/// The first successful verdict that has a StrongREJECT score / a safety verdict.
pub(crate) fn first_with(r: &RowView, f: impl Fn(&VerdictRow) -> bool) -> Option<&VerdictRow> {
    r.verdicts.iter().find(|v| v.ok && f(v))
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
    pub fn csv(&self) -> String {
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
