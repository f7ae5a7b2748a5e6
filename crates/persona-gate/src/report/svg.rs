//! Hand-written SVG charts for the report: stacked bars, lines with interval bars, grouped bars
//! and heatmaps. No dependencies and no scripts: each function returns one `<svg>` element with
//! `class="plot"` and a `data-plot` id, so the report's test can find every plot in the DOM.

use std::fmt::Write;

/// Label colours: refusal, bypass, degenerate.
pub const LABEL_COLORS: [&str; 3] = ["#2b6cb0", "#dd6b20", "#a0aec0"];
/// Series colours (colour-blind safe, Okabe-Ito).
pub const SERIES: [&str; 8] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000",
];

/// Escape text for SVG / HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn open(id: &str, w: f64, h: f64, title: &str) -> String {
    format!(
        r##"<svg class="plot" data-plot="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{}" font-family="system-ui, sans-serif" font-size="12"><title>{}</title><rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##,
        esc(id),
        esc(title),
        esc(title)
    )
}

fn text(s: &mut String, x: f64, y: f64, anchor: &str, extra: &str, t: &str) {
    let _ = write!(
        s,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" {extra}>{}</text>"#,
        esc(t)
    );
}

fn truncate(t: &str, n: usize) -> String {
    if t.chars().count() <= n {
        t.to_string()
    } else {
        let s: String = t.chars().take(n.saturating_sub(1)).collect();
        format!("{s}…")
    }
}

/// One bar of a stacked-bar chart: label, fractions (refusal, bypass, degenerate), n.
pub struct StackRow {
    pub label: String,
    pub parts: [f64; 3],
    pub n: usize,
}

/// Horizontal 100% stacked bars, one per row.
pub fn stacked_bars(id: &str, title: &str, rows: &[StackRow], names: [&str; 3]) -> String {
    let left = 230.0;
    let w = 760.0;
    let bar_w = w - left - 70.0;
    let row_h = 22.0;
    let top = 46.0;
    let h = top + rows.len() as f64 * row_h + 40.0;
    let mut s = open(id, w, h, title);
    text(
        &mut s,
        10.0,
        20.0,
        "start",
        r#"font-size="14" font-weight="600""#,
        title,
    );
    // Legend.
    let mut lx = left;
    for (i, n) in names.iter().enumerate() {
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="28" width="10" height="10" fill="{}"/>"#,
            LABEL_COLORS[i]
        );
        text(&mut s, lx + 14.0, 37.0, "start", "", n);
        lx += 110.0;
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        text(
            &mut s,
            left - 8.0,
            y + 14.0,
            "end",
            "",
            &truncate(&r.label, 34),
        );
        let mut x = left;
        for (k, p) in r.parts.iter().enumerate() {
            let bw = (p.clamp(0.0, 1.0) * bar_w).max(0.0);
            if bw > 0.0 {
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"><title>{}: {} {:.1}%</title></rect>"#,
                    y + 3.0,
                    row_h - 6.0,
                    LABEL_COLORS[k],
                    esc(&r.label),
                    names[k],
                    100.0 * p
                );
            }
            x += bw;
        }
        if r.n == 0 {
            let _ = write!(
                s,
                r##"<rect x="{left}" y="{:.1}" width="{bar_w:.1}" height="{:.1}" fill="none" stroke="#cbd5e0" stroke-dasharray="3 3"/>"##,
                y + 3.0,
                row_h - 6.0
            );
        }
        text(
            &mut s,
            left + bar_w + 6.0,
            y + 14.0,
            "start",
            r##"fill="#4a5568""##,
            &format!("n={}", r.n),
        );
    }
    // Axis.
    let ay = top + rows.len() as f64 * row_h + 4.0;
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{ay}" x2="{:.1}" y2="{ay}" stroke="#4a5568"/>"##,
        left + bar_w
    );
    for t in 0..=4 {
        let x = left + bar_w * t as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{ay}" x2="{x:.1}" y2="{:.1}" stroke="#4a5568"/>"##,
            ay + 4.0
        );
        text(&mut s, x, ay + 17.0, "middle", "", &format!("{}%", t * 25));
    }
    s.push_str("</svg>");
    s
}

