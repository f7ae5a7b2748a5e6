//! Geometry of directions: norms, cosines between directions at each layer (is the compliant persona
//! direction aligned with refusal? more than a random control?), and how a direction turns from
//! layer to layer.
//!
//! For reference, two independent random directions in `d` dimensions have `|cos|` of about
//! `sqrt(2 / (pi d))` (0.027 at d = 896), the floor against which an alignment is read.

use serde::Serialize;

use super::set::DirectionSet;
pub use super::util::cosine;
use crate::{Error, Result};

/// Expected `|cos|` between two independent random directions in `d` dimensions.
pub fn random_abs_cos(d: usize) -> f64 {
    (2.0 / (std::f64::consts::PI * d.max(1) as f64)).sqrt()
}

/// Cosine between two sets at every layer.
#[derive(Debug, Clone, Serialize)]
pub struct PairCosines {
    pub a: String,
    pub b: String,
    pub cos: Vec<Option<f64>>,
}

/// Everything `pgate geometry` reports.
#[derive(Debug, Clone, Serialize)]
pub struct GeometryReport {
    pub names: Vec<String>,
    pub n_layers: usize,
    pub d_model: usize,
    /// Expected |cos| of random directions at this width.
    pub random_abs_cos: f64,
    /// `norms[set][layer]`.
    pub norms: Vec<Vec<f64>>,
    /// Every pair of sets, layer by layer.
    pub pairs: Vec<PairCosines>,
    /// `adjacent[set][l]` = cos(v_l, v_{l+1}).
    pub adjacent: Vec<Vec<Option<f64>>>,
    /// `across_layers[set][l][m]` = cos(v_l, v_m) (when asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub across_layers: Option<Vec<Vec<Vec<Option<f64>>>>>,
}

/// The flags of `pgate geometry`: the direction files, and where the table and report also go.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct GeometryFlags {
    /// Direction files (.safetensors) from the same model.
    #[cfg_attr(feature = "cli", arg(required = true))]
    pub files: Vec<std::path::PathBuf>,
    /// Write the long-form table (kind,a,b,layer_a,layer_b,value) here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub csv: Option<std::path::PathBuf>,
    /// Write the report as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: Option<std::path::PathBuf>,
    /// Also compare each direction across all pairs of layers.
    #[cfg_attr(feature = "cli", arg(long))]
    pub all_layers: bool,
}

impl GeometryFlags {
    /// The report over the files.
    pub fn report(&self) -> Result<GeometryReport> {
        let sets = self
            .files
            .iter()
            .map(|p| DirectionSet::load(p))
            .collect::<Result<Vec<_>>>()?;
        GeometryReport::new(&sets.iter().collect::<Vec<_>>(), self.all_layers)
    }

    /// Write `report` to the `--csv` and `--json` files that are given (after the table is
    /// printed, so a bad path loses nothing shown).
    pub fn write_files(&self, report: &GeometryReport) -> Result<()> {
        let write = |p: &std::path::Path, text: String| {
            std::fs::write(p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))
        };
        if let Some(p) = &self.csv {
            write(p, report.to_csv())?;
        }
        if let Some(p) = &self.json {
            write(p, serde_json::to_string_pretty(report)?)?;
        }
        Ok(())
    }
}

impl GeometryReport {
    /// Compare `sets` (same number of layers and width). `all_layers` adds each set's full
    /// layer-by-layer cosine matrix.
    pub fn new(sets: &[&DirectionSet], all_layers: bool) -> Result<Self> {
        let first = sets
            .first()
            .ok_or_else(|| Error::Empty("no directions to compare".into()))?;
        let (n, d) = (first.n_layers(), first.d_model());
        for s in sets {
            if s.n_layers() != n || s.d_model() != d {
                return Err(Error::InvalidValue(format!(
                    "'{}' is {} layers x {} but '{}' is {n} layers x {d}: directions from different models cannot be compared",
                    s.name(),
                    s.n_layers(),
                    s.d_model(),
                    first.name()
                )));
            }
        }
        let mut names: Vec<String> = Vec::with_capacity(sets.len());
        for s in sets {
            let mut name = s.name().to_string();
            let mut k = 2;
            while names.contains(&name) {
                name = format!("{}#{k}", s.name());
                k += 1;
            }
            names.push(name);
        }
        let mut pairs = Vec::new();
        for i in 0..sets.len() {
            for j in i + 1..sets.len() {
                pairs.push(PairCosines {
                    a: names[i].clone(),
                    b: names[j].clone(),
                    cos: sets[i].cosines(sets[j])?,
                });
            }
        }
        let rows = |s: &DirectionSet| -> Vec<Vec<f32>> { s.rows().map(|r| r.to_vec()).collect() };
        let adjacent = sets
            .iter()
            .map(|s| {
                let r = rows(s);
                r.windows(2).map(|w| cosine(&w[0], &w[1])).collect()
            })
            .collect();
        let across_layers = all_layers.then(|| {
            sets.iter()
                .map(|s| {
                    let r = rows(s);
                    r.iter()
                        .map(|a| r.iter().map(|b| cosine(a, b)).collect())
                        .collect()
                })
                .collect()
        });
        Ok(Self {
            names,
            n_layers: n,
            d_model: d,
            random_abs_cos: random_abs_cos(d),
            norms: sets.iter().map(|s| s.norms()).collect(),
            pairs,
            adjacent,
            across_layers,
        })
    }

