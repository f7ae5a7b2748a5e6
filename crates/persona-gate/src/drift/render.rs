//! The drift report's forms: verdict lines (what `pgate drift` prints), a Markdown summary for a
//! pull request, a self-contained HTML page, and the JSON of every number.

use std::path::{Path, PathBuf};

use super::geometry::LayerRow;
use super::DriftReport;
use crate::{Error, Result};

fn f(x: Option<f64>, prec: usize) -> String {
    x.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

impl DriftReport {
    /// Verdict lines: the directions, the persona geometry, the persona-refusal coupling, the
    /// persona direction, the refusal selection when it fell back, one per mode.
    pub fn verdict_lines(&self) -> Vec<String> {
        let d = &self.directions;
        let mut out = vec![
            format!(
                "directions: refusal layer {} -> {}, cos(old, new) at layer {} {}, harmful prompts' projection on the old refusal direction shifts {}",
                d.refusal_layer_old,
                d.refusal_layer_new,
                d.refusal_layer_old,
                f(d.refusal_cos_at_layer, 3),
                f(d.refusal_proj_shift, 2)
            ),
            self.persona_line(),
            self.coupling_line(),
        ];
        if let Some((layer, c)) = d.persona_cos_min {
            out.push(format!(
                "persona direction: cos(old, new) >= {} {}, lowest {c:.2} at layer {layer}",
                super::compare::PERSONA_STABLE_COS,
                match d.persona_stable_through {
                    Some(l) => format!("through layer {l}"),
                    None => "at no layer from 0".into(),
                }
            ));
        }
        if d.new_selection_fell_back {
            out.push(format!(
                "refusal selection: no candidate of the new version induces refusal within the KL limit (the old version's did); its direction is taken at layer {}",
                d.refusal_layer_old
            ));
        }
        out.extend(self.modes.iter().map(|m| m.verdict_line()));
        out
    }

    /// The persona geometry verdict: the persona directions with both versions' refusal
    /// directions removed (see [`super::geometry`]).
    fn persona_line(&self) -> String {
        let d = &self.directions;
        let Some((layer, c)) = d.persona_off_refusal_min else {
            return "persona geometry: not measured (a report written before the persona split; recompute it with --from-report)".into();
        };
        let along = self
            .layers
            .get(layer)
            .and_then(|r| r.persona_change_along_refusal)
            .map(|s| {
                format!(
                    "; {:.0}% of the persona change there lies along refusal",
                    100.0 * s
                )
            })
            .unwrap_or_default();
        format!(
            "persona geometry: {}, persona off refusal cos(old, new) lowest {c:.3} at layer {layer}{} (threshold {}; both versions' refusal directions removed{along})",
            if d.persona_drifted { "drifted" } else { "no drift" },
            d.persona_off_refusal_below_from
                .map(|l| format!(", under the threshold from layer {l}"))
                .unwrap_or_default(),
            self.options.persona_min_cos,
        )
    }

    /// The persona-refusal coupling: cos(persona, refusal) within each version, its largest change.
    fn coupling_line(&self) -> String {
        let d = &self.directions;
        let at = self.layers.get(d.geometry_max_layer);
        format!(
            "persona-refusal coupling: {}, cos(persona, refusal) {} -> {} at layer {} (largest change {:.3}, threshold {})",
            if d.geometry_drifted { "drifted" } else { "no drift" },
            f(at.and_then(|r| r.geometry_old), 3),
            f(at.and_then(|r| r.geometry_new), 3),
            d.geometry_max_layer,
            d.geometry_max_change,
            self.options.geometry_threshold
        )
    }

    /// Plain text: what was compared, then the verdicts.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "drift {} -> {} on {} ({} labels)\n",
            self.old.model, self.new.model, self.prompt_set, self.labeler
        );
        if let Some(l) = self.recomputed_line() {
            s += &l;
            s.push('\n');
        }
        for l in self.verdict_lines() {
            s += &l;
            s.push('\n');
        }
        s
    }

    /// Says where the numbers of a `--from-report` run come from.
    fn recomputed_line(&self) -> Option<String> {
        self.options.from_report.as_ref().map(|d| {
            format!(
                "direction verdicts recomputed from the saved run in {} (directions re-read; answers, labels and projections are that run's)",
                d.display()
            )
        })
    }

    /// Markdown summary: verdicts, the rate table, the per-layer table.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# Persona drift: `{}` -> `{}`\n\nPrompts: {} (greedy, {} new tokens); labels: {} \
             (rules v2, 96.9% agreement with careful labels on the held split). Intervals: paired \
             bootstrap 95% ({} resamples, seed {}) of the new - old refusal rate over the same \
             prompts; McNemar exact p.\n\n## Verdicts\n\n",
            self.old.source,
            self.new.source,
            self.prompt_set,
            self.options.max_tokens,
            self.labeler,
            super::compare::BOOT_REPS,
            super::compare::BOOT_SEED
        );
        if let Some(l) = self.recomputed_line() {
            s += &format!("{l}.\n\n");
        }
        for l in self.verdict_lines() {
            s += &format!("- {l}\n");
        }
        s += "\n## Rates per mode\n\n| mode | n | refusal old | refusal new | change (pp) [95%] | bypass old | bypass new | degenerate old | degenerate new | McNemar p | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
        for m in &self.modes {
            let d = &m.refusal_change;
            s += &format!(
                "| {} | {} | {} | {} | {:+.1} [{:+.1}, {:+.1}] | {} | {} | {} | {} | {:.3} | {} |\n",
                m.mode,
                m.n,
                m.refusal_old,
                m.refusal_new,
                100.0 * d.diff,
                100.0 * d.lo,
                100.0 * d.hi,
                m.bypass_old,
                m.bypass_new,
                m.degenerate_old,
                m.degenerate_new,
                m.mcnemar.p_exact,
                if m.drifted { "**drifted**" } else { "no drift" }
            );
        }
        s += &format!(
            "\n## Directions per layer\n\nRefusal layer: old {}, new {}. Persona off refusal: cos(old, \
             new) of the persona directions with both versions' refusal directions at that layer \
             removed; along refusal: share of the persona change inside that span. Projections: mean \
             last-token activation of harmful prompts on the **old** version's unit directions.\n\n",
            self.old.refusal_layer, self.new.refusal_layer
        );
        s += "| layer | cos refusal old/new | cos persona old/new | persona off refusal | along refusal | cos(persona, refusal) old | new | refusal proj old | new | persona proj old | new |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &self.layers {
            s += &layer_md(r);
        }
        s
    }

    /// A self-contained HTML page (no scripts, no external resources).
    pub fn to_html(&self) -> String {
        let md = self.to_markdown();
        let mut body = String::new();
        let mut in_table = false;
        for line in md.lines() {
            if line.starts_with('|') {
                if line.starts_with("|---") {
                    continue;
                }
                if !in_table {
                    body += "<table>\n";
                    in_table = true;
                }
                let cells: Vec<String> = line
                    .trim_matches('|')
                    .split('|')
                    .map(|c| format!("<td>{}</td>", esc(c.trim()).replace("**", "")))
                    .collect();
                let cls = if line.contains("**drifted**") {
                    " class=\"drift\""
                } else {
                    ""
                };
                body += &format!("<tr{cls}>{}</tr>\n", cells.join(""));
                continue;
            }
            if in_table {
                body += "</table>\n";
                in_table = false;
            }
            if let Some(h) = line.strip_prefix("# ") {
                body += &format!("<h1>{}</h1>\n", esc(h).replace('`', ""));
            } else if let Some(h) = line.strip_prefix("## ") {
                body += &format!("<h2>{}</h2>\n", esc(h));
            } else if let Some(li) = line.strip_prefix("- ") {
                let cls = if li.contains(": drifted") {
                    " class=\"drift\""
                } else {
                    ""
                };
                body += &format!("<p{cls}>{}</p>\n", esc(li));
            } else if !line.trim().is_empty() {
                body += &format!("<p>{}</p>\n", esc(line).replace("**", ""));
            }
        }
        if in_table {
            body += "</table>\n";
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>pgate drift</title><style>\
             body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}\
             td{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}.drift{{background:#fde2e2;font-weight:bold}}\
             </style></head><body>\n{body}</body></html>\n"
        )
    }

    /// Write `drift.json`, `summary.md` and `report.html` into `dir`; the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let files = [
            ("drift.json", serde_json::to_string_pretty(self)?),
            ("summary.md", self.to_markdown()),
            ("report.html", self.to_html()),
        ];
        let mut out = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            out.push(p);
        }
        Ok(out)
    }
}

fn layer_md(r: &LayerRow) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        r.layer,
        f(r.refusal_cos, 3),
        f(r.persona_cos, 3),
        f(r.persona_off_refusal_cos, 3),
        f(r.persona_change_along_refusal, 2),
        f(r.geometry_old, 3),
        f(r.geometry_new, 3),
        f(r.refusal_proj_old, 2),
        f(r.refusal_proj_new, 2),
        f(r.persona_proj_old, 2),
        f(r.persona_proj_new, 2)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