/// A point with its interval.
#[derive(Debug, Clone, Copy)]
pub struct Pt {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

pub struct Series {
    pub name: String,
    pub points: Vec<Pt>,
}

/// A horizontal reference line (e.g. the baseline's rate).
pub struct RefLine {
    pub name: String,
    pub y: f64,
    pub dash: &'static str,
}

/// Lines with 95% interval bars; y in [0, 1] shown as percent. `x_ticks` labels the x values
/// (numeric axis from their min to max).
pub fn line_chart(
    id: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    refs: &[RefLine],
) -> String {
    let (w, h) = (760.0, 360.0);
    let (l, r, t, b) = (64.0, 200.0, 40.0, 50.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.x))
        .collect();
    let (mut x0, mut x1) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        });
    if !x0.is_finite() {
        x0 = 0.0;
        x1 = 1.0;
    }
    if x1 - x0 < 1e-9 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = (x1 - x0) * 0.05;
    let (x0, x1) = (x0 - pad, x1 + pad);
    let px = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| t + (1.0 - y.clamp(0.0, 1.0)) * ph;
    let mut s = open(id, w, h, title);
    text(
        &mut s,
        10.0,
        20.0,
        "start",
        r#"font-size="14" font-weight="600""#,
        title,
    );
    axes(&mut s, l, t, pw, ph, y_label);
    // x ticks at the distinct x values.
    let mut ticks = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
    for x in &ticks {
        let xx = px(*x);
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#4a5568"/>"##,
            t + ph,
            t + ph + 4.0
        );
        text(&mut s, xx, t + ph + 17.0, "middle", "", &num(*x));
    }
    text(
        &mut s,
        l + pw / 2.0,
        h - 10.0,
        "middle",
        r##"fill="#2d3748""##,
        x_label,
    );
    legend_and_refs(&mut s, series, refs, l, t, pw, &py, w - r + 14.0);
    for (i, se) in series.iter().enumerate() {
        let c = SERIES[i % SERIES.len()];
        let mut pts = se.points.clone();
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.x), py(p.y)))
            .collect();
        if path.len() > 1 {
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                path.join(" ")
            );
        }
        for p in &pts {
            interval(&mut s, px(p.x), py(p.lo), py(p.hi), c);
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{c}" stroke="#fff"><title>{}: x={} {:.1}% [{:.1}, {:.1}]</title></circle>"##,
                px(p.x),
                py(p.y),
                esc(&se.name),
                num(p.x),
                100.0 * p.y,
                100.0 * p.lo,
                100.0 * p.hi
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// Grouped vertical bars with 95% interval bars over categorical x.
pub fn grouped_bars(
    id: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<Option<Pt>>)],
    refs: &[RefLine],
) -> String {
    let (w, h) = (760.0, 360.0);
    let (l, r, t, b) = (64.0, 200.0, 40.0, 50.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let py = |y: f64| t + (1.0 - y.clamp(0.0, 1.0)) * ph;
    let mut s = open(id, w, h, title);
    text(
        &mut s,
        10.0,
        20.0,
        "start",
        r#"font-size="14" font-weight="600""#,
        title,
    );
    axes(&mut s, l, t, pw, ph, y_label);
    let nc = categories.len().max(1) as f64;
    let ns = series.len().max(1) as f64;
    let gw = pw / nc;
    let bw = (gw * 0.8 / ns).min(40.0);
    for (ci, c) in categories.iter().enumerate() {
        let gx = l + gw * ci as f64 + gw / 2.0;
        text(&mut s, gx, t + ph + 17.0, "middle", "", &truncate(c, 18));
        for (si, (name, vals)) in series.iter().enumerate() {
            let Some(p) = vals.get(ci).copied().flatten() else {
                continue;
            };
            let col = SERIES[si % SERIES.len()];
            let x = gx - bw * ns / 2.0 + bw * si as f64;
            let y = py(p.y);
            let bh = (t + ph - y).max(0.0);
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{col}" fill-opacity="0.85"><title>{} {}: {:.1}% [{:.1}, {:.1}]</title></rect>"#,
                bw - 2.0,
                esc(name),
                esc(c),
                100.0 * p.y,
                100.0 * p.lo,
                100.0 * p.hi
            );
            if bh < 1.0 {
                // A zero rate still shows as a thin mark.
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="2" fill="{col}"/>"#,
                    t + ph - 2.0,
                    bw - 2.0
                );
            }
            interval(&mut s, x + (bw - 2.0) / 2.0, py(p.lo), py(p.hi), "#1a202c");
        }
    }
    text(
        &mut s,
        l + pw / 2.0,
        h - 10.0,
        "middle",
        r##"fill="#2d3748""##,
        x_label,
    );
    let as_series: Vec<Series> = series
        .iter()
        .map(|(n, _)| Series {
            name: n.clone(),
            points: vec![],
        })
        .collect();
    legend_and_refs(&mut s, &as_series, refs, l, t, pw, &py, w - r + 14.0);
    s.push_str("</svg>");
    s
}

