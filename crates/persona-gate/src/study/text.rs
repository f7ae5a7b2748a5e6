//! The plain-text forms of study results: the tables `pgate study status / table / compare / check
//! / relabel` print, as `Display` implementations of the typed results of [`super::ops`].
//!
//! Why in the library: every front end that shows a study as text (the CLI, a Python `print`, a
//! log) then shows the same table, and the binary stays parsing and printing. The JSON forms are
//! the results' `Serialize` implementations.

use std::fmt::{self, Display, Formatter};

use super::ops::{Comparison, EndpointStatus, StudyOverview, StudyStatus, StudyTable, Target};
use super::relabel::RelabelSummary;
use super::report::{pct, pval, ReportRow};

/// The first 12 characters of a hash (all of a shorter one).
fn short(hash: &str) -> &str {
    &hash[..12.min(hash.len())]
}

/// The widest of `names`, at least `min` (the column's header).
fn width<'a>(names: impl Iterator<Item = &'a str>, min: usize) -> usize {
    names.map(str::len).max().unwrap_or(min).max(min)
}

impl Display for StudyStatus {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "study {} ({}), db {}",
            self.study,
            short(&self.hash),
            self.db.display()
        )?;
        let w = width(self.conditions.iter().map(|r| r.condition.as_str()), 9);
        let ws = width(self.conditions.iter().map(|r| r.prompt_set.as_str()), 3);
        writeln!(
            f,
            "{:<w$}  {:<ws$}  {:>11}",
            "condition", "set", "done/total"
        )?;
        for r in &self.conditions {
            writeln!(
                f,
                "{:<w$}  {:<ws$}  {:>11}",
                r.condition,
                r.prompt_set,
                format!("{}/{}", r.done, r.total)
            )?;
        }
        writeln!(
            f,
            "{:<w$}  {:<ws$}  {:>11}  ({:.0}%)",
            "total",
            "",
            format!("{}/{}", self.done, self.total),
            100.0 * self.done as f64 / self.total.max(1) as f64
        )?;
        match &self.endpoint {
            Some(e) => write!(f, "{e}"),
            None => Ok(()),
        }
    }
}

