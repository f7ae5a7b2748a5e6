//! The study report: one self-contained HTML file (inline CSS, inline SVG, a few lines of inline
//! JavaScript for the example table's filter; nothing fetched) drawn from a study's receipts and
//! result rows.
//!
//! Plots, each an `<svg class="plot">` with a `data-plot` id:
//! - `labels-SET`: refusal / bypass / degenerate stacked bars per condition;
//! - `coeff-SET`: refusal against the steering coefficient (conditions with one `add` op that
//!   differ only in its coefficient, with the baseline at 0);
//! - `readd-SET`: refusal against the layer where the refusal direction is added back (conditions
//!   whose last op adds a `refusal` direction at one layer, grouped by the ops before it);
//! - `window-SET`: refusal per project-out window (conditions whose last op is `ablate`), the
//!   persona direction and the random-direction control side by side;
//! - `cosine`: cosine(direction, refusal direction) at every layer, for every other direction
//!   file of the study (heatmap);
//! - `category-SET`: refusal per prompt category and condition (heatmap).
//!
//! A plot that does not apply to the study (no sweep of that kind) is replaced by a sentence saying
//! why, never drawn empty.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::json;

use super::receipt::{labels_line, Bundle, OpRecord, Receipt};
use super::svg::{self, esc, Pt, RefLine, Series, StackRow};
use crate::eval::Rate;
use crate::study::store::RowView;

/// Cosines of each direction with the refusal direction, per layer.
#[derive(Debug, Clone)]
pub struct CosineMap {
    pub refusal: String,
    /// (direction name, role, cosine per layer)
    pub rows: Vec<(String, String, Vec<Option<f64>>)>,
}

/// What the report is drawn from.
pub struct ReportInput<'a> {
    pub bundle: &'a Bundle,
    pub receipts: &'a [Receipt],
    pub rows: &'a [RowView],
    pub cosines: Option<CosineMap>,
    /// Why there is no cosine map (shown instead of the plot).
    pub cosine_note: Option<String>,
}

fn pt(r: &Rate, x: f64) -> Pt {
    Pt {
        x,
        y: r.p,
        lo: r.lo,
        hi: r.hi,
    }
}

fn pct(r: &Rate) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * r.p,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