/// A heatmap. `values[row][col]` in `[lo, hi]`; diverging (blue-white-red) when `lo < 0`,
/// sequential white-to-blue otherwise. `cell_text` writes text in each cell.
#[allow(clippy::too_many_arguments)]
pub fn heatmap(
    id: &str,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
    lo: f64,
    hi: f64,
    cell_text: Option<&[Vec<String>]>,
    x_label: &str,
) -> String {
    let left = 220.0;
    let top = 40.0;
    let nc = cols.len().max(1) as f64;
    let cw = ((720.0 - left) / nc).clamp(14.0, 90.0);
    let ch = if cell_text.is_some() { 26.0 } else { 22.0 };
    let w = left + cw * nc + 90.0;
    let h = top + ch * rows.len() as f64 + 56.0;
    let mut s = open(id, w, h, title);
    text(
        &mut s,
        10.0,
        20.0,
        "start",
        r#"font-size="14" font-weight="600""#,
        title,
    );
    let every = ((20.0 / cw).ceil() as usize).max(1);
    for (ci, c) in cols.iter().enumerate() {
        if ci % every == 0 || cols.len() <= 30 && cw >= 20.0 {
            text(
                &mut s,
                left + cw * (ci as f64 + 0.5),
                top + ch * rows.len() as f64 + 14.0,
                "middle",
                r#"font-size="10""#,
                &truncate(c, (cw / 6.0).max(3.0) as usize),
            );
        }
    }
    text(
        &mut s,
        left + cw * nc / 2.0,
        top + ch * rows.len() as f64 + 34.0,
        "middle",
        r##"fill="#2d3748""##,
        x_label,
    );
    for (ri, r) in rows.iter().enumerate() {
        let y = top + ch * ri as f64;
        text(
            &mut s,
            left - 6.0,
            y + ch / 2.0 + 4.0,
            "end",
            "",
            &truncate(r, 34),
        );
        for (ci, c) in cols.iter().enumerate() {
            let x = left + cw * ci as f64;
            let v = values
                .get(ri)
                .and_then(|row| row.get(ci))
                .copied()
                .flatten();
            let fill = v
                .map(|v| color(v, lo, hi))
                .unwrap_or_else(|| "#edf2f7".into());
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{cw:.1}" height="{ch:.1}" fill="{fill}" stroke="#ffffff"><title>{} / {}: {}</title></rect>"##,
                esc(r),
                esc(c),
                v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
            );
            if let Some(t) = cell_text
                .and_then(|ct| ct.get(ri))
                .and_then(|row| row.get(ci))
            {
                let dark = v.is_some_and(|v| (v - lo) / (hi - lo) > 0.6);
                text(
                    &mut s,
                    x + cw / 2.0,
                    y + ch / 2.0 + 4.0,
                    "middle",
                    if dark {
                        r##"font-size="10" fill="#ffffff""##
                    } else {
                        r##"font-size="10" fill="#1a202c""##
                    },
                    t,
                );
            }
        }
    }
    // Colour bar.
    let bx = left + cw * nc + 20.0;
    let bh = (ch * rows.len() as f64).max(60.0);
    for k in 0..20 {
        let v = hi - (hi - lo) * (k as f64 + 0.5) / 20.0;
        let _ = write!(
            s,
            r#"<rect x="{bx:.1}" y="{:.1}" width="14" height="{:.2}" fill="{}"/>"#,
            top + bh * k as f64 / 20.0,
            bh / 20.0 + 0.5,
            color(v, lo, hi)
        );
    }
    text(
        &mut s,
        bx + 18.0,
        top + 9.0,
        "start",
        r#"font-size="10""#,
        &num(hi),
    );
    text(
        &mut s,
        bx + 18.0,
        top + bh,
        "start",
        r#"font-size="10""#,
        &num(lo),
    );
    s.push_str("</svg>");
    s
}

