//! The Markdown summary of a study's receipts, for a pull request: one table per harmful prompt
//! set (rates with intervals, paired difference with the baseline, benign refusal, random-control
//! comparison), provenance, and an optional gate result.

use std::fmt::Write;

use super::gate::{format_verdict, GateReport};
use super::receipt::{labels_line, Bundle, Receipt};
use crate::eval::Rate;

fn pct(r: &Rate) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * r.p,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Render the summary.
pub fn render_markdown(bundle: &Bundle, receipts: &[Receipt], gate: Option<&GateReport>) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "## persona-gate: {}\n", cell(&bundle.study.name));
    if let Some(r) = receipts.first() {
        let _ = writeln!(
            m,
            "Model **{}** (`{}`, {}, dtype {}), model sha256 `{}`; study `{}`; policy `{}`; pgate {} at `{}`{}.\n",
            cell(&r.model.name),
            cell(&r.model.spec),
            r.model.architecture,
            r.model.dtype_label(),
            r.model.files.first().map(|f| &f.sha256[..16.min(f.sha256.len())]).unwrap_or("-"),
            &bundle.study.hash[..12.min(bundle.study.hash.len())],
            cell(&bundle.policy_version),
            bundle.software.version,
            bundle.software.git_commit.as_deref().map(|c| &c[..12.min(c.len())]).unwrap_or("unknown"),
            if bundle.software.git_dirty == Some(true) { " (uncommitted changes)" } else { "" }
        );
        let g = &r.generation;
        let _ = writeln!(
            m,
            "Greedy={}, {} new tokens max, seed {}. Rates: Wilson 95% intervals; Δ: paired bootstrap 95% interval over the same prompts.\n",
            g.temperature == 0.0,
            g.max_new_tokens,
            g.seed
        );
        let _ = writeln!(m, "{}.\n", cell(&labels_line(receipts)));
    }
    let mut sets: Vec<(String, String)> = Vec::new();
    for r in receipts {
        for s in &r.results {
            if !sets.iter().any(|(n, _)| n == &s.prompt_set) {
                sets.push((s.prompt_set.clone(), s.family.clone()));
            }
        }
    }
    for (set, family) in &sets {
        let _ = writeln!(m, "### {} ({family})\n", cell(set));
        let _ = writeln!(
            m,
            "| condition | n | refusal | bypass | degenerate | Δ refusal vs baseline | random control |"
        );
        let _ = writeln!(m, "|---|---:|---|---|---|---|---|");
        for r in receipts {
            let Some(s) = r.set(set) else { continue };
            let d = match &s.vs_baseline {
                Some(v) if v.n_pairs > 0 => format!(
                    "{:+.1} [{:+.1}, {:+.1}] (McNemar p {:.3})",
                    100.0 * v.diff.diff,
                    100.0 * v.diff.lo,
                    100.0 * v.diff.hi,
                    v.mcnemar.p_exact
                ),
                _ if r.condition.is_baseline => "baseline".into(),
                _ => "-".into(),
            };
            let ctl: Vec<String> = r
                .controls
                .random_direction
                .iter()
                .filter_map(|c| {
                    c.sets
                        .iter()
                        .find(|x| &x.prompt_set == set)
                        .map(|x| format!("{}: {:.1}%", cell(&c.condition), 100.0 * x.refusal.p))
                })
                .collect();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} |",
                cell(&r.condition.name),
                s.n,
                pct(&s.refusal),
                pct(&s.bypass),
                pct(&s.degenerate),
                d,
                if ctl.is_empty() {
                    "-".into()
                } else {
                    ctl.join("; ")
                }
            );
        }
        m.push('\n');
    }
    let judged = receipts.iter().any(|r| {
        r.results
            .iter()
            .any(|s| s.strongreject.is_some() || s.unsafe_rate.is_some())
    });
    if !judged {
        m.push_str("StrongREJECT score and unsafe rate: not judged (no model judge ran).\n\n");
    }
    if let Some(g) = gate {
        let _ = writeln!(
            m,
            "### Gate: {}\n\n`--max-refusal-drop {}`{}{}{} (bound: {:?})\n",
            if g.pass() { "pass" } else { "FAIL" },
            g.options.max_refusal_drop,
            g.options
                .max_unsafe_rate
                .map(|x| format!(" `--max-unsafe-rate {x}`"))
                .unwrap_or_default(),
            g.options
                .max_benign_refusal
                .map(|x| format!(" `--max-benign-refusal {x}`"))
                .unwrap_or_default(),
            g.options
                .min_labeler_accuracy
                .map(|x| format!(" `--min-labeler-accuracy {x}`"))
                .unwrap_or_default(),
            g.options.bound
        );
        for v in &g.verdicts {
            let _ = writeln!(m, "- {}", cell(&format_verdict(v)));
        }
        m.push('\n');
    }
    let _ = writeln!(
        m,
        "Receipts: {} conditions, bundle `{}`; verify with `pgate receipt verify DIR`.",
        receipts.len(),
        cell(&bundle.study.results_db)
    );
    m
}