    /// A terminal table: one row per layer with each set's norm, each pair's cosine, and each
    /// set's cosine with its next layer.
    pub fn to_table(&self) -> String {
        let mut cols: Vec<(String, Vec<String>)> = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            cols.push((
                format!("|{n}|"),
                self.norms[i].iter().map(|x| format!("{x:.3}")).collect(),
            ));
        }
        for p in &self.pairs {
            cols.push((
                format!("cos({},{})", p.a, p.b),
                p.cos.iter().map(fmt_cos).collect(),
            ));
        }
        for (i, n) in self.names.iter().enumerate() {
            let mut v: Vec<String> = self.adjacent[i].iter().map(fmt_cos).collect();
            v.push("-".into());
            cols.push((format!("{n}:l~l+1"), v));
        }
        let mut out = String::new();
        let widths: Vec<usize> = cols
            .iter()
            .map(|(h, v)| {
                v.iter()
                    .map(|s| s.len())
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        out.push_str(&format!("{:>5}", "layer"));
        for ((h, _), w) in cols.iter().zip(&widths) {
            out.push_str(&format!("  {h:>w$}"));
        }
        out.push('\n');
        for l in 0..self.n_layers {
            out.push_str(&format!("{l:>5}"));
            for ((_, v), w) in cols.iter().zip(&widths) {
                out.push_str(&format!("  {:>w$}", v[l]));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "width {}: random directions have |cos| ~ {:.3}\n",
            self.d_model, self.random_abs_cos
        ));
        if let Some(m) = &self.across_layers {
            for (i, n) in self.names.iter().enumerate() {
                out.push_str(&format!("\ncos({n}[l], {n}[m])\n{:>5}", "l\\m"));
                for l in 0..self.n_layers {
                    out.push_str(&format!(" {l:>5}"));
                }
                out.push('\n');
                for (l, row) in m[i].iter().enumerate() {
                    out.push_str(&format!("{l:>5}"));
                    for c in row {
                        out.push_str(&format!(
                            " {:>5}",
                            c.map(|x| format!("{x:.2}")).unwrap_or("-".into())
                        ));
                    }
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Long-form CSV: `kind,a,b,layer_a,layer_b,value` with kinds `norm`, `cos` (between sets at
    /// one layer), `adjacent` and `across` (one set across layers). Empty value = undefined (zero
    /// vector).
    pub fn to_csv(&self) -> String {
        let mut out = String::from("kind,a,b,layer_a,layer_b,value\n");
        let v = |x: Option<f64>| x.map(|x| format!("{x:.6}")).unwrap_or_default();
        for (i, n) in self.names.iter().enumerate() {
            for (l, x) in self.norms[i].iter().enumerate() {
                out.push_str(&format!("norm,{},,{l},{l},{x:.6}\n", csv_field(n)));
            }
        }
        for p in &self.pairs {
            for (l, c) in p.cos.iter().enumerate() {
                out.push_str(&format!(
                    "cos,{},{},{l},{l},{}\n",
                    csv_field(&p.a),
                    csv_field(&p.b),
                    v(*c)
                ));
            }
        }
        for (i, n) in self.names.iter().enumerate() {
            for (l, c) in self.adjacent[i].iter().enumerate() {
                let n = csv_field(n);
                out.push_str(&format!("adjacent,{n},{n},{l},{},{}\n", l + 1, v(*c)));
            }
        }
        if let Some(m) = &self.across_layers {
            for (i, n) in self.names.iter().enumerate() {
                for (l, row) in m[i].iter().enumerate() {
                    for (k, c) in row.iter().enumerate() {
                        let n = csv_field(n);
                        out.push_str(&format!("across,{n},{n},{l},{k},{}\n", v(*c)));
                    }
                }
            }
        }
        out
    }
}

fn fmt_cos(c: &Option<f64>) -> String {
    // No "-0.000": a cosine that rounds to zero prints as +0.000.
    c.map(|x| format!("{:+.3}", if x.abs() < 5e-4 { 0.0 } else { x }))
        .unwrap_or_else(|| "-".into())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