fn ops_key(ops: &[OpRecord]) -> String {
    serde_json::to_string(
        &ops.iter()
            .map(|o| {
                json!([
                    o.field,
                    o.identity,
                    o.coeff,
                    o.raw,
                    o.lo,
                    o.hi,
                    o.pick,
                    o.layers,
                    o.positions
                ])
            })
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default()
}

fn layers_text(l: &[usize]) -> String {
    match (l.first(), l.last()) {
        (Some(a), Some(b)) if l.len() > 1 && b - a + 1 == l.len() => format!("{a}-{b}"),
        _ => l
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The prompt sets of the study, in order of first appearance, with their family.
fn sets(receipts: &[Receipt]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for r in receipts {
        for s in &r.results {
            if !out.iter().any(|(n, _)| n == &s.prompt_set) {
                out.push((s.prompt_set.clone(), s.family.clone()));
            }
        }
    }
    out
}

/// One rendered plot (or the reason it does not apply).
pub struct Figure {
    pub id: String,
    pub title: String,
    pub svg: Option<String>,
    pub caption: String,
}

fn baseline(receipts: &[Receipt]) -> Option<&Receipt> {
    receipts.iter().find(|r| r.condition.is_baseline)
}

pub fn fig_labels(receipts: &[Receipt], set: &str) -> Figure {
    let rows: Vec<StackRow> = receipts
        .iter()
        .filter_map(|r| r.set(set).map(|s| (r, s)))
        .map(|(r, s)| StackRow {
            label: r.condition.name.clone(),
            parts: [s.refusal.p, s.bypass.p, s.degenerate.p],
            n: s.n,
        })
        .collect();
    let title = format!("Labels per condition: {set}");
    Figure {
        id: format!("labels-{set}"),
        svg: (!rows.is_empty()).then(|| {
            svg::stacked_bars(
                &format!("labels-{set}"),
                &title,
                &rows,
                ["refusal", "bypass", "degenerate"],
            )
        }),
        title,
        caption: "Share of outputs labelled refusal, bypass and degenerate by the documented rules (README, Labels).".into(),
    }
}

pub fn fig_coeff(receipts: &[Receipt], set: &str) -> Figure {
    let base = baseline(receipts);
    let mut groups: BTreeMap<String, (String, Vec<Pt>)> = BTreeMap::new();
    for r in receipts {
        let [o] = r.condition.ops.as_slice() else {
            continue;
        };
        let (Some(c), "add", false) = (o.coeff, o.field.as_str(), o.raw) else {
            continue;
        };
        let Some(s) = r.set(set) else { continue };
        let key = serde_json::to_string(&json!([
            r.condition.system_prompt,
            o.identity,
            o.layers,
            o.positions,
            o.pick
        ]))
        .unwrap_or_default();
        let name = format!("{} @ {}", o.direction, layers_text(&o.layers));
        let e = groups.entry(key).or_insert_with(|| (name, Vec::new()));
        e.1.push(pt(&s.refusal, c));
    }
    let mut series = Vec::new();
    for (_, (name, mut pts)) in groups {
        if let Some(b) = base.and_then(|b| b.set(set)) {
            pts.push(pt(&b.refusal, 0.0));
        }
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        pts.dedup_by(|a, b| a.x == b.x);
        if pts.len() >= 2 {
            series.push(Series { name, points: pts });
        }
    }
    let title = format!("Refusal vs steering coefficient: {set}");
    let id = format!("coeff-{set}");
    Figure {
        svg: (!series.is_empty()).then(|| {
            svg::line_chart(&id, &title, "steering coefficient (unit direction x coeff; 0 = baseline)", "refusal rate", &series, &[])
        }),
        id,
        title,
        caption: "Conditions with one `add` op that differ only in its coefficient; the baseline is drawn at 0. Bars: Wilson 95% intervals.".into(),
    }
}

pub fn fig_readd(receipts: &[Receipt], set: &str) -> Figure {
    let base = baseline(receipts);
    let mut groups: BTreeMap<String, (String, Vec<Pt>)> = BTreeMap::new();
    for r in receipts {
        let Some((last, before)) = r.condition.ops.split_last() else {
            continue;
        };
        if last.role != "refusal" || !last.field.starts_with("add") || last.layers.len() != 1 {
            continue;
        }
        let Some(s) = r.set(set) else { continue };
        let key = format!("{:?}\u{1f}{}", r.condition.system_prompt, ops_key(before));
        let base_name = receipts
            .iter()
            .find(|b| {
                b.condition.system_prompt == r.condition.system_prompt
                    && ops_key(&b.condition.ops) == ops_key(before)
            })
            .map(|b| b.condition.name.clone())
            .unwrap_or_else(|| {
                before
                    .iter()
                    .map(|o| o.spec.clone())
                    .collect::<Vec<_>>()
                    .join(" + ")
            });
        let e = groups
            .entry(key)
            .or_insert_with(|| (format!("{} + {}", base_name, last.direction), Vec::new()));
        e.1.push(pt(&s.refusal, last.layers[0] as f64));
    }
    let mut refs = Vec::new();
    if let Some(b) = base.and_then(|b| b.set(set)) {
        refs.push(RefLine {
            name: "baseline".into(),
            y: b.refusal.p,
            dash: "6 4",
        });
    }
    // The condition the refusal direction is added to (first group).
    if let Some(r) = receipts.iter().find(|r| {
        r.condition.ops.split_last().is_some_and(|(l, _)| {
            l.role == "refusal" && l.field.starts_with("add") && l.layers.len() == 1
        })
    }) {
        let before = &r.condition.ops[..r.condition.ops.len() - 1];
        if let Some(b) = receipts.iter().find(|b| {
            !before.is_empty()
                && b.condition.system_prompt == r.condition.system_prompt
                && ops_key(&b.condition.ops) == ops_key(before)
        }) {
            if let Some(s) = b.set(set) {
                refs.push(RefLine {
                    name: b.condition.name.clone(),
                    y: s.refusal.p,
                    dash: "2 3",
                });
            }
        }
    }
    let series: Vec<Series> = groups
        .into_values()
        .map(|(name, points)| Series { name, points })
        .collect();
    let title = format!("Refusal vs layer where the refusal direction is re-added: {set}");
    let id = format!("readd-{set}");
    Figure {
        svg: (!series.is_empty()).then(|| svg::line_chart(&id, &title, "layer (0 = first block)", "refusal rate", &series, &refs)),
        id,
        title,
        caption: "Conditions whose last op adds the refusal direction at one layer, by layer: early against late. Dashed: the baseline; dotted: the same condition without the refusal direction.".into(),
    }
}

pub fn fig_window(receipts: &[Receipt], set: &str) -> Figure {
    let base = baseline(receipts);
    let mut cats: Vec<String> = Vec::new();
    // series name -> window -> rate
    let mut series_map: BTreeMap<(u8, String), BTreeMap<String, Rate>> = BTreeMap::new();
    let mut base_cond: Option<String> = None;
    for r in receipts {
        let Some((last, before)) = r.condition.ops.split_last() else {
            continue;
        };
        if last.field != "ablate" {
            continue;
        }
        let Some(s) = r.set(set) else { continue };
        let w = layers_text(&last.layers);
        if !cats.contains(&w) {
            cats.push(w.clone());
        }
        let base_name = receipts
            .iter()
            .find(|b| {
                b.condition.system_prompt == r.condition.system_prompt
                    && ops_key(&b.condition.ops) == ops_key(before)
            })
            .map(|b| b.condition.name.clone());
        if base_cond.is_none() {
            base_cond = base_name;
        }
        let order = if last.role == "random" { 1 } else { 0 };
        let name = format!(
            "{} ({})",
            last.direction,
            if last.role == "random" {
                "random control"
            } else {
                last.role.as_str()
            }
        );
        series_map
            .entry((order, name))
            .or_default()
            .insert(w, s.refusal);
    }
    cats.sort_by_key(|c| {
        c.split(['-', ','])
            .next()
            .and_then(|x| x.parse::<usize>().ok())
            .unwrap_or(0)
    });
    let series: Vec<(String, Vec<Option<Pt>>)> = series_map
        .into_iter()
        .map(|((_, name), m)| {
            (
                name,
                cats.iter().map(|c| m.get(c).map(|r| pt(r, 0.0))).collect(),
            )
        })
        .collect();
    let mut refs = Vec::new();
    if let Some(b) = base.and_then(|b| b.set(set)) {
        refs.push(RefLine {
            name: "baseline".into(),
            y: b.refusal.p,
            dash: "6 4",
        });
    }
    if let Some(bc) = base_cond.and_then(|n| receipts.iter().find(|r| r.condition.name == n)) {
        if !bc.condition.is_baseline {
            if let Some(s) = bc.set(set) {
                refs.push(RefLine {
                    name: bc.condition.name.clone(),
                    y: s.refusal.p,
                    dash: "2 3",
                });
            }
        }
    }
    let title = format!("Refusal per project-out window, with the random-direction control: {set}");
    let id = format!("window-{set}");
    Figure {
        svg: (!series.is_empty()).then(|| svg::grouped_bars(&id, &title, "layers the direction is projected out of", "refusal rate", &cats, &series, &refs)),
        id,
        title,
        caption: "Conditions whose last op projects a direction out of a window of layers; the persona direction and a random direction over the same window side by side. Dashed: the baseline; dotted: the condition without the projection.".into(),
    }
}

pub fn fig_cosine(c: Option<&CosineMap>, note: Option<&str>) -> Figure {
    let title = match c {
        Some(c) => format!("cosine(direction, {}) per layer", c.refusal),
        None => "cosine(persona, refusal) per layer".into(),
    };
    let svg = c.filter(|c| !c.rows.is_empty()).map(|c| {
        let n = c.rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
        let cols: Vec<String> = (0..n).map(|l| l.to_string()).collect();
        let rows: Vec<String> = c
            .rows
            .iter()
            .map(|(n, role, _)| format!("{n} ({role})"))
            .collect();
        let vals: Vec<Vec<Option<f64>>> = c.rows.iter().map(|r| r.2.clone()).collect();
        let m = vals
            .iter()
            .flatten()
            .flatten()
            .fold(0.1f64, |a, v| a.max(v.abs()));
        svg::heatmap("cosine", &title, &rows, &cols, &vals, -m, m, None, "layer")
    });
    Figure {
        id: "cosine".into(),
        title,
        caption: note.map(str::to_string).unwrap_or_else(|| "Cosine similarity of each direction file of the study with the refusal direction at the same layer (red: aligned, blue: opposed). Random controls should stay near 0.".into()),
        svg,
    }
}

pub fn fig_category(receipts: &[Receipt], set: &str) -> Figure {
    let mut cats: Vec<String> = Vec::new();
    for r in receipts {
        if let Some(s) = r.set(set) {
            for c in &s.by_category {
                if !cats.contains(&c.category) {
                    cats.push(c.category.clone());
                }
            }
        }
    }
    cats.sort();
    let with: Vec<&Receipt> = receipts.iter().filter(|r| r.set(set).is_some()).collect();
    let rows: Vec<String> = with.iter().map(|r| r.condition.name.clone()).collect();
    let mut vals = Vec::new();
    let mut texts = Vec::new();
    for r in &with {
        let s = r.set(set).expect("filtered");
        let mut v = Vec::new();
        let mut t = Vec::new();
        for c in &cats {
            match s.by_category.iter().find(|x| &x.category == c) {
                Some(x) => {
                    v.push(Some(x.refusal.p));
                    t.push(format!("{}/{}", x.refusal.k, x.n));
                }
                None => {
                    v.push(None);
                    t.push(String::new());
                }
            }
        }
        vals.push(v);
        texts.push(t);
    }
    let title = format!("Refusal per category: {set}");
    let id = format!("category-{set}");
    let has = !cats.is_empty() && (cats.len() != 1 || cats[0] != "(none)");
    Figure {
        svg: has.then(|| svg::heatmap(&id, &title, &rows, &cats, &vals, 0.0, 1.0, Some(&texts), "prompt category")),
        id,
        title,
        caption: "Refusals / prompts per category of the prompt set; colour: refusal rate (white 0%, blue 100%).".into(),
    }
}

/// Every figure of the report, in order.
pub fn figures(input: &ReportInput<'_>) -> Vec<Figure> {
    let rs = input.receipts;
    let all_sets = sets(rs);
    let mut out = Vec::new();
    for (s, _) in &all_sets {
        out.push(fig_labels(rs, s));
    }
    let harmful: Vec<&String> = all_sets
        .iter()
        .filter(|(_, f)| f == "harmful")
        .map(|(s, _)| s)
        .collect();
    for s in &harmful {
        out.push(fig_coeff(rs, s));
    }
    for s in &harmful {
        out.push(fig_readd(rs, s));
    }
    for s in &harmful {
        out.push(fig_window(rs, s));
    }
    out.push(fig_cosine(
        input.cosines.as_ref(),
        input.cosine_note.as_deref(),
    ));
    for s in &harmful {
        out.push(fig_category(rs, s));
    }
    out
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1100px;color:#1a202c;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.meta{color:#4a5568;font-size:13px}.meta code{font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #e2e8f0;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f7fafc}td.num{text-align:right;white-space:nowrap}
figure{margin:16px 0}figcaption{color:#4a5568;font-size:13px;max-width:760px}
.na{color:#718096;font-style:italic;border:1px dashed #cbd5e0;padding:8px;max-width:740px}
.lab-refusal{color:#2b6cb0;font-weight:600}.lab-bypass{color:#c05621;font-weight:600}.lab-degenerate{color:#718096;font-weight:600}
#examples td.out{white-space:pre-wrap;max-width:520px;font-family:ui-monospace,monospace;font-size:12px}
#examples td.prompt{max-width:260px}
.filters{display:flex;gap:8px;flex-wrap:wrap;margin:8px 0}.filters input,.filters select{font-size:13px;padding:3px}
"#;

const JS: &str = r#"
(function(){
  var q=document.getElementById('f-text'),c=document.getElementById('f-cond'),l=document.getElementById('f-label'),s=document.getElementById('f-set'),n=document.getElementById('f-count');
  var rows=Array.prototype.slice.call(document.querySelectorAll('#examples tbody tr'));
  function apply(){
    var t=q.value.toLowerCase(),shown=0;
    rows.forEach(function(r){
      var ok=(!c.value||r.dataset.cond===c.value)&&(!l.value||r.dataset.label===l.value)&&(!s.value||r.dataset.set===s.value)&&(!t||r.textContent.toLowerCase().indexOf(t)>=0);
      r.style.display=ok?'':'none'; if(ok)shown++;
    });
    n.textContent=shown+' of '+rows.length+' rows';
  }
  [q,c,l,s].forEach(function(e){e.addEventListener('input',apply);e.addEventListener('change',apply);});
  apply();
})();
"#;

/// Render the report: the page head with the study's provenance, then its sections in order.
pub fn render_html(input: &ReportInput<'_>) -> String {
    let mut h = String::new();
    write_head(&mut h, input);
    write_summary(&mut h, input.receipts);
    write_plots(&mut h, input);
    write_conditions(&mut h, input.receipts);
    write_examples(&mut h, input.rows);
    let _ = writeln!(h, "<script>{JS}</script></body></html>");
    h
}

/// The document head, the title and the provenance lines (study, model, policy, software,
/// generation settings, intervals, labelers) read from the first receipt.
fn write_head(h: &mut String, input: &ReportInput<'_>) {
    let b = input.bundle;
    let rs = input.receipts;
    let title = format!("persona-gate report: {}", b.study.name);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{CSS}</style></head><body>",
        esc(&title)
    );
    let _ = write!(h, "<h1>{}</h1>", esc(&title));
    if let Some(r) = rs.first() {
        let m = &r.model;
        let _ = write!(
            h,
            "<p class=\"meta\">study <code>{}</code> ({}) · model {} ({}, {}, dtype {}, sha256 <code>{}</code>) · policy {} · pgate {} commit <code>{}</code>{} · receipts written {}</p>",
            esc(&b.study.hash[..12.min(b.study.hash.len())]),
            esc(b.study.file.as_deref().unwrap_or("-")),
            esc(&m.name),
            esc(&m.spec),
            esc(&m.architecture),
            esc(&m.dtype_label()),
            esc(m.files.first().map(|f| &f.sha256[..16.min(f.sha256.len())]).unwrap_or("-")),
            esc(&b.policy_version),
            esc(&b.software.version),
            esc(b.software.git_commit.as_deref().map(|c| &c[..12.min(c.len())]).unwrap_or("unknown")),
            if b.software.git_dirty == Some(true) { " (with uncommitted changes)" } else { "" },
            esc(&b.created_at)
        );
        let g = &r.generation;
        let _ = write!(
            h,
            "<p class=\"meta\">generation: {} new tokens max, temperature {}, top-p {}, seed {}, {} sample(s) per prompt · intervals: Wilson 95% for rates, paired bootstrap ({} resamples) for differences</p>",
            g.max_new_tokens, g.temperature, g.top_p, g.seed, g.samples,
            r.stats.get("bootstrap").and_then(|v| v.as_u64()).unwrap_or(0)
        );
        let _ = write!(h, "<p class=\"meta\">{}</p>", esc(&labels_line(rs)));
    }
}

/// The summary table: rates per condition and prompt set, the paired difference with the baseline,
/// McNemar, benign refusal and the random-direction controls.
fn write_summary(h: &mut String, rs: &[Receipt]) {
    h.push_str("<h2>Summary</h2><table><thead><tr><th>condition</th><th>prompt set</th><th>n</th><th>refusal</th><th>bypass</th><th>degenerate</th><th>Δ refusal vs baseline [95% CI]</th><th>McNemar p</th><th>benign refusal</th><th>controls</th></tr></thead><tbody>");
    for r in rs {
        for s in &r.results {
            let (d, p) = match &s.vs_baseline {
                Some(v) if v.n_pairs > 0 => (
                    format!(
                        "{:+.1} [{:+.1}, {:+.1}]",
                        100.0 * v.diff.diff,
                        100.0 * v.diff.lo,
                        100.0 * v.diff.hi
                    ),
                    format!("{:.3}", v.mcnemar.p_exact),
                ),
                _ => ("-".into(), "-".into()),
            };
            let ctl: Vec<String> = r
                .controls
                .random_direction
                .iter()
                .filter_map(|c| {
                    c.sets
                        .iter()
                        .find(|x| x.prompt_set == s.prompt_set)
                        .map(|x| {
                            format!(
                                "vs {} {}{}",
                                c.condition,
                                pct(&x.refusal),
                                x.diff
                                    .map(|d| format!(", Δ {:+.1}", 100.0 * d.diff))
                                    .unwrap_or_default()
                            )
                        })
                })
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}{}</td><td>{} ({})</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&r.condition.name),
                if r.condition.is_baseline { " <em>(baseline)</em>" } else { "" },
                esc(&s.prompt_set),
                esc(&s.family),
                s.n,
                pct(&s.refusal),
                pct(&s.bypass),
                pct(&s.degenerate),
                d,
                p,
                r.benign_refusal.as_ref().map(pct).unwrap_or_else(|| "-".into()),
                esc(&ctl.join("; "))
            );
        }
    }
    h.push_str("</tbody></table>");
    let judged = rs.iter().any(|r| {
        r.results
            .iter()
            .any(|s| s.strongreject.is_some() || s.unsafe_rate.is_some())
    });
    if !judged {
        h.push_str("<p class=\"meta\">StrongREJECT score and unsafe rate: not judged (no model judge ran; see the receipts' <code>judges</code>). Leakage below is the rule-based proxy.</p>");
    }
}

/// Every figure, or a note saying it does not apply to this study.
fn write_plots(h: &mut String, input: &ReportInput<'_>) {
    h.push_str("<h2>Plots</h2>");
    for f in figures(input) {
        let _ = write!(h, "<figure id=\"fig-{}\">", esc(&f.id));
        match &f.svg {
            Some(s) => h.push_str(s),
            None => {
                let _ = write!(
                    h,
                    "<div class=\"na\" data-plot-missing=\"{}\"><strong>{}</strong>: not applicable to this study.</div>",
                    esc(&f.id),
                    esc(&f.title)
                );
            }
        }
        let _ = write!(h, "<figcaption>{}</figcaption></figure>", esc(&f.caption));
    }
}

/// The conditions table: hash, system prompt, intervention ops, receipt hash.
fn write_conditions(h: &mut String, rs: &[Receipt]) {
    h.push_str("<h2>Conditions</h2><table><thead><tr><th>condition</th><th>hash</th><th>system prompt</th><th>ops</th><th>receipt sha256</th></tr></thead><tbody>");
    for r in rs {
        let ops: Vec<String> = r
            .condition
            .ops
            .iter()
            .map(|o| format!("{} {} ({})", o.field, o.spec, o.role))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&r.condition.name),
            esc(&r.condition.hash[..12.min(r.condition.hash.len())]),
            esc(r.condition.system_prompt.as_deref().unwrap_or("(template default)")),
            esc(&if ops.is_empty() { "none".to_string() } else { ops.join("; ") }),
            esc(&r.receipt_sha256[..16.min(r.receipt_sha256.len())])
        );
    }
    h.push_str("</tbody></table>");
}

/// The example outputs with their filters (condition, prompt set, label, text).
fn write_examples(h: &mut String, rows: &[RowView]) {
    let mut conds: Vec<&str> = Vec::new();
    let mut set_names: Vec<&str> = Vec::new();
    for r in rows {
        if !conds.contains(&r.condition.as_str()) {
            conds.push(&r.condition);
        }
        if !set_names.contains(&r.prompt_set.as_str()) {
            set_names.push(&r.prompt_set);
        }
    }
    let opt = |v: &[&str]| -> String {
        v.iter()
            .map(|x| format!("<option value=\"{0}\">{0}</option>", esc(x)))
            .collect()
    };
    let _ = write!(
        h,
        "<h2>Example outputs</h2><div class=\"filters\"><input id=\"f-text\" type=\"search\" placeholder=\"filter text\"><select id=\"f-cond\"><option value=\"\">all conditions</option>{}</select><select id=\"f-set\"><option value=\"\">all prompt sets</option>{}</select><select id=\"f-label\"><option value=\"\">all labels</option>{}</select><span id=\"f-count\" class=\"meta\"></span></div>",
        opt(&conds),
        opt(&set_names),
        opt(&["refusal", "bypass", "degenerate"])
    );
    h.push_str("<table id=\"examples\"><thead><tr><th>condition</th><th>set</th><th>category</th><th>prompt</th><th>output</th><th>label</th></tr></thead><tbody>");
    for r in rows {
        let _ = write!(
            h,
            "<tr data-cond=\"{}\" data-set=\"{}\" data-label=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"prompt\">{}</td><td class=\"out\">{}</td><td class=\"lab-{}\">{}</td></tr>",
            esc(&r.condition),
            esc(&r.prompt_set),
            esc(&r.label),
            esc(&r.condition),
            esc(&r.prompt_set),
            esc(r.category.as_deref().unwrap_or("")),
            esc(&r.prompt),
            esc(r.output.trim()),
            esc(&r.label),
            esc(&r.label)
        );
    }
    h.push_str("</tbody></table>");
}