impl Display for EndpointStatus {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "target: endpoint {} model {}; server reported {}; white-box fields do not apply (no weights, tokenizer, directions)",
            self.base_url.as_deref().unwrap_or("?"),
            self.model.as_deref().unwrap_or("?"),
            if self.reported_models.is_empty() {
                "no model name yet".to_string()
            } else {
                format!("model {}", self.reported_models.join(", "))
            }
        )?;
        let w = width(
            self.conditions.iter().map(|u| u.usage.condition.as_str()),
            9,
        );
        writeln!(
            f,
            "{:<w$}  {:>6}  {:>6}  {:>13}  {:>17}  {:>13}  {:>10}",
            "condition",
            "rows",
            "tries",
            "failed tries",
            "prompt tokens",
            "completion tok",
            "est. cost"
        )?;
        for c in &self.conditions {
            let u = &c.usage;
            writeln!(
                f,
                "{:<w$}  {:>6}  {:>6}  {:>13}  {:>17}  {:>13}  {:>10}",
                u.condition,
                u.rows,
                u.tries_ok_rows + u.failed_tries,
                u.failed_tries,
                u.prompt_tokens,
                u.completion_tokens,
                c.cost
                    .map(|c| format!("{c:.4}"))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        writeln!(
            f,
            "usage: {} prompt + {} completion tokens{}; {} failed tries recorded{}",
            self.prompt_tokens,
            self.completion_tokens,
            self.cost
                .map(|c| format!(
                    ", estimated cost {c:.4} (price_input_per_mtok / price_output_per_mtok)"
                ))
                .unwrap_or_else(|| ", no prices given".into()),
            self.failed_tries,
            if self.failure_kinds.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.failure_kinds
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

/// `harmful` or `harmful/violence` (by category).
fn set_name(r: &ReportRow) -> String {
    match &r.category {
        Some(c) => format!("{}/{}", r.prompt_set, c),
        None => r.prompt_set.clone(),
    }
}

impl Display for StudyTable {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "study {} ({}); rates with Wilson 95% intervals; paired vs '{}' over the same prompts: refusal difference with a {}-resample bootstrap 95% interval, McNemar exact p (mid-p)",
            self.study,
            short(&self.hash),
            self.baseline,
            self.bootstrap
        )?;
        let rep = &self.rows;
        let wc = width(rep.iter().map(|r| r.condition.as_str()), 9);
        let ws = rep
            .iter()
            .map(|r| {
                r.prompt_set.len()
                    + r.category
                        .as_ref()
                        .map(|c| c.chars().count() + 1)
                        .unwrap_or(0)
            })
            .max()
            .unwrap_or(3)
            .max(3);
        writeln!(
            f,
            "{:<wc$}  {:<ws$}  {:>4}  {:<22}  {:<22}  {:<22}  {:>5}  {:<24}  McNemar p (mid-p)",
            "condition", "set", "n", "refusal", "bypass", "degenerate", "leak", "Δrefusal [95% CI]",
        )?;
        for r in rep {
            let (diff, p) = match &r.vs_baseline {
                None => ("-".to_string(), "-".to_string()),
                Some(v) if v.n_pairs == 0 => ("no pairs".into(), "-".into()),
                Some(v) => (
                    format!(
                        "{:+.1} [{:+.1}, {:+.1}]",
                        100.0 * v.diff.diff,
                        100.0 * v.diff.lo,
                        100.0 * v.diff.hi
                    ),
                    format!(
                        "{} ({})  b={} c={}",
                        pval(v.mcnemar.p_exact),
                        pval(v.mcnemar.p_mid),
                        v.mcnemar.b,
                        v.mcnemar.c
                    ),
                ),
            };
            writeln!(
                f,
                "{:<wc$}  {:<ws$}  {:>4}  {:<22}  {:<22}  {:<22}  {:>5.2}  {:<24}  {}",
                r.condition,
                set_name(r),
                r.n,
                pct(&r.refusal),
                pct(&r.bypass),
                pct(&r.degenerate),
                r.leakage_mean,
                diff,
                p
            )?;
        }
        let judged: Vec<&ReportRow> = rep.iter().filter(|r| !r.judges.is_empty()).collect();
        if judged.is_empty() {
            return writeln!(f, "judges: none ran (StrongREJECT and safety not judged; leak = rule-based leakage proxy)");
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<wc$}  {:<ws$}  {:<12}  {:>6}  {:>6}  {:>8}  {:<22}  {:>7}",
            "condition", "set", "judge", "judged", "failed", "SR score", "unsafe", "leakage"
        )?;
        for r in judged {
            for j in &r.judges {
                writeln!(
                    f,
                    "{:<wc$}  {:<ws$}  {:<12}  {:>6}  {:>6}  {:>8}  {:<22}  {:>7}",
                    r.condition,
                    set_name(r),
                    j.judge,
                    j.judged,
                    j.failed,
                    j.strongreject_mean
                        .map(|x| format!("{x:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    j.unsafe_rate
                        .as_ref()
                        .map(pct)
                        .unwrap_or_else(|| "-".into()),
                    j.leakage_mean
                        .map(|x| format!("{x:.2}"))
                        .unwrap_or_else(|| "-".into()),
                )?;
            }
        }
        Ok(())
    }
}

/// `k (p%)` of `n`.
fn share(k: usize, n: usize) -> String {
    format!("{} ({:.0}%)", k, 100.0 * k as f64 / (n as f64).max(1.0))
}

/// An output on one line, cut after 100 characters.
fn clip(t: &str) -> String {
    let t = t.trim().replace('\n', " ");
    match t.char_indices().nth(100) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t,
    }
}

impl Display for Comparison {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "A = {} ({}), B = {} ({}); pairs: same condition name, prompt and sample; refusal with Wilson 95%",
            self.a,
            short(&self.a_hash),
            self.b,
            short(&self.b_hash)
        )?;
        let w = width(self.conditions.iter().map(|c| c.condition.as_str()), 9);
        writeln!(
            f,
            "{:<w$}  {:>5}  {:<22}  {:<22}  {:>13}  {:>13}  McNemar p",
            "condition", "n", "refusal A", "refusal B", "labels agree", "same output"
        )?;
        for c in &self.conditions {
            writeln!(
                f,
                "{:<w$}  {:>5}  {:<22}  {:<22}  {:>13}  {:>13}  {}",
                c.condition,
                c.n,
                pct(&c.refusal_a),
                pct(&c.refusal_b),
                share(c.labels_agree, c.n),
                share(c.outputs_identical, c.n),
                pval(c.mcnemar.p_exact)
            )?;
        }
        if self.show == 0 {
            return Ok(());
        }
        writeln!(
            f,
            "\nlabels differ on {} pairs{}",
            self.disagreements_total,
            if self.disagreements_total > self.show {
                format!(" (first {})", self.show)
            } else {
                String::new()
            }
        )?;
        for d in &self.disagreements {
            writeln!(
                f,
                "{} / {} (sample {}):",
                d.condition, d.prompt_id, d.sample
            )?;
            writeln!(f, "  A {:<10} {:?}", d.label_a, clip(&d.output_a))?;
            writeln!(f, "  B {:<10} {:?}", d.label_b, clip(&d.output_b))?;
        }
        Ok(())
    }
}