/// Colour of `v` on the scale `[lo, hi]`.
pub fn color(v: f64, lo: f64, hi: f64) -> String {
    let mix = |a: [f64; 3], b: [f64; 3], t: f64| -> String {
        let t = t.clamp(0.0, 1.0);
        format!(
            "#{:02x}{:02x}{:02x}",
            (a[0] + (b[0] - a[0]) * t).round() as u8,
            (a[1] + (b[1] - a[1]) * t).round() as u8,
            (a[2] + (b[2] - a[2]) * t).round() as u8
        )
    };
    let white = [255.0, 255.0, 255.0];
    let blue = [33.0, 102.0, 172.0];
    let red = [178.0, 24.0, 43.0];
    if lo < 0.0 {
        let m = hi.abs().max(lo.abs());
        if v >= 0.0 {
            mix(white, red, v / m)
        } else {
            mix(white, blue, -v / m)
        }
    } else {
        mix(white, blue, (v - lo) / (hi - lo).max(1e-12))
    }
}

fn num(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.2}")
    }
}

fn axes(s: &mut String, l: f64, t: f64, pw: f64, ph: f64, y_label: &str) {
    for k in 0..=4 {
        let y = t + ph * (1.0 - k as f64 / 4.0);
        let _ = write!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e2e8f0"/>"##,
            l + pw
        );
        text(s, l - 6.0, y + 4.0, "end", "", &format!("{}%", k * 25));
    }
    let _ = write!(
        s,
        r##"<line x1="{l}" y1="{t}" x2="{l}" y2="{:.1}" stroke="#4a5568"/><line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#4a5568"/>"##,
        t + ph,
        t + ph,
        l + pw,
        t + ph
    );
    let _ = write!(
        s,
        r##"<text x="14" y="{:.1}" text-anchor="middle" transform="rotate(-90 14 {:.1})" fill="#2d3748">{}</text>"##,
        t + ph / 2.0,
        t + ph / 2.0,
        esc(y_label)
    );
}

fn interval(s: &mut String, x: f64, ylo: f64, yhi: f64, c: &str) {
    let _ = write!(
        s,
        r#"<line x1="{x:.1}" y1="{ylo:.1}" x2="{x:.1}" y2="{yhi:.1}" stroke="{c}" stroke-width="1.2"/><line x1="{:.1}" y1="{ylo:.1}" x2="{:.1}" y2="{ylo:.1}" stroke="{c}"/><line x1="{:.1}" y1="{yhi:.1}" x2="{:.1}" y2="{yhi:.1}" stroke="{c}"/>"#,
        x - 3.0,
        x + 3.0,
        x - 3.0,
        x + 3.0
    );
}

#[allow(clippy::too_many_arguments)]
fn legend_and_refs(
    s: &mut String,
    series: &[Series],
    refs: &[RefLine],
    l: f64,
    t: f64,
    pw: f64,
    py: &dyn Fn(f64) -> f64,
    lx: f64,
) {
    let mut ly = t + 6.0;
    for (i, se) in series.iter().enumerate() {
        let c = SERIES[i % SERIES.len()];
        let _ = write!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{c}"/>"#,
            ly - 9.0
        );
        text(s, lx + 17.0, ly + 1.0, "start", "", &truncate(&se.name, 26));
        ly += 18.0;
    }
    for rl in refs {
        let y = py(rl.y);
        let _ = write!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#4a5568" stroke-dasharray="{}"><title>{}: {:.1}%</title></line>"##,
            l + pw,
            rl.dash,
            esc(&rl.name),
            100.0 * rl.y
        );
        let _ = write!(
            s,
            r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#4a5568" stroke-dasharray="{}"/>"##,
            ly - 3.0,
            lx + 12.0,
            ly - 3.0,
            rl.dash
        );
        text(
            s,
            lx + 17.0,
            ly + 1.0,
            "start",
            "",
            &truncate(&format!("{} ({:.0}%)", rl.name, 100.0 * rl.y), 28),
        );
        ly += 18.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let s = stacked_bars(
            "x",
            "t<&>",
            &[StackRow {
                label: "a".into(),
                parts: [0.5, 0.25, 0.25],
                n: 4,
            }],
            ["refusal", "bypass", "degenerate"],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("t&lt;&amp;&gt;"));
        assert_eq!(s.matches("<rect").count(), 1 + 3 + 3);
        assert_eq!(color(0.0, -1.0, 1.0), "#ffffff");
        assert_eq!(color(1.0, 0.0, 1.0), "#2166ac");
    }
}