impl Display for StudyOverview {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Local { spec, dtype } => writeln!(
                f,
                "study {} ({}), model {} ({})",
                self.name, self.hash, spec, dtype
            )?,
            Target::Endpoint {
                base_url,
                model,
                concurrency,
                requests_per_minute,
                tokens_per_minute,
            } => writeln!(
                f,
                "study {} ({}), endpoint {} model {} (black box: system prompts and sampling only; {} requests in flight{}{})",
                self.name,
                self.hash,
                base_url,
                model,
                concurrency,
                requests_per_minute
                    .map(|r| format!(", {r} requests/min"))
                    .unwrap_or_default(),
                tokens_per_minute
                    .map(|t| format!(", {t} tokens/min"))
                    .unwrap_or_default()
            )?,
        }
        for s in &self.prompt_sets {
            writeln!(
                f,
                "prompts {:<16} {:>5} prompts  {} (skip {}, set sha256 {})",
                s.name,
                s.prompts,
                s.source,
                s.skip,
                short(&s.hash)
            )?;
        }
        for c in &self.conditions {
            let who = match (&c.persona, c.system) {
                (Some(p), _) => format!("persona {p}; "),
                (None, true) => "system prompt; ".to_string(),
                (None, false) => String::new(),
            };
            writeln!(
                f,
                "condition {:<28} {}  {:>5} items  {}{}{}",
                c.name,
                short(&c.hash),
                c.items,
                who,
                if c.ops.is_empty() {
                    "no ops".to_string()
                } else {
                    c.ops.join("; ")
                },
                if c.baseline { "  (baseline)" } else { "" }
            )?;
        }
        for j in &self.judges {
            writeln!(
                f,
                "judge {} ({:?}{})",
                j.name,
                j.kind,
                j.mode
                    .as_deref()
                    .map(|m| format!(", {m}"))
                    .unwrap_or_default()
            )?;
        }
        writeln!(f, "{} work items", self.items)
    }
}

impl Display for RelabelSummary {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} rows labeled by {} in {:.1} s ({} labeled by it already): {} labels changed",
            self.relabeled, self.labeler, self.secs, self.skipped, self.changed
        )?;
        for st in &self.studies {
            writeln!(f, "study {} ({})", st.study, short(&st.hash))?;
            let wc = width(st.conditions.iter().map(|c| c.condition.as_str()), 9);
            let ws = width(st.conditions.iter().map(|c| c.prompt_set.as_str()), 3);
            writeln!(
                f,
                "  {:<wc$}  {:<ws$}  {:>5}  {:>7}  {:<24}  changes",
                "condition", "set", "n", "changed", "refusal before -> after"
            )?;
            for c in &st.conditions {
                let moves: Vec<String> = c
                    .transitions
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                writeln!(
                    f,
                    "  {:<wc$}  {:<ws$}  {:>5}  {:>7}  {:<24}  {}",
                    c.condition,
                    c.prompt_set,
                    c.n,
                    c.changed,
                    format!(
                        "{:.1}% -> {:.1}%",
                        100.0 * c.refusal_rate_before(),
                        100.0 * c.refusal_rate_after()
                    ),
                    if moves.is_empty() {
                        "-".to_string()
                    } else {
                        moves.join(", ")
                    }
                )?;
            }
        }
        Ok(())
    }
}
